"""Parity with FusionBench 0.2.33: TSV-M, Iso-C and Iso-CTS on the same checkpoints, every tensor compared.

    python benchmarks/compare_fusionbench.py [--venv ~/.cache/distmerge/peers/fusion-bench-0.2.33] [--work DIR]
                                             [--sizes 64x176x4x2x256,...] [--tasks 2,3,4] [--tol 1e-5] [--ratio 2]

1. Creates (if missing) a scratch virtual environment outside the repository and installs `torch==2.13.0
   fusion-bench==0.2.33` into it (torch pinned exactly: the CPU wheel on disk, not a multi-GB CUDA build). If
   that install fails, it falls back to `fusion-bench --no-deps` plus the packages that importing the two modules
   used here needs (peers.FUSIONBENCH.minimal_deps, found by trying).
2. Writes float32 Llama-shaped families (`distmerge.synthetic.make_family`, a base and 4 experts, 2 layers) in a
   few sizes; every size has non-square matrices (k/v projections, MLP, embeddings, lm_head). T = 2, 3, 4 use the
   first T experts.
3. FusionBench side: a driver, written to the work directory and run by the scratch venv's python, loads the
   safetensors, builds task vectors (expert - base), calls FusionBench's own functions by import on CPU
   (`TSVM_utils.compute_and_sum_svd_mem_reduction`, `iso_utils.iso_c`, `iso_utils.iso_cts`), and saves
   base + alpha * merged, as FusionBench's TSVM / IsoC / IsoCTS algorithms do with a single alpha. It runs once in
   float32 (the reference) and once in float64 (an "exact" yardstick that shows float32 round-off on both sides).
   distmerge side: `distmerge merge CFG -o OUT --quiet --threads N` with `svd: exact` and `polar: gram`, then
   `polar: svd` (by default all configs in one process through the click entry point of the console script,
   start-up costs several seconds a process here; `--one-process-per-merge` runs the console script itself).
4. Compares every tensor: max abs difference, and ||distmerge - FusionBench||_F / ||FusionBench - base||_F (the
   difference relative to the size of the merged task vector, the meaningful scale). A tensor is `equal` within
   --tol (default 1e-5); beyond it, it is `round-off` when distmerge is no farther from the float64 result than
   --ratio (default 2) times FusionBench's own float32 result is, else a MISMATCH. (Truncated SVDs in float32
   carry round-off of a few 1e-5 of the task vector on these inputs: FusionBench's float32 result is that far
   from its float64 one, so a bare 1e-5 would fail the reference against itself in another precision.)
5. Writes benchmarks/results/fusionbench_parity.md and exits 1 on a mismatch (or a failed merge).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import FUSIONBENCH, ensure_peer_venv, package_versions
from provenance import git_revision, machine_summary

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fusionbench_parity.md"
DEFAULT_VENV = FUSIONBENCH.default_venv
DEFAULT_WORK = Path.home() / ".cache" / "distmerge" / "fusionbench-parity"
METHODS = ("tsvm", "iso_c", "iso_cts")
POLARS = ("gram", "svd")
DEFAULT_SIZES = "64x176x4x2x256,132x344x4x2x200,192x512x6x2x320"
FLOAT32_EPS = torch.finfo(torch.float32).eps


def log(message: str) -> None:
    print(f"[compare_fusionbench] {message}", file=sys.stderr, flush=True)


# ---- inputs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A Llama shape: hidden x intermediate x heads x kv_heads x vocab (2 layers)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def parse(cls, text: str) -> Size:
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) != 5:
            raise SystemExit(f"--sizes entry {text!r}: want HIDDENxINTERMEDIATExHEADSxKV_HEADSxVOCAB")
        return cls(*parts)

    @property
    def label(self) -> str:
        return f"h{self.hidden}"

    def config(self, layers: int) -> dict:
        from distmerge.architecture import llama_config

        return llama_config(hidden=self.hidden, intermediate=self.intermediate, layers=layers, heads=self.heads,
                            kv_heads=self.kv_heads, vocab=self.vocab)


@dataclass(frozen=True)
class Case:
    """One merge: a method on the first `tasks` experts of a size's family."""

    size: Size
    method: str
    tasks: int

    @property
    def slug(self) -> str:
        return f"{self.size.label}-{self.method}-T{self.tasks}"


