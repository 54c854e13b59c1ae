"""From a config to work units, reading headers only.

`build_plan` opens every checkpoint's index and safetensors headers, checks everything that can be checked
without tensor data (names, shapes, dtypes, parameters and their ranges, per tensor), resolves each tensor's
parameters, assigns tensors to output shards (natural name order, size cap) and makes one work unit per shard.
Units are ordered largest cost first. The plan is small and picklable: it is what Ray actors receive.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import CODE_TO_NAME, DTYPES, TORCH_TO_CODE, Checkpoint, TensorInfo, resolve_model_dir
from .config import MergeConfig, ModelEntry, format_bytes, layer_position, resolve_setting
from .errors import CheckpointError, ConfigError
from .methods import MethodSpec, get_method
from .methods.linalg import resolve_backend
from .methods.spectral import goes_through_svd

TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name, shape, saved dtype, parameters, and whether it is merged or copied."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    params: dict
    merge: bool = True  # False: copied from the base (integer buffers and the like)
    svd: bool = False  # spectral methods: this tensor goes through SVDs

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * DTYPES[self.out_dtype][1]


@dataclass(frozen=True)
class WorkUnit:
    """One output shard: the tensors it holds, in the order they are written."""

    index: int
    shard: str
    tensors: tuple[TensorJob, ...]
    cost: float

    @property
    def out_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)


@dataclass
class MergePlan:
    config: MergeConfig
    spec: MethodSpec
    base: Checkpoint | None
    models: tuple[Checkpoint, ...]  # the T inputs merged (the base excluded for methods that take one)
    model_ids: tuple[int, ...]  # their positions in `models:` (random streams are keyed by these)
    units: tuple[WorkUnit, ...]
    device: str
    fingerprint: str
    threads: int | None = None  # CPU threads per worker (LAPACK results depend on it)
    dropped: tuple[str, ...] = ()  # tensors left out on purpose (a tied lm_head)
    tokenizer_dir: Path | None = None
    global_thresholds: tuple[float, ...] | None = None  # from the first pass of TIES with trim_scope: global
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose config, tied-embedding layout and non-float tensors the output takes."""
        return self.base or self.models[0]

    @property
    def tensors(self) -> list[TensorJob]:
        return [t for u in self.units for t in u.tensors]

    @property
    def needs_global_pass(self) -> bool:
        return self.tensors[0].params.get("trim_scope") == "global" if self.tensors else False

    def inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + list(self.models)

    def bind(self, device: str, threads: int | None) -> None:
        """Fix where the work runs; the fingerprint covers it, since it can change the bytes."""
        self.device, self.threads = device, threads
        self.fingerprint = _fingerprint(self)

    def unit_read_bytes(self, unit: WorkUnit) -> int:
        return sum(self.read_bytes(job) for job in unit.tensors)

    def read_bytes(self, job: TensorJob) -> int:
        """Bytes read from storage for one output tensor (a copied tensor is read once)."""
        if not job.merge:
            return self.reference.tensors[job.name].nbytes
        return sum(ckpt.tensors[job.name].nbytes for ckpt in self.inputs())

    def bytes_read(self) -> int:
        return sum(self.read_bytes(t) for t in self.tensors)

    def bytes_written(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    def peak_bytes_per_worker(self) -> int:
        """Largest working set of one tensor: T + 1 compute-dtype copies, the stored-dtype read buffer, and the
        method's scratch (masks for elementwise methods; stacked singular vectors, one SVD's factors and its
        workspace, and the float64 Gram matrix for spectral ones)."""
        n_models = len(self.models)
        width = 8 if self.config.compute_dtype == "float64" else 4
        worst = 0
        for t in self.tensors:
            inputs = (n_models + 1) * t.numel * width + t.numel * 4
            if t.svd:
                rows, cols = t.shape
                rank = min(rows, cols)
                scratch = (2 * (rows + cols) * rank + t.numel) * width + 8 * rank * rank
            else:
                scratch = 2 * t.numel * width
            worst = max(worst, inputs + scratch)
        return worst

    def svd_count(self) -> int:
        return sum(len(self.models) for t in self.tensors if t.svd)

    def compute_flops(self, job: TensorJob) -> dict[str, float]:
        """Floating-point operations for one SVD-merged tensor, by the route that runs them (SVD backend or
        `polar`): the routes run at very different rates (float64 Gram products vs LAPACK vs sketches)."""
        rows, cols = job.shape
        n_tasks, rank = len(self.models), min(rows, cols)
        per_task = rank // n_tasks
        oversample = job.params.get("oversample", 20)
        backend = resolve_backend(job.params.get("svd", "exact"), per_task, oversample, rank)
        if backend == "randomized":
            one = (2 + 4 * job.params.get("power_iters", 6)) * rows * cols * (per_task + oversample)
        elif backend == "gram":
            one = 2.0 * max(rows, cols) * rank**2 * 2 + 9.0 * rank**3  # float64 Gram, eigh, U = A V / S
        else:
            one = 14.0 * max(rows, cols) * rank**2 + 8.0 * rank**3  # thin SVD with both factors
        polar = 2 * (4.0 * (rows + cols) * rank**2 + 9.0 * rank**3)  # Gram, eigh and product, for U and for V
        return {backend: n_tasks * one, "polar": polar}


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def build_plan(config: MergeConfig, config_only: bool = False) -> MergePlan:
    """`config_only`: allow models that have only a config.json (planning, never merging)."""
    spec = get_method(config.merge_method)
    base, models, entries, model_ids = _open_inputs(config, spec, config_only)
    reference = base or models[0]
    _check_parameter_names(config, spec, entries)
    _check_same_tensors(reference, base, models)

    dropped = []
    names = sorted(reference.tensors, key=natural_key)
    if reference.config.get("tie_word_embeddings") and TIED_HEAD in reference.tensors:
        names.remove(TIED_HEAD)  # the loader re-ties it; merging it separately could untie it
        dropped.append(TIED_HEAD)

    num_layers = reference.num_layers
    jobs = []
    for name in names:
        info = reference.tensors[name]
        merge = info.is_float
        params = _resolve_params(config, spec, entries, name, layer_position(name, num_layers)) if merge else {}
        jobs.append(TensorJob(
            name=name,
            shape=info.shape,
            out_dtype=_out_dtype(config, info) if merge else info.dtype,
            params=params,
            merge=merge,
            svd=merge and spec.spectral and goes_through_svd(name, info.shape, params["exclude"]),
        ))

    _check_global_trim(spec, jobs)
    units = _make_units(jobs, config.engine.shard_size, len(models))
    plan = MergePlan(
        config=config, spec=spec, base=base, models=tuple(models), model_ids=tuple(model_ids), units=units,
        device="", fingerprint="", dropped=tuple(dropped), tokenizer_dir=_tokenizer_dir(config, base, models),
    )
    plan.bind(config.engine.device or "cpu", config.engine.threads)
    return plan


def _open_inputs(config: MergeConfig, spec: MethodSpec, config_only: bool):
    base = Checkpoint.open(config.base_model, config.base_dir, config_only) if config.base_model else None
    if spec.needs_base and base is None:
        raise ConfigError(f"`merge_method: {spec.name}` needs `base_model` (the model the others were fine-tuned from)")
    models, entries, model_ids = [], [], []
    for index, entry in enumerate(config.models):
        if base is not None and spec.needs_base and _same_model(entry.model, config, base):
            if entry.parameters:
                raise ConfigError(f"`models[{index}]` is the base model; {spec.name} takes no parameters for it")
            continue  # mergekit configs list the base among the models
        models.append(Checkpoint.open(entry.model, config.base_dir, config_only))
        entries.append(entry)
        model_ids.append(index)
    if len(models) < spec.min_models or (spec.max_models is not None and len(models) > spec.max_models):
        wanted = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                  else f"at least {spec.min_models}" if spec.max_models is None
                  else f"{spec.min_models} to {spec.max_models}")
        extra = " besides the base model" if spec.needs_base else ""
        raise ConfigError(f"`merge_method: {spec.name}` needs {wanted} model(s){extra} under `models`, "
                          f"got {len(models)}")
    return base, models, entries, model_ids


