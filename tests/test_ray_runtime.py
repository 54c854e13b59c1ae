"""The Ray runtime writes the same bytes as the local runtime, survives a worker killed mid-unit, and resumes
after the driver is interrupted. One Ray instance serves the whole session."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import make_adapter, run_cli, write_config

from distmerge.config import load_config
from distmerge.merge import finalize, merge
from distmerge.methods import elementwise
from distmerge.plan import build_plan, fingerprint
from distmerge.progress import Progress
from distmerge.runtime.ray import RayRuntime, WorkerPool, cpu_worker_memory
from distmerge.writer import OutputDir

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_address():
    """One Ray for the session: 2 CPUs, a small object store, no dashboard."""
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)  # a new Ray of its own, even if one runs on the machine
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.safetensors"))}


def merged(config_path: Path, out: Path, on=None, **engine) -> dict[str, bytes]:
    """The shards of a merge of `config_path` with these `distmerge:` settings (on the runtime `on`, if given)."""
    config = load_config(config_path)
    merge(replace(config, engine=replace(config.engine, **engine)), out, quiet=True, runtime=on)
    return shard_bytes(out)


@pytest.fixture(scope="class")
def ray_workers(ray_address):
    """`ray_workers(n)`: a Ray runtime of n CPU workers, kept for the next merges of the class that ask for n,
    as a multi-stage merge keeps its actors from one stage to the next: each merge is loaded into the same actors.
    The session's Ray has room for one runtime at a time."""
    runtimes = {}

    def runtime(workers: int) -> RayRuntime:
        if workers not in runtimes:
            for other in runtimes.values():
                other.close()
            runtimes.clear()
            runtimes[workers] = RayRuntime("cpu", workers=workers, quiet=True)
        return runtimes[workers]

    yield runtime
    for runner in runtimes.values():
        runner.close()


METHOD_CONFIGS = {
    "linear": dict(base=None, models="weight", values=(1.0, 2.0, 0.5)),
    "task_arithmetic": dict(parameters={"lambda": 0.7}),
    "ties": dict(models="density", values=(0.5, 0.3, 0.7)),
    "ties_global": dict(method="ties", models="density", values=(0.4, 0.4, 0.4), parameters={"trim_scope": "global"}),
    "dare_linear": dict(models="density", values=(0.5, 0.3, 0.7)),
    "dare_ties": dict(models="density", values=(0.5, 0.3, 0.7)),
    "breadcrumbs": dict(models="density", values=(0.5, 0.6, 0.7)),
    "breadcrumbs_ties": dict(models="density", values=(0.5, 0.6, 0.7)),
    "della": dict(models="density", values=(0.5, 0.4, 0.6)),
    "della_linear": dict(models="density", values=(0.5, 0.4, 0.6), parameters={"rescale": "l1"}),
    # mergekit's draws: one generator state per tensor, found before the merge, so any worker merges any tensor
    "dare_ties_rng_mergekit": dict(method="dare_ties", models="density", values=(0.5, 0.3, 0.7),
                                   engine={"rng": "mergekit"}),
    "della_rng_mergekit": dict(method="della", models="density", values=(0.5, 0.4, 0.6), engine={"rng": "mergekit"}),
    "consensus_ta": dict(),
    "consensus_ties": dict(models="density", values=(0.5, 0.5, 0.5)),
    "slerp": dict(n_models=1, parameters={"t": 0.3}),
    "passthrough": dict(n_models=1, base=None, models="scale", values=(0.5,)),
    "nuslerp": dict(n_models=2, models="weight", values=(1.0, 0.6), parameters={"nuslerp_flatten": False}),
    "multislerp": dict(models="weight", values=(1.0, 2.0, 0.5)),
    "karcher": dict(),  # the base_model is a fourth model
    "model_stock": dict(),
    "tsvm": dict(parameters={"alpha": 0.9}),
    "rtsvm": dict(parameters={"eta": 0.8}),
    # the rank budget's first pass, and the effective ranks each worker finds again for its matrices
    "rtsvm_model_ranks": dict(method="rtsvm", parameters={"rank_allocation": "model", "rank_budget": 0.6,
                                                          "task_weighting": "kurtosis", "spectrum_outliers": True}),
    "iso_c": dict(),
    "iso_cts": dict(parameters={"common_fraction": 0.7}),
}
# LAPACK's SVD changes its last bits with the thread count: spectral merges on CPU are pinned to one thread per
# worker on both sides (the thread count is part of the resume fingerprint for them).
SPECTRAL = {"tsvm", "rtsvm", "rtsvm_model_ranks", "iso_c", "iso_cts"}