def make_families(work: Path, sizes: list[Size], n_experts: int, layers: int) -> dict[Size, dict]:
    """One float32 family per size under work/inputs (reused when its files are already there)."""
    from distmerge.synthetic import make_family

    families = {}
    for size in sizes:
        root = work / "inputs" / size.label
        stamp = root / "size.json"
        wanted = json.dumps({"size": size.__dict__, "experts": n_experts, "layers": layers})
        if not (stamp.exists() and stamp.read_text() == wanted):
            shutil.rmtree(root, ignore_errors=True)
            make_family(root, n_experts=n_experts, config=size.config(layers), dtype=torch.float32,
                        shard_size=None, seed=0)
            stamp.write_text(wanted)
        families[size] = {"base": root / "base", "experts": [root / f"expert{i + 1}" for i in range(n_experts)]}
    return families


def load_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# ---- the FusionBench side ----------------------------------------------------------------------------------------

# Runs in the scratch venv. Each job: load the checkpoints, task vectors in job["dtype"], FusionBench's function on
# CPU, base + alpha * merged (FusionBench's algorithms apply a single alpha after the merge), save.
FUSIONBENCH_DRIVER = '''
"""FusionBench side of distmerge's benchmarks/compare_fusionbench.py (generated; safe to delete)."""
import contextlib, io, json, sys, traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts

_cache = {}


def load(directory, dtype):
    key = (directory, dtype)
    if key not in _cache:
        tensors = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        _cache[key] = {name: t.to(getattr(torch, dtype)) for name, t in tensors.items()}
    return _cache[key]


def merged_task_vector(job, task_vectors):
    if job["method"] == "tsvm":
        return compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    if job["method"] == "iso_c":
        return iso_c(task_vectors, accelerator="cpu")
    if job["method"] == "iso_cts":
        return iso_cts(task_vectors, common_space_fraction=job["common_fraction"], accelerator="cpu")
    raise ValueError(job["method"])


def run(job):
    base = load(job["base"], job["dtype"])
    experts = [load(path, job["dtype"]) for path in job["experts"]]
    task_vectors = [{name: expert[name] - base[name] for name in base} for expert in experts]
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per tensor
        merged = merged_task_vector(job, task_vectors)
    out = {name: (base[name] + job["alpha"] * merged[name]).contiguous() for name in base}
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(job["out"]) / "model.safetensors"), metadata={"format": "pt"})


def main():
    jobs, failure_file, threads = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    failures = {}
    for job in jobs:
        try:
            run(job)
        except BaseException:
            failures[job["out"]] = traceback.format_exc(limit=4)
    json.dump(failures, open(failure_file, "w"))


main()
'''

# Runs in this venv: every (config, out) through distmerge's click command, in one process.
DISTMERGE_DRIVER = """
import json, sys, traceback
from distmerge.cli import cli
failures = {}
jobs, failure_file, threads = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
for cfg, out in jobs:
    try:
        cli.main(["merge", cfg, "-o", out, "--quiet", "--force", "--threads", threads], standalone_mode=False)
    except BaseException:
        failures[out] = traceback.format_exc(limit=4)
json.dump(failures, open(failure_file, "w"))
"""


def fusionbench_jobs(cases: list[Case], families: dict, outputs: dict, alpha: float, common_fraction: float):
    jobs = []
    for case in cases:
        family = families[case.size]
        for precision in ("float32", "float64"):
            jobs.append({"method": case.method, "base": str(family["base"]),
                         "experts": [str(p) for p in family["experts"][:case.tasks]], "alpha": alpha,
                         "common_fraction": common_fraction, "dtype": precision,
                         "out": str(outputs[f"fusionbench-{precision}"][case])})
    return jobs


def distmerge_config(case: Case, family: dict, polar: str, alpha: float, common_fraction: float) -> dict:
    parameters = {"alpha": alpha, "polar": polar}
    if case.method != "iso_c":  # iso_c has no per-task SVDs (and so no `svd` parameter)
        parameters["svd"] = "exact"
    if case.method == "iso_cts":
        parameters["common_fraction"] = common_fraction
    return {"merge_method": case.method, "base_model": str(family["base"]),
            "models": [{"model": str(p)} for p in family["experts"][:case.tasks]],
            "parameters": parameters, "dtype": "float32"}


def distmerge_jobs(cases, families, outputs, work: Path, alpha: float, common_fraction: float):
    jobs = []
    for polar in POLARS:
        for case in cases:
            cfg = work / "configs" / f"{case.slug}-polar-{polar}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(yaml.safe_dump(distmerge_config(case, families[case.size], polar, alpha, common_fraction),
                                          sort_keys=False))
            jobs.append((cfg, outputs[f"distmerge-{polar}"][case]))
    return jobs


