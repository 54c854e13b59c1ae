"""Merging models whose vocabularies differ: mergekit's `tokenizer_source` and `tokenizer:` block.

The output vocabulary is a tokenizer's: the base model's (`base`), a named model's, or the union (`union`: the
base's tokenizer, then every token of the other models it lacks, models in `models:` order), plus the block's
`tokens` it lacks; `pad_to_multiple_of` rounds its number of rows up. It is computed when planning, from the
tokenizers alone (transformers' AutoTokenizer on local files, no remote code), never from the weights, and the
output tokenizer is built with transformers and saved with `save_pretrained`, as mergekit 0.1.5 does.

The vocabulary tensors are the tensors indexed by token id on their first axis: the floating-point tensors outside
the layers whose name contains `embed`, `lm_head` or `wte` (model.embed_tokens.weight, lm_head.weight, GPT-2's
transformer.wte.weight) and whose first axis is the model's `vocab_size`. The planner merges the same inputs in
every tensor, so each input is read through a `VocabularyView`: its vocabulary tensors come with one row per
output token, in the output's order, and everything downstream merges [V_out, ...] tensors as usual. A tensor's
inputs (its `Layout`) are the merge's, or in a slice merge the sources of the first slice (the embedding) or of the
last (the head), as in mergekit.

A row of output token t, for one input (mergekit's PermutedVocabulary):
- the input has t (in its tokenizer, at an id below its vocab_size) and t is not forced: the input's own row;
- otherwise t's fill row, the same for every input: the block's `tokens.t.source` when given (zero, t's row in a
  model, or the row of another token or id in a model); else, of the inputs, the only one that has t gives its
  row, none gives zeros, several give the base's row when the base is among them and their mean otherwise;
- a padding row (past the tokenizer's tokens): the mean of that input's rows of real tokens.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import Checkpoint, CheckpointView, checkpoint_file, resolve_model_dir
from .config import LAYER_INDEX, MergeConfig, TokenEmbedding, TokenizerSettings
from .errors import CheckpointError, ConfigError
from .hub import HubAccess
from .writer import TOKENIZER_FILES

VOCABULARY_NAME = re.compile(r"embed|lm_head|wte")
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # a tokenizer is there


@dataclass(frozen=True)
class Fill:
    """An output token's fill row: zeros (no rows), one input's row, or the mean of several, as (input, row)."""

    rows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Layout:
    """How the inputs of some vocabulary tensors are read: every input once, in mergekit's order (`models:`, then
    the base; in a slice merge, the sources of the slice the tensors come from), and per input, for each output
    token, its own row, or -1 where it takes the token's fill row."""

    inputs: tuple[Checkpoint, ...]
    own: tuple[torch.Tensor, ...]
    fills: dict[int, Fill]  # output token -> its fill row, for every token some input takes it for

    def index(self, ckpt: Checkpoint) -> int:
        return next(k for k, candidate in enumerate(self.inputs) if candidate is ckpt)

    def donors(self, index: int) -> set[int]:
        """The other inputs whose tensor reading input `index`'s reads too (its fill rows' sources)."""
        lacking = (self.own[index] < 0).nonzero().flatten().tolist()
        return {k for token in lacking for k, _ in self.fills[token].rows} - {index}

    @property
    def is_identity(self) -> bool:
        return all(torch.equal(own, torch.arange(len(own))) for own in self.own)


