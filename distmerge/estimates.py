"""What a plan will cost: bytes read and written, decompositions and their flops, memory per worker, and a
lower-bound time on a given cluster; and `describe`, the summary `distmerge plan` and `validate` print.

Every count comes from the methods' own declarations (`MethodSpec.work`), so what is printed is what the merge
runs (tests count the decompositions a merge makes and compare).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checkpoint import CODE_TO_NAME
from .config import format_bytes
from .methods.linalg import SVD_ROUTES

if TYPE_CHECKING:
    from .plan import MergePlan, TensorJob, WorkUnit

# Sustained rates of one worker per route, from benchmarks/results/svd/svd_cuda.md and gpu_layer/gpu_layer.md
# (H100) and the CPU SVD benchmark (2 cores); the flop counts of Decomposition.flops divided by measured seconds.
WORKER_FLOPS = {
    "cpu": {"exact": 8.6e10, "gram": 6e10, "randomized": 8e10, "polar": 6e10, "spectrum": 6e10},
    "cuda": {"exact": 3.8e12, "gram": 1.5e13, "randomized": 7.8e12, "polar": 1.5e13, "spectrum": 1.5e13},
}
WORKER_ELEMENTWISE_BYTES = {"cpu": 1.5e9, "cuda": 5e11}  # bytes read per second by elementwise methods
FLOPS_PER_BYTE_MOVED = 50.0  # weighs decompositions against data movement when ordering units


# ---- bytes -------------------------------------------------------------------------------------------------


def read_bytes(plan: MergePlan, job: TensorJob) -> int:
    """Bytes read from storage for one output tensor (a copied tensor is read once; an input's vocabulary tensor
    with those of the inputs its fill rows come from)."""
    if not job.merge:
        return plan.reference.tensors[job.name].nbytes
    if plan.vocabulary is not None and job.name in plan.vocabulary.names:
        return sum(read.tensors[job.name].nbytes for ckpt in plan.inputs() for read in ckpt.vocabulary_reads(job.name))
    return sum(ckpt.tensors[job.name].nbytes for ckpt in plan.inputs())


def unit_read_bytes(plan: MergePlan, unit: WorkUnit) -> int:
    return sum(read_bytes(plan, job) for job in unit.tensors)


def bytes_read(plan: MergePlan) -> int:
    return sum(read_bytes(plan, job) for job in plan.tensors)


def bytes_written(plan: MergePlan) -> int:
    return sum(job.out_bytes for job in plan.tensors)


# ---- compute and memory --------------------------------------------------------------------------------------


def decomposition_counts(plan: MergePlan) -> Counter:
    """How many decompositions of each route the merge runs (at most, where `upper_bound`)."""
    return Counter(d.route for job in plan.tensors for d in job.work.decompositions)


def svd_count(plan: MergePlan) -> int:
    return sum(1 for job in plan.tensors for d in job.work.decompositions if d.is_svd)


def flops_by_route(job: TensorJob) -> dict[str, float]:
    flops: dict[str, float] = {}
    for d in job.work.decompositions:
        flops[d.route] = flops.get(d.route, 0.0) + d.flops()
    return flops


def is_upper_bound(plan: MergePlan) -> bool:
    return any(job.work.upper_bound for job in plan.tensors)


def tensor_cost(job: TensorJob, n_models: int) -> float:
    """Relative cost, for ordering units largest first: bytes moved plus decomposition flops."""
    moved = job.numel * 4 * (n_models + 2)
    return moved + sum(d.flops() for d in job.work.decompositions) / FLOPS_PER_BYTE_MOVED


def job_peak_bytes(plan: MergePlan, job: TensorJob, rows: int | None = None) -> int:
    """One worker's working set for merging `job`, whole or (rows) a block of that many rows: T + 1 compute-dtype
    copies, the stored-dtype read buffer, the method's declared scratch (which scales with the block); for a
    vocabulary tensor also what reading one input holds (its rows in the output order, and its own and its fill
    rows' inputs' tensors in the compute dtype)."""
    width = 8 if plan.config.compute_dtype == "float64" else 4
    share = 1.0 if rows is None else rows / job.shape[0]
    numel = job.numel * share
    reading = 0
    if plan.vocabulary is not None and job.name in plan.vocabulary.names:
        reading = (1 + max(len(ckpt.vocabulary_reads(job.name)) for ckpt in plan.inputs())) * job.numel * width
    return int((len(plan.models) + 1) * numel * width + numel * 4
               + share * (job.work.scratch * width + job.work.scratch_float64 * 8) + reading)


def peak_bytes_per_worker(plan: MergePlan) -> int:
    """The largest working set of one tensor (or of one row block, for tensors merged in blocks)."""
    return max((job_peak_bytes(plan, job, job.block_rows) for job in plan.tensors if job.merge), default=0)


def rows_within(plan: MergePlan, job: TensorJob, budget: int) -> int:
    """The most rows of `job` one block can hold within `budget` bytes (at least one)."""
    return max(1, min(job.shape[0], int(budget // max(1, job_peak_bytes(plan, job, 1)))))


def over_limit(plan: MergePlan) -> list[tuple[TensorJob, int]]:
    """(job, its working set) for every merged tensor whose working set exceeds what a worker may hold (the
    budget given, else its memory where it is known)."""
    if plan.memory_limit is None:
        return []
    peaks = [(job, job_peak_bytes(plan, job, job.block_rows)) for job in plan.tensors if job.merge]
    return [(job, peak) for job, peak in peaks if peak > plan.memory_limit]


# ---- time on a cluster -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """What `distmerge plan --gpus N --nodes M --read-gbps X` assumes."""

    workers: int
    nodes: int
    read_gbps: float  # storage read bandwidth per node, GB/s
    write_gbps: float
    device: str


def unit_seconds(plan: MergePlan, unit: WorkUnit, device_kind: str) -> float:
    """One worker's compute time for a unit: decompositions at their route's rate, elementwise work at the
    elementwise read rate."""
    rates = WORKER_FLOPS[device_kind]
    return sum(
        sum(flops / rates[route] for route, flops in flops_by_route(job).items()) if job.work.decompositions
        else read_bytes(plan, job) / WORKER_ELEMENTWISE_BYTES[device_kind]
        for job in unit.tensors
    )


def estimate_seconds(plan: MergePlan, cluster: Cluster) -> dict[str, float]:
    """Lower bounds: reading and writing at full storage bandwidth, computing on every worker at once, and the
    largest unit on one worker. The merge takes at least the largest of them."""
    kind = cluster.device.split(":")[0]
    per_unit = [unit_seconds(plan, unit, kind) for unit in plan.units]
    return {
        "read": bytes_read(plan) / (cluster.nodes * cluster.read_gbps * 1e9),
        "write": bytes_written(plan) / (cluster.nodes * cluster.write_gbps * 1e9),
        "compute": sum(per_unit) / cluster.workers,
        "largest unit": max(per_unit, default=0.0),
    }


# ---- the summary ------------------------------------------------------------------------------------------------


def describe(plan: MergePlan, device: str, cluster: Cluster | None = None) -> str:
    """Human-readable summary for `distmerge plan` and `distmerge validate`."""
    counts = decomposition_counts(plan)
    at_most = "at most " if is_upper_bound(plan) else ""
    svd_routes = ", ".join(f"{counts[r]} {r}" for r in SVD_ROUTES if counts[r])
    eigh = counts["polar"] + counts["spectrum"]
    blocked = sum(1 for job in plan.tensors if job.block_rows)
    cpu_blocked = sum(1 for job in plan.tensors if job.blockwise) if device.split(":")[0] == "cpu" else 0
    base = ("" if plan.base is None else f", counting base model {plan.base.ref}" if plan.spec.base_is_model
            else f" + base model {plan.base.ref}")
    lines = [
        f"method        {plan.spec.name} ({len(plan.models)} models{base})",
        f"tensors       {len(plan.tensors)} in {len(plan.units)} shard(s)"
        + (f"; left out: {', '.join(plan.dropped)} (tied to the embeddings)" if plan.dropped else ""),
        f"read          {format_bytes(bytes_read(plan))}",
        f"write         {format_bytes(bytes_written(plan))}"
        + f" ({', '.join(sorted({CODE_TO_NAME.get(t.out_dtype, t.out_dtype) for t in plan.tensors}))})",
        f"SVDs          {at_most}{svd_count(plan)}" + (f" ({svd_routes})" if svd_routes else ""),
        f"Gram eigh     {at_most}{eigh}" + (f" ({counts['polar']} polar factors, {counts['spectrum']} spectra)"
                                          if eigh else ""),
        f"peak memory   {format_bytes(peak_bytes_per_worker(plan))} per worker (one tensor at a time)",
        f"budget        {format_bytes(plan.memory_budget)} per worker"
        + (f"; {blocked} tensor(s) merged in row blocks" if blocked else ""),
        f"device        {device}" + (f"; {cpu_blocked} tensor(s) merged in cache-sized row blocks (entry by entry)"
                                     if cpu_blocked else ""),
    ]
    over = over_limit(plan)
    if over:
        job, peak = max(over, key=lambda item: item[1])
        lines.append(f"over limit    {len(over)} tensor(s) over {format_bytes(plan.memory_limit)}, the largest "
                     f"{job.name} ({format_bytes(peak)}): `distmerge merge` refuses to start")
    if plan.first_pass is not None:
        lines.append(f"first pass    {plan.first_pass.label}: every input is read twice")
    missing = [ckpt.ref for ckpt in plan.inputs() if not ckpt.has_weights]
    if missing:
        lines.append(f"note          no weights yet for {', '.join(missing)}: tensors derived from config.json")
    if cluster is not None:
        from .progress import format_seconds

        parts = estimate_seconds(plan, cluster)
        bound = max(parts["read"] + parts["write"], parts["compute"], parts["largest unit"])
        lines += [
            f"cluster       {cluster.workers} {'GPU' if cluster.device.startswith('cuda') else 'CPU'} worker(s) on "
            f"{cluster.nodes} node(s); storage {cluster.read_gbps:g} GB/s read, {cluster.write_gbps:g} GB/s "
            "write per node",
            # with data-dependent ranks the compute is counted at its most: the bound is then an estimate
            f"time          {'about' if at_most else 'at least'} {format_seconds(bound)} (" + ", ".join(
                f"{name} {format_seconds(value)}" for name, value in parts.items()) + ")",
        ]
        if cluster.workers > 1 and parts["largest unit"] > parts["compute"] / 2:
            share = parts["largest unit"] / (parts["compute"] * cluster.workers)
            lines.append(  # one shard is one unit of work: a unit over half a worker's share leaves workers idle
                f"note          the largest shard holds {share:.0%} of the work and {len(plan.units)} shard(s) feed "
                f"{cluster.workers} workers; a smaller shard_size (--shard-size) cuts more, smaller units")
    return "\n".join(lines)