def _same_model(ref: str, config: MergeConfig, base: Checkpoint) -> bool:
    if ref == base.ref:
        return True
    try:
        return resolve_model_dir(ref, config.base_dir) == base.path
    except CheckpointError:
        return False


def _check_parameter_names(config: MergeConfig, spec: MethodSpec, entries: list[ModelEntry]) -> None:
    known = spec.names_with_aliases()
    allowed = ", ".join(p.name for p in spec.params) or "(none)"
    for where, settings in [("parameters", config.parameters)] + [
        (f"parameters of model {e.model}", e.parameters) for e in entries
    ]:
        for key in settings:
            if key not in known:
                raise ConfigError(f"`{key}` in {where} is not a parameter of {spec.name}; allowed: {allowed}")
            param = known[key]
            if param.alias and param.name in settings and param.alias in settings:
                raise ConfigError(f"{where} sets both `{param.name}` and its mergekit alias `{param.alias}`; keep one")
            if not param.per_model and where != "parameters":
                raise ConfigError(f"`{key}` is set once for the whole merge in {spec.name}: move it from {where} "
                                  "to the top-level `parameters`")


def _lookup(settings: dict, param) -> Any:
    if param.name in settings:
        return settings[param.name]
    if param.alias and param.alias in settings:
        return settings[param.alias]
    return None


