"""Which merge methods exist (asked from `distmerge methods`), each one's knob grid, and running one merge.

Adding a method to the benchmark is one line in GRIDS. A method that `distmerge methods` lists but GRIDS does
not know still runs, once, at its defaults (and the report says so); a method GRIDS knows but distmerge does
not list is skipped. Knobs are chosen on the validation split only; when the best value sits on the edge of the
grid the grid is extended outwards (EXTEND_STEPS[track] times at most), so an edge optimum is not reported as chosen.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Task arithmetic-style methods add the T task vectors (aggregate: sum), so their lambda is about 1/T..1;
# TIES-style methods take a disjoint mean (aggregate: mean), so theirs is about 1..T.
# Three points per knob (a CPU budget); a best value on the grid's edge extends the grid outwards.
LAM_SUM = (0.3, 0.5, 0.75)
LAM_SPARSE_SUM = (0.3, 0.5, 0.75)
LAM_SPARSE_MEAN = (1.0, 1.5, 2.0)
DENSITY = (0.2, 0.5)
ALPHA = (0.5, 0.75, 1.0)
EXTEND_STEPS = {"encoder": 2,  # per track; the LM track's spectral methods want alpha 4-6, several steps out
                "lm": 6}

# method: ({knob: grid, ...}, {fixed parameter: value}); the grid is the product of the knobs' values.
GRIDS: dict[str, tuple[dict, dict]] = {
    "linear": ({}, {}),
    "task_arithmetic": ({"lambda": LAM_SUM}, {}),
    "ties": ({"lambda": LAM_SPARSE_MEAN, "density": DENSITY}, {}),
    "dare_linear": ({"lambda": LAM_SPARSE_SUM, "density": DENSITY}, {}),
    "dare_ties": ({"lambda": LAM_SPARSE_MEAN, "density": DENSITY}, {}),
    "breadcrumbs": ({"lambda": LAM_SPARSE_SUM, "density": DENSITY}, {}),
    "breadcrumbs_ties": ({"lambda": LAM_SPARSE_MEAN, "density": DENSITY}, {}),
    "della": ({"lambda": LAM_SPARSE_MEAN, "density": (0.3, 0.5)}, {}),  # density - epsilon(0.15) must stay > 0
    "della_linear": ({"lambda": LAM_SPARSE_SUM, "density": (0.3, 0.5)}, {}),
    "consensus_ta": ({"lambda": LAM_SUM}, {}),
    "consensus_ties": ({"lambda": LAM_SPARSE_MEAN}, {"density": 0.5}),
    "model_stock": ({}, {}),
    "slerp": ({"t": (0.25, 0.5, 0.75)}, {}),  # two models only
    "tsvm": ({"alpha": ALPHA}, {}),
    "rtsvm": ({"alpha": ALPHA}, {}),
    "iso_c": ({"alpha": ALPHA}, {}),
    "iso_cts": ({"alpha": ALPHA}, {}),
}

# Where a track's earlier validation searches ended far from ALPHA, its grid starts there (the LM track's spectral
# methods chose alpha 1.8-5.6 after up to six extensions from ALPHA: 2026-12-02, lm.md). Still chosen on validation
# and still extended at an edge; only the steps to get there are saved.
TRACK_KNOBS = {"lm": {"tsvm": {"alpha": (1.3333, 1.7777, 2.3702)}, "rtsvm": {"alpha": (1.3333, 1.7777, 2.3702)},
                      "iso_c": {"alpha": (3.1601, 4.2133, 5.6175)}, "iso_cts": {"alpha": (3.1601, 4.2133, 5.6175)}}}

# Extra rows: a method run with some parameters fixed (each gets its own knob search).
# rtsvm: each addition off in turn, and all off (the plain row is all on, its defaults), each with its own alpha
# search; then one statistic at a time moved away from its default (every addition on) at one fixed alpha (the
# value validation chose for the defaults on that track), next to the defaults at that alpha: one merge each (a CPU
# budget). The ablation table and the proposed defaults come from these rows (read on validation first).
STAT_ALPHA = {"encoder": 0.3333,  # track 1's validation choice for rtsvm (grid 0.5, 0.75, 1 extended down)
              "lm": 1.7777}       # track 2's (grid 0.5, 0.75, 1 extended up)
ADDITIONS = ("outlier_weighting", "adaptive_rank", "spectrum_outliers")  # rtsvm's, all on by default
SWITCHES = {"rtsvm": [{a: a != off for a in ADDITIONS} for off in ADDITIONS] + [dict.fromkeys(ADDITIONS, False)]}
STATISTICS = {"rtsvm": [{}, {"outlier_m": 5.0}, {"outlier_m": 2.0}, {"outlier_statistic": "median"},
                        {"outlier_weight": 0.5}, {"outlier_residual": "drop"}, {"eta": 0.8}, {"eta": 0.95}]}
# rtsvm's candidate reconstructions (issue 15), each on top of the defaults: (fixed parameters, its own knob grid),
# searched jointly with alpha on validation. The spectral outliers won on validation on both tracks (2026-12-03) and
# are now part of the defaults; their row searches the threshold around its default. The lambda grids follow each
# statistic's scale: an outlier share is about 0.01-0.05 of the entries, an excess kurtosis about 1-100. The budget
# counts every SVD-merged matrix, the untouched ones too (on the LM track 18 of 30 blocks are not tuned): only a
# budget below 12/30 can bind there.
CANDIDATES = {"rtsvm": [
    ({"spectrum_outliers": True, "spectrum_outlier_shrink": 0.0}, {"spectrum_outlier_m": (1.0, 1.5, 3.0)}),
    ({"task_weighting": "outlier_share"}, {"task_weighting_lambda": (10.0, 50.0)}),
    ({"task_weighting": "kurtosis"}, {"task_weighting_lambda": (0.1, 1.0)}),
    ({"rank_allocation": "model"}, {"rank_budget": (0.1, 0.2, 0.5, 1.0, 2.0)}),
]}
ABLATIONS = ("none", "switches", "candidates", "all")  # each level runs the rows of the levels before it


def variants(name: str, ablation: str, stat_alpha: float) -> list[tuple[dict, dict]]:
    """The extra rows as (fixed parameters, extra knobs): none, the switches, also the candidate reconstructions
    (`candidates`), or also the statistics at alpha stat_alpha (`all`)."""
    level = ABLATIONS.index(ablation)
    rows = [(v, {}) for v in SWITCHES.get(name, [])] if level >= 1 else []
    if level >= 2:
        rows += CANDIDATES.get(name, [])
    if level >= 3:
        rows += [({**v, "alpha": stat_alpha}, {}) for v in STATISTICS.get(name, [])]
    return rows


@dataclass
class Method:
    name: str
    needs_base: bool
    min_models: int
    max_models: int | None
    knobs: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    known: bool = True

    @property
    def label(self) -> str:
        return row_label(self.name, self.fixed) if self.name in SWITCHES else self.name


def row_label(name: str, fixed: dict) -> str:
    switches = name == "rtsvm" and all(a in fixed for a in ADDITIONS)
    rest = {k: v for k, v in fixed.items() if not (switches and k in ADDITIONS)}
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rest.items()]
    if switches:
        states = (f"{short} {'on' if fixed[a] else 'off'}" for short, a in zip(("OW", "AR", "SO"), ADDITIONS))
        parts.insert(0, ", ".join(states))
    return name + (f" [{', '.join(parts)}]" if parts else "")


def list_methods() -> dict[str, dict]:
    """Parse `distmerge methods`: {name: {needs_base, min_models, max_models}}."""
    text = subprocess.run([sys.executable, "-m", "distmerge.cli", "methods"], check=True, capture_output=True,
                          text=True).stdout
    found, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^([a-z0-9_]+): ", line)
        if head:
            current = head.group(1)
            found[current] = {"needs_base": True, "min_models": 1, "max_models": None}
            continue
        info = re.match(r"^\s+(base model required|no base model needed); models: (\d+)(\+?)", line)
        if current and info:
            n = int(info.group(2))
            found[current] = {"needs_base": info.group(1) == "base model required", "min_models": n,
                              "max_models": None if info.group(3) else n}
    return found


def plan(n_models: int, only: list[str] | None = None, ablation: str = "all", track: str = "encoder",
         log=print) -> list[Method]:
    """The rows to run on `track`: every listed method (that takes n_models models), plus the variants of
    `ablation` (one of ABLATIONS, see variants())."""
    rows = []
    for name, info in list_methods().items():
        if only and name not in only:
            continue
        if n_models < info["min_models"] or (info["max_models"] is not None and n_models > info["max_models"]):
            log(f"skip {name}: merges {info['min_models']}..{info['max_models'] or 'any'} models, not {n_models}")
            continue
        knobs, fixed = GRIDS.get(name, ({}, {}))
        knobs = {**knobs, **TRACK_KNOBS.get(track, {}).get(name, {})}
        rows.append(Method(name, info["needs_base"], info["min_models"], info["max_models"], dict(knobs),
                           dict(fixed), known=name in GRIDS))
        for extra, extra_knobs in variants(name, ablation, STAT_ALPHA[track]):
            rows.append(Method(name, info["needs_base"], info["min_models"], info["max_models"],
                               {**{k: v for k, v in knobs.items() if k not in extra}, **extra_knobs},
                               {**fixed, **extra}))
    return rows


def grid_points(method: Method) -> list[dict]:
    keys = list(method.knobs)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(method.knobs[k] for k in keys))]


def extend(method: Method, scores: dict[str, float], points: list[dict]) -> list[dict]:
    """New points one step beyond the grid's edge when the best point lies on that edge (per 1-D knob only)."""
    if not scores:
        return []
    best = max(points, key=lambda p: scores.get(point_key(p), float("-inf")))
    new = []
    for knob in ("lambda", "alpha"):
        if knob not in best:
            continue
        values = sorted({p[knob] for p in points})
        if len(values) < 2:
            continue
        if best[knob] == values[-1]:
            step = values[-1] / values[-2]
            new.append({**best, knob: round(values[-1] * step, 4)})
        elif best[knob] == values[0] and values[0] / (values[1] / values[0]) > 0.01:
            new.append({**best, knob: round(values[0] / (values[1] / values[0]), 4)})
    return [p for p in new if point_key(p) not in scores]