def method_config(tmp_path: Path, family: dict, case: str) -> Path:
    spec = METHOD_CONFIGS[case]
    experts = family["experts"][: spec.get("n_models", 3)]
    values = spec.get("values", (None,) * len(experts))
    models = [{"model": str(p), **({"parameters": {spec["models"]: v}} if "models" in spec else {})}
              for p, v in zip(experts, values)]
    engine = {"distmerge": spec["engine"]} if "engine" in spec else {}
    return write_config(tmp_path / f"{case}.yaml", spec.get("method", case), family, models=models,
                        base=spec.get("base", "family"), parameters=spec.get("parameters", {}), **engine)


@pytest.mark.slow
class TestTheSameBytesAsLocal:
    """Every method, and the input views (LoRA, slices, vocabularies), on one Ray runtime reused from merge to
    merge, as a multi-stage merge reuses its actors."""

    @pytest.mark.parametrize("case", sorted(METHOD_CONFIGS))
    def test_two_workers_write_the_same_bytes_as_local(self, tmp_path, family_bf16_sharded, ray_workers, case):
        cfg = method_config(tmp_path, family_bf16_sharded, case)
        local = merged(cfg, tmp_path / "local", shard_size=6000, threads=1 if case in SPECTRAL else None)
        assert len(local) >= 3
        assert merged(cfg, tmp_path / "ray2", ray_workers(2), runtime="ray", workers=2, shard_size=6000) == local

    def test_a_lora_input_under_ray_writes_the_local_bytes(self, tmp_path, family_bf16_sharded, ray_workers):
        pytest.importorskip("peft")
        base = family_bf16_sharded["base"]
        adapter = make_adapter(base, tmp_path / "adapter", {"r": 4, "target_modules": ["q_proj", "down_proj"]})
        models = [{"model": f"{base}+{adapter}"}, {"model": str(family_bf16_sharded["experts"][0])}]
        cfg = write_config(tmp_path / "lora.yaml", "ties", family_bf16_sharded, models=models,
                           parameters={"density": 0.5})
        local = merged(cfg, tmp_path / "local", shard_size=6000)
        assert len(local) >= 3 and merged(cfg, tmp_path / "ray", ray_workers(2), runtime="ray", workers=2,
                                          shard_size=6000) == local

    def test_slices_under_ray_write_the_local_bytes(self, tmp_path, family_bf16_sharded, ray_workers):
        import yaml

        base, e1, e2, e3 = map(str, (family_bf16_sharded["base"], *family_bf16_sharded["experts"]))
        doc = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5}, "slices": [
            {"sources": [{"model": m, "layer_range": [0, 2]} for m in (base, e1, e2)]},
            {"sources": [{"model": m, "layer_range": [1, 2]} for m in (base, e2, e3)], "parameters": {"density": 0.3}}]}
        cfg = tmp_path / "slices.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        local = merged(cfg, tmp_path / "local", shard_size=6000)
        assert len(local) >= 3 and merged(cfg, tmp_path / "ray", ray_workers(2), runtime="ray", workers=2,
                                          shard_size=6000) == local

    def test_a_union_of_vocabularies_under_ray_writes_the_local_bytes(self, tmp_path, ray_workers):
        """Each input's embedding and head, read in the output vocabulary on the workers, as locally."""
        import yaml
        from test_vocabularies import A_VOCAB, B_ADDED, B_VOCAB, BASE_VOCAB, write_model

        for seed, (name, vocab, added) in enumerate((("base", BASE_VOCAB, []), ("a", A_VOCAB, []),
                                                     ("b", B_VOCAB, B_ADDED))):
            write_model(tmp_path / name, vocab, added, seed)
        doc = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "parameters": {"density": 0.5},
               "models": [{"model": str(tmp_path / name)} for name in "ab"],
               "tokenizer": {"source": "union", "pad_to_multiple_of": 16}}
        cfg = tmp_path / "union.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        local = merged(cfg, tmp_path / "local", shard_size=3000)
        assert len(local) >= 3 and merged(cfg, tmp_path / "ray", ray_workers(2), runtime="ray", workers=2,
                                          shard_size=3000) == local

    @pytest.mark.parametrize("case", ["ties_global", "dare_ties", "dare_ties_rng_mergekit", "rtsvm",
                                      "rtsvm_model_ranks"])
    def test_one_worker_writes_the_same_bytes_as_local(self, tmp_path, family_bf16_sharded, ray_workers, case):
        """The two-pass, random and SVD paths on a single worker too (last in the class: one switch of runtime)."""
        cfg = method_config(tmp_path, family_bf16_sharded, case)
        local = merged(cfg, tmp_path / "local", shard_size=6000, threads=1 if case in SPECTRAL else None)
        assert merged(cfg, tmp_path / "ray1", ray_workers(1), runtime="ray", workers=1, shard_size=6000) == local


