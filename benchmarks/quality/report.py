"""Tables (markdown, csv, json) and the PNG plot of a track's results, with bootstrap confidence intervals.

All intervals are 95% percentile intervals from B bootstrap resamples of the test examples, drawn per task
and shared by every row (paired), so that "normalised" (merged / expert on the same resample) and "difference
to the best merge" intervals account for the correlation between rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .common import write_json

B = 1000


def _resamples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(B, n))


def boot_stats(rows: dict[str, dict[str, np.ndarray]], expert: dict[str, np.ndarray], tasks: list[str],
               seed: int = 0) -> dict[str, np.ndarray]:
    """Per row: (B,) bootstrap draws of the mean accuracy and of the mean normalised accuracy."""
    idx = {t: _resamples(len(expert[t]), seed + i) for i, t in enumerate(tasks)}
    exp = {t: expert[t][idx[t]].mean(1) for t in tasks}
    out = {}
    for name, corr in rows.items():
        acc = np.stack([corr[t][idx[t]].mean(1) for t in tasks])          # (T, B)
        norm = np.stack([acc[i] / np.maximum(exp[t], 1e-9) for i, t in enumerate(tasks)])
        out[name] = {"acc": acc.mean(0), "norm": norm.mean(0), "task": acc}
    return out


def ci(draws: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def summarise(track: str, tasks: list[str], base: dict, experts: dict, search: dict, meta: dict) -> dict:
    """Numbers for every row: per-task test accuracy, average and normalised average with CIs."""
    arr = lambda d: {t: np.asarray(d[t], dtype=float) for t in tasks}  # noqa: E731
    expert = arr(experts)
    rows = {"base (zero-shot)" if track == "lm" else "frozen base + probe": arr(base), "experts (own task)": expert}
    merged = {label: arr(c) for label, c in search["test"].items()}
    rows.update(merged)
    draws = boot_stats(rows, expert, tasks)
    best = max(merged, key=lambda k: np.mean([merged[k][t].mean() for t in tasks])) if merged else None
    table = []
    for name, corr in rows.items():
        accs = {t: float(corr[t].mean()) for t in tasks}
        d = draws[name]
        entry = {"row": name, "kind": "reference" if name not in merged else "merge",
                 "method": search["methods"].get(name, ""), "knob": search["chosen"].get(name, ""),
                 "grid_searched": search["known"].get(name, True) if name in merged else None,
                 "val_avg": float(np.mean([np.mean(v) for v in search["val"][name].values()])) if name in merged
                 else None,
                 "task_acc": accs, "task_ci": {t: ci(d["task"][i]) for i, t in enumerate(tasks)},
                 "avg": float(np.mean(list(accs.values()))), "avg_ci": ci(d["acc"]),
                 "norm": float(np.mean([accs[t] / expert[t].mean() for t in tasks])), "norm_ci": ci(d["norm"])}
        if best is not None and name in merged:
            diff = d["acc"] - draws[best]["acc"]
            entry["diff_to_best"] = float(entry["avg"] - np.mean([merged[best][t].mean() for t in tasks]))
            entry["diff_to_best_ci"] = ci(diff)
        table.append(entry)
    refs = [e for e in table if e["kind"] == "reference"]
    merges = sorted((e for e in table if e["kind"] == "merge"), key=lambda e: -e["avg"])
    summary = {"track": track, "tasks": tasks, "rows": refs + merges, "best_merge": best, **meta,
               "grid": search["grid"], "configs": search["configs"], "errors": search["errors"],
               "seconds": search["seconds"]}
    if best is not None:
        gap = draws["experts (own task)"]["acc"] - draws[best]["acc"]
        summary["interference"] = {"experts_avg": refs[1]["avg"], "best_merge": best,
                                   "best_merge_avg": merges[0]["avg"], "gap": refs[1]["avg"] - merges[0]["avg"],
                                   "gap_ci": ci(gap)}
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _pci(lo_hi) -> str:
    return f"[{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"


def markdown(summary: dict) -> str:
    tasks = summary["tasks"]
    head = ["row", "knob (val)"] + tasks + ["avg", "avg 95% CI", "norm. avg", "norm. 95% CI", "Δ best [CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary["rows"]:
        knob = e["knob"] or ("—" if e["kind"] == "reference" else "default")
        if e.get("grid_searched") is False:
            knob += " (no grid)"
        diff = f"{100 * e['diff_to_best']:+.1f} {_pci(e['diff_to_best_ci'])}" if "diff_to_best" in e else ""
        cells = [e["row"] if e["kind"] == "merge" else f"*{e['row']}*", knob]
        cells += [_pct(e["task_acc"][t]) for t in tasks]
        cells += [f"**{_pct(e['avg'])}**", _pci(e["avg_ci"]), _pct(e["norm"]), _pci(e["norm_ci"]), diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(summary: dict, path: Path) -> None:
    tasks = summary["tasks"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "kind", "method", "knob", "val_avg"] + tasks
                   + ["avg", "avg_lo", "avg_hi", "norm", "norm_lo", "norm_hi"])
        for e in summary["rows"]:
            w.writerow([e["row"], e["kind"], e["method"], e["knob"], e["val_avg"] if e["val_avg"] is not None else ""]
                       + [f"{e['task_acc'][t]:.4f}" for t in tasks]
                       + [f"{x:.4f}" for x in (e["avg"], *e["avg_ci"], e["norm"], *e["norm_ci"])])


def plot(summary: dict, path: Path, title: str) -> None:
    """Normalised accuracy per row (bar, 95% CI) with each task's normalised accuracy as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    tasks = summary["tasks"]
    expert = next(e for e in rows if e["row"] == "experts (own task)")
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(rows) + 3), 4.8))
    x = np.arange(len(rows))
    norm = [100 * e["norm"] for e in rows]
    err = np.array([[100 * (e["norm"] - e["norm_ci"][0]), 100 * (e["norm_ci"][1] - e["norm"])] for e in rows]).T
    colors = ["#999999" if e["kind"] == "reference" else "#4477aa" for e in rows]
    ax.bar(x, norm, yerr=err, color=colors, capsize=3, zorder=2)
    markers = "osD^v<>p*h"
    for i, t in enumerate(tasks):
        ys = [100 * e["task_acc"][t] / expert["task_acc"][t] for e in rows]
        ax.scatter(x + (i - len(tasks) / 2) * 0.06, ys, s=12, marker=markers[i % len(markers)], zorder=3,
                   label=t, alpha=0.8)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [e["row"] for e in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("accuracy / expert's accuracy (%)")
    lo = min(min(norm), *(100 * e["task_acc"][t] / expert["task_acc"][t] for e in rows for t in tasks))
    ax.set_ylim(max(0, lo - 5), 105)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(summary: dict, out_dir: Path, name: str, title: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", summary)
    write_csv(summary, out_dir / f"{name}.csv")
    md = markdown(summary)
    (out_dir / f"{name}.md").write_text(md + "\n")
    plot(summary, out_dir / f"{name}.png", title)
    return md
