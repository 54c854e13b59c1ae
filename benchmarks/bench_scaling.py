"""The same merge with the local runtime and with the Ray runtime at several worker counts and on two nodes:
wall time with and without start-up, the critical path, each worker's busy time, and whether the bytes match.

    python benchmarks/bench_scaling.py                                   # tsvm and ties, 0.5B family, CPU
    python benchmarks/bench_scaling.py --methods ties --layers 8 --repeats 1
    python benchmarks/bench_scaling.py --methods tsvm --device cuda --workers 1   # GPU actors, no 2-node run

Inputs: the speed benchmark's Llama-shaped family (`--size 0.5b`: hidden 1024, 36 layers, vocab 32000, base + 3
bfloat16 experts; generated once under --cache). Every run is the CLI in a fresh process, as users run it:
- `local`: `--runtime local --threads 1`;
- `ray xN`: `--runtime ray --workers N --threads 1` (a Ray instance started by the run, as `ray.init()` does);
- `ray 2 nodes`: two raylets on this machine (`ray start --head --num-cpus 1`, then `ray start --address` with one
  more CPU), the merge joining them with `--address`, one worker per node;
- `ray x2, one unit per shard` (the before row): `ray x2` with the default shard size.
On CPU every worker has one thread, so that workers, not threads, are compared, and the bytes must match.

From each output's merge_report.parquet (one row per tensor: its worker, start time and seconds): `after start-up`
is the time from the first tensor's start to the end of the run, `critical path` the busiest shard (a shard is
one unit of work), `busy` each worker's summed seconds. Medians over --repeats.
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
from collections import defaultdict
from pathlib import Path

import torch
import yaml

import common
from speed import cases

RESULTS = common.RESULTS / "scaling"
DEFAULT_CACHE = Path.home() / ".cache" / "distmerge" / "bench-speed"  # the speed benchmark's inputs
CONFIGS = {  # method -> top-level keys besides the models (the experts' weights are the speed benchmark's)
    "tsvm": {"merge_method": "tsvm", "dtype": "float32", "out_dtype": "bfloat16"},
    "ties": {"merge_method": "ties", "dtype": "float32", "out_dtype": "bfloat16", "parameters": {"normalize": True}},
}
TWO_NODES = "ray 2 nodes"
BEFORE = "ray x2, one unit per shard"

log = common.logger("bench_scaling", clock=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--methods", default="tsvm,ties", help="comma-separated subset of %(default)s")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts (default %(default)s)")
    parser.add_argument("--size", choices=tuple(cases.SIZES), default="0.5b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shard-size", default="64MB", help="output shard size: shards are the units of work")
    parser.add_argument("--no-two-nodes", action="store_true", help="skip the run on two raylets")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--note", action="append", default=[], help="a line for the notes (repeatable)")
    return parser.parse_args(argv)


def runs(args) -> dict[str, list[str]]:
    """label -> the CLI options of that run."""
    one_thread = ["--threads", "1"] if args.device == "cpu" else []
    shards = ["--shard-size", args.shard_size]
    table = {"local": ["--runtime", "local", *one_thread, *shards]}
    for n in map(int, args.workers.split(",")):
        table[f"ray x{n}"] = ["--runtime", "ray", "--workers", str(n), *one_thread, *shards]
    if args.device == "cpu" and not args.no_two_nodes:
        table[TWO_NODES] = ["--runtime", "ray", "--workers", "2", *one_thread, *shards]  # --address added when run
    if "ray x2" in table:
        table[BEFORE] = ["--runtime", "ray", "--workers", "2", *one_thread]
    return table


class TwoRaylets:
    """A Ray cluster of two raylets with one CPU each on this machine, for as long as the block runs."""

    def __init__(self, work: Path):
        self.env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.temp = work / "ray"
        self.address = None

    def _ray(self, *arguments: str) -> None:
        subprocess.run([str(Path(sys.executable).with_name("ray")), *arguments], env=self.env, check=True,
                       capture_output=True)

    def __enter__(self) -> "TwoRaylets":
        port = 6390
        self._ray("start", "--head", "--num-cpus", "1", "--port", str(port), "--include-dashboard", "false",
                  "--temp-dir", str(self.temp))
        self.address = f"127.0.0.1:{port}"
        self._ray("start", "--address", self.address, "--num-cpus", "1")
        return self

    def __exit__(self, *exc) -> None:
        self._ray("stop", "--force")


def report_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "merge_report.parquet").to_pylist()


def measure(config: Path, out: Path, options: list[str], env: dict) -> dict:
    """One run of the CLI: wall time, and what its merge report says about where the time went."""
    launched = time.time()
    subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config), "-o", str(out), "--force", "--quiet",
                    *options], check=True, env=env)
    ended = time.time()
    rows = report_rows(out)
    busy, shards = defaultdict(float), defaultdict(float)
    for row in rows:
        busy[row["worker"]] += row["seconds"]
        shards[row["shard"]] += row["seconds"]
    first = min(row["started"] for row in rows)
    return {"wall_s": ended - launched, "after_start_up_s": ended - first, "start_up_s": first - launched,
            "critical_path_s": max(shards.values()), "units": len(shards), "workers": len(busy),
            "busy_s": sorted(busy.values(), reverse=True), "compute_s": sum(busy.values())}


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def median_run(samples: list[dict]) -> dict:
    """The run whose wall time is the median (its other numbers with it), with every wall time."""
    ordered = sorted(samples, key=lambda s: s["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "walls_s": [s["wall_s"] for s in samples]}


def time_method(args, method: str, config: Path, work: Path) -> list[dict]:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    rows, reference = [], work / method / "local"
    for label, options in runs(args).items():
        out = work / method / label.replace(" ", "_").replace(",", "")
        if label == TWO_NODES:
            with TwoRaylets(work) as cluster:
                samples = [measure(config, out, [*options, "--address", cluster.address], env)
                           for _ in range(args.repeats)]
        else:
            samples = [measure(config, out, options, env) for _ in range(args.repeats)]
        if label == "local":
            reference = out
        # the before row cuts other shards: its tensors, not its files, must be the same
        same = _same_tensors(out, reference) if label == BEFORE else shard_bytes(out) == shard_bytes(reference)
        rows.append({"method": method, "run": label, **median_run(samples), "same_bytes_as_local": same})
        log(f"{method} {label}: {json.dumps({k: v for k, v in rows[-1].items() if k not in ('method', 'run')})}")
    one = next((r for r in rows if r["run"] == "ray x1"), None)
    for r in rows:
        r["speedup_vs_ray_x1"] = one["wall_s"] / r["wall_s"] if one else None
        r["speedup_after_start_up"] = one["after_start_up_s"] / r["after_start_up_s"] if one else None
    return rows


def _same_tensors(out: Path, reference: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        merged = {}
        for file in sorted(path.glob("*.safetensors")):
            merged.update(load_file(file))
        return merged

    ours, theirs = tensors(out), tensors(reference)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def render(args, machine: dict, family: dict, rows: list[dict], seconds: float) -> str:
    lines = [
        f"# Scaling across workers and nodes ({machine['device']}, {machine['cores']} cores, {machine['date']})", "",
        f"Generated by `benchmarks/bench_scaling.py` in {seconds:.0f} s. Command: `python benchmarks/bench_scaling.py "
        f"{' '.join(sys.argv[1:])}`.", "",
        f"- inputs: the speed benchmark's `{args.size}` family, {family['settings']['llama_config']['layers']} layers, "
        f"base + {cases.N_EXPERTS} bfloat16 experts, {family['params'] / 1e9:.2f}B parameters per model; output "
        f"bfloat16 in shards of {args.shard_size} (one unit of work each), float32 compute.",
        f"- machine: {machine['device']}, {machine['cores']} cores, torch {machine['torch']}; load average before the "
        f"run {machine['load_before']}, after {machine['load_after']}.",
        "- wall: the whole CLI run (Python and torch imports, planning, Ray or cluster connection, actors, merge, "
        "index); after start-up: from the first tensor's start to the end; critical path: the busiest unit; busy: "
        "each worker's summed tensor seconds (from merge_report.parquet). Speedups against `ray x1`.",
        *[f"- {note}" for note in args.note], "",
        "| method | run | units | wall s | after start-up s | start-up s | critical path s | busy s per worker "
        "| speedup (wall) | speedup (after start-up) | same bytes as local |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        busy = ", ".join(f"{b:.1f}" for b in r["busy_s"])
        speed = (f"{r['speedup_vs_ray_x1']:.2f} | {r['speedup_after_start_up']:.2f}"
                 if r["speedup_vs_ray_x1"] is not None else "- | -")
        same = {True: "yes", False: "**no**", None: "-"}[r["same_bytes_as_local"]]
        if r["run"] == BEFORE and r["same_bytes_as_local"]:
            same = "same tensors (other shards)"
        lines.append(f"| {r['method']} | {r['run']} | {r['units']} | {r['wall_s']:.1f} | {r['after_start_up_s']:.1f} "
                     f"| {r['start_up_s']:.1f} | {r['critical_path_s']:.1f} | {busy} | {speed} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    family = cases.family(args.cache, args.size, args.layers, log)
    work = Path(tempfile.mkdtemp(prefix="distmerge-scaling-"))
    machine = {"device": common.device_name(args.device), "cores": os.cpu_count(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "load_before": round(os.getloadavg()[0], 2)}
    rows = []
    for method in args.methods.split(","):
        config = work / f"{method}.yaml"
        models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family["experts"], cases.WEIGHTS)]
        config.write_text(yaml.safe_dump({**CONFIGS[method], "base_model": str(family["base"]), "models": models}))
        rows += time_method(args, method, config, work)
    machine["load_after"] = round(os.getloadavg()[0], 2)
    name = f"scaling_{args.device}"
    common.write_results(args.results, name, render(args, machine, family, rows, time.perf_counter() - started),
                         {"machine": machine, "args": vars(args) | {"cache": None, "results": None}, "results": rows})
    log(f"wrote {args.results / name}.md")


if __name__ == "__main__":
    main()
