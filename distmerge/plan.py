"""From a config to work units, reading headers only.

`build_plan` opens every checkpoint's index and safetensors headers, checks everything that can be checked
without tensor data (names, shapes, dtypes, parameters and their ranges, per tensor), resolves each tensor's
parameters, assigns tensors to output shards (natural name order, size cap) and makes one work unit per shard.
Units are ordered largest cost first. The plan is small, picklable and immutable: it is what Ray actors receive.
What each tensor costs is the method's declaration (`MethodSpec.work`); the estimates built on it are in
`estimates`, parameter resolution in `params`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from .architecture import stored_transposed
from .chat_templates import TOKENIZER_CONFIG, resolve_chat_template, tokenizer_files_with_template
from .checkpoint import DTYPES, TORCH_TO_CODE, Checkpoint, TensorInfo, checkpoint_file, resolve_model_dir
from .config import MergeConfig, ModelEntry, layer_position
from .errors import CheckpointError, ConfigError
from .estimates import rows_within, tensor_cost
from .hub import HubAccess
from .methods import FirstPass, MethodSpec, Work, get_method
from .methods.sampling import mergekit_generator_states
from .moe_layout import ModelLayoutView, StoredPart, model_layout_view, stored_parts
from .params import check_parameter_names, resolve_params, whole_model_chains
from .slices import EMBEDDING, SlicedInputs, open_slices
from .vocabulary import VOCABULARY_NAME, OutputVocabulary, VocabularyView, plan_vocabulary, vocabulary_settings
from .writer import TOKENIZER_FILES

TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name, shape, saved dtype, parameters, whether it is merged or copied, and what
    merging it runs (the method's declaration for this shape and these parameters)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    params: dict
    merge: bool = True  # False: copied from the base (integer buffers and the like)
    work: Work = Work()
    draw_state: bytes | None = None  # `rng: mergekit`: torch's CPU generator state where this tensor's draws start
    transposed: bool = False  # a linear layer's weight stored [in, out] (architecture.stored_transposed)
    parts: tuple[StoredPart, ...] = ()  # the tensors it is written as, where the reference stores it otherwise
    block_rows: int | None = None  # merged this many rows at a time, to stay within the memory budget
    blockwise: bool = False  # any row blocks give the same bytes, and every input reads them alone

    @property
    def stored(self) -> tuple[StoredPart, ...]:
        """The output tensors this job writes: its parts, or itself."""
        return self.parts or (StoredPart(self.name, self.shape),)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

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


@dataclass(frozen=True)
class MergePlan:
    """What the merge computes, complete and immutable: the inputs, every output tensor with its resolved
    parameters and declared work, the shards, and the method's first pass if this merge needs one. Where it runs
    (device, threads) is the runtime's; `fingerprint(plan, device, threads)` combines the two."""

    config: MergeConfig
    spec: MethodSpec
    base: Checkpoint | None
    models: tuple[Checkpoint, ...]  # the T inputs merged (the base excluded for methods that take one as origin)
    model_ids: tuple[int, ...]  # their positions in `models:` (random streams are keyed by these)
    units: tuple[WorkUnit, ...]
    dropped: tuple[str, ...] = ()  # tensors left out on purpose (a tied lm_head)
    first_pass: FirstPass | None = None  # the method's first pass, when these parameters need it
    # The small files the output copies from the inputs (generation config, tokenizer): (name in the output, real
    # path to copy), located and checked by `checkpoint_file` when planned.
    copied_files: tuple[tuple[str, Path | bytes], ...] = ()  # name in the output -> file to copy, or its bytes
    vocabulary: OutputVocabulary | None = None  # the output vocabulary, where `tokenizer_source`/`tokenizer:` change it
    memory_budget: int = 0  # bytes one worker may hold for one tensor (EngineSettings.memory_budget, resolved)
    memory_limit: int | None = None  # a tensor needing more is refused: the budget given, else what a worker has

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose config, tied-embedding layout and non-float tensors the output takes."""
        return self.base or self.models[0]

    @property
    def tensors(self) -> list[TensorJob]:
        return [t for u in self.units for t in u.tensors]

    def inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + list(self.models)

    def first_pass_params(self) -> dict:
        """The parameters the first pass's `finish` reads: its `check` made them the same for every tensor."""
        return next(job.params for job in self.tensors if job.merge)


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def build_plan(config: MergeConfig, config_only: bool = False, hub: HubAccess = HubAccess()) -> MergePlan:
    """`config_only`: allow models that have only a config.json (planning, never merging; hub ids then get only
    their small files downloaded). `hub`: whether hub ids not in the local cache are downloaded."""
    spec = check_config(config)
    sliced = open_slices(config, spec, config_only, hub) if config.slices else None
    if sliced is not None:
        base, models, entries, model_ids = sliced.base, list(sliced.models), [], list(range(len(sliced.models)))
    else:
        base, models, entries, model_ids = _open_inputs(config, spec, config_only, hub)
    vocabulary = _vocabulary(config, base, models, model_ids, sliced, hub)
    if vocabulary is not None:  # each input read through its view; the same view where one input plays two roles
        views = {}
        for ckpt in ([base] if base is not None else []) + models:
            sources = {name: ckpt.reads[name][0] if sliced is not None else ckpt for name in vocabulary.names}
            views.setdefault(id(ckpt), VocabularyView(ckpt, sources, vocabulary))
        base = views[id(base)] if base is not None else None
        models = [views[id(ckpt)] for ckpt in models]
    layouts = {}  # every input in transformers 5's layout (moe_layout), as mergekit reads it
    for ckpt in ([base] if base is not None else []) + models:
        layouts.setdefault(id(ckpt), model_layout_view(ckpt))
    base = layouts[id(base)] if base is not None else None
    models = [layouts[id(ckpt)] for ckpt in models]
    reference = base or models[0]
    if not config_only and not reference.config:
        role = "the base model" if base is not None else "the first model (`models[0]`, there is no base_model)"
        raise CheckpointError(
            f"model {reference.ref}: {reference.path / 'config.json'} is missing or empty; the merged model takes "
            f"its config.json from {role}, and could not be loaded without it. Put the checkpoint's config.json "
            "there (re-download the model)")
    if not config.engine.allow_crimes:
        _check_same_architecture(reference, base, models)
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
        parts = stored_parts(reference, name)
        if not info.is_float:
            jobs.append(TensorJob(name=name, shape=info.shape, out_dtype=info.dtype, params={}, merge=False,
                                  parts=parts))
            continue
        if sliced is not None:
            stored = parts[0].name if parts else name  # the slices place the tensors they store (one layer's parts)
            params = resolve_params(spec, name, sliced.position[stored], *sliced.chains(config, stored))
        else:
            params = resolve_params(spec, name, layer_position(name, num_layers), *whole_model_chains(config, entries))
        transposed = stored_transposed(reference.config, name)
        as_merged = info.shape[::-1] if transposed else info.shape  # the [out, in] matrix the method sees
        jobs.append(TensorJob(name=name, shape=info.shape, out_dtype=_out_dtype(config, info), params=params,
                              work=spec.work(name, as_merged, params, len(models)), transposed=transposed,
                              parts=parts))

    _check_mergekit_rng(config, spec, dropped, ([base] if base is not None else []) + models)
    plan = MergePlan(
        config=config, spec=spec, base=base, models=tuple(models), model_ids=tuple(model_ids),
        units=_make_units(jobs, config.engine.shard_size, len(models)), dropped=tuple(dropped),
        first_pass=_first_pass(spec, jobs),
        copied_files=_copied_files(config, reference, _tokenizer_dir(config, base, models, hub),
                                   ([base] if base else []) + models, vocabulary),
        vocabulary=vocabulary, memory_budget=config.engine.memory_budget or machine_memory() // 4,
        memory_limit=config.engine.memory_budget or worker_memory(config),
    )
    return with_row_blocks(plan)


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def worker_memory(config: MergeConfig) -> int | None:
    """What one worker can hold without a budget given: this machine's memory for a local merge on its CPU, its
    GPU's for one on its GPU; None where the workers are not known here (a Ray cluster's, a GPU not visible)."""
    if config.engine.runtime != "local":
        return None
    device = config.engine.device or "cpu"
    if device == "cpu":
        return machine_memory()
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory if torch.cuda.is_available() else None


