"""Who runs the work units: this process (`local`) or Ray actors, one per GPU (`ray`).

Every runtime does the same two jobs through the same engine functions, so every runtime writes the same bytes:
`first_pass` (each unit's share of the method's first-pass statistic) and `merge` (each unit into its shard).
Where the work runs is the runtime's `placement`, known once it is connected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..plan import MergePlan, WorkUnit
    from ..progress import Progress
    from ..writer import OutputDir, ShardRecord


@dataclass(frozen=True)
class Placement:
    """Where the work runs: the device type of every worker and, on CPU, the threads per worker (LAPACK's
    results depend on it); `memory`: what the smallest worker can hold, where the runtime knows more than the
    plan does (the plan knows the machine that plans it)."""

    device: str
    threads: int | None
    memory: int | None = None


class Runtime(Protocol):
    placement: Placement

    def first_pass(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir,
                   progress: Progress) -> list[torch.Tensor | None]:
        """Each unit's `engine.unit_statistic`, in any order."""

    def merge(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, first_pass: Any,
              progress: Progress) -> list[ShardRecord]:
        """Each unit merged into its shard (`engine.run_unit`); their records, in any order."""

    def close(self) -> None:
        """Release the workers (and anything the runtime started)."""


def make_runtime(name: str, device: str | None, workers: int | None = None, address: str | None = None,
                 threads: int | None = None, quiet: bool = False) -> Runtime:
    """A connected runtime; its `placement` says where the work will run."""
    if name == "ray":
        from .ray import RayRuntime

        return RayRuntime(device, workers=workers, address=address, threads=threads, quiet=quiet)
    from .local import LocalRuntime

    return LocalRuntime(device or "cpu", threads=threads)
