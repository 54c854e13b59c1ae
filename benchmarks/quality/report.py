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
from .methods import row_label

B = 1000
ABLATION_REF = "rtsvm"  # the rtsvm row at its defaults: the switch ablation's reference


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


def summarise(track: str, tasks: list[str], base: dict, experts: dict, search: dict, meta: dict,
              extra_refs: dict | None = None) -> dict:
    """Numbers for every row: per-task test accuracy, average and normalised average with CIs.
    extra_refs: more reference rows ({label: {task: 0/1 list}}), listed after the experts."""
    arr = lambda d: {t: np.asarray(d[t], dtype=float) for t in tasks}
    expert = arr(experts)
    rows = {"base (zero-shot)" if track == "lm" else "frozen base + probe": arr(base), "experts (own task)": expert}
    rows.update({label: arr(c) for label, c in (extra_refs or {}).items()})
    merged = {label: arr(c) for label, c in search["test"].items()}
    rows.update(merged)
    draws = boot_stats(rows, expert, tasks)
    main = [k for k in merged if search["methods"].get(k) == k]  # ablation variants are not candidates for "best"
    best = max(main, key=lambda k: np.mean([merged[k][t].mean() for t in tasks])) if main else None
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
                 "norm": float(np.mean([accs[t] / max(expert[t].mean(), 1e-9) for t in tasks])), "norm_ci": ci(d["norm"])}
        if best is not None:  # references too: how far the experts and the data-mixture models are from it
            diff = d["acc"] - draws[best]["acc"]
            entry["diff_to_best"] = float(entry["avg"] - np.mean([merged[best][t].mean() for t in tasks]))
            entry["diff_to_best_ci"] = ci(diff)
        fixed = search.get("fixed", {}).get(name, {})
        # the statistics rows (alpha fixed) compare with the defaults at that alpha, the switch rows with `rtsvm`
        ref = row_label("rtsvm", {"alpha": fixed["alpha"]}) if "alpha" in fixed else ABLATION_REF
        if ref in merged and name in merged and search["methods"].get(name) in ("rtsvm", "tsvm"):
            entry["ablation_ref"] = ref
            entry["diff_to_ref"] = float(entry["avg"] - np.mean([merged[ref][t].mean() for t in tasks]))
            entry["diff_to_ref_ci"] = ci(d["acc"] - draws[ref]["acc"])
            ref_val = np.mean([np.mean(v) for v in search["val"][ref].values()])
            entry["val_diff_to_ref"] = float(entry["val_avg"] - ref_val)
            entry["fixed"] = fixed
        table.append(entry)
    refs = [e for e in table if e["kind"] == "reference"]  # base, experts, then any extra references
    merges = sorted((e for e in table if e["kind"] == "merge"), key=lambda e: -e["avg"])
    summary = {"track": track, "tasks": tasks, "rows": refs + merges, "best_merge": best, **meta,
               "grid": search["grid"], "configs": search["configs"], "errors": search["errors"],
               "seconds": search["seconds"]}
    base_row = next(iter(rows))
    gain = {}
    for i, t in enumerate(tasks):
        g = draws["experts (own task)"]["task"][i] - draws[base_row]["task"][i]
        gain[t] = {"base": float(rows[base_row][t].mean()), "expert": float(expert[t].mean()),
                   "gain": float(expert[t].mean() - rows[base_row][t].mean()), "gain_ci": ci(g), "n_test": len(expert[t])}
    g = draws["experts (own task)"]["acc"] - draws[base_row]["acc"]
    gain["average"] = {"base": refs[0]["avg"], "expert": refs[1]["avg"], "gain": refs[1]["avg"] - refs[0]["avg"],
                       "gain_ci": ci(g), "n_test": sum(len(expert[t]) for t in tasks)}
    summary["expert_gain"] = gain
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
        if e["kind"] == "merge" and e["method"] != e["row"]:
            continue  # ablation variants: in their own table
        knob = e["knob"] or ("—" if e["kind"] == "reference" else "default")
        if e.get("grid_searched") is False:
            knob += " (no grid)"
        diff = f"{100 * e['diff_to_best']:+.1f} {_pci(e['diff_to_best_ci'])}" if "diff_to_best" in e else ""
        cells = [e["row"] if e["kind"] == "merge" else f"*{e['row']}*", knob]
        cells += [_pct(e["task_acc"][t]) for t in tasks]
        cells += [f"**{_pct(e['avg'])}**", _pci(e["avg_ci"]), _pct(e["norm"]), _pci(e["norm_ci"]), diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_markdown(summary: dict) -> str:
    base_name = summary["rows"][0]["row"]
    lines = [f"| task | n test | {base_name} | expert | expert - base [95% CI] |", "|---|---|---|---|---|"]
    for t, g in summary["expert_gain"].items():
        lines.append(f"| {t} | {g['n_test']} | {_pct(g['base'])} | {_pct(g['expert'])} | "
                     f"{100 * g['gain']:+.1f} {_pci(g['gain_ci'])} |")
    return "\n".join(lines)


def ablation_markdown(summary: dict) -> str:
    rows = [e for e in summary["rows"] if "diff_to_ref" in e]
    if len(rows) < 2:
        return ""
    head = ["| row | knob (val) | val avg | val Δ | test avg [95% CI] | norm. avg | test Δ [95% CI] |",
            "|---|---|---|---|---|---|---|"]
    out = []
    fixed_refs = sorted({e["ablation_ref"] for e in rows} - {ABLATION_REF})
    groups = [(ABLATION_REF, "each addition on/off, and each candidate reconstruction on top of the defaults, each "
                             "with alpha (and its own knob) chosen on validation; Δ against the defaults (`rtsvm`)")]
    for ref in fixed_refs:
        alpha = next(e["fixed"]["alpha"] for e in rows if e["ablation_ref"] == ref)
        groups.append((ref, f"one statistic at a time away from its default (every addition on), alpha fixed at "
                            f"{alpha:g}; Δ against the defaults at that alpha"))
    for ref, what in groups:
        sel = [e for e in rows if e["ablation_ref"] == ref]
        if len(sel) < 2:
            continue
        sel.sort(key=lambda e: (e["row"] != ref, e["row"] != "tsvm", e["row"]))
        out += ["", f"{what}:", ""] + head
        for e in sel:
            out.append(f"| {e['row']} | {e['knob'] or '—'} | {_pct(e['val_avg'])} | {100 * e['val_diff_to_ref']:+.1f} | "
                       f"{_pct(e['avg'])} {_pci(e['avg_ci'])} | {_pct(e['norm'])} | "
                       f"{100 * e['diff_to_ref']:+.1f} {_pci(e['diff_to_ref_ci'])} |")
    return "\n".join(out[1:])


def document(summary: dict, title: str) -> str:
    """The committed markdown: main table, expert gains over the base, interference, rtsvm ablation."""
    parts = [f"## {title}", "", "All rows: test accuracy (%) per task, their unweighted average with a 95% bootstrap "
             "interval (test examples resampled per task), and the average of accuracy / expert's accuracy "
             "(norm.). Each merge's knob was chosen on the validation split (val avg = its validation average); "
             "Δ best = difference to the best merge on the same resamples.", "", markdown(summary), "",
             "### Experts against the base (each task's own head / prompt)", "", gain_markdown(summary)]
    if "interference" in summary:
        i = summary["interference"]
        parts += ["", "### Interference", "",
                  f"Experts (each on its own task) average {_pct(i['experts_avg'])}; the best merge "
                  f"({i['best_merge']}) averages {_pct(i['best_merge_avg'])}: a gap of {100 * i['gap']:.1f} points "
                  f"{_pci(i['gap_ci'])}."]
    abl = ablation_markdown(summary)
    if abl:
        parts += ["", "### R-TSVM ablation", "",
                  "OW = outlier-aware weighting, AR = sparsity-adaptive rank, SO = spectral outliers clipped. The "
                  "plain `rtsvm` row runs the defaults (all three on: outlier_m 3, mean statistic, outlier_weight 0, "
                  "residual add, eta 0.9, spectrum_outlier_m 1.5). `tsvm` and `rtsvm [OW off, AR off, SO off]` "
                  "compute the same merge. val Δ / test Δ: difference to the reference row "
                  "on validation / test (test interval paired over the same resamples).", "", abl]
    if summary.get("errors"):
        parts += ["", "### Failed rows", ""] + [f"- {k}: {v.splitlines()[0] if v else ''}" for k, v in summary["errors"].items()]
    return "\n".join(parts)


def seeds_markdown(by_seed: dict[int, dict]) -> str:
    """The rows that every fine-tuning seed ran, side by side: how much a row, and its gap to the best merge, move
    when only the experts' seed changes (the data, splits, grids and merge code being the same)."""
    seeds = sorted(by_seed)
    rows = [{e["row"]: e for e in by_seed[s]["rows"]} for s in seeds]
    common = [label for label in rows[0] if all(label in r for r in rows[1:])]
    head = (["row"] + [f"avg, seed {s}" for s in seeds] + [f"Δ best, seed {s} [CI]" for s in seeds]
            + ["seed spread of avg", "seed spread of Δ best"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in common:
        es = [r[label] for r in rows]
        spread = lambda xs: f"{100 * (max(xs) - min(xs)):.1f}"
        cells = [label] + [f"{_pct(e['avg'])} ({e['knob'] or '—'})" for e in es]
        cells += [f"{100 * e['diff_to_best']:+.1f} {_pci(e['diff_to_best_ci'])}" for e in es]
        cells += [spread([e["avg"] for e in es]), spread([e["diff_to_best"] for e in es])]
        lines.append("| " + " | ".join(cells) + " |")
    best = ", ".join(f"seed {s}: {by_seed[s]['best_merge']}" for s in seeds)
    return (f"Best merge per seed: {best}. Intervals: test-set bootstrap within one seed; the spread columns are the "
            f"largest minus the smallest value over the seeds, for the same knobs' search.\n\n" + "\n".join(lines))


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

    rows = [e for e in summary["rows"] if e["kind"] == "reference" or e["method"] == e["row"]]
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
        ys = [100 * e["task_acc"][t] / max(expert["task_acc"][t], 1e-9) for e in rows]
        ax.scatter(x + (i - len(tasks) / 2) * 0.06, ys, s=12, marker=markers[i % len(markers)], zorder=3,
                   label=t, alpha=0.8)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [e["row"] for e in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("accuracy / expert's accuracy (%)")
    lo = min(min(norm), *(100 * e["task_acc"][t] / max(expert["task_acc"][t], 1e-9) for e in rows for t in tasks))
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
    md = document(summary, title)
    (out_dir / f"{name}.md").write_text(md + "\n")
    plot(summary, out_dir / f"{name}.png", title)
    return md