def start_driver(python: Path, driver: str, jobs: list, work: Path, tool: str, threads: int):
    """Launch one driver process over a job list; returns (process, failure file, log file)."""
    job_file, failure_file, log_file = (work / f"{tool}_{kind}" for kind in ("jobs.json", "failures.json", "log.txt"))
    job_file.write_text(json.dumps(jobs, default=str))
    failure_file.unlink(missing_ok=True)
    script = work / f"{tool}_driver.py"
    script.write_text(driver)
    with open(log_file, "w") as log_stream:
        process = subprocess.Popen([str(python), str(script), str(job_file), str(failure_file), str(threads)],
                                   stdout=log_stream, stderr=subprocess.STDOUT, cwd=work)
    return process, failure_file, log_file


def run_one_process_each(jobs, threads: int) -> dict[str, str]:
    failures = {}
    for cfg, out in jobs:
        command = [str(Path(sys.executable).parent / "distmerge"), "merge", str(cfg), "-o", str(out), "--quiet",
                   "--force", "--threads", str(threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            failures[str(out)] = result.stderr[-2000:]
    return failures


def finish_driver(tool: str, process, failure_file: Path, log_file: Path) -> dict[str, str]:
    process.wait()
    if process.returncode != 0 or not failure_file.exists():
        raise SystemExit(f"{tool} driver crashed (exit {process.returncode}):\n{log_file.read_text()[-4000:]}")
    return json.loads(failure_file.read_text())


def run_both(peer_python, cases, families, outputs, work, args) -> dict[str, str]:
    """Both tools at once (one process each; --threads each); returns {output dir: error} for failed merges."""
    start = time.perf_counter()
    for by_case in outputs.values():
        for out in by_case.values():
            shutil.rmtree(out, ignore_errors=True)
    fb = start_driver(peer_python, FUSIONBENCH_DRIVER,
                      fusionbench_jobs(cases, families, outputs, args.alpha, args.common_fraction), work,
                      "fusionbench", args.threads)
    dm_jobs = distmerge_jobs(cases, families, outputs, work, args.alpha, args.common_fraction)
    if args.one_process_per_merge:
        failures = run_one_process_each(dm_jobs, args.threads)
    else:
        dm = start_driver(Path(sys.executable), DISTMERGE_DRIVER, [[str(c), str(o)] for c, o in dm_jobs], work,
                          "distmerge", args.threads)
        failures = finish_driver("distmerge", *dm)
    log(f"distmerge: {len(dm_jobs)} merges done ({time.perf_counter() - start:.0f} s)")
    failures.update(finish_driver("fusionbench", *fb))
    log(f"FusionBench: {2 * len(cases)} merges done ({time.perf_counter() - start:.0f} s)")
    return failures


# ---- comparing outputs -----------------------------------------------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||a - b||_F / scale (0 when both are equal, inf when the scale is 0 and they are not)."""
    diff = float(torch.linalg.vector_norm(a - b))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


@dataclass
class TensorResult:
    name: str
    shape: tuple[int, ...]
    max_abs: float  # max |distmerge - FusionBench|
    rel: float  # ||distmerge - FusionBench|| / ||FusionBench - base||
    rel_exact: float  # ||distmerge - FusionBench float64|| / ||FusionBench float64 - base||
    fb_rel_exact: float  # ||FusionBench - FusionBench float64|| / ||FusionBench float64 - base||
    from_average: float  # ||FusionBench - (b + alpha mean d)|| / ||FusionBench - base||: 0 when averaged

    def verdict(self, tol: Tolerance) -> str:
        if self.rel <= tol.rel:
            return "equal"
        return "round-off" if self.rel_exact <= tol.ratio * self.fb_rel_exact else "MISMATCH"


@dataclass(frozen=True)
class Tolerance:
    """A tensor passes when it is within `rel` of FusionBench's float32 result ("equal"), or when it is no farther
    from exact (float64) arithmetic than `ratio` times FusionBench's own float32 result is ("round-off")."""

    rel: float
    ratio: float


@dataclass
class CaseResult:
    case: Case
    polar: str
    error: str | None = None
    tensors: list[TensorResult] = field(default_factory=list)
    condition: float = float("nan")  # of the matrices orthogonalised for the worst tensor

    def worst(self, key: str = "rel") -> TensorResult | None:
        return max(self.tensors, key=lambda t: getattr(t, key), default=None)

    def top(self, key: str) -> float:
        worst = self.worst(key)
        return getattr(worst, key) if worst else float("nan")

    def verdict(self, tol: Tolerance) -> str:
        """equal, round-off or MISMATCH (the worst over tensors), or error."""
        if self.error or not self.tensors:
            return "error"
        verdicts = {t.verdict(tol) for t in self.tensors}
        return next(v for v in ("MISMATCH", "round-off", "equal") if v in verdicts)

    def passes(self, tol: Tolerance) -> bool:
        return self.verdict(tol) in ("equal", "round-off")

    def beyond(self, tol: Tolerance) -> int:
        """How many tensors are farther than tol.rel from FusionBench."""
        return sum(t.rel > tol.rel for t in self.tensors)


def compare_case(case: Case, polar: str, family: dict, dirs: dict[str, Path], alpha: float) -> CaseResult:
    """distmerge's output for `polar` against FusionBench's float32 output, tensor by tensor, in float64."""
    ours, theirs, exact = (load_checkpoint(dirs[k]) for k in (f"distmerge-{polar}", "fusionbench-float32",
                                                              "fusionbench-float64"))
    base = load_checkpoint(family["base"])
    experts = [load_checkpoint(p) for p in family["experts"][:case.tasks]]
    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))
        return CaseResult(case, polar, error=f"tensor names differ, e.g. {only[0]}")
    result = CaseResult(case, polar)
    for name in sorted(theirs):
        if ours[name].dtype != torch.float32 or ours[name].shape != theirs[name].shape:
            return CaseResult(case, polar, error=f"{name}: distmerge wrote {ours[name].dtype} "
                                                 f"{tuple(ours[name].shape)}, FusionBench {tuple(theirs[name].shape)}")
        b, a, t, x = (d[name].double() for d in (base, ours, theirs, exact))
        average = b + alpha * torch.stack([e[name].double() - b for e in experts]).mean(0)
        scale, exact_scale = float(torch.linalg.vector_norm(t - b)), float(torch.linalg.vector_norm(x - b))
        result.tensors.append(TensorResult(
            name, tuple(theirs[name].shape), float((a - t).abs().max()), relative(a, t, scale),
            relative(a, x, exact_scale), relative(t, x, exact_scale), relative(t, average, scale)))
    return result