def with_worker_memory(plan: MergePlan, memory: int) -> MergePlan:
    """The plan for workers that can each hold `memory` bytes, where no budget is given: a quarter of it the
    budget (as a quarter of this machine's is without workers known), a tensor that needs more than all of it
    refused (`merge.check_memory_limit`)."""
    if plan.config.engine.memory_budget:
        return plan
    return with_row_blocks(replace(plan, memory_budget=memory // 4, memory_limit=memory))


def with_row_blocks(plan: MergePlan) -> MergePlan:
    """The plan with each tensor that can be merged in row blocks marked `blockwise`, and cut into blocks where it
    is over the memory budget. Blockwise: its method merges entry by entry (`MethodSpec.blockwise`), so blocks
    give the same bytes, and every input reads a block's rows alone; the rows of fused experts are experts, each
    written as its stored matrices. Whole: tensors of one row, vocabulary tensors (read whole through the output
    vocabulary), mergekit's draws (one sequence per tensor), and tensors a LoRA adapter updates (its update reads
    the whole tensor)."""
    if plan.spec.blockwise is None or plan.config.engine.rng == "mergekit":
        return plan
    vocabulary = set(plan.vocabulary.names) if plan.vocabulary is not None else set()

    def blocked(job: TensorJob) -> TensorJob:
        whole = not job.merge or len(job.shape) < 2 or job.name in vocabulary
        if whole or not plan.spec.blockwise(job.params) or not all(
                ckpt.reads_rows_alone(job.name) for ckpt in plan.inputs()):
            return job
        rows = rows_within(plan, job, plan.memory_budget)
        return replace(job, blockwise=True, block_rows=rows if rows < job.shape[0] else None)

    return replace(plan, units=tuple(replace(unit, tensors=tuple(blocked(job) for job in unit.tensors))
                                     for unit in plan.units))


def _vocabulary(config: MergeConfig, base: Checkpoint | None, models: list[Checkpoint], model_ids: list[int],
                sliced: SlicedInputs | None, hub: HubAccess) -> OutputVocabulary | None:
    """The output vocabulary that `tokenizer_source` or `tokenizer:` asks for (vocabulary.py); None where the config
    asks for none or every input already has it. A vocabulary tensor is merged from the inputs in the order
    mergekit gathers them: `models:` in order, then the base where it is not listed there; in a slice merge, the
    sources of the first slice (embeddings) or of the last (the head), as they are listed."""
    settings = vocabulary_settings(config)
    if settings is None:
        return None
    inputs = ([base] if base is not None else []) + models
    template = (resolve_chat_template(config.chat_template, [(ckpt.ref, ckpt.path) for ckpt in inputs])
                if config.chat_template is not None else None)
    if sliced is not None:
        opened = sliced.checkpoints
        everyone = list({id(opened[ref]): opened[ref] for ref in config.model_refs()}.values())

        def slice_inputs(name: str) -> tuple[list[Checkpoint], Checkpoint | None]:
            output_slice = config.slices[0 if EMBEDDING.search(name) else -1]
            base_ref = output_slice.base_model or config.base_model
            sources = {id(opened[s.model]): opened[s.model] for s in output_slice.sources}
            return list(sources.values()), opened.get(base_ref)

        return plan_vocabulary(config, settings, everyone, opened.get(config.base_model), template, slice_inputs,
                               hub)
    position = {id(ckpt): index for ckpt, index in zip(models, model_ids)}
    if base is not None and id(base) not in position:
        listed = [i for i, entry in enumerate(config.models) if _same_model(entry.model, config, base)]
        position[id(base)] = listed[0] if listed else len(config.models)
    distinct = {id(ckpt): ckpt for ckpt in inputs}
    ordered = [distinct[key] for key in sorted(distinct, key=position.__getitem__)]
    return plan_vocabulary(config, settings, ordered, base, template, lambda name: (ordered, base), hub)


def _check_mergekit_rng(config: MergeConfig, spec: MethodSpec, dropped: list[str], inputs: list[Checkpoint]
                        ) -> None:
    """`rng: mergekit` holds only where distmerge knows the method's draws in mergekit and draws for the same
    tensors in the same order."""
    if config.engine.rng != "mergekit" or not spec.random:
        return
    if config.slices:
        raise ConfigError("`distmerge.rng: mergekit` does not reproduce mergekit's draws in a merge of `slices`; "
                          "remove `rng: mergekit` (the default draws are distmerge's own)")
    if spec.mergekit_draws is None:
        raise ConfigError(f"`distmerge.rng: mergekit`: distmerge does not reproduce mergekit's random draws for "
                          f"`{spec.name}`; remove `rng: mergekit` (the default draws are distmerge's own)")
    if dropped:
        raise ConfigError(f"`distmerge.rng: mergekit`: {dropped[0]} is tied to the embedding and not merged here, so "
                          "the tensors that draw are not mergekit's; remove `rng: mergekit`")
    converted = next((ckpt for ckpt in inputs if isinstance(ckpt, ModelLayoutView)), None)
    if converted is not None:  # mergekit schedules tensors it converts in an order its task graph leaves open
        name = min(converted.parts, key=natural_key)
        stored = converted.parts[name][0].name
        raise ConfigError(f"`distmerge.rng: mergekit`: model {converted.ref} stores {stored} where mergekit reads "
                          f"{name} (converted as transformers 5 loads it), and mergekit draws for converted tensors "
                          "in an order distmerge cannot reproduce; remove `rng: mergekit`, or save the models in "
                          "transformers 5's layout (save_pretrained(..., save_original_format=False))")


def with_mergekit_draws(plan: MergePlan) -> MergePlan:
    """The plan with every drawing tensor's generator state for `rng: mergekit` (sampling.mergekit_generator_states:
    one pass of the generator over every draw of the merge, before any tensor is read)."""
    draws = {job.name: plan.spec.mergekit_draws(job.shape, job.params) for job in plan.tensors if job.merge}
    states = mergekit_generator_states(plan.config.engine.seed, draws)
    units = tuple(replace(unit, tensors=tuple(replace(job, draw_state=states.get(job.name)) for job in unit.tensors))
                  for unit in plan.units)
    return replace(plan, units=units)


def check_config(config: MergeConfig) -> MethodSpec:
    """The checks that need no model file, made before any checkpoint is opened (or downloaded): the method,
    its parameter names, and settings that contradict each other. Returns the method."""
    spec = get_method(config.merge_method)
    has_base = config.base_model is not None or any(s.base_model for s in config.slices)
    if spec.needs_base and not has_base:
        raise ConfigError(f"`merge_method: {spec.name}` needs `base_model` (the model the others were fine-tuned from)")
    # a model entry naming the base itself is checked when it is found to be the base (it takes no parameters)
    check_parameter_names(config, spec, [entry for entry in config.models
                                         if not (spec.needs_base and entry.model == config.base_model)])
    settings = vocabulary_settings(config)
    if settings is not None and settings.source == "base" and not has_base:
        raise ConfigError("`tokenizer_source: base` needs `base_model`")
    if config.chat_template is not None and not config.engine.copy_tokenizer and settings is None:
        raise ConfigError("`chat_template` is written into the output's tokenizer, and --no-copy-tokenizer "
                          "leaves it out: drop one of them")
    return spec


def _copied_files(config: MergeConfig, reference: Checkpoint, tokenizer_dir: Path, inputs: list[Checkpoint],
                  vocabulary: OutputVocabulary | None) -> tuple:
    """generation_config.json from the reference model, the tokenizer files from the tokenizer's source (each
    through `checkpoint_file`, so a link leading out of its checkpoint is refused now, not copied at the end),
    and the chat template the config asks for, as bytes. A built vocabulary brings its tokenizer's files (with the
    chat template), written whatever `copy_tokenizer` says, as mergekit does: the weights need that tokenizer."""
    found = [("generation_config.json", reference.file("generation_config.json"))]
    if vocabulary is not None:
        return tuple({name: path for name, path in found if path is not None}.items()) + vocabulary.tokenizer_files
    settings = vocabulary_settings(config)
    source = settings.source if settings is not None and settings.source not in ("base", "union") else reference.ref
    if config.engine.copy_tokenizer or settings is not None:  # a tokenizer asked for is written, as in mergekit
        found += [(name, checkpoint_file(source, tokenizer_dir, name)) for name in TOKENIZER_FILES]
    files = {name: path for name, path in found if path is not None}
    if config.chat_template is not None:
        if TOKENIZER_CONFIG not in files:
            raise CheckpointError(f"model {source}: {tokenizer_dir} has no {TOKENIZER_CONFIG}, so the merged "
                                  "model has no tokenizer to put `chat_template` into; name a `tokenizer_source` "
                                  "that has one")
        template = resolve_chat_template(config.chat_template, [(ckpt.ref, ckpt.path) for ckpt in inputs])
        if template is not None:
            files.update(tokenizer_files_with_template(template, files[TOKENIZER_CONFIG]))
    return tuple(files.items())


def _first_pass(spec: MethodSpec, jobs: list[TensorJob]) -> FirstPass | None:
    """The method's first pass if the resolved parameters of any tensor want it, checked across all tensors."""
    params = [job.params for job in jobs if job.merge]
    if spec.first_pass is None or not any(spec.first_pass.wanted(p) for p in params):
        return None
    problem = spec.first_pass.check(params)
    if problem:
        raise ConfigError(f"{spec.name}: {problem}")
    return spec.first_pass


def _open_inputs(config: MergeConfig, spec: MethodSpec, config_only: bool, hub: HubAccess):
    base = Checkpoint.open(config.base_model, config.base_dir, config_only, hub) if config.base_model else None
    models, entries, model_ids = [], [], []
    listed: dict[tuple, int] = {}  # each model's identity (real directories) -> its first position in `models:`
    for index, entry in enumerate(config.models):
        if base is not None and spec.takes_base and _same_model(entry.model, config, base):
            if entry.parameters:
                raise ConfigError(f"`models[{index}]` is the base model; {spec.name} takes no parameters for it")
            _check_listed_once(config, spec, listed, index, base, is_base=True)
            continue  # mergekit configs list the base among the models
        models.append(Checkpoint.open(entry.model, config.base_dir, config_only, hub))
        _check_listed_once(config, spec, listed, index, models[-1])
        entries.append(entry)
        model_ids.append(index)
    base_appended = base is not None and spec.base_is_model and base.identity not in listed
    if base_appended:  # mergekit merges it as one more input, after the listed ones
        models.append(base)
        entries.append(ModelEntry(config.base_model))
        model_ids.append(len(config.models))
    if len(models) < spec.min_models or (spec.max_models is not None and len(models) > spec.max_models):
        wanted = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                  else f"at least {spec.min_models}" if spec.max_models is None
                  else f"{spec.min_models} to {spec.max_models}")
        extra = " besides the base model" if spec.takes_base and base is not None else ""
        counted = (f" (base_model counts: {spec.name} merges it as one more model, as mergekit does)"
                   if base_appended else "")
        raise ConfigError(f"`merge_method: {spec.name}` needs {wanted} model(s){extra} under `models`, "
                          f"got {len(models)}{counted}")
    return base, models, entries, model_ids


def _check_listed_once(config: MergeConfig, spec: MethodSpec, listed: dict, index: int, ckpt: Checkpoint,
                       is_base: bool = False) -> None:
    """Refuse a model listed twice under `models:` (the same directory, whatever the spelling, or the same hub id):
    mergekit would merge it twice, silently doubling its weight; a weight says that explicitly."""
    first = listed.setdefault(ckpt.identity, index)
    if first == index:
        return
    weight = any(p.name == "weight" and p.per_model for p in spec.params)
    how = ("; list the base model once" if is_base
           else "; to give it more weight, list it once with `parameters: {weight: 2.0}`" if weight
           else f"; {spec.name} has no per-model weight, so list it once")
    named = config.models[first].model
    where = named if named == str(ckpt.path) else f"{named}, {ckpt.path}"
    raise ConfigError(f"`models[{index}]` ({config.models[index].model}) is the same model as `models[{first}]` "
                      f"({where}); a model listed twice would be merged twice, counting it double{how}")


def _same_model(ref: str, config: MergeConfig, base: Checkpoint) -> bool:
    if ref == base.ref:
        return True
    try:  # the base is on disk by now, so a reference to it resolves without downloading
        return resolve_model_dir(ref, config.base_dir, HubAccess(offline=True), weights=False) == base.path
    except CheckpointError:
        return False


def _check_same_architecture(reference: Checkpoint, base: Checkpoint | None, models: list[Checkpoint]) -> None:
    """As mergekit: models whose config.json name different architectures are refused unless the user allows
    it, even when their tensors happen to match (a Llama and a Mistral of the same shapes)."""
    ours = reference.config.get("architectures")
    for ckpt in ([base] if base is not None else []) + models:
        theirs = ckpt.config.get("architectures")
        if ours and theirs and theirs != ours:
            raise CheckpointError(
                f"model {ckpt.ref} is a {', '.join(theirs)} but {reference.ref} is a {', '.join(ours)} "
                "(`architectures` in their config.json); to merge different architectures anyway, pass "
                "--allow-crimes (or set `distmerge: {allow_crimes: true}`)")


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
                    f"{list(theirs.shape)}. Models must have the same shapes"
                    + ("; for models whose vocabularies differ, set `tokenizer_source` (union, base or a model)"
                       if VOCABULARY_NAME.search(name) else ""))
            if mine.is_float != theirs.is_float or (not mine.is_float and mine.dtype != theirs.dtype):
                raise CheckpointError(
                    f"model {ckpt.ref}: tensor {name} is {mine.dtype} but {reference.ref} has {theirs.dtype}; "
                    "floating-point tensors may differ in precision, other tensors must match exactly")


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


