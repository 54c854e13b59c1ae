"""`slices:` (mergekit's): the output's layers, slice by slice, each merged from a layer range of every source.

A slice of n layers takes layers `a .. a + n - 1` of each of its sources and writes output layers `o .. o + n - 1`,
where `o` counts the layers of the slices before it: a frankenmerge stacks layer ranges of several models
(`passthrough`, one source per slice), a per-range merge gives each range its own models and parameters. The
tensors outside the layers come from the first slice's sources (embeddings) or the last slice's (the final norm,
the head), as in mergekit.

The planner merges the same T models in every tensor. So each input role, the base and the k-th non-base source of
every slice, becomes one `SlicedCheckpoint`: for each output tensor, the checkpoint and stored tensor it is read
from. Everything downstream (engine, runtimes, estimates) reads it like any checkpoint. Slices must therefore have
the same number of sources besides the base; a source's `parameters` rank above its slice's, which rank above the
top-level ones, and gradients run over each slice's own layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo
from .config import LAYER_INDEX as LAYER
from .config import MergeConfig, SliceSource
from .errors import CheckpointError, ConfigError
from .hub import HubAccess
from .methods import MethodSpec
from .params import Chain

EMBEDDING = re.compile(r"embed|\.wte\.|\.wpe\.|^wte\.|^wpe\.")  # outside the layers, before them: the first slice's
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class SlicedCheckpoint(Checkpoint):
    """One input role of a slice merge: output tensor name -> the checkpoint and stored tensor it is read from."""

    def __init__(self, ref: str, tensors: dict[str, TensorInfo], config: dict,
                 reads: dict[str, tuple[Checkpoint, str]], pieces: tuple[Checkpoint, ...]):
        super().__init__(ref, pieces[0].path, tensors, config)
        self.reads = reads
        self.pieces = pieces

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        checkpoint, stored = self.reads[name]
        return checkpoint.read(stored, rows)

    def reads_rows_alone(self, name: str) -> bool:
        checkpoint, stored = self.reads[name]
        return checkpoint.reads_rows_alone(stored)

    @property
    def files(self) -> list[str]:
        return sorted({file for piece in self.pieces for file in piece.files})

    @property
    def directories(self) -> list[Path]:
        return list(dict.fromkeys(piece.path for piece in self.pieces))

    @property
    def identity(self) -> tuple:
        return (self.ref,)


@dataclass(frozen=True)
class SlicedInputs:
    base: SlicedCheckpoint | None
    models: tuple[SlicedCheckpoint, ...]
    model_sources: tuple[tuple[SliceSource, ...], ...]  # per slice, its sources besides the base, in role order
    slice_of: dict[str, int]  # output tensor -> the slice whose settings it takes
    position: dict[str, float]  # output tensor -> its place in its slice's layers (0 outside the layers)
    checkpoints: dict[str, Checkpoint]  # every model the slices name, as stored: reference -> checkpoint

    def chains(self, config: MergeConfig, name: str) -> tuple[Chain, list[Chain]]:
        """(merge-wide settings, per-model settings) for output tensor `name`: its slice's, over the top level."""
        index = self.slice_of[name]
        shared = [(f"slices[{index}].parameters", config.slices[index].parameters), ("parameters", config.parameters)]
        return shared, [[(f"parameters of slices[{index}] source {source.model}", source.parameters)] + shared
                        for source in self.model_sources[index]]


def open_slices(config: MergeConfig, spec: MethodSpec, config_only: bool, hub: HubAccess) -> SlicedInputs:
    """The merge's input roles, as SlicedCheckpoints, for a config with `slices:`."""
    opened: dict[str, Checkpoint] = {}

    def checkpoint(ref: str) -> Checkpoint:
        if ref not in opened:
            opened[ref] = Checkpoint.open(ref, config.base_dir, config_only, hub)
        return opened[ref]

    base_sources, model_sources = [], []  # per slice: the base's source (or None), the other sources
    for index, output_slice in enumerate(config.slices):
        base_ref = output_slice.base_model or config.base_model
        base_source = None
        if base_ref is not None and spec.takes_base:
            base = checkpoint(base_ref)
            matches = [s for s in output_slice.sources if checkpoint(s.model).identity == base.identity]
            if not matches:
                raise ConfigError(f"`slices[{index}]`: its base model {base_ref} is not among its sources; add it "
                                  "with the slice's layer_range (the base's layers are read from there)")
            base_source = matches[0]
        elif spec.needs_base:
            raise ConfigError(f"`merge_method: {spec.name}` needs a base model: set `base_model` at the top or in "
                              f"`slices[{index}]`")
        others = [s for s in output_slice.sources if s is not base_source]
        _check_count(spec, index, others, model_sources)
        base_sources.append(base_source)
        model_sources.append(others)
    if any(source is not None for source in base_sources) and None in base_sources:
        raise ConfigError("every slice needs a base model when one has one (set `base_model` at the top)")

    slice_of, position = {}, {}
    roles = [[sources[k] for sources in model_sources] for k in range(len(model_sources[0]))]
    models = tuple(_role(config, f"model {k}", role, checkpoint, slice_of, position) for k, role in enumerate(roles))
    base = (_role(config, "base", base_sources, checkpoint, slice_of, position)
            if base_sources[0] is not None else None)
    return SlicedInputs(base, models, tuple(map(tuple, model_sources)), slice_of, position, opened)


