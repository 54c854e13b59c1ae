"""The local runtime: every unit in this process, one after another, on one device."""

from __future__ import annotations

import torch

from ..engine import magnitude_histograms, resolve_device, run_unit
from ..plan import MergePlan, WorkUnit
from ..progress import Progress
from ..writer import OutputDir, ShardRecord


class LocalRuntime:
    def __init__(self, device: str, threads: int | None = None):
        self.device = str(resolve_device(device))
        self._threads_before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    def histograms(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, progress: Progress) -> torch.Tensor:
        total = None
        for unit in units:
            counts = magnitude_histograms(plan, unit, torch.device(self.device))
            total = counts if total is None else total + counts
            progress.advance(len(unit.tensors), plan.unit_read_bytes(unit))
        return total

    def merge(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, progress: Progress) -> list[ShardRecord]:
        return [
            run_unit(plan, unit, out, torch.device(self.device),
                     on_tensor=lambda job: progress.advance(1, plan.read_bytes(job)))
            for unit in units
        ]

    def close(self) -> None:
        torch.set_num_threads(self._threads_before)
