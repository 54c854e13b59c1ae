"""The same merge with the local runtime and with the Ray runtime at several worker counts: wall time,
speedup, and whether the bytes are identical.

    python benchmarks/bench_scaling.py --method tsvm --workers 1,2            # CPU workers (one per core)
    python benchmarks/bench_scaling.py --method tsvm --device cuda --workers 1  # GPU actors

Checkpoints are generated once (Llama-shaped, bfloat16, sharded) under --cache. Each configuration runs
--repeats times through the CLI (a subprocess, as users run it); medians are reported. CPU runs pin one thread
per worker on both sides (`--threads 1`), so that the comparison is of workers, not of threads, and the bytes
must match.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import common

RESULTS = common.RESULTS / "scaling"


def family(cache: Path, hidden: int, layers: int, experts: int) -> dict:
    """Llama-shaped bfloat16 checkpoints in 200 MB shards, made once under --cache."""
    arguments = {"hidden": hidden, "intermediate": int(hidden * 2.6875), "layers": layers, "heads": hidden // 64,
                 "kv_heads": max(1, hidden // 256), "vocab": 8192}
    return common.llama_family(cache / f"scaling_h{hidden}_l{layers}_t{experts}",
                               {"llama_config": arguments, "experts": experts, "dtype": "bfloat16",
                                "shard_size": 200_000_000, "seed": 0})


def merge_seconds(config: Path, out: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config), "-o", str(out), "--force", "--quiet",
                    *extra], check=True)
    return time.perf_counter() - start


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="tsvm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", default="50MB", help="small shards give the workers units to share")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("DISTMERGE_BENCH_CACHE",
                                                                          Path.home() / ".cache/distmerge-bench")))
    parser.add_argument("--out", default=None)
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON and markdown go (default benchmarks/results/scaling)")
    return parser.parse_args()


def runtimes(args) -> dict[str, list[str]]:
    """label -> the CLI options of that run: the local runtime, then Ray at each --workers count."""
    runs = {"local": ["--runtime", "local"]}
    runs.update({f"ray x{n}": ["--runtime", "ray", "--workers", str(n)] for n in map(int, args.workers.split(","))})
    return runs


def time_runtimes(args, config: Path, work: Path) -> list[dict]:
    """Median wall time per runtime, whether its bytes equal the local run's, and the speedup against ray x1."""
    shared = ["--device", args.device, "--shard-size", args.shard_size]
    if args.device == "cpu":
        shared += ["--threads", "1"]  # workers, not threads, are compared: one thread each on both sides
    rows, reference = [], None
    for label, extra in runtimes(args).items():
        out = work / label.replace(" ", "")
        times = [merge_seconds(config, out, shared + extra) for _ in range(args.repeats)]
        produced = shard_bytes(out)
        reference = reference or produced
        rows.append({"run": label, "median_s": statistics.median(times), "times": times,
                     "same_bytes_as_local": produced == reference})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["median_s"] for r in rows if r["run"] == "ray x1"), rows[0]["median_s"])
    for r in rows:
        r["speedup_vs_ray_x1"] = base / r["median_s"]
    return rows


def render(args, machine: dict, rows: list[dict]) -> str:
    lines = [f"# Scaling: {args.method} on {args.device} ({machine['device']}, {machine['cores']} cores, "
             f"{machine['date']})", "",
             f"Command: `python benchmarks/bench_scaling.py --method {args.method} --device {args.device} "
             f"--workers {args.workers} --hidden {args.hidden} --layers {args.layers} --experts {args.experts} "
             f"--repeats {args.repeats}`. Wall time of the whole CLI run (start-up, Ray start-up, reading, "
             "merging, writing), median of the repeats.", "",
             "| run | median s | speedup vs ray x1 | same bytes as local |", "|---|---:|---:|---|"]
    lines += [f"| {r['run']} | {r['median_s']:.1f} | {r['speedup_vs_ray_x1']:.2f} | {r['same_bytes_as_local']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    paths = family(args.cache, args.hidden, args.layers, args.experts)
    work = Path(tempfile.mkdtemp(prefix="distmerge-scaling-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": args.method, "base_model": str(paths["base"]),
        "models": [{"model": str(p)} for p in paths["experts"]], "dtype": "float32", "out_dtype": "bfloat16"}))
    rows = time_runtimes(args, config, work)
    machine = {"device": common.device_name(args.device), "cores": os.cpu_count(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    common.write_results(args.results, args.out or f"scaling_{args.method}_{args.device}", render(args, machine, rows),
                         {"machine": machine, "args": vars(args) | {"cache": None}, "results": rows})


if __name__ == "__main__":
    main()
