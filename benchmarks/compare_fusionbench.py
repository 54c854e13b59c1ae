"""Parity with FusionBench 0.2.33: TSV-M, Iso-C and Iso-CTS on the same checkpoints, every tensor compared.

    python benchmarks/compare_fusionbench.py [--venv ~/.cache/distmerge/peers/fusion-bench-0.2.33] [--work DIR]
                                             [--sizes 64x176x4x2x256,...] [--tasks 2,3,4] [--tol 1e-5] [--ratio 2]

1. Creates (if missing) a scratch virtual environment outside the repository and installs `torch==2.13.0
   fusion-bench==0.2.33` into it (torch pinned exactly: the CPU wheel on disk, not a multi-GB CUDA build). If
   that install fails, it falls back to `fusion-bench --no-deps` plus the packages that importing the two modules
   used here needs (peers.venvs.FUSIONBENCH.minimal_deps, found by trying).
2. Writes float32 Llama-shaped families (`distmerge.synthetic.make_family`, a base and 4 experts, 2 layers) in a
   few sizes; every size has non-square matrices (k/v projections, MLP, embeddings, lm_head). T = 2, 3, 4 use the
   first T experts.
3. FusionBench side: peers/fusionbench_batch.py, run by the scratch venv's python, loads the safetensors, builds
   task vectors (expert - base), calls FusionBench's own functions by import on CPU
   (`TSVM_utils.compute_and_sum_svd_mem_reduction`, `iso_utils.iso_c`, `iso_utils.iso_cts`), and saves
   base + alpha * merged, as FusionBench's TSVM / IsoC / IsoCTS algorithms do with a single alpha. It runs once in
   float32 (the reference) and once in float64 (an "exact" yardstick that shows float32 round-off on both sides).
   distmerge side: `distmerge merge CFG -o OUT --quiet --threads N` with `svd: exact` and `polar: gram`, then
   `polar: svd` (by default all configs in one process through the click entry point of the console script,
   distmerge_batch.py, start-up costs several seconds a process here; `--one-process-per-merge` runs the console
   script itself).
4. Compares every tensor: max abs difference, and ||distmerge - FusionBench||_F / ||FusionBench - base||_F (the
   difference relative to the size of the merged task vector, the meaningful scale). A tensor is `equal` within
   --tol (default 1e-5); beyond it, it is `round-off` when distmerge is no farther from the float64 result than
   --ratio (default 2) times FusionBench's own float32 result is, else a MISMATCH. (Truncated SVDs in float32
   carry round-off of a few 1e-5 of the task vector on these inputs: FusionBench's float32 result is that far
   from its float64 one, so a bare 1e-5 would fail the reference against itself in another precision.)
5. Writes benchmarks/results/fusionbench_parity/fusionbench_parity.md and exits 1 on a mismatch (or a failed
   merge).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import common
from fusionbench_parity.cases import DEFAULT_SIZES, METHODS, POLARS, Case, Size, distmerge_jobs, fusionbench_jobs
from fusionbench_parity.cases import make_families
from fusionbench_parity.compare import CaseResult, Tolerance, compare_case, condition_number, rank_corner_cases
from fusionbench_parity.report import render, verdict_line
from peers.venvs import FUSIONBENCH, driver, ensure_peer_venv, package_versions

RESULTS = common.RESULTS / "fusionbench_parity" / "fusionbench_parity.md"
DEFAULT_VENV = FUSIONBENCH.default_venv
DEFAULT_WORK = Path.home() / ".cache" / "distmerge" / "fusionbench-parity"
TOOLS = (*(f"fusionbench-{p}" for p in ("float32", "float64")), *(f"distmerge-{p}" for p in POLARS))

log = common.logger("compare_fusionbench")


def run_both(peer_python, cases, families, outputs, work, args) -> dict[str, str]:
    """Both tools at once (one process each; --threads each); returns {output dir: error} for failed merges."""
    start = time.perf_counter()
    for by_case in outputs.values():
        for out in by_case.values():
            shutil.rmtree(out, ignore_errors=True)
    fusionbench = common.start_batch(peer_python, driver("fusionbench_batch.py"),
                                     fusionbench_jobs(cases, families, outputs, args.alpha, args.common_fraction),
                                     work, "fusionbench", str(args.threads))
    dm_jobs = distmerge_jobs(cases, families, outputs, work, args.alpha, args.common_fraction)
    threads = ["--threads", str(args.threads)]
    if args.one_process_per_merge:
        distmerge = str(Path(sys.executable).parent / "distmerge")
        failures = common.run_each({out: [distmerge, "merge", str(cfg), "-o", str(out), "--quiet", "--force", *threads]
                                    for cfg, out in dm_jobs})
    else:
        failures = common.finish_batch(*common.start_batch(Path(sys.executable), common.HERE / "distmerge_batch.py",
                                                           dm_jobs, work, "distmerge", *threads))
    log(f"distmerge: {len(dm_jobs)} merges done ({time.perf_counter() - start:.0f} s)")
    failures.update(common.finish_batch(*fusionbench))
    log(f"FusionBench: {2 * len(cases)} merges done ({time.perf_counter() - start:.0f} s)")
    return failures


def compare_all(cases, families, outputs, failures, args, tol: Tolerance) -> list[CaseResult]:
    """One result per case and polar route: the tools' errors, or the tensor differences of their outputs."""
    results = []
    for case in cases:
        for polar in POLARS:
            dirs = {tool: outputs[tool][case] for tool in TOOLS}
            errors = [f"{tool}: {common.last_error_line(failures[str(d)])}" for tool, d in dirs.items()
                      if str(d) in failures and (tool.startswith("fusionbench") or tool.endswith(polar))]
            result = (CaseResult(case, polar, error="; ".join(errors)) if errors
                      else compare_case(case, polar, families[case.size], dirs, args.alpha))
            if result.tensors:
                result.condition = condition_number(case, families[case.size], result.worst("rel").name,
                                                     args.common_fraction)
            results.append(result)
            log(f"{case.slug:22s} polar={polar:4s} {result.verdict(tol):9s} "
                + (result.error or f"max rel {result.top('rel'):.2e}  max abs {result.top('max_abs'):.2e}"))
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"scratch venv (default {DEFAULT_VENV})")
    parser.add_argument("--install", choices=("auto", "full", "minimal"), default="auto",
                        help="how to install fusion-bench into a new venv: with its dependencies (full), with "
                             "--no-deps plus what its imports need (minimal), or full falling back to minimal (auto)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"inputs, configs, job lists and outputs go here (default {DEFAULT_WORK})")
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
    argv = sys.argv[1:] if argv is None else argv
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
    peer_python, route = ensure_peer_venv(FUSIONBENCH, args.venv.expanduser(), args.install, log=log)
    families = make_families(work, sizes, max(tasks), args.layers)
    cases = [Case(size, method, t) for method in methods for t in tasks for size in sizes]
    outputs = {tool: {case: work / "out" / tool / case.slug for case in cases} for tool in TOOLS}
    failures = run_both(peer_python, cases, families, outputs, work, args)
    results = compare_all(cases, families, outputs, failures, args, tol)
    results.sort(key=lambda r: (methods.index(r.case.method), r.case.tasks, POLARS.index(r.polar),
                                sizes.index(r.case.size)))

    import torch

    import distmerge

    context = {
        "date": common.utc_now(), "command": common.command_line("compare_fusionbench.py", argv),
        "machine": common.machine_summary(), "distmerge": distmerge.__version__, "git": common.git_revision(),
        "torch": torch.__version__, "venv": str(args.venv), "route": route,
        "peer_versions": package_versions(peer_python, ("fusion-bench", "torch", "safetensors")),
        "sizes": sizes, "layers": args.layers, "experts": max(tasks), "tasks": ", ".join(map(str, tasks)),
        "methods": methods, "alpha": args.alpha, "common_fraction": args.common_fraction, "tol": tol,
        "threads": args.threads, "work": work, "rank_hits": rank_corner_cases(families, tasks),
        "mode": "one process per merge" if args.one_process_per_merge
        else "all configs in one process through the console script's click entry point",
    }
    context["seconds"] = time.perf_counter() - started
    common.write_markdown(args.out, render(results, context))
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
