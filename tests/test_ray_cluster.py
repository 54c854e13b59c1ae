"""The Ray runtime on a real multi-node cluster simulated on this machine (`ray.cluster_utils.Cluster`: a head
with no CPUs and two worker nodes of one CPU each, separate raylets): a merge across both nodes writes the local
bytes; losing a worker node mid-merge moves its units to the surviving node and still writes the local bytes;
losing every worker node stops the merge within the configured time, with one error naming the lost nodes.

The driver runs in this process (as `distmerge merge --runtime ray` does), so a node can be removed at an exact
point of the merge: after a given number of units have finished.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import write_config

from distmerge.config import load_config
from distmerge.errors import ConfigError, StorageError
from distmerge.merge import finalize, merge
from distmerge.methods import elementwise
from distmerge.plan import build_plan, fingerprint
from distmerge.progress import Progress
from distmerge.runtime import ray as ray_runtime
from distmerge.runtime.ray import RayRuntime
from distmerge.writer import OutputDir

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a ~/.ray/auth_token on the machine must not switch tokens on
    if ray.is_initialized():
        ray.shutdown()  # one driver connection per process: this module's cluster replaces any earlier Ray
    # a lost node is noticed within about 2 s instead of Ray's default 15 s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 80 * 2**20,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    for _ in range(2):
        cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if auth_mode is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = auth_mode


def worker_nodes(cluster) -> list:
    return [node for node in cluster.list_all_nodes() if node is not cluster.head_node]


def restore_two_worker_nodes(cluster) -> None:
    while len(worker_nodes(cluster)) < 2:
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.safetensors"))}


def slow_linear(base, models, p, ctx):
    """linear, slowed so that units are still running when a node goes."""
    time.sleep(0.4)
    return elementwise.linear(base, models, p, ctx)


class LosesNodes(Progress):
    """Progress that removes `nodes` from the cluster once `after` units have finished."""

    def __init__(self, cluster, nodes: list, after: int):
        super().__init__("merging", 1, 1, quiet=True)
        self.cluster, self.nodes, self.after, self.units = cluster, nodes, after, 0

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        self.units += 1
        if self.units == self.after:
            for node in self.nodes:
                self.cluster.remove_node(node, allow_graceful=False)


def merge_losing_nodes(cfg: Path, out: Path, cluster, nodes: list, after: int) -> ray_runtime.WorkerPool:
    """The merge of `cfg` on two workers, removing `nodes` after `after` units; returns the worker pool."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))
    config = load_config(cfg)
    plan = build_plan(replace(config, engine=replace(config.engine, shard_size=6000)))
    plan = replace(plan, spec=replace(plan.spec, fn=slow_linear))
    runtime = RayRuntime("cpu", workers=2, quiet=True)
    try:
        out_dir = OutputDir(out)
        out_dir.prepare(fingerprint(plan, runtime.placement.device, runtime.placement.threads), force=False,
                        input_dirs=[])
        try:
            records = runtime.merge(plan, list(plan.units), out_dir, None, LosesNodes(cluster, nodes, after))
        finally:
            pool = runtime.pool
        finalize(plan, out_dir, records)
    finally:
        runtime.close()
    return pool


def local_bytes(cfg: Path, out: Path) -> dict[str, bytes]:
    config = load_config(cfg)
    merge(replace(config, engine=replace(config.engine, shard_size=6000)), out, quiet=True)
    return shard_bytes(out)


def test_a_merge_across_two_nodes_writes_the_local_bytes(tmp_path, family_bf16_sharded, cluster):
    cfg = write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded, parameters={"density": 0.5})
    expected = local_bytes(cfg, tmp_path / "local")
    assert ray.cluster_resources()["CPU"] == 2  # two one-CPU nodes: the two workers run on different nodes
    config = load_config(cfg)
    merge(replace(config, engine=replace(config.engine, runtime="ray", workers=2, shard_size=6000)),
          tmp_path / "ray", quiet=True)
    assert shard_bytes(tmp_path / "ray") == expected and len(expected) >= 3


def test_without_a_budget_the_smallest_cpu_worker_decides_what_is_refused(tmp_path, family_bf16_sharded, cluster):
    """Connected, the driver knows the workers' memory: each node's Ray `memory` resource, shared by as many
    workers as its CPUs fit; it plans from the smallest worker. A node of 2 CPUs and 80 kB makes 40 kB workers,
    too small for the 57 kB that ties needs to merge an MLP matrix whole: refused with one error naming the tensor, before any output."""
    small = cluster.add_node(num_cpus=2, memory=80_000, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    try:
        runtime = RayRuntime("cpu", quiet=True)
        try:
            assert runtime.placement.memory == 40_000
        finally:
            runtime.close()
        config = load_config(write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded,
                                          parameters={"density": 0.5}))
        with pytest.raises(ConfigError, match=r"^tensor \S+ .* needs .* more than a Ray worker's 40\.0 KB"):
            merge(replace(config, engine=replace(config.engine, runtime="ray")), tmp_path / "out", quiet=True)
        assert not (tmp_path / "out").exists()
    finally:
        cluster.remove_node(small)