def rank_corner_cases(families: dict, tasks: list[int]) -> list[str]:
    """(shape, T) where FusionBench's k = int(r * (1 / T)) differs from distmerge's r // T."""
    hits = []
    for family in families.values():
        for name, tensor in load_checkpoint(family["base"]).items():
            if tensor.dim() == 2:
                r = min(tensor.shape)
                hits += [f"{name} {tuple(tensor.shape)} T={T}" for T in tasks if int(r * (1 / T)) != r // T]
    return hits


def orthogonalised(method: str, deltas: torch.Tensor, common_fraction: float) -> list[torch.Tensor]:
    """The matrices whose polar factor the method takes, per METHODS.md (float64): tsvm and iso_cts orthogonalise
    the stacked leading singular vectors, iso_c the summed task vector."""
    n_tasks, rank = deltas.shape[0], min(deltas.shape[1:])
    if method == "iso_c":
        return [deltas.sum(0)]
    blocks = []
    if method == "iso_cts":
        common = int(rank * common_fraction)
        common = rank - round((rank - common) / n_tasks) * n_tasks
        U, _, Vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
        shared = U[:, :common]
        blocks.append((shared, Vh[:common].mT))
        deltas = deltas - shared @ (shared.mT @ deltas)
        per_task = (rank - common) // n_tasks
    else:
        per_task = rank // n_tasks
    for delta in deltas:
        U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
        blocks.append((U[:, :per_task], Vh[:per_task].mT))
    return [torch.cat([u for u, _ in blocks], 1), torch.cat([v for _, v in blocks], 1)]


def condition_number(case: Case, family: dict, name: str, common_fraction: float) -> float:
    """The largest sigma_max / sigma_min over the matrices `case.method` orthogonalises for tensor `name`."""
    base = load_checkpoint(family["base"])[name]
    if base.dim() != 2:
        return float("nan")
    deltas = torch.stack([(load_checkpoint(p)[name] - base).double() for p in family["experts"][:case.tasks]])
    worst = 0.0
    for matrix in orthogonalised(case.method, deltas, common_fraction):
        singular_values = torch.linalg.svdvals(matrix)
        worst = max(worst, float(singular_values[0] / singular_values[-1]))
    return worst


def tensor_kind(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


# ---- the report --------------------------------------------------------------------------------------------------





def summary_table(results: list[CaseResult], tol: Tolerance) -> list[str]:
    lines = [("| method | T | polar | size | tensors | max abs diff | max rel diff | worst tensor | "
             f"tensors > {tol.rel:g} | distmerge vs float64 | FusionBench vs float64 | cond | verdict |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.case
        if r.error:
            lines.append(f"| {c.method} | {c.tasks} | {r.polar} | {c.size.label} | | | | {r.error[:100]} | | | | | "
                         "error |")
            continue
        worst = r.worst("rel")
        lines.append(f"| {c.method} | {c.tasks} | {r.polar} | {c.size.label} | {len(r.tensors)} | "
                     f"{r.top('max_abs'):.2e} | {r.top('rel'):.2e} | {worst.name} {worst.shape} | {r.beyond(tol)} | "
                     f"{r.top('rel_exact'):.2e} | {r.top('fb_rel_exact'):.2e} | {r.condition:.1e} | {r.verdict(tol)} |")
    return lines


def compact_table(results: list[CaseResult], tol: Tolerance) -> list[str]:
    """method x T rows, one column per polar: the largest relative difference over sizes and tensors."""
    lines = ["| method | T | " + " | ".join(f"polar: {p}" for p in POLARS) + " |", "|---|---|" + "---|" * len(POLARS)]
    keys = list(dict.fromkeys((r.case.method, r.case.tasks) for r in results))
    for method, tasks in keys:
        cells = []
        for polar in POLARS:
            group = [r for r in results if (r.case.method, r.case.tasks, r.polar) == (method, tasks, polar)]
            if any(r.error for r in group):
                cells.append("error")
                continue
            rel = max(r.top("rel") for r in group)
            max_abs = max(r.top("max_abs") for r in group)
            worst = next(v for v in ("MISMATCH", "round-off", "equal") if v in {r.verdict(tol) for r in group})
            cells.append(f"{rel:.1e} rel, {max_abs:.1e} abs ({worst})")
        lines.append(f"| {method} | {tasks} | " + " | ".join(cells) + " |")
    return lines


def kind_table(results: list[CaseResult]) -> list[str]:
    """Per tensor kind: shapes, whether FusionBench SVD-merged it, and the worst difference per polar."""
    kinds: dict[str, dict] = {}
    for r in results:
        for t in r.tensors:
            entry = kinds.setdefault(tensor_kind(t.name), {"shapes": set(), "from_average": float("inf")})
            entry["shapes"].add(t.shape)
            entry["from_average"] = min(entry["from_average"], t.from_average)
            entry[r.polar] = max(entry.get(r.polar, 0.0), t.rel)
    lines = ["| tensor | shapes | FusionBench's result vs plain averaging (min) | "
             + " | ".join(f"max rel diff, polar: {p}" for p in POLARS) + " |", "|---|---|---|" + "---|" * len(POLARS)]
    for kind, e in kinds.items():
        shapes = ", ".join("x".join(map(str, s)) for s in sorted(e["shapes"]))
        lines.append(f"| {kind} | {shapes} | {e['from_average']:.2g} | "
                     + " | ".join(f"{e.get(p, float('nan')):.1e}" for p in POLARS) + " |")
    return lines


def verdict_line(results: list[CaseResult], tol: Tolerance) -> str:
    counts = {v: sum(r.verdict(tol) == v for r in results) for v in ("equal", "round-off", "MISMATCH", "error")}
    parts = [f"{n} {v}" for v, n in counts.items() if n]
    polars = {p: [r for r in results if r.polar == p] for p in POLARS}
    per_polar = "; ".join(f"polar: {p}: {sum(r.passes(tol) for r in group)}/{len(group)} pass"
                          for p, group in polars.items() if group)
    return f"{', '.join(parts)} of {len(results)} comparisons ({per_polar})"


def render(results: list[CaseResult], context: dict) -> str:
    tol = context["tol"]
    lines = [
        "# distmerge vs FusionBench 0.2.33: TSV-M, Iso-C, Iso-CTS",
        "",
        (f"Generated by `benchmarks/compare_fusionbench.py` on {context['date']} "
        f"({context['seconds']:.0f} s for {len(results)} comparisons)."),
        "",
        f"- command: `{context['command']}`",
        f"- machine: {context['machine']}",
        (f"- distmerge {context['distmerge']} (git {context['git']}), torch {context['torch']}, "
        f"{context['threads']} thread(s) per process"),
        f"- peer venv `{context['venv']}`: " + ", ".join(f"{k} {v}" for k, v in context["peer_versions"].items())
        + f"; installed by `{context['route']}`",
        f"- inputs: float32 synthetic Llama families (`distmerge.synthetic.make_family`, seed 0, base + "
        f"{context['experts']} experts, {context['layers']} layers; T = {context['tasks']} take the first T experts). "
        "Sizes (hidden x intermediate x heads x kv heads x vocab): "
        + ", ".join(f"{s.label} = {s.hidden}x{s.intermediate}x{s.heads}x{s.kv_heads}x{s.vocab}"
                    for s in context["sizes"]) + ".",
        (f"- FusionBench: `compute_and_sum_svd_mem_reduction(task_vectors, accelerator=\"cpu\")` (TSV-M), "
        f"`iso_c(task_vectors, accelerator=\"cpu\")`, `iso_cts(task_vectors, common_space_fraction="
        f"{context['common_fraction']}, accelerator=\"cpu\")`, default `exclude_keys` (every 2-D tensor goes through "
        f"the SVD, embeddings and lm_head included); result `base + alpha * merged` with alpha = {context['alpha']}, "
        "as its TSVM / IsoC / IsoCTS algorithms apply a single alpha. Run in float32 (the reference) and in float64 "
        "(the `float64` columns: how far each float32 result is from exact arithmetic)."),
        f"- distmerge: `distmerge merge CFG -o OUT --quiet --force --threads {context['threads']}` "
        f"({context['mode']}), `parameters: {{alpha: {context['alpha']}, svd: exact, polar: gram | svd"
        + (f", common_fraction: {context['common_fraction']} (iso_cts)" if "iso_cts" in context["methods"] else "")
        + "}`, `dtype: float32`; YAMLs under `" + f"{context['work']}/configs/`.",
        ("- rel diff = ||distmerge - FusionBench||_F / ||FusionBench - base||_F per tensor (the difference on the "
        "scale of the merged task vector); the tables give the largest over tensors. `distmerge vs float64` and "
        "`FusionBench vs float64` are the same measure against FusionBench's float64 run."),
        (f"- tolerance, per tensor: `equal` when rel diff <= {tol.rel:g} (float32 round-off, float32 eps = "
        f"{FLOAT32_EPS:.2e}); else `round-off` when distmerge is no farther from the float64 result than "
        f"{tol.ratio:g}x FusionBench's own float32 result is (two float32 computations of the truncated SVDs differ "
        "by their round-off, which here reaches a few 1e-5 for FusionBench itself); else `MISMATCH`, which fails "
        "the run. `cond` is the largest condition number (sigma_max / sigma_min) of the matrices that are "
        "orthogonalised, at the worst tensor (tsvm, iso_cts: the stacked U and V; iso_c: the summed task vector)."),
        "- rank per task: FusionBench computes k = int(r * (1/T)), distmerge r // T; for the shapes and T here "
        + (f"they differ for {len(context['rank_hits'])}: " + "; ".join(context["rank_hits"][:8])
           if context["rank_hits"] else "they agree everywhere (the two first differ at T = 49).")
        + " Iso-CTS sizes follow the same rounding rule on both sides.",
        "",
        f"**Verdict: {verdict_line(results, tol)}.**",
        "",
        "## method x T x polar (worst over sizes and tensors)",
        "",
        *compact_table(results, tol),
        "",
        "## Per tensor kind (all runs)",
        "",
        ("The third column is ||FusionBench - (base + alpha mean_t d_t)|| / ||FusionBench - base||: 0 for the 1-D "
        "tensors that both tools average, far from 0 for the 2-D ones (embeddings and lm_head included) that go "
        "through the SVD, so a tool that averaged them instead would fail the comparison."),
        "",
        *kind_table(results),
        "",
        "## Every comparison",
        "",
        *summary_table(results, tol),
        "",
    ]
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"scratch venv (default {DEFAULT_VENV})")
    parser.add_argument("--install", choices=("auto", "full", "minimal"), default="auto",
                        help="how to install fusion-bench into a new venv: with its dependencies (full), with "
                             "--no-deps plus what its imports need (minimal), or full falling back to minimal (auto)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"inputs, configs, drivers and outputs go here (default {DEFAULT_WORK})")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated HIDDENxINTERMEDIATExHEADSxKV_HEADSxVOCAB (default %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default %(default)s)")
    parser.add_argument("--tasks", default="2,3,4", help="numbers of experts merged (default %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of %(default)s")
    parser.add_argument("--alpha", type=float, default=0.8, help="scaling of the merged task vector (%(default)s)")
    parser.add_argument("--common-fraction", type=float, default=0.8, help="iso_cts common subspace share "
                                                                           "(%(default)s, both tools' default)")
    parser.add_argument("--tol", type=float, default=1e-5, help="relative difference to FusionBench that counts as "
                                                                "equal (%(default)s)")
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="beyond --tol, a tensor still passes when its distance from the float64 result is at "
                             "most this many times FusionBench's own float32 distance (%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (%(default)s)")
    parser.add_argument("--one-process-per-merge", action="store_true",
                        help="run distmerge's console script once per merge instead of all merges in one process")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file (default %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tol = Tolerance(args.tol, args.ratio)
    started = time.perf_counter()
    sizes = [Size.parse(s) for s in args.sizes.split(",") if s.strip()]
    tasks = sorted({int(t) for t in args.tasks.split(",")})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    if min(tasks) < 2:
        raise SystemExit("--tasks: merge at least 2 experts")
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    venv = args.venv.expanduser()
    peer_python, route = ensure_peer_venv(FUSIONBENCH, venv, args.install, log=log)
    families = make_families(work, sizes, max(tasks), args.layers)
    cases = [Case(size, method, t) for method in methods for t in tasks for size in sizes]
    tools = [f"fusionbench-{p}" for p in ("float32", "float64")] + [f"distmerge-{p}" for p in POLARS]
    outputs = {tool: {case: work / "out" / tool / case.slug for case in cases} for tool in tools}
    failures = run_both(peer_python, cases, families, outputs, work, args)

    results = []
    for case in cases:
        for polar in POLARS:
            dirs = {tool: outputs[tool][case] for tool in tools}
            errors = [f"{tool}: {failures[str(d)].strip().splitlines()[-1]}" for tool, d in dirs.items()
                      if str(d) in failures and (tool.startswith("fusionbench") or tool.endswith(polar))]
            result = (CaseResult(case, polar, error="; ".join(errors)) if errors
                      else compare_case(case, polar, families[case.size], dirs, args.alpha))
            if result.tensors:
                result.condition = condition_number(case, families[case.size], result.worst("rel").name,
                                                     args.common_fraction)
            results.append(result)
            log(f"{case.slug:22s} polar={polar:4s} {result.verdict(tol):9s} "
                + (result.error or f"max rel {result.top('rel'):.2e}  max abs {result.top('max_abs'):.2e}"))
    results.sort(key=lambda r: (methods.index(r.case.method), r.case.tasks, POLARS.index(r.polar),
                                sizes.index(r.case.size)))

    import distmerge

    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/compare_fusionbench.py"
                   + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_summary(), "distmerge": distmerge.__version__, "git": git_revision(), "torch": torch.__version__,
        "venv": str(args.venv), "route": route,
        "peer_versions": package_versions(peer_python, ("fusion-bench", "torch", "safetensors")),
        "sizes": sizes, "layers": args.layers, "experts": max(tasks), "tasks": ", ".join(map(str, tasks)),
        "methods": methods, "alpha": args.alpha, "common_fraction": args.common_fraction, "tol": tol,
        "threads": args.threads, "work": work, "rank_hits": rank_corner_cases(families, tasks),
        "mode": "one process per merge" if args.one_process_per_merge
        else "all configs in one process through the console script's click entry point",
    }
    context["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, context))
    log(f"wrote {args.out}")
    bad = [r for r in results if not r.passes(tol)]
    for r in bad:
        worst = r.worst("rel")
        log(f"FAIL {r.case.slug} polar={r.polar}: " + (r.error or (
            f"{worst.name}: rel diff {worst.rel:.2e} > {tol.rel:g}, and {worst.rel_exact:.2e} from float64 against "
            f"FusionBench's {worst.fb_rel_exact:.2e} (cond {r.condition:.1e})")))
    log(verdict_line(results, tol))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
