"""Running one work unit (one output shard) on one device.

For each tensor of the unit: read it from every input straight from storage, check it, move it to the device in
the compute dtype, call the method, cast to the saved dtype, append it to the shard. The shard is written under a
temporary name and renamed when complete. The local runtime and each Ray actor call the same `run_unit`, so both
produce the same bytes. `unit_statistic` is a unit's share of a method's first pass; what it computes is the
method's business.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from typing import Any, Callable

import torch

from .checkpoint import CODE_TO_NAME, DTYPES, Checkpoint
from .errors import CheckpointError, ConfigError, UserError
from .methods import TensorContext
from .plan import MergePlan, TensorJob, WorkUnit
from .writer import OutputDir, ShardRecord, ShardWriter, WriteBehind


def resolve_device(name: str) -> torch.device:
    """The torch device for `name`, checked. On CUDA, float32 matrix products are made IEEE float32: TF32
    tensor cores would round inputs to 10 mantissa bits, and the merge promises float32 arithmetic."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} was asked for but no CUDA device is visible; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    return device


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity, in one reduction pass and no tensor-sized temporary: NaN propagates through
    min and max, and an infinity is an extreme."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def read_checked(ckpt: Checkpoint, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    tensor = ckpt.read(name, rows)
    if not all_finite(tensor):
        raise CheckpointError(f"model {ckpt.ref}: tensor {name} contains NaN or Inf values; this checkpoint is "
                              "corrupt or diverged in training. Fix or drop the model before merging")
    return tensor


# Entries of one input in a row block on a CPU: the block's stack of inputs and the method's temporaries stay in
# the caches, so each of the method's passes over them costs a cache's bandwidth, not memory's. Measured on the
# 0.5B linear merge of the speed run (2 cores): whole tensors 3.0 s of reading and merging, 2^20-entry blocks 1.6 s.
CPU_BLOCK_ENTRIES = 2**20


def in_cpu_blocks(job: TensorJob, device: torch.device) -> bool:
    return job.blockwise and device.type == "cpu"


