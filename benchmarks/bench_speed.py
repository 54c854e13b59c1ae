"""Speed and memory of every distmerge method: against mergekit 0.1.5 and FusionBench 0.2.33 where they have it,
against the physical limit everywhere, on the same checkpoints.

    python benchmarks/bench_speed.py                                  # ~0.5B Llama-shaped bf16 models, 3 runs
    python benchmarks/bench_speed.py --layers 8 --runs 3              # same tensor shapes, fewer layers
    python benchmarks/bench_speed.py --spectral-layers 8              # tsvm, rtsvm, iso_c, iso_cts on 8 layers
    python benchmarks/bench_speed.py --methods ties,tsvm              # a subset (default: all 26 methods)
    python benchmarks/bench_speed.py --tiny --skip-peers --results /tmp/speed   # offline smoke test (seconds)

1. Generates (once, cached under --cache keyed by their settings) a Llama-shaped base and three experts with
   `distmerge.synthetic.make_family`: bfloat16, sharded with an index. `--size 0.5b` (default) is hidden 1024,
   intermediate 2816, 16 heads, 8 kv heads, vocab 32000, 36 layers (0.49B parameters per model); `--layers`
   changes only the depth. The spectral methods (tsvm, rtsvm, iso_c, iso_cts) read the spectral family, the same
   shapes at `--spectral-layers` (alias `--tsvm-layers`; default: the same checkpoints); the 22 elementwise
   methods read the other.
2. Writes one YAML per distmerge run (speed/cases.py), `dtype: bfloat16`. The 20 methods mergekit 0.1.5 has
   (linear, task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear,
   sce, model_stock, slerp, nuslerp, multislerp, karcher, passthrough, arcee_fusion, nearswap, ram, ramplus_tl)
   take their compare_mergekit.py case with density 0.5 where they have one; both tools read the same file.
   distmerge computes in float32 whatever `dtype` says and saves bfloat16; mergekit computes in bfloat16.
   tsvm runs twice, with `svd: exact` (FusionBench's computation) and the default `svd: auto`; iso_cts with
   `svd: exact` (FusionBench's computation); iso_c (no `svd` parameter), rtsvm, consensus_ta and consensus_ties
   with their defaults.
3. Each measured run is a fresh process under a small wrapper (speed/measure.py) that times it and records its
   peak RSS (getrusage(RUSAGE_CHILDREN).ru_maxrss, one fresh wrapper per run, plus the peak of the summed RSS of
   its process tree polled every 50 ms). In every round each method runs once in every tool that has it, the
   tools one after the other:
   - distmerge: `distmerge merge CFG -o OUT --force --quiet --runtime local --shard-size S` (default threads);
   - mergekit: `mergekit-yaml CFG OUT --out-shard-size S/2 --quiet` (S/2 parameters: bfloat16) in its scratch
     venv (peers/venvs.py);
   - FusionBench TSV-M, Iso-C and Iso-CTS: peers/fusionbench_tsvm.py in its scratch venv, which loads base and
     experts as whole float32 state dicts, builds the task vectors, calls
     `compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")`, `iso_c(...)` or
     `iso_cts(..., common_space_fraction=0.8)`, adds alpha times the result to the base and saves bfloat16;
   - consensus_ta, consensus_ties and rtsvm have no peer: their ratio is to the physical limit;
   - the physical limit (speed/read_write.py), once per family: read every input tensor of every model with
     safetensors (safe_open + get_tensor, one at a time) and write one model's worth of output bytes.
   The inputs are read once before timing, so every run reads from the page cache. A peer's run that fails is
   a result: recorded with its error, not run again, and its method compared with the physical limit instead; a
   failure of distmerge or of the physical limit stops the benchmark.
4. Checks the outputs of the last round (linear against an exact float64 reference for both tools; every other
   method with a peer against the peer's merged task vector: close for the deterministic ones, the same norm for
   the random dare_* and della*; arcee_fusion and model_stock, where mergekit's bfloat16 compute is too coarse,
   against one more mergekit run with `dtype: float32`, untimed, after the rounds), then writes
   --results/speed.md and speed.json: which methods ran on which family, medians, ratios against the peer
   measured in the same invocation (or the physical limit) and the targets, the checks, every run.

`--skip-peers` runs distmerge and the physical limits only (no peer venvs, no network). The last round's outputs
stay on disk for the checks: one model's worth per run label (about 47 GB for every method at 0.5B with the
spectral family at 8 layers).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import common
from speed import cases, checks, report, runs

DEFAULT_RESULTS = common.RESULTS / "speed"
DEFAULT_CACHE = Path.home() / ".cache" / "distmerge" / "bench-speed"

log = common.logger("bench_speed", clock=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="directory for speed.md and speed.json (default benchmarks/results/speed)")
    parser.add_argument("--runs", type=int, default=None, help="rounds of runs (default 3; 1 with --tiny)")
    parser.add_argument("--size", choices=tuple(cases.SIZES), default="0.5b", help="model shapes (default 0.5b)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the size's; fewer keeps every tensor shape)")
    parser.add_argument("--spectral-layers", "--tsvm-layers", type=int, default=None,
                        help="decoder layers of the spectral family, the checkpoints that tsvm, rtsvm, iso_c and "
                             "iso_cts merge (default: --layers); the same tensor shapes")
    parser.add_argument("--spectral-average-embeddings", "--tsvm-average-embeddings", action="store_true",
                        help="spectral methods: average embed_tokens and lm_head instead of SVD-merging them, on both "
                             "sides (distmerge `exclude`, FusionBench `exclude_keys`)")
    parser.add_argument("--auto-runs", type=int, default=None,
                        help="rounds that include distmerge tsvm with svd: auto (default: all)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: --size tiny, 1 round unless --runs")
    parser.add_argument("--skip-peers", action="store_true",
                        help="distmerge and the physical limit only: no peer venvs, no network")
    parser.add_argument("--methods", default=",".join(cases.METHODS),
                        help="comma-separated subset of %(default)s (default: all)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"inputs, configs, outputs, peer jobs (default {DEFAULT_CACHE})")
    parser.add_argument("--mergekit-venv", type=Path, default=None, help="default ~/.cache/distmerge/peers/...")
    parser.add_argument("--fusionbench-venv", type=Path, default=None, help="default ~/.cache/distmerge/peers/...")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    if args.runs is None:
        args.runs = 1 if args.tiny else 3
    if args.auto_runs is None:
        args.auto_runs = args.runs
    return args


def peer_pythons(args, methods: list[str]) -> tuple[dict, dict]:
    """The pythons of the peer venvs these methods need (installed on first use), and their package versions."""
    if args.skip_peers:
        return {}, {}
    from peers.venvs import FUSIONBENCH, MERGEKIT, ensure_peer_venv, package_versions

    pythons, versions = {}, {}
    if cases.peer_methods(methods, "mergekit"):
        pythons["mergekit"], _ = ensure_peer_venv(MERGEKIT, args.mergekit_venv, log=log)
        versions["mergekit"] = package_versions(pythons["mergekit"], ("mergekit", "torch", "safetensors"))
    if cases.peer_methods(methods, "fusionbench"):
        pythons["fusionbench"], route = ensure_peer_venv(FUSIONBENCH, args.fusionbench_venv, log=log)
        versions["fusionbench"] = {**package_versions(pythons["fusionbench"], ("fusion-bench", "torch", "safetensors")),
                                   "installed by": route}
    return pythons, versions


def run_or_record_failure(command: list[str], work: Path, label: str) -> dict:
    """One measured run. A peer's failure is a result (recorded with its error; its method is then compared with
    the physical limit); a failure of distmerge or of the physical limit stops the benchmark."""
    result = runs.measure(command, work, label)
    if "error" in result and label.startswith(("distmerge:", "limit:")):
        raise SystemExit(f"{label} failed: {result['error']}\n{shlex.join(command)}")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if unknown := [m for m in methods if m not in cases.METHODS]:
        raise SystemExit(f"unknown method {unknown[0]}; choose from {', '.join(cases.METHODS)}")
    if not methods:
        raise SystemExit("--methods: name at least one method")
    cache = args.cache.expanduser().resolve()
    if cache.is_relative_to(common.REPO):
        raise SystemExit(f"--cache {cache} is inside the repository; give a path outside it")
    peers, peer_versions = peer_pythons(args, methods)

    fams = cases.families(cache, args.size, args.layers, args.spectral_layers, log)
    work = cache / "runs" / "-".join(dict.fromkeys(f["root"].name for f in fams.values()))
    work.mkdir(parents=True, exist_ok=True)
    exclude = list(cases.SPECTRAL_EXCLUDED) if args.spectral_average_embeddings else []
    cfgs = cases.configs(fams, work / "configs", exclude)
    wanted = cases.wanted_labels(methods)
    shard_size = fams["elementwise"]["shard_size"]
    jobs = [job for job in runs.jobs_for(fams, cfgs, work, peers, shard_size, exclude) if job[0] in wanted]
    float32_jobs = [job for job in runs.float32_jobs(cfgs, work, peers, shard_size)
                    if job[0].removesuffix("_float32") in wanted]
    setting = {"methods": methods, "peers": sorted(peers), "exclude": exclude}

    log(", ".join(f"{g}: {f['params'] / 1e9:.3f}B parameters per model" for g, f in fams.items())
        + f"; {len(jobs)} runs a round; warming the page cache")
    runs.warm_page_cache(list({id(f): f for f in fams.values()}.values()))
    done, failed = [], set()  # failed: peer runs that failed, not run again
    for round_ in range(1, args.runs + 1):
        for label, command, target in jobs:
            if label in failed or (label == "distmerge:tsvm_auto" and round_ > args.auto_runs):
                continue
            shutil.rmtree(target, ignore_errors=True)
            result = run_or_record_failure(command, work, label)
            result.update({"round": round_, "label": label, "command": shlex.join(command)})
            done.append(result)
            if "error" in result:
                failed.add(label)
                log(f"round {round_}/{args.runs} {label:28s} FAILED after {result['wall_s']:.1f} s, not run again: "
                    f"{result['error']}")
                continue
            log(f"round {round_}/{args.runs} {label:28s} {result['wall_s']:7.1f} s  peak RSS "
                f"{result['maxrss_bytes'] / 1e9:.2f} GB  load {result['load_before'][0]:.1f}")
        if round_ < args.runs:  # partial results after every round, so an interrupted run leaves numbers
            write_results(args, argv, started, fams, work, setting, peer_versions, done, [], partial=True)
    for label, command, target in float32_jobs:  # untimed: only the checks read their outputs
        shutil.rmtree(target, ignore_errors=True)
        if "error" in (result := run_or_record_failure(command, work, label)):
            failed.add(label)
            log(f"{label} for the checks (untimed) FAILED: {result['error']}")
        else:
            log(f"{label} for the checks (untimed)")
    found = checks.check_outputs(fams, work, [label for label, _, _ in jobs + float32_jobs if label not in failed])
    for c in found:
        log(f"check {c['check']}: {'ok' if c['ok'] else 'FAILED'}")
    targets = write_results(args, argv, started, fams, work, setting, peer_versions, done, found, partial=False)
    for t in targets:
        log(f"{t['ours']} vs {t['peer']}: time x{t['time_ratio']:.3f} (target {t['time_target'] or '-'}), memory "
            f"x{t['memory_ratio']:.3f} (target {t['memory_target'] or '-'})")
    return 0 if all(c["ok"] for c in found) else 1


def write_results(args, argv, started, fams, work, setting, peer_versions, done, found, partial: bool) -> list[dict]:
    """speed.md and speed.json under --results; returns the targets."""
    import torch

    import distmerge

    medians = report.summarise(done)
    targets = report.evaluate_targets(medians)
    context = {
        "partial": partial, "date": common.utc_now(), "command": common.command_line("bench_speed.py", argv),
        "machine": common.machine(), "git": common.git_revision(), "torch_threads": torch.get_num_threads(),
        "versions": {"distmerge": distmerge.__version__, "torch": torch.__version__},
        "peer_versions": peer_versions, "peers": setting["peers"], "runs": args.runs, "auto_runs": args.auto_runs,
        "methods": {g: [m for m in setting["methods"] if cases.group(f"distmerge:{m}") == g] for g in fams},
        "spectral_exclude": setting["exclude"], "work": str(work),
        "failed": sorted({r["label"] for r in done if "error" in r}),
        "out_shard_size": fams["elementwise"]["shard_size"],
        "families": {g: {k: (str(v) if isinstance(v, Path) else v) for k, v in f.items() if k != "experts"}
                     for g, f in fams.items()},
        "shared_note": "another CPU-heavy job may run on this machine at the same time; load averages show it.",
        "notes": args.note,
        "seconds": time.perf_counter() - started,
    }
    markdown = report.render(context, done, medians, targets, found)
    data = {"context": context, "medians": medians, "targets": targets, "checks": found, "runs": done}
    common.write_results(args.results, "speed", markdown, data, indent=1)
    log(f"wrote {args.results / 'speed.md'} and speed.json" + (" (partial)" if partial else ""))
    return targets


if __name__ == "__main__":
    sys.exit(main())