def test_gpu_workers_memory_is_asked_of_a_gpu_on_every_gpu_node(cluster):
    """The driver sees no GPU: one task on each node with GPUs, holding one of them, reports its memory, and the
    smallest decides. Two nodes of one (Ray-declared) GPU each, with 80 and 40 GB said by a stand-in probe; a real
    RayRuntime on these CUDA-less GPUs learns nothing and plans as before."""
    nodes = [cluster.add_node(num_cpus=0, num_gpus=1, object_store_memory=80 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    said = {nodes[0].node_id: 80 * 10**9, nodes[1].node_id: 40 * 10**9}

    def probe():
        node = ray.get_runtime_context().get_node_id()
        assert ray.get_gpu_ids(), "the probe holds a GPU"
        return said[node]

    try:
        assert ray_runtime.gpu_worker_memory(ray, ray.nodes(), probe=probe) == 40 * 10**9
        runtime = RayRuntime("cuda", quiet=True)
        try:
            assert runtime.placement.memory is None
        finally:
            runtime.close()
    finally:
        for node in nodes:
            cluster.remove_node(node)


def test_losing_a_worker_node_moves_its_units_to_the_other_node(tmp_path, family_bf16_sharded, cluster,
                                                                 monkeypatch):
    """The lost node's worker cannot be replaced (the other node is full): after the start timeout, well before
    the surviving worker has finished (each tensor takes 0.4 s: about 8 s of work are left when the node goes,
    against about 2 s to notice the loss and 1 s to give up), its slot is given up and the survivor takes
    every remaining unit."""
    monkeypatch.setattr(ray_runtime, "WORKER_START_TIMEOUT_S", 1.0)
    restore_two_worker_nodes(cluster)
    cfg = write_config(tmp_path / "linear.yaml", "linear", family_bf16_sharded, base=None)
    expected = local_bytes(cfg, tmp_path / "local")
    lost = worker_nodes(cluster)[1]
    pool = merge_losing_nodes(cfg, tmp_path / "ray", cluster, [lost], after=1)
    assert shard_bytes(tmp_path / "ray") == expected
    assert len(pool.deaths) == 1 and lost.node_id[:12] in pool.deaths[0]
    assert pool.replacements == 1 and sum(pool.charged.values()) == 1  # only the unit it was running
    assert [slot.retired for slot in pool.slots].count(True) == 1


def test_losing_every_worker_node_stops_within_the_timeout_naming_the_nodes(tmp_path, family_bf16_sharded,
                                                                            cluster, monkeypatch):
    monkeypatch.setattr(ray_runtime, "WORKER_START_TIMEOUT_S", 2.0)
    restore_two_worker_nodes(cluster)
    cfg = write_config(tmp_path / "linear.yaml", "linear", family_bf16_sharded, base=None)
    nodes = worker_nodes(cluster)
    ids = [node.node_id[:12] for node in nodes]
    start = time.monotonic()
    with pytest.raises(StorageError) as error:
        merge_losing_nodes(cfg, tmp_path / "ray", cluster, nodes, after=2)
    assert time.monotonic() - start < 60
    message = str(error.value)
    assert all(node_id in message for node_id in ids), message
    assert "DISTMERGE_WORKER_START_TIMEOUT" in message and "rerun the same command to resume" in message
    assert len(shard_bytes(tmp_path / "ray")) >= 2  # finished shards are kept for the rerun


def test_losing_the_head_ends_the_driver_with_one_error(tmp_path):
    """Ray ends a driver by itself a minute after its head (the GCS) is gone, saying nothing a user can act on.
    A driver (a real process, connected to a head of its own) must say what happened and exit 2 first."""
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DISTMERGE_HEAD_TIMEOUT": "3"}
    os.environ["RAY_AUTH_MODE"], saved = "disabled", os.environ.get("RAY_AUTH_MODE")
    try:
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    finally:
        os.environ.pop("RAY_AUTH_MODE") if saved is None else os.environ.update(RAY_AUTH_MODE=saved)
    address = head.address
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from distmerge.runtime.ray import RayRuntime\n"
         f"runtime = RayRuntime('cpu', address={address!r}, quiet=True)\n"
         "print('connected', flush=True)\n"
         "time.sleep(120)\n"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "connected"
        start = time.monotonic()
        head.remove_node(head.head_node, allow_graceful=False)
        _, stderr = driver.communicate(timeout=50)
    finally:
        driver.kill()
        head.shutdown()
    assert driver.returncode == 2 and time.monotonic() - start < 50
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and address in errors[0] and "rerun the same command to resume" in errors[0]
    assert "Traceback" not in stderr
