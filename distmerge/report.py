"""The per-tensor report of a merge: `merge_report.parquet` beside the merged model, and `distmerge report`.

One row per tensor written: name, shape, method, shard, when it started (epoch seconds), seconds, device, worker
(host:pid), sha256 of the saved bytes, and whatever
the method measured (ranks kept per task, energy kept, outlier share, weights applied, ...). A stored expert matrix
merged as part of a fused tensor (moe_layout) names it in `merged_as`, and shares its statistics; the seconds are
on its first part.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

REPORT_NAME = "merge_report.parquet"


def report_rows(plan, records) -> list[dict]:
    by_name = {name: (record.shard, row) for record in records for name, row in record.tensors.items()}
    rows = []
    for job in plan.tensors:
        for part in job.stored:
            shard, stats = by_name[part.name]
            merged_as = {"merged_as": job.name} if job.parts else {}  # a fused expert tensor, or a renamed one
            rows.append({
                "tensor": part.name, "shape": list(part.shape), "method": plan.spec.name if job.merge else "copy",
                "shard": shard, **merged_as, **stats,
            })
    return rows


def report_bytes(rows: list[dict], models: list[str]) -> bytes:
    """The parquet file; `models` (the merged models, in task order) is kept in the schema metadata."""
    columns = list(dict.fromkeys(key for row in rows for key in row))  # union of keys, first-seen order
    table = pa.table({key: [row.get(key) for row in rows] for key in columns})
    table = table.replace_schema_metadata({"distmerge.models": json.dumps(models)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_report(out_dir: str | Path) -> tuple[list[dict], list[str]]:
    """(rows, merged model names in task order)."""
    path = Path(out_dir) / REPORT_NAME
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {out_dir} the output directory of a finished distmerge merge?")
    table = pq.read_table(path)
    models = json.loads((table.schema.metadata or {}).get(b"distmerge.models", b"[]"))
    return table.to_pylist(), models


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def matrix_rank(shape: list[int]) -> int:
    """min(rows, cols) of the matrices a spectral method decomposed: the tensor, or each of a stack's."""
    return min(shape[-2:])


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: list[dict], models: list[str]) -> str:
    """A few lines a person reads: what ran, where the time went, what the spectral methods kept."""
    methods = sorted({r["method"] for r in rows})
    seconds = sum(r["seconds"] for r in rows)
    lines = [
        f"models       {', '.join(models)} (tasks 1..{len(models)}, in this order below)",
        f"tensors      {len(rows)} ({', '.join(methods)}) on {', '.join(sorted({r['device'] for r in rows}))}",
        f"compute      {seconds:.1f} s in total (sum over tensors)",
    ]
    busy = defaultdict(float)
    for r in rows:
        busy[r.get("worker", "?")] += r["seconds"]  # reports written before workers were recorded have none
    if len(busy) > 1:
        lines.append(f"workers      {len(busy)}, busy {min(busy.values()):.1f} to {max(busy.values()):.1f} s each")
    spectral = [r for r in rows if r.get("rank_kept")]
    if spectral:
        tasks = len(spectral[0]["rank_kept"])
        rank_share = [_mean(r["rank_kept"][t] / matrix_rank(r["shape"]) for r in spectral) for t in range(tasks)]
        lines.append(f"rank kept    {', '.join(f'{x:.1%}' for x in rank_share)} of min(rows, cols), per task "
                     f"(mean over {len(spectral)} SVD-merged tensors)")
        if spectral[0].get("energy_kept"):
            energy = [_mean(r["energy_kept"][t] for r in spectral) for t in range(tasks)]
            lines.append(f"energy kept  {', '.join(f'{x:.1%}' for x in energy)} per task")
        if spectral[0].get("outlier_share"):
            share = [_mean(r["outlier_share"][t] for r in spectral) for t in range(tasks)]
            lines.append(f"outliers     {', '.join(f'{x:.2%}' for x in share)} of entries per task")
    slowest = sorted(rows, key=lambda r: -r["seconds"])[:5]
    lines.append("slowest      " + "; ".join(f"{r['tensor']} {r['seconds']:.2f} s" for r in slowest))
    return "\n".join(lines)


def per_layer(rows: list[dict], key: str, normalise_by_rank: bool = False) -> dict[int, list[float]]:
    """layer -> mean over that layer's tensors of `key` (a per-task list), per task."""
    grouped = defaultdict(list)
    for r in rows:
        layer = layer_of(r["tensor"])
        if layer is not None and r.get(key):
            values = [v / matrix_rank(r["shape"]) for v in r[key]] if normalise_by_rank else r[key]
            grouped[layer].append(values)
    return {layer: [_mean(col) for col in zip(*values)] for layer, values in sorted(grouped.items())}


def plot(rows: list[dict], models: list[str], out_dir: str | Path) -> list[Path]:
    """rank_kept.png and outlier_share.png: per layer, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for key, label, normalise in (("rank_kept", "rank kept / min(rows, cols)", True),
                                  ("outlier_share", "share of outlier entries", False)):
        series = per_layer(rows, key, normalise)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        layers = list(series)
        for task in range(len(next(iter(series.values())))):
            name = Path(models[task]).name if task < len(models) else f"task {task + 1}"
            ax.plot(layers, [series[layer][task] for layer in layers], marker="o", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{label}, per layer (mean over the layer's matrices)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / f"{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
