"""`distmerge validate --deep`: read every input tensor once and check it for NaN and Inf."""

from __future__ import annotations

from .engine import read_checked
from .plan import MergePlan
from .progress import Progress


def scan_inputs(plan: MergePlan, quiet: bool = False) -> None:
    inputs = plan.inputs()
    names = [job.name for job in plan.tensors if job.merge]
    total = sum(ckpt.tensors[name].nbytes for ckpt in inputs for name in names)
    progress = Progress("scanning", len(names) * len(inputs), total, quiet=quiet)
    for ckpt in inputs:
        for name in names:
            read_checked(ckpt, name)
            progress.advance(1, ckpt.tensors[name].nbytes)
    progress.close()