def row_blocks(job: TensorJob, device: torch.device) -> list[tuple[int, int] | None]:
    """The row ranges a tensor is merged in: [None] (whole), or consecutive blocks of rows: the plan's blocks (the
    memory budget), cut smaller on a CPU where the tensor is blockwise."""
    rows = job.block_rows
    if in_cpu_blocks(job, device):
        rows = min(rows or job.shape[0], max(1, CPU_BLOCK_ENTRIES // math.prod(job.shape[1:])))
    if rows is None or rows >= job.shape[0]:
        return [None]
    return [(start, min(start + rows, job.shape[0])) for start in range(0, job.shape[0], rows)]


class InputStack:
    """The memory that holds one tensor's inputs (or one row block of them), base first, kept from one tensor to
    the next.

    Fresh memory costs a page fault and a page of zeroing per 4 KiB on first touch: on a CPU that was a quarter
    of a linear merge's time (the 2026-11-30 speed run: `git show e19de03:benchmarks/results/speed/linear.md`).
    The returned views are valid until the next `load`; each merged tensor is written out before then.
    """

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def load(self, plan: MergePlan, job: TensorJob, device: torch.device, rows: tuple[int, int] | None = None,
             check: bool = True):
        """(base, models): the base tensor (or None) and the T fine-tuned tensors stacked, in the compute dtype;
        rows `rows[0]:rows[1]` of them only, when given; each scanned for NaN and Inf unless `check` is False."""
        dtype = getattr(torch, plan.config.compute_dtype)
        shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
        inputs = plan.inputs()
        numel = len(inputs) * math.prod(shape)
        buffer = self._buffer  # one plan and one device per unit: only the size changes
        if buffer is None or buffer.numel() < numel:
            self._buffer = None  # release the old buffer before allocating its successor
            self._buffer = buffer = torch.empty(numel, dtype=dtype, device=device)
        stack = buffer[:numel].view(len(inputs), *shape)
        for slot, ckpt in zip(stack, inputs):
            slot.copy_(read_checked(ckpt, job.name, rows) if check else ckpt.read(job.name, rows))
        return (stack[0], stack[1:]) if plan.base else (None, stack)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lies in this memory (a method returned one of its inputs, overwritten)."""
        return (self._buffer is not None and tensor.device == self._buffer.device
                and tensor.untyped_storage().data_ptr() == self._buffer.untyped_storage().data_ptr())


def tensor_context(plan: MergePlan, job: TensorJob, rows: tuple[int, int] | None, first_pass: Any = None
                   ) -> TensorContext:
    """What the method may know about the tensor (or the row block `rows` of it) besides its values."""
    first_entry = 0 if rows is None else rows[0] * math.prod(job.shape[1:])
    return TensorContext(job.name, plan.config.engine.seed, plan.model_ids, first_pass, transposed=job.transposed,
                         rng=plan.config.engine.rng, draw_state=job.draw_state, first_entry=first_entry)


def merge_tensor(plan: MergePlan, job: TensorJob, device: torch.device, inputs: InputStack,
                 first_pass: Any = None, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """The merged tensor, or rows `rows` of it (CPU, saved dtype), and the method's statistics for the report.
    `first_pass`: the result of the method's first pass, when the plan has one."""
    if not job.merge:
        return plan.reference.read(job.name), {}
    scan_inputs = not plan.spec.non_finite_reaches_output
    base, models = inputs.load(plan, job, device, rows, check=scan_inputs)
    ctx = tensor_context(plan, job, rows, first_pass)
    merged = plan.spec.fn(base, models, job.params, ctx)
    out = merged.to(DTYPES[job.out_dtype][0])
    if not all_finite(out):
        if not scan_inputs:  # a corrupt input, or an overflow: the inputs' own scan tells which
            for ckpt in plan.inputs():
                read_checked(ckpt, job.name, rows)
        raise ConfigError(f"merged tensor {job.name} has values outside the range of "
                          f"{CODE_TO_NAME.get(job.out_dtype, job.out_dtype)}; "
                          "save in bfloat16 or float32 (out_dtype), or lower lambda/weights")
    return out.cpu(), ctx.stats


@contextlib.contextmanager
def threads_beside_the_writer(cpu_blocks: bool):
    """For CPU row blocks, one torch thread fewer (at least one), so that the thread that hashes and writes the
    last block has a core of its own: each block's operations are short, and torch's threads would otherwise
    wait on the one that shares its core (the 0.5B linear merge on 2 cores: 3.4 s with 1 thread, 3.8-4.2 s with 2).
    Elementwise results do not depend on the thread count."""
    threads = torch.get_num_threads()
    if cpu_blocks and threads > 1:
        torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_unit(plan: MergePlan, unit: WorkUnit, out: OutputDir, device: torch.device, first_pass: Any = None,
             on_tensor: Callable[[TensorJob], None] | None = None) -> ShardRecord:
    """Merge every tensor of `unit` into its shard; returns the shard's record."""
    temp = out.temp_path(unit.shard)
    writer = WriteBehind(ShardWriter(temp, [(part.name, job.out_dtype, part.shape) for job in unit.tensors
                                            for part in job.stored], out.path / unit.shard))
    record = ShardRecord(shard=unit.shard, size=writer.writer.size)
    inputs = InputStack()
    worker = f"{socket.gethostname()}:{os.getpid()}"  # who merged it: per-worker busy time (bench_scaling.py)
    try:
        for job in unit.tensors:
            started, start = time.time(), time.perf_counter()
            rows = {part.name: {"started": started, "device": str(device), "worker": worker} for part in job.stored}
            with threads_beside_the_writer(in_cpu_blocks(job, device)):
                for block in row_blocks(job, device):
                    tensor, stats = merge_tensor(plan, job, device, inputs, first_pass, block)
                    if inputs.holds(tensor):  # merged in place: the next inputs overwrite it while it is written
                        tensor = tensor.clone()
                    if block is None or block[1] == job.shape[0]:  # the last piece: its report rows are complete
                        seconds = time.perf_counter() - start
                        for part in job.stored:  # the job's time on its first part, so that the report's sums hold
                            rows[part.name].update(stats, seconds=seconds)
                            seconds = 0.0
                    writer.write([(part.name, *part.of(tensor, block), rows[part.name])
                                  for part in job.stored if part.in_block(block)])
            record.tensors.update(rows)
            if on_tensor is not None:
                on_tensor(job)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    out.commit_shard(temp, record)
    return record


def unit_statistic(plan: MergePlan, unit: WorkUnit, device: torch.device) -> torch.Tensor | None:
    """The plan's first-pass statistic summed over the unit's merged tensors (CPU), or None if it merges none."""
    total = None
    inputs = InputStack()
    for job in unit.tensors:
        if not job.merge:
            continue
        for block in row_blocks(job, device):
            base, models = inputs.load(plan, job, device, block)
            value = plan.first_pass.statistic(base, models, job.params, tensor_context(plan, job, block))
            total = value if total is None else total.add_(value)
    return None if total is None else total.cpu()