def _check_count(spec: MethodSpec, index: int, others: list, earlier: list) -> None:
    wanted_max = spec.max_models if spec.max_models is not None else len(others)
    if not spec.min_models <= len(others) <= wanted_max:
        raise ConfigError(f"`slices[{index}]` gives {len(others)} model(s) besides its base; `merge_method: "
                          f"{spec.name}` needs {spec.min_models}" + ("" if spec.max_models == spec.min_models
                                                                     else " or more"))
    if earlier and len(others) != len(earlier[0]):
        raise ConfigError(f"`slices[{index}]` gives {len(others)} model(s) besides its base and `slices[0]` "
                          f"{len(earlier[0])}: distmerge merges the same number of models in every slice")


def _role(config: MergeConfig, label: str, sources: list, checkpoint, slice_of: dict, position: dict
          ) -> SlicedCheckpoint:
    """The SlicedCheckpoint that reads source `sources[s]` in slice `s`."""
    tensors: dict[str, TensorInfo] = {}
    reads: dict[str, tuple[Checkpoint, str]] = {}
    layer_sources: list[tuple[Checkpoint, int]] = []  # per output layer: the checkpoint and its layer
    start = 0
    for index, (output_slice, source) in enumerate(zip(config.slices, sources)):
        ckpt = checkpoint(source.model)
        first, end = source.layer_range
        if ckpt.num_layers is not None and end > ckpt.num_layers:
            raise CheckpointError(f"`slices[{index}]`: layer_range {list(source.layer_range)} of model {source.model} "
                                  f"runs past its {ckpt.num_layers} layers")
        found = set()
        for name, info in ckpt.tensors.items():
            match = LAYER.search(name)
            if match and first <= int(match.group(1)) < end:
                layer = int(match.group(1))
                found.add(layer)
                out = f"{name[:match.start(1)]}{start + layer - first}{name[match.end(1):]}"
                tensors[out], reads[out] = replace(info, name=out), (ckpt, name)
                slice_of[out] = index
                position[out] = (layer - first) / (output_slice.num_layers - 1) if output_slice.num_layers > 1 else 1.0
        if len(found) != end - first:
            missing = sorted(set(range(first, end)) - found)
            raise CheckpointError(f"`slices[{index}]`: model {source.model} has no tensors of layer {missing[0]} "
                                  f"(layer_range {list(source.layer_range)})")
        layer_sources += [(ckpt, layer) for layer in range(first, end)]
        start += end - first
    first_ckpt, last_ckpt = checkpoint(sources[0].model), checkpoint(sources[-1].model)
    for ckpt, index, embeddings in ((first_ckpt, 0, True), (last_ckpt, len(config.slices) - 1, False)):
        for name, info in ckpt.tensors.items():
            if LAYER.search(name) is None and bool(EMBEDDING.search(name)) == embeddings:
                tensors[name], reads[name] = info, (ckpt, name)
                slice_of[name], position[name] = index, 0.0
    ranges = " + ".join(f"{s.model}[{s.layer_range[0]}:{s.layer_range[1]}]" for s in sources)
    pieces = tuple(dict.fromkeys(checkpoint(s.model) for s in sources))
    return SlicedCheckpoint(f"{label} ({ranges})", tensors, _output_config(first_ckpt.config, layer_sources), reads,
                            pieces)


def _output_config(config: dict, layer_sources: list[tuple[Checkpoint, int]]) -> dict:
    """`config` with the output's layer count, and every per-layer list (e.g. `layer_types`) taken from the layers
    the output's layers come from."""
    nested = "text_config" in config
    inner = dict(config["text_config"] if nested else config)
    count = next((key for key in LAYER_COUNT_KEYS if key in inner), None)
    if count is not None:
        layers = inner[count]
        for key, value in list(inner.items()):
            if isinstance(value, list) and len(value) == layers:
                inner[key] = [_source_config(ckpt, nested, key)[layer] for ckpt, layer in layer_sources]
        inner[count] = len(layer_sources)
    return {**config, "text_config": inner} if nested else inner


def _source_config(ckpt: Checkpoint, nested: bool, key: str) -> list:
    return (ckpt.config.get("text_config", {}) if nested else ckpt.config)[key]