@pytest.mark.slow
def test_a_multi_stage_merge_under_ray_writes_the_local_bytes(tmp_path, family_bf16_sharded, ray_address):
    """Both stages run on the same actors (one runtime for the whole merge), and write what a local run writes."""
    import yaml

    base, e1, e2 = map(str, (family_bf16_sharded["base"], *family_bf16_sharded["experts"][:2]))
    docs = [{"name": "first", "merge_method": "ties", "base_model": base, "parameters": {"density": 0.5},
             "models": [{"model": e1}, {"model": e2}]},
            {"merge_method": "linear", "models": [{"model": "first"}, {"model": e1}]}]
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(yaml.safe_dump_all(docs))
    run_cli("merge", cfg, tmp_path / "local", "--quiet", "--shard-size", "6000")
    proc = run_cli("merge", cfg, tmp_path / "ray", "--runtime", "ray", "--workers", "2", "--shard-size", "6000",
                   env={"RAY_ADDRESS": ray_address})
    assert "stage first (1 of 2)" in proc.stderr and "final merge (2 of 2)" in proc.stderr
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local") and shard_bytes(tmp_path / "local")
    assert shard_bytes(tmp_path / "ray.stages" / "first") == shard_bytes(tmp_path / "local.stages" / "first")


def linear_that_kills_its_worker_once(marker: Path):
    """linear, except that the first worker to reach the second layer's down_proj kills its own process."""

    def method(base, models, p, ctx):
        if ctx.name == "model.layers.1.mlp.down_proj.weight" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return elementwise.linear(base, models, p, ctx)

    return method


@pytest.mark.slow
def test_a_worker_killed_mid_unit_costs_a_retry_and_not_the_bytes(tmp_path, family_bf16_sharded, ray_address):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))
    cfg = write_config(tmp_path / "linear.yaml", "linear", family_bf16_sharded, base=None)
    expected = merged(cfg, tmp_path / "local", shard_size=6000)

    marker = tmp_path / "crashed"
    config = load_config(cfg)
    config = replace(config, engine=replace(config.engine, shard_size=6000))
    plan = build_plan(config)
    plan = replace(plan, spec=replace(plan.spec, fn=linear_that_kills_its_worker_once(marker)))
    runtime = RayRuntime("cpu", workers=2, quiet=True)
    try:
        out = OutputDir(tmp_path / "ray")
        out.prepare(fingerprint(plan, runtime.placement.device, runtime.placement.threads), force=False,
                    input_dirs=[])
        records = runtime.merge(plan, list(plan.units), out, None, Progress("t", 1, 1, quiet=True))
        replacements = runtime.pool.replacements
    finally:
        runtime.close()
    finalize(plan, out, records)
    assert marker.exists(), "the worker was not killed"
    assert replacements == 1
    assert shard_bytes(tmp_path / "ray") == expected


@pytest.mark.slow
def test_an_interrupted_ray_driver_resumes(tmp_path, family_bf16_sharded, ray_address, monkeypatch):
    cfg = write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded)
    expected = merged(cfg, tmp_path / "local", shard_size=6000)

    real_run = WorkerPool.run

    def run_two_units_then_interrupt(self, units, submit, on_done):
        real_run(self, units[:2], submit, on_done)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkerPool, "run", run_two_units_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        merged(cfg, tmp_path / "out", runtime="ray", workers=2, shard_size=6000)
    monkeypatch.undo()
    assert len(shard_bytes(tmp_path / "out")) == 2

    proc = run_cli("merge", cfg, "-o", tmp_path / "out", "--runtime", "ray", "--workers", "2", "--shard-size", "6000",
                   env={"RAY_ADDRESS": ray_address})
    assert "resuming: 2 of" in proc.stderr and "merging:" in proc.stderr
    assert shard_bytes(tmp_path / "out") == expected


