"""Merge the experts with every method through the CLI, choose each method's knob on validation, score test.

One unit of work = (row, grid point, split): write the YAML, run `distmerge merge`, evaluate the merged encoder
on every task with that task's own head, store the 0/1 vectors as json, delete the merged checkpoint (merges are
deterministic, so the test pass merges again instead of keeping ~90 MB per grid point). Units run in `jobs`
processes; stored scores are reused on the next run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import methods as M
from .common import read_json, set_threads, write_json


@dataclass(frozen=True)
class Context:
    """What a worker needs to score one merge (plain paths, so it pickles across processes)."""
    root: Path            # cache/merges/<key>: configs, scores, scratch outputs
    base: Path
    experts: tuple        # expert encoder dirs, in task order
    heads: tuple          # head files, in task order
    task_names: tuple
    tasks_file: Path
    task_subset: tuple    # tasks_file keys to use (same order as task_names)
    threads: int
    evaluate: str = "encoder"   # which evaluator: encoder (track 1) or lm (track 2)
    small_matrices: tuple = ()  # 2-D tensors with a side < T: `exclude`d for tsvm/rtsvm (methods.PER_TASK_RANK)
    frozen_blocks: int = 0      # track 2: decoder blocks below the tuned ones (their outputs are cached) ...
    frozen_states: Path | None = None  # ... in this directory (lm.FrozenPart)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text).strip("_")


def score_path(ctx: Context, row: M.Method, point: dict, split: str) -> Path:
    return ctx.root / "scores" / slug(row.label) / f"{slug(M.point_key(point))}.{split}.json"


_WORKER: dict = {}


def _evaluate(ctx: Context, model_dir: Path, split: str) -> dict[str, list[int]]:
    if ctx.evaluate == "lm":
        from . import lm

        return lm.evaluate_dir(ctx, model_dir, split, _WORKER)
    from . import encoder as E

    if "tok" not in _WORKER:
        data = read_json(ctx.tasks_file)
        _WORKER["tasks"] = {n: data[n] for n in ctx.task_subset}
        _WORKER["tok"] = E.load_tokenizer(ctx.base)
        _WORKER["heads"] = {n: E.load_head(Path(h)) for n, h in zip(ctx.task_names, ctx.heads)}
    res = E.evaluate_encoder(model_dir, _WORKER["tok"], _WORKER["tasks"], _WORKER["heads"], split)
    return {n: v.astype(int).tolist() for n, v in res.items()}


# Score entries written before they recorded the method's defaults: still valid for every method but these, whose
# defaults changed since (rtsvm: spectral outliers on, 2026-12-03).
DEFAULTS_CHANGED_SINCE_UNRECORDED = {"rtsvm"}


def method_defaults(name: str, models: int) -> dict:
    """The parameters the CLI fills in where a row's YAML is silent, as JSON stores them: a changed default changes
    the merge behind an unchanged YAML, so a cached score counts only while they are the same."""
    from distmerge.methods import get_method

    return json.loads(json.dumps(get_method(name).defaults(models), default=str))


def still_valid(entry: dict, row: M.Method, defaults: dict) -> bool:
    if "defaults" in entry:
        return entry["defaults"] == defaults
    return row.name not in DEFAULTS_CHANGED_SINCE_UNRECORDED


def run_unit(args) -> tuple[str, str, dict | None, str | None]:
    """Merge + evaluate one (row, point) on one or more splits; returns (label, point key, {split: result}, error)."""
    ctx, row, point, splits = args
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    set_threads(ctx.threads)
    paths = {s: score_path(ctx, row, point, s) for s in splits}
    defaults = method_defaults(row.name, len(ctx.experts))
    done = {s: entry for s, p in paths.items() if p.exists() and still_valid(entry := read_json(p), row, defaults)}
    if len(done) == len(splits):
        return row.label, M.point_key(point), done, None
    work = ctx.root / "work" / slug(row.label) / slug(M.point_key(point))
    cfg = M.write_config(work / "merge.yaml", row, point, ctx.base, [Path(p) for p in ctx.experts],
                         exclude=ctx.small_matrices)
    out = work / "merged"
    try:
        t0 = time.time()
        M.run_merge(cfg, out, ctx.threads)
        t_merge = time.time() - t0
        for split in splits:
            if split in done:
                continue
            t1 = time.time()
            correct = _evaluate(ctx, out, split)
            done[split] = {"row": row.label, "method": row.name, "point": point, "fixed": row.fixed, "split": split,
                           "merge_seconds": round(t_merge, 1), "eval_seconds": round(time.time() - t1, 1),
                           "correct": correct, "config": cfg.read_text(), "defaults": defaults}
            write_json(paths[split], done[split])
        return row.label, M.point_key(point), done, None
    except Exception as exc:  # reported in the results, never silently dropped
        msg = str(exc) if isinstance(exc, RuntimeError) else traceback.format_exc()
        write_json(paths[splits[0]].with_suffix(".error.json"), {"row": row.label, "point": point, "error": msg})
        return row.label, M.point_key(point), None, msg
    finally:
        shutil.rmtree(out, ignore_errors=True)


def mean_acc(result: dict) -> float:
    return float(np.mean([np.mean(v) for v in result["correct"].values()]))


def _map(units: list, jobs: int):
    if jobs > 1 and len(units) > 1:
        with mp.get_context("spawn").Pool(min(jobs, len(units))) as pool:
            yield from pool.imap_unordered(run_unit, units)
    else:
        for u in units:
            yield run_unit(u)


def search(ctx: Context, rows: list[M.Method], jobs: int, extend_steps: int, log=print) -> dict:
    """Validation grid (extended at its edges up to extend_steps times) per row, then test at each row's chosen point.

    A row with a single point and no extension is scored on validation and test in one merge."""
    val: dict[str, dict[str, dict]] = {r.label: {} for r in rows}
    test: dict[str, dict] = {}
    errors: dict[str, str] = {}
    points = {r.label: M.grid_points(r) for r in rows}
    single = {r.label for r in rows if len(points[r.label]) == 1 and not (extend_steps and r.knobs)}
    pending = [(ctx, r, p, ("val", "test") if r.label in single else "val") for r in rows for p in points[r.label]]
    rounds = 0
    while pending:
        log(f"validation: {len(pending)} merge(s)")
        for label, key, res, err in _map(pending, jobs):
            if err:
                errors[label] = err
                log(f"  {label} {key}: FAILED\n{err}")
                continue
            val[label][key] = res["val"]
            if "test" in res:
                test[label] = res["test"]
            log(f"  {label:34s} {key:28s} val avg {mean_acc(res['val']):.4f}")
        pending = []
        rounds += 1
        if rounds <= extend_steps:
            for r in rows:
                scores = {k: mean_acc(v) for k, v in val[r.label].items()}
                new = M.extend(r, scores, points[r.label])
                points[r.label] += new
                pending += [(ctx, r, p, "val") for p in new]
    chosen = {}
    for r in rows:
        if val[r.label]:
            # in grid order, not in the order the parallel merges finished: a tie goes to the earlier point
            keys = [k for k in map(M.point_key, points[r.label]) if k in val[r.label]]
            best_key = max(keys, key=lambda k: mean_acc(val[r.label][k]))
            chosen[r.label] = (r, val[r.label][best_key]["point"])
    todo = [(ctx, r, p, "test") for label, (r, p) in chosen.items() if label not in test]
    log(f"test: {len(todo)} merge(s)")
    for label, key, res, err in _map(todo, jobs):
        if err:
            errors[label] = err
            log(f"  {label} {key}: FAILED\n{err}")
        else:
            test[label] = res["test"]
    for label in test:
        log(f"  {label:34s} {M.point_key(chosen[label][1]):28s} test avg {mean_acc(test[label]):.4f}")
    return {"rows": [r.label for r in rows], "methods": {r.label: r.name for r in rows},
            "known": {r.label: r.known for r in rows}, "fixed": {r.label: r.fixed for r in rows},
            "grid": {label: {k: mean_acc(v) for k, v in pts.items()} for label, pts in val.items()},
            "chosen": {label: M.point_key(p) for label, (r, p) in chosen.items()},
            "val": {label: val[label][M.point_key(p)]["correct"] for label, (r, p) in chosen.items()},
            "test": {label: res["correct"] for label, res in test.items()},
            "configs": {label: res["config"] for label, res in test.items()},
            "seconds": {label: {"merge": res["merge_seconds"], "eval": res["eval_seconds"]}
                        for label, res in test.items()},
            "errors": errors}
