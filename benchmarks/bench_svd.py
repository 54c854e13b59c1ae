"""Seconds per SVD backend and per polar step, on the sizes that matter for 70B-class models.

    python benchmarks/bench_svd.py [--device cuda] [--sizes 4096x4096,8192x8192,28672x8192] [--repeats 3]

For each matrix (a random low-rank-plus-noise "task vector"): the exact SVD (on CUDA, each cuSOLVER driver),
the float64-Gram route (`svd: gram`), randomized SVDs (distmerge's default oversampling and subspace iterations)
at TSV-M's rank for T = 3 (r/3) and at a small adaptive rank (r/16), and the polar step that orthogonalises
T = 3 stacked blocks of singular vectors, by distmerge's Gram route and by the SVD route the reference uses.
Medians of --repeats runs; results as JSON and a markdown table under benchmarks/results/svd/ (svd_cpu.*,
svd_cuda.*: one pair per device).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import common
from distmerge.methods import linalg
from distmerge.methods.spectral import OVERSAMPLE, POWER_ITERS

RESULTS = common.RESULTS / "svd"


def task_vector(rows: int, cols: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    rank = min(rows, cols) // 8
    left = torch.randn(rows, rank, device=device, generator=gen)
    right = torch.randn(rank, cols, device=device, generator=gen)
    return left @ right / rank + 0.01 * torch.randn(rows, cols, device=device, generator=gen)


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stacked_blocks(rows: int, rank: int, device: str, n_tasks: int = 3) -> torch.Tensor:
    """T blocks of orthonormal columns, rank // T each: what TSV-M orthogonalises."""
    blocks = [torch.linalg.qr(torch.randn(rows, rank // n_tasks, device=device)).Q for _ in range(n_tasks)]
    return torch.cat(blocks, 1)


def cases(rows: int, cols: int, device: str):
    matrix = task_vector(rows, cols, device)
    rank = min(rows, cols)
    sketch = lambda shape: torch.rand(shape, device=device)  # noqa: E731
    drivers = ["gesvd", "gesvdj", "gesvda", None] if device == "cuda" else [None]
    for driver in drivers:
        label = f"exact ({driver})" if driver else "exact"
        yield label, lambda d=driver: torch.linalg.svd(matrix, full_matrices=False, driver=d)
    yield "gram (float64 Gram)", lambda: linalg.gram_svd(matrix)
    for share, label in ((3, "randomized r/3"), (16, "randomized r/16")):
        yield label, lambda k=rank // share: linalg.randomized_svd(matrix, k + OVERSAMPLE.default,
                                                                   POWER_ITERS.default, sketch)
    stacked = stacked_blocks(rows, rank, device)
    yield "polar gram (U)", lambda: linalg.polar(stacked.clone(), "gram")
    yield "polar svd (U)", lambda: linalg.polar(stacked.clone(), "svd")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="4096x4096,8192x8192,28672x8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated case labels to skip (e.g. slow drivers)")
    parser.add_argument("--out", default=None, help="results name (default: svd_<device>)")
    parser.add_argument("--single-above", type=float, default=60.0,
                        help="a case whose first run takes longer than this many seconds is timed once")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON and markdown go (default benchmarks/results/svd)")
    return parser.parse_args()


def time_every_case(args) -> list[dict]:
    """Seconds per (size, case): the median of --repeats runs after a first run that is also the warm-up."""
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rows_out = []
    for size in args.sizes.split(","):
        rows, cols = map(int, size.split("x"))
        for label, fn in cases(rows, cols, args.device):
            if label in skip:
                continue
            first = timed(fn, args.device, 1)  # also the warm-up (cuSOLVER handles, MKL threads)
            runs = 1 if first > args.single_above else args.repeats
            seconds = first if runs == 1 else timed(fn, args.device, runs)
            rows_out.append({"size": size, "case": label, "seconds": seconds, "runs": runs})
            print(f"{size:>12} {label:<22} {seconds:9.3f} s ({runs} run(s))", flush=True)
    return rows_out


def render(args, machine: dict, rows: list[dict]) -> str:
    lines = [f"# SVD backends and polar step ({machine['device']}, torch {machine['torch']}, "
             f"{machine['cpu_threads']} CPU threads, {machine['date']})", "",
             f"Median of {args.repeats} runs after a warm-up run (1 run where the first took over "
             f"{args.single_above:g} s). Command: `python benchmarks/bench_svd.py --device {args.device}"
             f" --sizes {args.sizes} --repeats {args.repeats}`. Load average (1, 5, 15 min) before "
             f"{' / '.join(f'{x:.1f}' for x in machine['load_average_before'])}, after "
             f"{' / '.join(f'{x:.1f}' for x in machine['load_average_after'])} ({os.cpu_count()} cores).", "",
             "| matrix | case | seconds | runs |", "|---|---|---:|---:|"]
    lines += [f"| {r['size']} | {r['case']} | {r['seconds']:.3f} | {r['runs']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    machine = {"device": common.device_name(args.device), "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "load_average_before": os.getloadavg()}
    rows = time_every_case(args)
    machine["load_average_after"] = os.getloadavg()
    common.write_results(args.results, args.out or f"svd_{args.device}", render(args, machine, rows),
                         {"machine": machine, "results": rows})


if __name__ == "__main__":
    main()
