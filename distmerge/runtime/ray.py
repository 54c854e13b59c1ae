"""The Ray runtime: one long-lived actor per GPU (or per CPU slot), gang-reserved in a placement group.

The driver only plans and schedules: it never reads a tensor and never touches CUDA (Ray sets
CUDA_VISIBLE_DEVICES for each actor). Each actor holds the plan, reads its units' tensors straight from storage,
writes their shards, and returns a small record. `WorkerPool` keeps at most two units in flight per actor (the
second queues inside the actor, so it starts without a round trip), largest cost first, and replaces an actor
that died.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
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
# How long a worker started to replace a dead one may take to come up (its node gone, the cluster full) before
# its slot is given up.
WORKER_START_TIMEOUT_S = float(os.environ.get("DISTMERGE_WORKER_START_TIMEOUT", "300"))
HEAD_TIMEOUT_S = float(os.environ.get("DISTMERGE_HEAD_TIMEOUT", "30"))  # below Ray's own 60 s
HEAD_PROBE_INTERVAL_S = 5.0
GPU_PROBE_TIMEOUT_S = 120.0  # asking each GPU node its GPU's memory: a worker process starts and imports torch
SETTLE_TIMEOUT_S = 30.0  # after an actor died: how long its other tasks get to report their end


class MergeWorker:
    """One per GPU or CPU slot; lives as long as its runtime, through every merge it runs (`load` gives it the
    next one)."""

    def __init__(self, plan: MergePlan, out_path: str, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.load(plan, out_path)

    def load(self, plan: MergePlan, out_path: str) -> None:
        self.plan = plan
        self.units = {unit.index: unit for unit in plan.units}
        self.out = OutputDir(out_path)

    def merge(self, unit_index: int, first_pass: Any) -> ShardRecord:
        return run_unit(self.plan, self.units[unit_index], self.out, self.device, first_pass)

    def statistic(self, unit_index: int) -> torch.Tensor | None:
        return unit_statistic(self.plan, self.units[unit_index], self.device)

    def where(self) -> str:
        """The node this worker runs on, for messages about it."""
        import ray

        return f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Slot:
    """One worker slot: its actor, whether that actor is up yet, and the units sent to it."""

    actor: Any
    starting: Any  # ref of actor.where() until the actor is up, then None
    deadline: float | None  # a replacement must be up by then (the first actors have their placement already)
    node: str = "an unknown node"  # where the actor runs, once it is up
    queue: deque = field(default_factory=deque)  # (ref, unit) in submission order: the first one is running
    retired: bool = False


class WorkerPool:
    """Runs units on a fixed number of actor slots, at most IN_FLIGHT_PER_ACTOR at a time on each live actor.

    An actor runs its tasks in the order they were submitted, so when it dies, the oldest of its units that had
    not finished is the one it was running: that unit is charged an attempt, and the units queued behind it go
    back to the front of the queue free of charge. A dead actor's finished results are kept. The slot gets a new
    actor; if the cluster cannot start it within WORKER_START_TIMEOUT_S (its node is gone and no other node has
    room), the slot is retired and the other slots take its units. With no slot left, the merge stops with an
    error naming the lost nodes.
    """

    def __init__(self, ray, make_actor: Callable[[int], Any], workers: int,
                 warn: Callable[[str], None] = lambda message: print(f"warning: {message}", file=sys.stderr)):
        self.ray = ray
        self._make_actor = make_actor
        self._warn = warn
        self.slots = [self._start(slot, deadline=None) for slot in range(workers)]
        self.replacements = 0
        self.charged: Counter = Counter()  # unit index -> attempts lost to a dying worker
        self.deaths: list[str] = []  # the node of each worker that died
        self._pending: deque = deque()

    @property
    def actors(self) -> list:
        return [slot.actor for slot in self.slots]

    def run(self, units: list[WorkUnit], submit: Callable, on_done: Callable[[WorkUnit, Any], None]) -> None:
        """`submit(actor, unit)` returns an object ref; `on_done(unit, result)` is called once per unit."""
        self._pending = deque(units)
        while self._pending or any(slot.queue for slot in self.slots):
            self._fill(submit)
            event = self._wait_for_one()
            if event is None:
                self._retire_overdue()
            elif event[2] == "started":
                self._started(event[0], event[1])
            else:
                self._collect(event[0], event[1], on_done)

    def _start(self, index: int, deadline: float | None) -> Slot:
        actor = self._make_actor(index)
        return Slot(actor, actor.where.remote(), deadline)

    def _fill(self, submit: Callable) -> None:
        live = [slot for slot in self.slots if slot.starting is None and not slot.retired]
        for slot in sorted(live, key=lambda s: len(s.queue)):
            while self._pending and len(slot.queue) < IN_FLIGHT_PER_ACTOR:
                unit = self._pending.popleft()
                slot.queue.append((submit(slot.actor, unit), unit))

    def _wait_for_one(self) -> tuple[int, Any, str] | None:
        """(slot, ref, "finished" or "started") for a task that ended or an actor that came up; None when an
        actor took too long to come up."""
        events = {ref: (i, ref, "finished") for i, slot in enumerate(self.slots) for ref, _ in slot.queue}
        events.update({slot.starting: (i, slot.starting, "started")
                       for i, slot in enumerate(self.slots) if slot.starting is not None})
        deadlines = [slot.deadline for slot in self.slots if slot.starting is not None and slot.deadline]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready, _ = self.ray.wait(list(events), num_returns=1, timeout=timeout)
        return events[ready[0]] if ready else None

    def _started(self, index: int, ref) -> None:
        slot = self.slots[index]
        try:
            slot.node = self.ray.get(ref)
            slot.starting = None
        except self.ray.exceptions.RayActorError:
            if slot.deadline is None:
                self._worker_died(index, on_done=None)
            else:
                # A replacement placed on the lost node before Ray marked it dead: no worker was lost, so the
                # slot tries again until the same deadline.
                self.slots[index] = self._start(index, deadline=slot.deadline)
                self.slots[index].node = slot.node

    def _collect(self, index: int, ref, on_done: Callable) -> None:
        try:
            result = self._get(ref)
        except self.ray.exceptions.RayActorError:
            self._worker_died(index, on_done)
            return
        queue = self.slots[index].queue
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

    def _worker_died(self, index: int, on_done: Callable | None) -> None:
        dead = self.slots[index]
        self.deaths.append(dead.node)
        self.ray.wait([ref for ref, _ in dead.queue], num_returns=len(dead.queue), timeout=SETTLE_TIMEOUT_S)
        unfinished = []
        for ref, unit in dead.queue:
            try:
                on_done(unit, self._get(ref))
            except self.ray.exceptions.RayActorError:
                unfinished.append(unit)
        if unfinished:
            self._charge(unfinished[0])  # the one the actor was running
        self._pending.extendleft(reversed(unfinished))
        self.replacements += 1
        if self.replacements > 2 * len(self.slots):
            raise StorageError(f"{self.replacements} Ray workers died during this merge; see `ray logs` for why")
        self.slots[index] = self._start(index, deadline=time.monotonic() + WORKER_START_TIMEOUT_S)
        self.slots[index].node = dead.node  # until the new actor says where it runs

    def _charge(self, unit: WorkUnit) -> None:
        self.charged[unit.index] += 1
        if self.charged[unit.index] >= MAX_ATTEMPTS:
            raise StorageError(f"shard {unit.shard} failed {MAX_ATTEMPTS} times because its worker died; "
                               "see `ray logs` for the cause")

    def _retire_overdue(self) -> None:
        """Give up on actors that did not start in time; the live slots take their units."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.starting is not None and slot.deadline is not None and now >= slot.deadline:
                self.ray.kill(slot.actor)
                slot.starting, slot.retired = None, True
        lost = ", ".join(sorted({slot.node for slot in self.slots if slot.retired}))
        if all(slot.retired for slot in self.slots):
            raise StorageError(
                f"lost the Ray worker(s) on {lost} and the cluster had no room to start others within "
                f"{WORKER_START_TIMEOUT_S:.0f}s (DISTMERGE_WORKER_START_TIMEOUT); finished shards are kept: add "
                "capacity and rerun the same command to resume")
        self._warn(f"continuing with {sum(not slot.retired for slot in self.slots)} of {len(self.slots)} Ray "
                   f"workers: no room to replace the one(s) lost on {lost}")