def point_key(point: dict) -> str:
    return ",".join(f"{k}={point[k]}" for k in sorted(point)) or "default"


# Methods that give each task floor(r/T) singular triplets of a 2-D tensor: distmerge 0.x fails on a tensor with
# min(rows, cols) < T (BERT's 2 x 384 token-type embeddings with 6 experts), so such tensors are passed as
# `exclude` (averaged, the documented route for tensors not to SVD-merge). See small_matrices().
PER_TASK_RANK = ("tsvm", "rtsvm")


def small_matrices(checkpoint: Path, n_models: int) -> list[str]:
    """Names of the checkpoint's 2-D tensors whose smaller side is below the number of merged models."""
    from safetensors import safe_open

    names = []
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                if len(shape) == 2 and min(shape) < n_models:
                    names.append(k)
    return names


def write_config(path: Path, method: Method, point: dict, base: Path, models: list[Path],
                 exclude: tuple = ()) -> Path:
    doc = {"merge_method": method.name}
    if method.needs_base:
        doc["base_model"] = str(base)
    doc["models"] = [{"model": str(m)} for m in models]
    params = {**method.fixed, **point}
    if exclude and method.name in PER_TASK_RANK:
        params["exclude"] = list(exclude)
    if params:
        doc["parameters"] = params
    doc["dtype"] = "float32"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_merge(config: Path, out: Path, threads: int, seed: int = 0, timeout: int = 1800) -> None:
    """`distmerge merge` as users run it; a failure is raised with the exact command and distmerge's stderr."""
    cmd = [sys.executable, "-m", "distmerge.cli", "merge", str(config), "-o", str(out), "--quiet", "--force",
           "--threads", str(threads), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"distmerge failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
