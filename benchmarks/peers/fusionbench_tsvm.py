"""One TSV-M, Iso-C or Iso-CTS merge through FusionBench, holding the models as FusionBench does: the speed
benchmark's peer run of the spectral methods.

    python fusionbench_tsvm.py JOB.json

JOB.json: {"method": tsvm | iso_c | iso_cts, "base", "experts", "alpha", "common_fraction", "out", "exclude"}.
Loads base and experts as whole float32 state dicts, builds the task vectors (as FusionBench's TSVM, IsoC and
IsoCTS algorithms do: the base and every task vector in memory at once), calls the method's function on CPU
(`compute_and_sum_svd_mem_reduction`, `iso_c` or `iso_cts`, with exclude_keys) and saves base + alpha * merged in
bfloat16. Run by the fusion-bench venv's python (bench_speed.py), which times it and records its peak memory.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from safetensors.torch import load_file, save_file


def load_float32(directory: str) -> dict:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return {name: t.float() for name, t in tensors.items()}


def task_vectors(base: dict, experts: list[str]) -> list[dict]:
    """expert - base for each expert, one expert in memory at a time beside the task vectors."""
    out = []
    for path in experts:
        expert = load_float32(path)
        out.append({name: expert[name] - base[name] for name in base})
        del expert
    return out


def merged_task_vector(job: dict, vectors: list[dict]) -> dict:
    exclude = job["exclude"] or None
    if job["method"] == "tsvm":
        return compute_and_sum_svd_mem_reduction(vectors, exclude_keys=exclude, accelerator="cpu")
    if job["method"] == "iso_c":
        return iso_c(vectors, accelerator="cpu", exclude_keys=exclude)
    if job["method"] == "iso_cts":
        return iso_cts(vectors, common_space_fraction=job["common_fraction"], accelerator="cpu", exclude_keys=exclude)
    raise ValueError(job["method"])


def main(job: dict) -> None:
    base = load_float32(job["base"])
    vectors = task_vectors(base, job["experts"])
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per tensor
        merged = merged_task_vector(job, vectors)
    out = {name: (base[name] + job["alpha"] * merged[name]).to(torch.bfloat16).contiguous() for name in base}
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(job["out"]) / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