def _resolve_params(config: MergeConfig, spec: MethodSpec, entries: list[ModelEntry], name: str, t: float) -> dict:
    """Each declared parameter's value for tensor `name`, validated (per-model ones as lists)."""

    def value_of(param, settings_chain: list[tuple[str, dict]]):
        for where, settings in settings_chain:
            setting = _lookup(settings, param)
            if setting is None:
                continue
            key = param.name if param.name in settings else param.alias
            value = setting if param.kind == "globs" else resolve_setting(setting, name, t, key)
            if value is not None:
                return param.check(value, f"{where} (tensor {name})")
        return param.default

    resolved = {}
    for param in spec.params:
        if param.per_model:
            resolved[param.name] = [
                value_of(param, [(f"parameters of model {e.model}", e.parameters), ("parameters", config.parameters)])
                for e in entries
            ]
        else:
            resolved[param.name] = value_of(param, [("parameters", config.parameters)])
    if spec.check is not None:
        problem = spec.check(resolved)
        if problem:
            raise ConfigError(f"{spec.name}, tensor {name}: {problem}")
    return resolved


def _check_same_tensors(reference: Checkpoint, base: Checkpoint | None, models: list[Checkpoint]) -> None:
    ref_names = set(reference.tensors)
    for ckpt in ([base] if base is not None else []) + models:
        if ckpt is reference:
            continue
        names = set(ckpt.tensors)
        missing, extra = sorted(ref_names - names, key=natural_key), sorted(names - ref_names, key=natural_key)
        if missing or extra:
            what = (f"lacks {len(missing)} tensor(s) of {reference.ref}, e.g. {missing[0]}" if missing
                    else f"has {len(extra)} tensor(s) that {reference.ref} lacks, e.g. {extra[0]}")
            raise CheckpointError(f"model {ckpt.ref} {what}. All models must share one architecture "
                                  "(same tensor names); merge only fine-tunes of the same base")
        for name in sorted(ref_names, key=natural_key):
            mine, theirs = ckpt.tensors[name], reference.tensors[name]
            if mine.shape != theirs.shape:
                raise CheckpointError(
                    f"model {ckpt.ref}: tensor {name} has shape {list(mine.shape)} but {reference.ref} has "
                    f"{list(theirs.shape)}. Models must have the same shapes (resized vocabularies must match)")
            if mine.is_float != theirs.is_float or (not mine.is_float and mine.dtype != theirs.dtype):
                raise CheckpointError(
                    f"model {ckpt.ref}: tensor {name} is {mine.dtype} but {reference.ref} has {theirs.dtype}; "
                    "floating-point tensors may differ in precision, other tensors must match exactly")


def _check_global_trim(spec: MethodSpec, jobs: list[TensorJob]) -> None:
    """Global trimming keeps each task's top `density` over the whole model: one scope and one density per task."""
    merged = [job for job in jobs if job.merge]
    scopes = {job.params.get("trim_scope") for job in merged}
    if "global" in scopes and (len(scopes) > 1 or len({tuple(job.params["density"]) for job in merged}) > 1):
        raise ConfigError(f"{spec.name} with `trim_scope: global` needs one `trim_scope` and one `density` per "
                          "model for the whole model (no gradients or filters on them)")


def _out_dtype(config: MergeConfig, info: TensorInfo) -> str:
    """out_dtype, else dtype (mergekit: one key sets both), else the reference's own dtype."""
    name = config.out_dtype or config.dtype
    return TORCH_TO_CODE[name] if name else info.dtype


