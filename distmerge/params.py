"""Each declared parameter's value for one tensor, from the config's settings, checked against its declaration.

Precedence as in mergekit: a model's own `parameters` over the top-level `parameters` over the declared default;
with slices, a source's `parameters` over its slice's over the top-level ones. Each source of settings is one
link of a chain, highest precedence first: the first link whose setting gives a value for the tensor wins (a
filter list that matches nothing passes the question on). A setting may be a scalar, a gradient over the layers
or a list of name filters (`config.resolve_setting`).
"""

from __future__ import annotations

from typing import Any

from .config import MergeConfig, ModelEntry, resolve_setting
from .errors import ConfigError
from .methods import MethodSpec, Param

Chain = list[tuple[str, dict]]  # (where the settings are, for errors; the settings), highest precedence first


def check_parameter_names(config: MergeConfig, spec: MethodSpec, entries: list[ModelEntry]) -> None:
    """Every key set in the config is a parameter of the method, set once, and where the method takes it."""
    scopes = [("parameters", config.parameters, False)]
    scopes += [(f"parameters of model {e.model}", e.parameters, True) for e in entries]
    for i, output_slice in enumerate(config.slices):
        scopes.append((f"slices[{i}].parameters", output_slice.parameters, False))
        scopes += [(f"slices[{i}].sources[{j}].parameters ({source.model})", source.parameters, True)
                   for j, source in enumerate(output_slice.sources)]
    known = spec.names_with_aliases()
    allowed = ", ".join(p.name for p in spec.params) or "(none)"
    for where, settings, per_model_scope in scopes:
        for key in settings:
            if key not in known:
                raise ConfigError(f"`{key}` in {where} is not a parameter of {spec.name}; allowed: {allowed}")
            param = known[key]
            if param.alias and param.name in settings and param.alias in settings:
                raise ConfigError(f"{where} sets both `{param.name}` and its mergekit alias `{param.alias}`; keep one")
            if not param.per_model and per_model_scope:
                raise ConfigError(f"`{key}` is set once for the whole merge in {spec.name}: move it from {where} "
                                  "to the top-level `parameters`")


def whole_model_chains(config: MergeConfig, entries: list[ModelEntry]) -> tuple[Chain, list[Chain]]:
    """(the chain of the merge-wide settings, one chain per model) of a config that lists whole models."""
    shared = [("parameters", config.parameters)]
    return shared, [[(f"parameters of model {e.model}", e.parameters)] + shared for e in entries]


def resolve_params(spec: MethodSpec, name: str, t: float, shared: Chain, per_model: list[Chain]) -> dict:
    """Each declared parameter's value for tensor `name` at layer position `t`, validated (per-model ones as
    lists of T values, from `per_model`), and the method's cross-parameter check passed."""

    def value_of(param: Param, chain: Chain):
        for where, settings in chain:
            found = _lookup(settings, param)
            if found is None:
                continue
            key, setting = found
            value = setting if param.kind == "globs" else resolve_setting(setting, name, t, key)
            if value is not None:
                return param.check(value, f"{where} (tensor {name})")
        return param.default

    resolved = {}
    for param in spec.params:
        if param.per_model:
            resolved[param.name] = [value_of(param, chain) for chain in per_model]
        else:
            resolved[param.name] = value_of(param, shared)
    if spec.check is not None:
        problem = spec.check(resolved)
        if problem:
            raise ConfigError(f"{spec.name}, tensor {name}: {problem}")
    return resolved


def _lookup(settings: dict, param: Param) -> tuple[str, Any] | None:
    """(the key used, its setting) for `param` in `settings`, under its name or its mergekit alias."""
    for key in (param.name, param.alias):
        if key and key in settings and settings[key] is not None:
            return key, settings[key]
    return None