@dataclass(frozen=True)
class OutputVocabulary:
    """What the merge's inputs' vocabulary tensors are read as, and the tokenizer the output gets."""

    size: int  # rows of the output's vocabulary tensors, padding included (its config's vocab_size)
    tokens: int  # tokens of the output tokenizer (ids 0 .. tokens - 1)
    layouts: dict[str, Layout]  # vocabulary tensor -> how its inputs are read
    dtype: str  # the merge's compute dtype: fill rows and padding are computed in it
    tokenizer_files: tuple[tuple[str, bytes], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.layouts)

    def reads(self, name: str, ckpt: Checkpoint) -> list[Checkpoint]:
        """The checkpoints whose tensor `name` reading `ckpt`'s in the output vocabulary reads."""
        layout = self.layouts[name]
        index = layout.index(ckpt)
        return [layout.inputs[k] for k in sorted({index} | layout.donors(index))]

    def digest(self) -> str:
        """What decides the rows read and the tokenizer written (for the merge's fingerprint)."""
        layouts = [(name, [c.ref for c in layout.inputs], [o.tolist() for o in layout.own],
                    sorted(layout.fills.items())) for name, layout in self.layouts.items()]
        content = hashlib.sha256(repr((self.size, self.tokens, self.dtype, layouts)).encode())
        for name, data in self.tokenizer_files:
            content.update(name.encode() + b"\0" + data)
        return content.hexdigest()

    def read(self, name: str, ckpt: Checkpoint) -> torch.Tensor:
        """Checkpoint `ckpt`'s tensor `name` with its rows in the output vocabulary."""
        dtype = getattr(torch, self.dtype)
        layout = self.layouts[name]
        stored: dict[int, torch.Tensor] = {}

        def tensor(k: int) -> torch.Tensor:
            if k not in stored:
                stored[k] = layout.inputs[k].read(name).to(dtype)
            return stored[k]

        index = layout.index(ckpt)
        mine = tensor(index)
        out = torch.zeros((self.size, *mine.shape[1:]), dtype=dtype)  # zero fills stay as they are
        own = layout.own[index]
        present = own >= 0
        out[:self.tokens][present] = mine[own[present]]
        copies: dict[int, tuple[list[int], list[int]]] = {}  # input -> (output tokens, its rows): one gather each
        for token in (~present).nonzero().flatten().tolist():
            fill = layout.fills[token]
            if len(fill.rows) == 1:
                k, row = fill.rows[0]
                copies.setdefault(k, ([], []))
                copies[k][0].append(token)
                copies[k][1].append(row)
            elif fill.rows:
                total = torch.zeros(out.shape[1:], dtype=dtype)  # summed in input order from zero, as mergekit does
                for k, row in fill.rows:
                    total = total + tensor(k)[row]
                out[token] = total / len(fill.rows)
        for k, (tokens, rows) in copies.items():
            out[tokens] = tensor(k)[rows]
        if self.size > self.tokens:  # as suggested by https://nlp.stanford.edu/~johnhew/vocab-expansion.html
            out[self.tokens:] = torch.mean(out[:self.tokens], dim=0)
        return out


class VocabularyView(CheckpointView):
    """An input whose vocabulary tensors are read in the output vocabulary (`OutputVocabulary.read`). `sources`:
    vocabulary tensor -> the checkpoint it is read from (the input itself; for an input role of a slice merge, the
    source of the slice the tensor comes from)."""

    def __init__(self, inner: Checkpoint, sources: dict[str, Checkpoint], vocabulary: OutputVocabulary):
        tensors = {name: (replace(info, shape=(vocabulary.size, *info.shape[1:])) if name in vocabulary.layouts
                          else info) for name, info in inner.tensors.items()}
        super().__init__(inner, tensors)
        self.sources = sources
        self.vocabulary = vocabulary

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.vocabulary.layouts:
            return self.inner.read(name, rows)
        tensor = self.vocabulary.read(name, self.sources[name])
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def vocabulary_reads(self, name: str) -> list[Checkpoint]:
        """The checkpoints whose tensor `name` reading this input's reads (its own and its fill rows')."""
        return self.vocabulary.reads(name, self.sources[name])


def vocabulary_settings(config: MergeConfig) -> TokenizerSettings | None:
    """The `tokenizer:` block, or `tokenizer_source` as one; None when the config asks for neither."""
    if config.tokenizer is not None:
        return config.tokenizer
    return TokenizerSettings(source=config.tokenizer_source) if config.tokenizer_source is not None else None