def _make_units(jobs: list[TensorJob], shard_size: int, n_models: int) -> tuple[WorkUnit, ...]:
    """Fill shards in name order up to `shard_size` bytes; a tensor larger than that gets its own shard."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.out_bytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.out_bytes
    total = len(groups)
    units = [
        WorkUnit(index=i, shard=f"model-{i + 1:05d}-of-{total:05d}.safetensors", tensors=tuple(group),
                 cost=sum(tensor_cost(t, n_models) for t in group))
        for i, group in enumerate(groups)
    ]
    return tuple(sorted(units, key=lambda u: (-u.cost, u.index)))


def tensor_cost(job: TensorJob, n_models: int) -> float:
    """Relative cost for ordering: bytes moved, plus SVD work (rows x cols x min(rows, cols) per SVD)."""
    moved = job.numel * 4 * (n_models + 2)
    if not job.svd:
        return moved
    rows, cols = job.shape
    return moved + (n_models + 2) * rows * cols * min(rows, cols) / 50.0  # ~50 flops per byte moved


def _tokenizer_dir(config: MergeConfig, base: Checkpoint | None, models: list[Checkpoint]) -> Path | None:
    source = config.tokenizer_source
    if source is None or source == "base":
        if source == "base" and base is None:
            raise ConfigError("`tokenizer_source: base` needs `base_model`")
        return (base or models[0]).path
    return resolve_model_dir(source, config.base_dir)


def _fingerprint(plan: MergePlan) -> str:
    """What decides the output bytes: the config, the input files as they are now, the device type (and, for
    SVDs on CPU, the threads per worker), and this version of distmerge. A rerun with the same fingerprint may
    resume; any change starts over."""
    import hashlib
    import json

    files = []
    for ckpt in plan.inputs():
        for file in ckpt.files:
            st = os.stat(file) if file else None
            files.append([file, st.st_size, st.st_mtime_ns] if st else [ckpt.ref, None, None])
    payload = {
        "config": plan.config.fingerprint(),
        "files": files,
        "device": plan.device.split(":")[0],
        "threads": plan.threads if plan.device == "cpu" and plan.spec.spectral else None,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# Sustained rates of one worker per route, from benchmarks/results/svd_cuda.md and gpu_layer.md (H100) and the
# CPU SVD benchmark (2 cores); the flop counts of compute_flops divided by measured seconds.
WORKER_FLOPS = {
    "cpu": {"exact": 8.6e10, "gram": 6e10, "randomized": 8e10, "polar": 6e10},
    "cuda": {"exact": 3.8e12, "gram": 1.5e13, "randomized": 7.8e12, "polar": 1.5e13},
}
WORKER_ELEMENTWISE_BYTES = {"cpu": 1.5e9, "cuda": 5e11}  # bytes read per second by elementwise methods


@dataclass(frozen=True)
class Cluster:
    """What `distmerge plan --gpus N --nodes M --read-gbps X` assumes."""

    workers: int
    nodes: int
    read_gbps: float  # storage read bandwidth per node, GB/s
    write_gbps: float
    device: str


def estimate_seconds(plan: MergePlan, cluster: Cluster) -> dict[str, float]:
    """Lower bounds: reading and writing at full storage bandwidth, computing on every worker at once, and the
    largest unit on one worker. The merge takes at least the largest of them."""
    kind = cluster.device.split(":")[0]

    def unit_seconds(unit: WorkUnit) -> float:
        return sum(sum(flops / WORKER_FLOPS[kind][route] for route, flops in plan.compute_flops(t).items())
                   if t.svd else plan.read_bytes(t) / WORKER_ELEMENTWISE_BYTES[kind] for t in unit.tensors)

    compute = sum(unit_seconds(u) for u in plan.units)
    return {
        "read": plan.bytes_read() / (cluster.nodes * cluster.read_gbps * 1e9),
        "write": plan.bytes_written() / (cluster.nodes * cluster.write_gbps * 1e9),
        "compute": compute / cluster.workers,
        "largest unit": max(unit_seconds(u) for u in plan.units),
    }


def describe(plan: MergePlan, cluster: Cluster | None = None) -> str:
    """Human-readable summary for `distmerge plan` and `distmerge validate`."""
    n_tensors = len(plan.tensors)
    lines = [
        f"method        {plan.spec.name} ({len(plan.models)} models"
        + (f" + base model {plan.base.ref})" if plan.base else ")"),
        f"tensors       {n_tensors} in {len(plan.units)} shard(s)"
        + (f"; left out: {', '.join(plan.dropped)} (tied to the embeddings)" if plan.dropped else ""),
        f"read          {format_bytes(plan.bytes_read())}",
        f"write         {format_bytes(plan.bytes_written())}"
        + f" ({', '.join(sorted({CODE_TO_NAME.get(t.out_dtype, t.out_dtype) for t in plan.tensors}))})",
        f"SVDs          {plan.svd_count()}",
        f"peak memory   {format_bytes(plan.peak_bytes_per_worker())} per worker (one tensor at a time)",
        f"device        {plan.device}",
    ]
    missing = [ckpt.ref for ckpt in plan.inputs() if not ckpt.has_weights]
    if missing:
        lines.append(f"note          no weights yet for {', '.join(missing)}: tensors derived from config.json")
    if cluster is not None:
        from .progress import format_seconds

        parts = estimate_seconds(plan, cluster)
        bound = max(parts["read"] + parts["write"], parts["compute"], parts["largest unit"])
        lines += [
            f"cluster       {cluster.workers} {'GPU' if cluster.device.startswith('cuda') else 'CPU'} worker(s) on "
            f"{cluster.nodes} node(s); storage {cluster.read_gbps:g} GB/s read, {cluster.write_gbps:g} GB/s "
            "write per node",
            "time          at least " + format_seconds(bound) + " (" + ", ".join(
                f"{name} {format_seconds(value)}" for name, value in parts.items()) + ")",
        ]
    return "\n".join(lines)
