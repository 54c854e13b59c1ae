"""The local runtime: every unit in this process, one after another, on one device."""

from __future__ import annotations

from typing import Any

import torch

from ..engine import resolve_device, run_unit, unit_statistic
from ..estimates import read_bytes, unit_read_bytes
from ..plan import MergePlan, WorkUnit
from ..progress import Progress
from ..writer import OutputDir, ShardRecord
from . import Placement


class LocalRuntime:
    def __init__(self, device: str, threads: int | None = None):
        self._device = resolve_device(device)
        self._threads_before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.placement = Placement(str(self._device), torch.get_num_threads())

    def first_pass(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir,
                   progress: Progress) -> list[torch.Tensor | None]:
        statistics = []
        for unit in units:
            statistics.append(unit_statistic(plan, unit, self._device))
            progress.advance(len(unit.tensors), unit_read_bytes(plan, unit))
        return statistics

    def merge(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, first_pass: Any,
              progress: Progress) -> list[ShardRecord]:
        return [
            run_unit(plan, unit, out, self._device, first_pass,
                     on_tensor=lambda job: progress.advance(1, read_bytes(plan, job)))
            for unit in units
        ]

    def close(self) -> None:
        torch.set_num_threads(self._threads_before)