def _tokenizer_dir(config: MergeConfig, base: Checkpoint | None, models: list[Checkpoint], hub: HubAccess) -> Path:
    settings = vocabulary_settings(config)
    source = settings.source if settings is not None else None
    if source is None or source in ("base", "union"):  # check_config made sure `base` has a base model
        return (base or models[0]).path
    # a `model+adapter` has its model's tokenizer; of a hub id, only the small files are needed
    return resolve_model_dir(source.partition("+")[0], config.base_dir, hub, weights=False)


def fingerprint(plan: MergePlan, device: str, threads: int | None) -> str:
    """What decides the output bytes: the config, the input files as they are now, the device type (and, for
    decompositions on CPU, whose last bits LAPACK changes with the thread count, the threads per worker), and
    this version of distmerge. A rerun with the same fingerprint may resume; any change starts over."""
    files = []
    for ckpt in plan.inputs():
        for file in ckpt.files:
            st = os.stat(file) if file else None
            files.append([file, st.st_size, st.st_mtime_ns] if st else [ckpt.ref, None, None])
    decomposes = any(job.work.decompositions for job in plan.tensors)
    payload = {
        "config": plan.config.fingerprint(),
        "files": files,
        "device": device.split(":")[0],
        "threads": threads if device == "cpu" and decomposes else None,
        "version": __version__,
    }
    if plan.vocabulary is not None:  # it comes from the tokenizers, whose files are not among the inputs' files
        payload["vocabulary"] = plan.vocabulary.digest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
