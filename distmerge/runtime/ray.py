"""The Ray runtime: one long-lived actor per GPU (or per CPU slot), gang-reserved in a placement group.

The driver only plans and schedules: it never reads a tensor and never touches CUDA (Ray sets
CUDA_VISIBLE_DEVICES for each actor). Each actor holds the plan, reads its units' tensors straight from storage,
writes their shards, and returns a small record. `WorkerPool` keeps at most two units in flight per actor (the
second queues inside the actor, so it starts without a round trip), largest cost first, and replaces an actor
that died.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from typing import Any, Callable

import torch

from ..engine import resolve_device, run_unit, unit_statistic
from ..errors import StorageError, UserError
from ..estimates import unit_read_bytes
from ..plan import MergePlan, WorkUnit
from ..progress import Progress
from ..writer import OutputDir, ShardRecord
from . import Placement

IN_FLIGHT_PER_ACTOR = 2
MAX_ATTEMPTS = 3  # per unit: the first try and two retries on other actors
PLACEMENT_TIMEOUT_S = float(os.environ.get("DISTMERGE_PLACEMENT_TIMEOUT", "600"))
SETTLE_TIMEOUT_S = 30.0  # after an actor died: how long its other tasks get to report their end


class MergeWorker:
    """One per GPU or CPU slot; lives for the whole merge."""

    def __init__(self, plan: MergePlan, out_path: str, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.plan = plan
        self.units = {unit.index: unit for unit in plan.units}
        self.out = OutputDir(out_path)
        self.device = resolve_device(device)

    def merge(self, unit_index: int, first_pass: Any) -> ShardRecord:
        return run_unit(self.plan, self.units[unit_index], self.out, self.device, first_pass)

    def statistic(self, unit_index: int) -> torch.Tensor | None:
        return unit_statistic(self.plan, self.units[unit_index], self.device)

    def pid(self) -> int:
        return os.getpid()


class WorkerPool:
    """Runs units on a fixed number of actor slots, at most IN_FLIGHT_PER_ACTOR at a time on each.

    An actor runs its tasks in the order they were submitted, so when it dies, the oldest of its units that had
    not finished is the one it was running: that unit is charged an attempt, and the units queued behind it go
    back to the front of the queue free of charge. A dead actor's finished results are kept. The slot gets a new
    actor (Ray reschedules the slot's bundle if its node is gone).
    """

    def __init__(self, ray, make_actor: Callable[[int], Any], workers: int):
        self.ray = ray
        self._make_actor = make_actor
        self.actors = [make_actor(slot) for slot in range(workers)]
        self._queues: list[deque] = [deque() for _ in range(workers)]  # per slot: (ref, unit), oldest first
        self.replacements = 0
        self._pending: deque = deque()
        self.charged: Counter = Counter()  # unit index -> attempts lost to a dying worker

    def run(self, units: list[WorkUnit], submit: Callable, on_done: Callable[[WorkUnit, Any], None]) -> None:
        """`submit(actor, unit)` returns an object ref; `on_done(unit, result)` is called once per unit."""
        self._pending = deque(units)
        while self._pending or any(self._queues):
            self._fill(submit)
            slot, ref = self._wait_for_one()
            self._collect(slot, ref, on_done)

    def _fill(self, submit: Callable) -> None:
        for slot in sorted(range(len(self.actors)), key=lambda s: len(self._queues[s])):
            while self._pending and len(self._queues[slot]) < IN_FLIGHT_PER_ACTOR:
                unit = self._pending.popleft()
                self._queues[slot].append((submit(self.actors[slot], unit), unit))

    def _wait_for_one(self) -> tuple[int, Any]:
        slot_of = {ref: slot for slot, queue in enumerate(self._queues) for ref, _ in queue}
        [ref], _ = self.ray.wait(list(slot_of), num_returns=1)
        return slot_of[ref], ref

    def _collect(self, slot: int, ref, on_done: Callable) -> None:
        try:
            result = self._get(ref)
        except self.ray.exceptions.RayActorError:
            self._worker_died(slot, on_done)
            return
        queue = self._queues[slot]
        unit = next(unit for queued, unit in queue if queued == ref)
        queue.remove((ref, unit))
        on_done(unit, result)

    def _get(self, ref):
        """The task's result; a user error raised inside a worker is raised here as itself."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise

    def _worker_died(self, slot: int, on_done: Callable) -> None:
        queue, self._queues[slot] = self._queues[slot], deque()
        self.ray.wait([ref for ref, _ in queue], num_returns=len(queue), timeout=SETTLE_TIMEOUT_S)
        unfinished = []
        for ref, unit in queue:
            try:
                on_done(unit, self._get(ref))
            except self.ray.exceptions.RayActorError:
                unfinished.append(unit)
        if unfinished:
            self._charge(unfinished[0])  # the one the actor was running
        self._pending.extendleft(reversed(unfinished))
        self._replace(slot)

    def _charge(self, unit: WorkUnit) -> None:
        self.charged[unit.index] += 1
        if self.charged[unit.index] >= MAX_ATTEMPTS:
            raise StorageError(f"shard {unit.shard} failed {MAX_ATTEMPTS} times because its worker died; "
                               "see `ray logs` for the cause")

    def _replace(self, slot: int) -> None:
        self.replacements += 1
        if self.replacements > 2 * len(self.actors):
            raise StorageError(f"{self.replacements} Ray workers died during this merge; see `ray logs` for why")
        self.actors[slot] = self._make_actor(slot)


class RayRuntime:
    def __init__(self, device: str | None, workers: int | None = None, address: str | None = None,
                 threads: int | None = None, quiet: bool = False):
        import ray

        self.ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Plain ray.init() joins the cluster named by RAY_ADDRESS (as under `ray job submit`); with no cluster
            # it starts a local one.
            local = address is None and not os.environ.get("RAY_ADDRESS")
            extra = {"include_dashboard": False} if local else {}
            ray.init(address=address, log_to_driver=not quiet, logging_level="WARNING", **extra)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        device = device or ("cuda" if gpus else "cpu")
        if device.startswith("cuda"):
            if not gpus:
                raise UserError("--device cuda was asked for but the Ray cluster has no GPUs; use --device cpu")
            threads, slots, self._bundle = None, gpus, {"GPU": 1, "CPU": 1}
        else:
            threads = threads or 1
            slots, self._bundle = cpus // threads, {"CPU": threads}
        self.placement = Placement(device, threads)
        self.workers = workers or slots
        if self.workers < 1 or self.workers > slots:
            raise UserError(f"--workers {self.workers} does not fit the Ray cluster: it has room for {slots} "
                            f"worker(s) of {self._bundle}; lower --workers or add nodes")
        self.pool: WorkerPool | None = None
        self._group = None

    def _start(self, plan: MergePlan, out: OutputDir) -> WorkerPool:
        """The actors, started on first use and kept for both passes."""
        if self.pool is not None:
            return self.pool
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._group = placement_group([dict(self._bundle)] * self.workers, strategy="PACK")
        try:
            self.ray.get(self._group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise UserError(f"the Ray cluster did not provide {self.workers} x {self._bundle} within "
                            f"{PLACEMENT_TIMEOUT_S:.0f}s; lower --workers or add nodes") from None
        actor_class = self.ray.remote(MergeWorker)
        plan_ref = self.ray.put(plan)

        def make_actor(slot: int):
            return actor_class.options(
                num_cpus=self._bundle["CPU"], num_gpus=self._bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=slot),
            ).remote(plan_ref, str(out.path), self.placement.device, self.placement.threads)

        self.pool = WorkerPool(self.ray, make_actor, self.workers)
        return self.pool

    def first_pass(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir,
                   progress: Progress) -> list[torch.Tensor | None]:
        statistics = []

        def done(unit, statistic):
            statistics.append(statistic)
            progress.advance(len(unit.tensors), unit_read_bytes(plan, unit))

        self._start(plan, out).run(units, lambda actor, unit: actor.statistic.remote(unit.index), done)
        return statistics

    def merge(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, first_pass: Any,
              progress: Progress) -> list[ShardRecord]:
        records = []

        def done(unit, record):
            records.append(record)
            progress.advance(len(unit.tensors), unit_read_bytes(plan, unit))

        self._start(plan, out).run(units, lambda actor, unit: actor.merge.remote(unit.index, first_pass), done)
        return records

    def close(self) -> None:
        if self.pool is not None:
            for actor in self.pool.actors:
                self.ray.kill(actor)
            self.pool = None
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._group)
            self._group = None
        if self._owns_ray:
            self.ray.shutdown()