def model_vocab_size(ckpt: Checkpoint) -> int:
    """The number of rows of the model's vocabulary tensors: its config.json's `vocab_size`."""
    size = ckpt.config.get("text_config", {}).get("vocab_size") or ckpt.config.get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise CheckpointError(f"model {ckpt.ref}: its config.json gives no `vocab_size`, which merging vocabularies "
                              "needs (the rows of its embedding); add it")
    return size


def vocabulary_tensors(ckpt: Checkpoint) -> list[str]:
    rows = model_vocab_size(ckpt)
    return sorted(name for name, info in ckpt.tensors.items()
                  if info.is_float and VOCABULARY_NAME.search(name) and not LAYER_INDEX.search(name)
                  and info.shape and info.shape[0] == rows)


def plan_vocabulary(config: MergeConfig, settings: TokenizerSettings, everyone: list[Checkpoint],
                    base: Checkpoint | None, chat_template: str | None,
                    inputs_of: Callable[[str], tuple[list[Checkpoint], Checkpoint | None]],
                    hub: HubAccess | None = None) -> OutputVocabulary | None:
    """The output vocabulary of a merge of `everyone` (every input checkpoint once; the union takes them in this
    order, after `base`, else its first); None when it changes nothing: every input already has the output's tokens
    at the output's ids and rows, and no token is forced. `inputs_of(tensor)`: the checkpoints a vocabulary tensor
    is merged from, in mergekit's order, and its base model. `chat_template`: the template the output tokenizer
    gets (already resolved), or None."""
    names = _vocabulary_names(everyone)
    first = base or everyone[0]
    tokenizers = _input_tokenizers(everyone, first)
    output = _output_tokenizer(config, settings, everyone, first, tokenizers, hub)
    vocab = output.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError(f"the output tokenizer's ids are not 0 .. {len(vocab) - 1} without gaps; distmerge "
                              "cannot lay out its embedding rows")
    tokens = len(vocab)
    pad = settings.pad_to_multiple_of
    size = -(-tokens // pad) * pad if pad else tokens
    by_id = [None] * tokens
    for token, token_id in vocab.items():
        by_id[token_id] = token
    reference_tokenizer = tokenizers[id(first)]  # also the vocabulary of a model without a tokenizer
    layouts, made = {}, {}
    for name in names:
        inputs, group_base = inputs_of(name)
        key = (tuple(map(id, inputs)), id(group_base))
        if key not in made:
            made[key] = _layout(config, settings, by_id, inputs, group_base,
                                [tokenizers[id(ckpt)] or reference_tokenizer for ckpt in inputs])
        layouts[name] = made[key]
    if size == tokens and all(model_vocab_size(ckpt) == size for ckpt in everyone) and all(
            layout.is_identity for layout in layouts.values()):
        return None
    return OutputVocabulary(size=size, tokens=tokens, layouts=layouts, dtype=config.compute_dtype,
                            tokenizer_files=_saved(output, chat_template))


def _layout(config: MergeConfig, settings: TokenizerSettings, by_id: list[str], inputs: list[Checkpoint],
            base: Checkpoint | None, tokenizers: list) -> Layout:
    """How `inputs` are read in the output vocabulary `by_id` (output id -> token), with mergekit's fills."""
    rows_of = [model_vocab_size(ckpt) for ckpt in inputs]
    vocabs = [_usable(tokenizer, rows) for tokenizer, rows in zip(tokenizers, rows_of)]
    has = [torch.tensor([v.get(token, -1) for token in by_id], dtype=torch.int64) for v in vocabs]
    configured = dict(settings.tokens)
    forced = torch.tensor([configured.get(token, TokenEmbedding()).force for token in by_id], dtype=torch.bool)
    own = tuple(torch.where(forced, -1, found) for found in has)
    base_index = next((k for k, ckpt in enumerate(inputs) if ckpt is base), None)
    fills = {}
    for token_id in sorted(set(torch.cat([(o < 0).nonzero().flatten() for o in own]).tolist())):
        token = by_id[token_id]
        present = [k for k in range(len(inputs)) if has[k][token_id] >= 0]
        if token in configured:
            fills[token_id] = _configured_fill(config, token, configured[token], present, inputs, tokenizers,
                                               rows_of, has, token_id)
        else:  # the base's row where it has the token; else the one input's, zeros, or the mean of several
            donors = [base_index] if base_index in present else present
            fills[token_id] = Fill(tuple((k, int(has[k][token_id])) for k in donors))
    return Layout(tuple(inputs), own, fills)


def _vocabulary_names(inputs: list[Checkpoint]) -> list[str]:
    names = vocabulary_tensors(inputs[0])
    if not names:
        raise CheckpointError(f"model {inputs[0].ref} has no vocabulary tensors (an `embed`, `lm_head` or `wte` "
                              f"tensor with {model_vocab_size(inputs[0])} rows, its vocab_size) to lay out in the "
                              "output vocabulary")
    for ckpt in inputs[1:]:
        theirs = vocabulary_tensors(ckpt)
        if theirs != names:
            raise CheckpointError(f"model {ckpt.ref}'s vocabulary tensors ({', '.join(theirs) or 'none'}) are not "
                                  f"{inputs[0].ref}'s ({', '.join(names)}); merge models of one architecture")
    return names


def load_tokenizer(ref: str, directory: Path):
    """The tokenizer in `directory` (transformers' AutoTokenizer, no remote code), None when it has none. Its files
    go through `checkpoint_file` first: a link leading out of the checkpoint is refused, not followed."""
    present = [name for name in TOKENIZER_FILES if checkpoint_file(ref, directory, name) is not None]
    if not any(name in TOKENIZER_MODELS for name in present):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("merging vocabularies (`tokenizer_source`, `tokenizer:`) reads the tokenizers with "
                          "transformers: pip install 'transformers>=5.24'") from None
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, use_fast=True)
    except Exception as exc:  # whatever transformers raises for a tokenizer it cannot load
        raise CheckpointError(f"model {ref}: transformers cannot load the tokenizer in {directory}: {exc}") from None


