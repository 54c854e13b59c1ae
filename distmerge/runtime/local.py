"""The local runtime: every unit in this process, one after another, on one device."""

from __future__ import annotations

import torch

from ..engine import magnitude_histograms, resolve_device, run_unit
from ..plan import MergePlan, WorkUnit
from ..progress import Progress
from ..writer import OutputDir, ShardRecord


class LocalRuntime:
    def __init__(self, device: str):
        self.device = resolve_device(device)

    def histograms(self, plan: MergePlan, units: list[WorkUnit], progress: Progress) -> torch.Tensor:
        total = None
        for unit in units:
            counts = magnitude_histograms(plan, unit, self.device)
            total = counts if total is None else total + counts
            progress.advance(len(unit.tensors), sum(plan.read_bytes(job) for job in unit.tensors))
        return total

    def merge(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, progress: Progress) -> list[ShardRecord]:
        return [
            run_unit(plan, unit, out, self.device, on_tensor=lambda job: progress.advance(1, plan.read_bytes(job)))
            for unit in units
        ]

    def close(self) -> None:
        pass