class HeadWatch:
    """Ray ends the driver's process by itself a minute after it loses the head node (the GCS), with a log line
    that does not say what to do. This thread notices first: when the cluster has not answered for
    HEAD_TIMEOUT_S, it prints one error line and exits with status 2. The output directory is then as an
    interrupted merge leaves it, and rerunning the command resumes."""

    def __init__(self, ray, address: str):
        self.ray, self.address = ray, address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distmerge-head-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(HEAD_PROBE_INTERVAL_S):
            if not self._head_answers() and not self._stop.is_set() and self.ray.is_initialized():
                print(f"error: lost the connection to the Ray cluster's head at {self.address} (no answer for "
                      f"{HEAD_TIMEOUT_S:.0f}s); finished shards are kept: once the cluster is back, rerun the same "
                      "command to resume", file=sys.stderr, flush=True)
                os._exit(UserError.exit_code)

    def _head_answers(self) -> bool:
        answered = threading.Event()

        def probe():
            try:
                self.ray.nodes()
                answered.set()
            except Exception:  # any failure to reach the GCS counts as no answer
                pass

        threading.Thread(target=probe, daemon=True).start()
        return answered.wait(HEAD_TIMEOUT_S)

    def stop(self) -> None:
        self._stop.set()


def cpu_worker_memory(nodes: list[dict], threads: int) -> int | None:
    """What the smallest CPU worker of `threads` CPUs can hold: each live node's Ray `memory` resource (the memory
    its tasks and actors may use) shared by as many workers as its CPUs fit; None where no node says."""
    shares = [node["Resources"]["memory"] / (node["Resources"]["CPU"] // threads) for node in nodes
              if node.get("Alive") and node["Resources"].get("CPU", 0) >= threads and node["Resources"].get("memory")]
    return int(min(shares)) if shares else None


def device_memory() -> int | None:
    """The memory of the GPU Ray gave this process (the first one it sees); None where CUDA is not usable."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def gpu_worker_memory(ray, nodes: list[dict], probe: Callable[[], int | None] = device_memory) -> int | None:
    """What the smallest GPU worker can hold: the driver sees no GPU, so one task per live node with a GPU asks
    one of them (`probe`, on that node, holding one GPU). None where no GPU answers within GPU_PROBE_TIMEOUT_S
    (every GPU busy) or none can say."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(probe)
    answers = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
               for node in nodes if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1]
    try:
        memories = [memory for memory in ray.get(answers, timeout=GPU_PROBE_TIMEOUT_S) if memory]
    except ray.exceptions.GetTimeoutError:
        for answer in answers:
            ray.cancel(answer, force=True)
        return None
    return min(memories) if memories else None


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
        if device == "cpu":
            memory = cpu_worker_memory(ray.nodes(), self._bundle["CPU"])
        else:
            memory = gpu_worker_memory(ray, ray.nodes())
        self.placement = Placement(device, threads, memory)
        self.workers = workers or slots
        if self.workers < 1 or self.workers > slots:
            raise UserError(f"--workers {self.workers} does not fit the Ray cluster: it has room for {slots} "
                            f"worker(s) of {self._bundle}; lower --workers or add nodes")
        self.pool: WorkerPool | None = None
        self._group = None
        self._quiet = quiet
        self._head_watch = HeadWatch(ray, ray.get_runtime_context().gcs_address)

    def _warn(self, message: str) -> None:
        if not self._quiet:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _start(self, plan: MergePlan, out: OutputDir) -> WorkerPool:
        """The actors, started on first use and kept for both passes and for every later merge of this runtime
        (a multi-stage merge pays for Ray and its actors once); a new merge is loaded into them."""
        if self.pool is not None:
            if self._loaded_plan is not plan or self._out_path != str(out.path):
                self._plan_ref, self._out_path, self._loaded_plan = self.ray.put(plan), str(out.path), plan
                self.ray.get([actor.load.remote(self._plan_ref, self._out_path) for actor in self.pool.actors])
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
        self._plan_ref, self._out_path, self._loaded_plan = self.ray.put(plan), str(out.path), plan

        def make_actor(slot: int):  # a replacement starts with the merge loaded now
            return actor_class.options(
                num_cpus=self._bundle["CPU"], num_gpus=self._bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=slot),
            ).remote(self._plan_ref, self._out_path, self.placement.device, self.placement.threads)

        self.pool = WorkerPool(self.ray, make_actor, self.workers, warn=self._warn)
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
        self._head_watch.stop()
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