def _input_tokenizers(inputs: list[Checkpoint], first: Checkpoint) -> dict[int, object]:
    """id(input) -> its tokenizer; None for a model without one, which is taken to have `first`'s (the base's, as
    in mergekit), which must exist and fit its embedding."""
    tokenizers = {id(ckpt): load_tokenizer(ckpt.ref, ckpt.path) for ckpt in inputs}
    tokenizer = tokenizers[id(first)]
    if tokenizer is None:
        raise CheckpointError(f"model {first.ref}: {first.path} has no tokenizer (tokenizer.json or "
                              "tokenizer.model), which the output vocabulary starts from")
    rows = model_vocab_size(first)
    beyond = sorted(token for token, token_id in tokenizer.get_vocab().items() if token_id >= rows)
    if beyond:
        raise CheckpointError(f"model {first.ref}: its tokenizer has {len(beyond)} token(s) at ids past its "
                              f"vocab_size {rows} (e.g. {beyond[0]!r}); distmerge does not strip them: remove them "
                              "from its tokenizer or raise vocab_size")
    return tokenizers


def _usable(tokenizer, rows: int) -> dict[str, int]:
    """token -> id for the tokens that have a row in the model (ids below its vocab_size)."""
    return {token: token_id for token, token_id in tokenizer.get_vocab().items() if token_id < rows}


