"""The per-tensor report of a merge: `merge_report.parquet` beside the merged model.

One row per tensor: name, shape, method, shard, seconds, device, sha256 of the saved bytes, and whatever the
method measured (ranks kept per task, energy kept, outlier share, weights applied, ...).
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

REPORT_NAME = "merge_report.parquet"


def report_rows(plan, records) -> list[dict]:
    by_name = {name: (record.shard, row) for record in records for name, row in record.tensors.items()}
    rows = []
    for job in plan.tensors:
        shard, stats = by_name[job.name]
        rows.append({
            "tensor": job.name, "shape": list(job.shape), "method": plan.spec.name if job.merge else "copy",
            "shard": shard, **stats,
        })
    return rows


def report_bytes(rows: list[dict]) -> bytes:
    columns = list(dict.fromkeys(key for row in rows for key in row))  # union of keys, first-seen order
    buffer = io.BytesIO()
    pq.write_table(pa.table({key: [row.get(key) for row in rows] for key in columns}), buffer)
    return buffer.getvalue()


def read_report(path) -> pa.Table:
    return pq.read_table(path)
