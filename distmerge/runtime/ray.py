"""The Ray runtime: one long-lived actor per GPU (or per CPU slot), gang-reserved in a placement group.

The driver only plans and schedules: it never reads a tensor and never touches CUDA (Ray sets
CUDA_VISIBLE_DEVICES for each actor). Each actor holds the plan, reads its units' tensors straight from storage,
writes their shards, and returns a small record. The driver keeps at most two units in flight per actor (the
second queues inside the actor, so it starts without a round trip), largest cost first, and gives the unit of
an actor that died to another actor.
"""

from __future__ import annotations

import os
from collections import deque

import torch

from ..engine import magnitude_histograms, resolve_device, run_unit
from ..errors import StorageError, UserError
from ..plan import MergePlan, WorkUnit
from ..progress import Progress
from ..writer import OutputDir, ShardRecord

IN_FLIGHT_PER_ACTOR = 2
MAX_ATTEMPTS = 3  # per unit: the first try and two retries on other actors
PLACEMENT_TIMEOUT_S = float(os.environ.get("DISTMERGE_PLACEMENT_TIMEOUT", "600"))


class MergeWorker:
    """One per GPU or CPU slot; lives for the whole merge."""

    def __init__(self, plan: MergePlan, out_path: str, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.plan = plan
        self.out = OutputDir(out_path)
        self.device = resolve_device(device)

    def merge(self, unit_index: int, thresholds) -> ShardRecord:
        self.plan.global_thresholds = thresholds
        return run_unit(self.plan, self._unit(unit_index), self.out, self.device)

    def histograms(self, unit_index: int) -> torch.Tensor:
        return magnitude_histograms(self.plan, self._unit(unit_index), self.device)

    def pid(self) -> int:
        return os.getpid()

    def _unit(self, index: int) -> WorkUnit:
        return next(u for u in self.plan.units if u.index == index)


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
        self.device = device or ("cuda" if gpus else "cpu")
        if self.device.startswith("cuda"):
            if not gpus:
                raise UserError("--device cuda was asked for but the Ray cluster has no GPUs; use --device cpu")
            self.threads, slots, self._bundle = None, gpus, {"GPU": 1, "CPU": 1}
        else:
            self.threads = threads or 1
            slots, self._bundle = cpus // self.threads, {"CPU": self.threads}
        self.workers = workers or slots
        if self.workers < 1 or self.workers > slots:
            raise UserError(f"--workers {self.workers} does not fit the Ray cluster: it has room for {slots} "
                            f"worker(s) of {self._bundle}; lower --workers or add nodes")
        self._actors: list = []
        self._replacements = 0
        self._group = None
        self._make_actor = None

    # ---- actors ----------------------------------------------------------------------------------------------

    def _start(self, plan: MergePlan, out: OutputDir) -> None:
        if self._actors:
            return
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
            ).remote(plan_ref, str(out.path), self.device, self.threads)

        self._make_actor = make_actor
        self._actors = [make_actor(slot) for slot in range(self.workers)]

    def _replace(self, slot: int) -> None:
        """A worker died: start a new one in its bundle (Ray reschedules the bundle if its node is gone)."""
        self._replacements += 1
        if self._replacements > 2 * self.workers:
            raise StorageError(f"{self._replacements} Ray workers died during this merge; see `ray logs` for why")
        self._actors[slot] = self._make_actor(slot)

    def close(self) -> None:
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors = []
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._group)
            self._group = None
        if self._owns_ray:
            self.ray.shutdown()

    # ---- the scheduling loop -----------------------------------------------------------------------------------

    def _run(self, units: list[WorkUnit], submit, on_done) -> None:
        """Run every unit on some actor, at most IN_FLIGHT_PER_ACTOR at a time each; the unit of a worker that
        died goes to the front of the queue and runs again, on another worker."""
        ray = self.ray
        pending = deque(units)
        attempts = {unit.index: 0 for unit in units}
        in_flight: dict = {}  # object ref -> (unit, slot, actor)
        load = [0] * len(self._actors)
        while pending or in_flight:
            for slot in sorted(range(len(self._actors)), key=lambda s: load[s]):
                while pending and load[slot] < IN_FLIGHT_PER_ACTOR:
                    unit = pending.popleft()
                    attempts[unit.index] += 1
                    in_flight[submit(self._actors[slot], unit)] = (unit, slot, self._actors[slot])
                    load[slot] += 1
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            unit, slot, actor = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if attempts[unit.index] >= MAX_ATTEMPTS:
                    raise StorageError(f"shard {unit.shard} failed {MAX_ATTEMPTS} times because its worker died "
                                       f"({exc.__class__.__name__}); see `ray logs` for the cause") from None
                if actor is self._actors[slot]:  # the first failure seen from this worker
                    load[slot] = 0
                    self._replace(slot)
                pending.appendleft(unit)
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, UserError):
                    raise exc.cause from None
                raise
            finally:
                if actor is self._actors[slot]:
                    load[slot] = max(0, load[slot] - 1)
            on_done(unit, result)

    def histograms(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, progress: Progress) -> torch.Tensor:
        self._start(plan, out)
        total = []

        def done(unit, counts):
            total.append(counts)
            progress.advance(len(unit.tensors), plan.unit_read_bytes(unit))

        self._run(units, lambda actor, unit: actor.histograms.remote(unit.index), done)
        return torch.stack(total).sum(0)

    def merge(self, plan: MergePlan, units: list[WorkUnit], out: OutputDir, progress: Progress) -> list[ShardRecord]:
        self._start(plan, out)
        records = []
        thresholds = plan.global_thresholds

        def done(unit, record):
            records.append(record)
            progress.advance(len(unit.tensors), plan.unit_read_bytes(unit))

        self._run(units, lambda actor, unit: actor.merge.remote(unit.index, thresholds), done)
        return records