def _output_tokenizer(config: MergeConfig, settings: TokenizerSettings, inputs: list[Checkpoint], first: Checkpoint,
                      tokenizers: dict[int, object], hub: HubAccess | None):
    """A fresh tokenizer with the output vocabulary: the source's, then the configured tokens it lacks."""
    if settings.source in ("base", "union"):
        output = load_tokenizer(first.ref, first.path)
    else:
        directory = resolve_model_dir(settings.source.partition("+")[0], config.base_dir, hub, weights=False)
        output = load_tokenizer(settings.source, directory)
        if output is None:
            raise CheckpointError(f"model {settings.source}: {directory} has no tokenizer (tokenizer.json or "
                                  "tokenizer.model) to take the output vocabulary from")
    if settings.source == "union":
        ordered = [first] + [ckpt for ckpt in inputs if ckpt is not first]
        _add_union(output, [(tokenizers[id(ckpt)], model_vocab_size(ckpt)) for ckpt in ordered
                            if tokenizers[id(ckpt)] is not None])
    existing = output.get_vocab()
    output.add_tokens([token for token, _ in settings.tokens if token not in existing])
    return output


def _add_union(output, tokenizers: list[tuple]) -> None:
    """Add to `output` (the base's tokenizer) every other tokenizer's tokens it lacks, from (tokenizer, rows) in
    order, the base's first, each model's tokens by id. A token that is an added token in any model is added with
    the settings of its first model (special or not, stripping); the others as plain tokens, after the base's."""
    plain, added = {}, {}
    for tokenizer, rows in tokenizers:
        for token, _ in sorted(_usable(tokenizer, rows).items(), key=lambda item: item[1]):
            plain.setdefault(token, None)
        for token_id, info in sorted(tokenizer.added_tokens_decoder.items()):
            if token_id < rows:
                added.setdefault(info.content, info)
    existing = output.get_vocab()
    output.add_tokens([token for token in plain if token not in added and token not in existing])
    output.add_tokens(list(added.values()))  # those the base has keep their ids


def _configured_fill(config: MergeConfig, token: str, embedding: TokenEmbedding, present: list[int],
                     inputs: list[Checkpoint], tokenizers: list, rows_of: list[int], has: list[torch.Tensor],
                     token_id: int) -> Fill:
    """The fill row `tokenizer.tokens.TOKEN` asks for."""
    key = f"`tokenizer.tokens.{token}`"
    if embedding.kind is None:
        raise ConfigError(f"{key}: not every model has this token (or it is forced), so it needs a `source`: a "
                          "model, {kind: zero} or {kind: model_token, model: M, token: T}")
    if embedding.kind == "zero":
        return Fill(())
    k = _input_index(config, embedding.model, inputs, key)
    if embedding.kind == "model":
        if k not in present:
            raise ConfigError(f"{key}: model {embedding.model} does not have this token; name a model that has it, "
                              "or give {kind: model_token, model: M, token: T}")
        return Fill(((k, int(has[k][token_id])),))
    row = embedding.token_id
    if row is None:
        vocab = tokenizers[k].get_vocab()
        if embedding.token not in vocab:
            raise ConfigError(f"{key}: model {embedding.model} has no token {embedding.token!r}")
        row = vocab[embedding.token]
    if row >= rows_of[k]:
        raise ConfigError(f"{key}: row {row} is past the {rows_of[k]} rows of model {embedding.model}")
    return Fill(((k, row),))


def _input_index(config: MergeConfig, ref: str, inputs: list[Checkpoint], key: str) -> int:
    """The input `ref` names: the same reference, or the same directory however spelled."""
    for k, ckpt in enumerate(inputs):
        if ckpt.ref == ref:
            return k
    try:
        directory = resolve_model_dir(ref, config.base_dir, HubAccess(offline=True))  # the inputs are resolved
    except CheckpointError:
        directory = None
    for k, ckpt in enumerate(inputs):
        if ckpt.path == directory and ckpt.adapter is None:
            return k
    raise ConfigError(f"{key}: model {ref} is not one of the models merged; its rows can come only from those")


def _saved(tokenizer, chat_template: str | None) -> tuple[tuple[str, bytes], ...]:
    """The files `save_pretrained` writes for `tokenizer` (with `chat_template`, when given), as bytes."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return tuple((path.name, path.read_bytes()) for path in sorted(Path(directory).iterdir()) if path.is_file())