@pytest.mark.slow
def test_too_many_workers_is_a_clear_error(tmp_path, family_fp32_single, ray_address):
    cfg = write_config(tmp_path / "ta.yaml", "task_arithmetic", family_fp32_single)
    proc = run_cli("merge", cfg, "-o", tmp_path / "out", "--runtime", "ray", "--workers", "5", check=False,
                   env={"RAY_ADDRESS": ray_address})
    assert proc.returncode == 2 and "--workers 5 does not fit" in proc.stderr


class FlakyWorker:
    """Runs a unit by name, writing one file per start; the first time it starts a unit listed in `dies_on`, the
    whole worker process dies, once the driver has collected the results of the units this actor ran before
    (each marked by a `<name>.collected` file): a process that exits right after a task may lose that task's reply,
    and the pool then rightly counts the task as unfinished. With `dies_coming_up`, the first replacement actor dies
    before it is up (as one placed on a node that is going away)."""

    def __init__(self, log_dir: str, dies_coming_up: bool = False):
        self.log, self.dies_coming_up = Path(log_dir), dies_coming_up

    def where(self) -> str:
        actors = len(list(self.log.glob("actor*")))
        (self.log / f"actor{actors}").touch()
        if self.dies_coming_up and actors == 1:
            os._exit(1)
        return "this machine"

    def run(self, name: str, dies_on: tuple[str, ...]) -> str:
        starts = len(list(self.log.glob(f"{name}.start*")))
        (self.log / f"{name}.start{starts}").touch()
        if name in dies_on and starts == 0:
            earlier = [f.name.split(".")[0] for f in self.log.glob("*.start0") if not f.name.startswith(f"{name}.")]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all((self.log / f"{e}.collected").exists() for e in earlier):
                time.sleep(0.01)
            os._exit(1)
        return name


@pytest.mark.slow
@pytest.mark.parametrize("replacement_dies_coming_up", [False, True])
def test_a_dead_worker_charges_only_the_unit_it_was_running(tmp_path, ray_address, replacement_dies_coming_up):
    """One actor slot, two units in flight: B kills its worker when it starts; C, queued behind it on the same
    actor, never started. B is charged one attempt, C none; A, finished before the death, is not run again.
    A replacement that dies before it is up lost no work: it is neither a death nor a replacement, and the slot
    starts another actor."""
    from ray import cloudpickle

    from distmerge.plan import WorkUnit

    cloudpickle.register_pickle_by_value(__import__(__name__))
    actor_class = ray.remote(num_cpus=1)(FlakyWorker)
    pool = WorkerPool(ray, lambda slot: actor_class.remote(str(tmp_path), replacement_dies_coming_up), workers=1)
    units = [WorkUnit(index=i, shard=name, tensors=(), cost=0.0) for i, name in enumerate("ABC")]
    done = []
    try:
        def collected(unit, result):
            done.append(result)
            (tmp_path / f"{result}.collected").touch()

        pool.run(units, lambda actor, unit: actor.run.remote(unit.shard, ("B",)), collected)
    finally:
        for actor in pool.actors:
            ray.kill(actor)
    assert sorted(done) == ["A", "B", "C"]
    assert pool.charged == {1: 1} and pool.replacements == 1 and len(pool.deaths) == 1
    assert len(list(tmp_path.glob("actor*"))) == 2 + replacement_dies_coming_up
    starts = {name: len(list(tmp_path.glob(f"{name}.start*"))) for name in "ABC"}
    assert starts == {"A": 1, "B": 2, "C": 1}


def test_a_cpu_worker_holds_its_share_of_its_node():
    """Each live node's `memory` resource over the workers its CPUs fit; the smallest share decides."""
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "memory": 8e9}},
             {"Alive": True, "Resources": {"CPU": 2.0, "memory": 2e9}},
             {"Alive": False, "Resources": {"CPU": 1.0, "memory": 1e3}},  # gone
             {"Alive": True, "Resources": {"memory": 1e3}}]  # a head without CPUs hosts no worker
    assert cpu_worker_memory(nodes, threads=1) == 1e9  # the second node's two workers
    assert cpu_worker_memory(nodes, threads=2) == 2e9  # 4e9 each on the first node, 2e9 on the second
    assert cpu_worker_memory(nodes, threads=3) == 8e9  # only the first node fits one
    assert cpu_worker_memory(nodes, threads=8) is None
