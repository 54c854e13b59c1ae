"""TSV-M, Iso-C and Iso-CTS through FusionBench's own functions, for many merges in one process.

    python fusionbench_batch.py JOBS.json FAILURES.json THREADS

Each job: {"method": tsvm | iso_c | iso_cts, "base", "experts", "alpha", "common_fraction", "dtype", "out"}. It loads
the safetensors in job["dtype"], builds the task vectors (expert - base), calls FusionBench's function on CPU and
saves base + alpha * merged (FusionBench's TSVM / IsoC / IsoCTS algorithms apply a single alpha after the merge).
FAILURES.json gets {output directory: traceback} for the jobs that raised. Run by the fusion-bench venv's python
(compare_fusionbench.py).
"""

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from safetensors.torch import load_file, save_file

_loaded = {}  # the jobs share their inputs: each checkpoint is read once per dtype


def load(directory: str, dtype: str) -> dict:
    if (directory, dtype) not in _loaded:
        tensors = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        _loaded[directory, dtype] = {name: t.to(getattr(torch, dtype)) for name, t in tensors.items()}
    return _loaded[directory, dtype]


def merged_task_vector(job: dict, task_vectors: list) -> dict:
    if job["method"] == "tsvm":
        return compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    if job["method"] == "iso_c":
        return iso_c(task_vectors, accelerator="cpu")
    if job["method"] == "iso_cts":
        return iso_cts(task_vectors, common_space_fraction=job["common_fraction"], accelerator="cpu")
    raise ValueError(job["method"])


def run(job: dict) -> None:
    base = load(job["base"], job["dtype"])
    experts = [load(path, job["dtype"]) for path in job["experts"]]
    task_vectors = [{name: expert[name] - base[name] for name in base} for expert in experts]
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per tensor
        merged = merged_task_vector(job, task_vectors)
    out = {name: (base[name] + job["alpha"] * merged[name]).contiguous() for name in base}
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(job["out"]) / "model.safetensors"), metadata={"format": "pt"})


def run_all(jobs: list) -> dict:
    failures = {}
    for job in jobs:
        try:
            run(job)
        except BaseException:  # however a merge fails, it is reported and the next one runs
            failures[job["out"]] = traceback.format_exc(limit=4)
    return failures


if __name__ == "__main__":
    job_file, failure_file, threads = sys.argv[1:4]
    torch.set_num_threads(int(threads))
    Path(failure_file).write_text(json.dumps(run_all(json.loads(Path(job_file).read_text()))))
