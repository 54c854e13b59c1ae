"""Mixture-of-experts checkpoints read in transformers 5's model layout, written back as stored.

Published MoE checkpoints store each expert's projections as matrices of their own: `...experts.{e}.w1.weight`,
`w3` and `w2` (Mixtral, MiniMax, PhiMoE), or `...experts.{e}.gate_proj.weight`, `up_proj` and `down_proj`
(Qwen2-MoE, Qwen3-MoE, DeepSeek, OLMoE, GLM-4-MoE, ...). transformers 5 loads them as two fused tensors per layer,
`experts.gate_up_proj` `[E, 2 * I, H]` (expert e's gate rows, then its up rows) and `experts.down_proj`
`[E, H, I]`, and renames Mixtral's `block_sparse_moe` module to `mlp`. mergekit 0.1.5 reads checkpoints through
that conversion and merges the fused tensors under those names. So that a config gives mergekit's model (a
per-tensor statistic such as TIES' top-k taken over all of a layer's experts, a `filter: mlp` matching the
experts and the router), every input is read through `model_layout_view`: the same tensors under transformers 5's
names, experts fused. Each merged tensor knows its `StoredPart`s, the tensors the output writes, so the output
keeps the layout of the model it takes its config from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .checkpoint import DTYPES, Checkpoint, CheckpointView, TensorInfo

EXPERT_MATRIX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight$")
# stored projection -> (fused tensor, its position among the expert's row blocks)
FUSED_PROJECTIONS = {
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}
BLOCKS = {fused: 1 + max(b for f, b in FUSED_PROJECTIONS.values() if f == fused)  # row blocks per expert
          for fused, _ in FUSED_PROJECTIONS.values()}
# transformers 5's renamings of modules (its checkpoint conversion mapping), by `model_type`
RENAMED_MODULES = {
    "mixtral": ((".block_sparse_moe.", ".mlp."),),
    "minimax": ((".block_sparse_moe.", ".mlp."),),
    "phimoe": ((".block_sparse_moe.", ".mlp."), (".mlp.gate.weight", ".mlp.router.weight")),
}


@dataclass(frozen=True)
class StoredPart:
    """A tensor as the checkpoint stores it, and where it lies in the tensor as merged: rows `rows` of expert
    `expert` of a fused expert tensor, or (expert None) the whole of a renamed tensor."""

    name: str
    shape: tuple[int, ...]
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def in_block(self, block: tuple[int, int] | None) -> bool:
        """Whether row block `block` of the merged tensor (None: all of it) holds this part, or rows of it."""
        return self.expert is None or block is None or block[0] <= self.expert < block[1]

    def of(self, merged: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple | None]:
        """(this part's tensor, or its rows, in `merged`, row block `block` of the merged tensor; those rows or
        None): a renamed tensor's block is its own rows, an expert matrix lies whole in the block of its expert."""
        if self.expert is None:
            return merged, block
        return merged[self.expert - (block[0] if block else 0), self.rows[0]:self.rows[1]], None


class ModelLayoutView(CheckpointView):
    """An input read under transformers 5's names with its per-expert matrices fused. `parts`: each tensor that
    is not stored as it is read -> the stored tensors it is made of."""

    def __init__(self, inner: Checkpoint, tensors: dict[str, TensorInfo], parts: dict[str, tuple[StoredPart, ...]]):
        super().__init__(inner, tensors)
        self.parts = parts

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        parts = self.parts.get(name)
        if parts is None:
            return self.inner.read(name, rows)
        if parts[0].expert is None:
            return self.inner.read(parts[0].name, rows)
        info = self.tensors[name]
        first, last = rows or (0, info.shape[0])  # rows of a fused tensor are experts
        fused = torch.empty((last - first, *info.shape[1:]), dtype=DTYPES[info.dtype][0])
        for part in parts:
            if part.in_block((first, last)):
                fused[part.expert - first, part.rows[0]:part.rows[1]] = self.inner.read(part.name)
        return fused

    def reads_rows_alone(self, name: str) -> bool:
        parts = self.parts.get(name)
        if parts is None:
            return self.inner.reads_rows_alone(name)
        return parts[0].expert is not None or self.inner.reads_rows_alone(parts[0].name)  # experts are whole reads

    def vocabulary_reads(self, name: str) -> list[Checkpoint]:
        """As the inner VocabularyView's (vocabulary tensors are stored as they are read)."""
        return self.inner.vocabulary_reads(name)


def stored_parts(ckpt: Checkpoint, name: str) -> tuple[StoredPart, ...]:
    """The stored tensors that tensor `name` of `ckpt` is written as; () where it is stored under that name."""
    return ckpt.parts.get(name, ()) if isinstance(ckpt, ModelLayoutView) else ()


def model_layout_view(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` read in transformers 5's layout; `ckpt` itself where that is the stored layout, or where a name
    would be taken twice (a checkpoint holding both layouts is read as stored)."""
    renames = RENAMED_MODULES.get(ckpt.config.get("model_type"), ())
    tensors: dict[str, TensorInfo] = {}
    parts: dict[str, tuple[StoredPart, ...]] = {}
    for fused, experts in _expert_groups(ckpt).items():
        name = _renamed(fused, renames)
        first = ckpt.tensors[experts[0][0]]
        rows = first.shape[0]
        parts[name] = tuple(StoredPart(stored, first.shape, e, (block * rows, (block + 1) * rows))
                            for e, blocks in enumerate(experts) for block, stored in enumerate(blocks))
        tensors[name] = TensorInfo(name, first.dtype, (len(experts), len(experts[0]) * rows, *first.shape[1:]),
                                   first.file)
    grouped = {part.name for group in parts.values() for part in group}
    for stored, info in ckpt.tensors.items():
        if stored in grouped:
            continue
        name = _renamed(stored, renames)
        if name in tensors:
            return ckpt
        if name != stored:
            parts[name] = (StoredPart(stored, info.shape),)
        tensors[name] = replace(info, name=name)
    return ModelLayoutView(ckpt, tensors, parts) if parts else ckpt


def _renamed(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        name = name.replace(old, new)
    return name


def _expert_groups(ckpt: Checkpoint) -> dict[str, list[tuple[str, ...]]]:
    """Fused tensor name -> for each expert 0 .. E-1, its stored matrices in row order; only complete groups:
    every expert present with every block, all of one floating-point dtype, blocks of equal shape and experts
    alike (what transformers' conversion stacks)."""
    found: dict[str, dict[int, dict[int, str]]] = {}
    for stored in ckpt.tensors:
        match = EXPERT_MATRIX.match(stored)
        if match is None or match["projection"] not in FUSED_PROJECTIONS:
            continue
        fused, block = FUSED_PROJECTIONS[match["projection"]]
        found.setdefault(f"{match['prefix']}.experts.{fused}", {}).setdefault(int(match["expert"]), {})[block] = stored
    groups = {}
    for fused, by_expert in found.items():
        blocks = BLOCKS[fused.rsplit(".", 1)[1]]
        if sorted(by_expert) != list(range(len(by_expert))) or any(len(b) != blocks for b in by_expert.values()):
            continue
        experts = [tuple(by_expert[e][b] for b in range(blocks)) for e in range(len(by_expert))]
        infos = [ckpt.tensors[stored] for names in experts for stored in names]
        if infos[0].is_float and all((i.dtype, i.shape) == (infos[0].dtype, infos[0].shape) for i in infos):
            groups[fused] = experts
    return groups
