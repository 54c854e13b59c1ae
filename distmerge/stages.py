"""Multi-stage merges, in mergekit-multi's format: one YAML file of several documents, each a merge config with
an optional `name`. A later document uses an earlier merge by writing its name where a model goes (`model:`,
`base_model:`, `tokenizer_source:`, the `tokenizer:` block's sources, also as `name+adapter`). The unnamed
document is the final merge, written to OUT; every named one is written to the intermediate directory under its
name, and is reused by the next run while its config and inputs are unchanged (`stages.json` there records what
each was merged from).

This module reads the documents and orders the stages; `merge.merge_stages` runs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .config import MergeConfig, ModelEntry, config_from_document
from .errors import ConfigError

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a directory name of its own


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the final merge
    config: MergeConfig  # with every stage name replaced by that stage's directory
    needs: tuple[str, ...]  # the stages whose output it reads


def documents(text: str, source: str) -> list:
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def is_multi_stage(text: str, source: str) -> bool:
    docs = documents(text, source)
    return len(docs) > 1 or any(isinstance(doc, dict) and "name" in doc for doc in docs)


def load_stages(path: Path, intermediate_dir: Path) -> list[Stage]:
    """The stages of the file at `path`, each after the stages it needs; the final merge last."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    base_dir = str(path.resolve().parent)
    named: dict[str | None, MergeConfig] = {}
    for number, doc in enumerate(documents(text, str(path)), start=1):
        if not isinstance(doc, dict):
            raise ConfigError(f"document {number} of {path} must be a YAML mapping (a merge config)")
        doc = dict(doc)
        name = doc.pop("name", None)
        where = f"document {number} of {path}" + (f" (`name: {name}`)" if name is not None else "")
        if name is not None and (not isinstance(name, str) or not STAGE_NAME.match(name)):
            raise ConfigError(f"{where}: a stage name must be letters, digits, `_`, `-` or `.`, got {name!r}")
        if name in named:
            raise ConfigError(f"{where}: " + (f"`name: {name}` is used twice" if name is not None else
                                              "only one document may be unnamed (the final merge, written to OUT)"))
        named[name] = config_from_document(doc, base_dir, where)
    stages = {name: _link(name, config, set(named) - {None}, intermediate_dir) for name, config in named.items()}
    final = _final(stages, path)
    ordered: list[Stage] = []
    _visit(final, stages, ordered, trail=())
    unused = [name for name in stages if stages[name] not in ordered]
    if unused:
        raise ConfigError(f"stage {unused[0]} of {path} is not used by the final merge; remove it or use it")
    return ordered


def _final(stages: dict[str | None, Stage], path: Path) -> str | None:
    """The unnamed stage, else the one named stage that no other stage uses."""
    if None in stages:
        return None
    used = {need for stage in stages.values() for need in stage.needs}
    ends = [name for name in stages if name not in used]
    if len(ends) != 1:
        raise ConfigError(f"{path}: no unnamed document, and {len(ends)} stages that no other uses "
                          f"({', '.join(map(str, ends)) or 'a cycle'}); leave the final merge unnamed")
    return ends[0]


def _visit(name: str | None, stages: dict, ordered: list[Stage], trail: tuple) -> None:
    if name in trail:
        cycle = " -> ".join(str(n) for n in trail[trail.index(name):] + (name,))
        raise ConfigError(f"the stages use each other in a cycle: {cycle}")
    stage = stages[name]
    if stage in ordered:
        return
    for need in stage.needs:
        _visit(need, stages, ordered, trail + (name,))
    ordered.append(stage)


def _link(name: str | None, config: MergeConfig, names: set[str], intermediate_dir: Path) -> Stage:
    """The stage with every model reference that names a stage pointed at that stage's directory."""
    needs: list[str] = []

    def resolve(ref: str | None) -> str | None:
        if ref is None:
            return None
        model, plus, adapter = ref.partition("+")
        if model not in names:
            return ref
        if model == name:
            raise ConfigError(f"stage {name} uses itself as a model")
        needs.append(model)
        return str(intermediate_dir / model) + plus + adapter

    config = replace(
        config, base_model=resolve(config.base_model),
        models=tuple(ModelEntry(resolve(entry.model), entry.parameters) for entry in config.models),
        slices=tuple(replace(output_slice, base_model=resolve(output_slice.base_model),
                             sources=tuple(replace(source, model=resolve(source.model))
                                           for source in output_slice.sources))
                     for output_slice in config.slices),
        tokenizer_source=config.tokenizer_source if config.tokenizer_source in (None, "base", "union")
        else resolve(config.tokenizer_source),
        tokenizer=config.tokenizer and replace(
            config.tokenizer,
            source=config.tokenizer.source if config.tokenizer.source in ("base", "union")
            else resolve(config.tokenizer.source),
            tokens=tuple((token, replace(embedding, model=resolve(embedding.model)))
                         for token, embedding in config.tokenizer.tokens)))
    return Stage(name, config, tuple(dict.fromkeys(needs)))
