"""Each declared parameter's value for one tensor, from the config's settings, checked against its declaration.

Precedence as in mergekit: a model's own `parameters` over the top-level `parameters` over the declared default.
A setting may be a scalar, a gradient over the layers or a list of name filters (`config.resolve_setting`).
"""

from __future__ import annotations

from typing import Any

from .config import MergeConfig, ModelEntry, resolve_setting
from .errors import ConfigError
from .methods import MethodSpec, Param


def check_parameter_names(config: MergeConfig, spec: MethodSpec, entries: list[ModelEntry]) -> None:
    """Every key set in the config is a parameter of the method, set once, and where the method takes it."""
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


def _lookup(settings: dict, param: Param) -> tuple[str, Any] | None:
    """(the key used, its setting) for `param` in `settings`, under its name or its mergekit alias."""
    for key in (param.name, param.alias):
        if key and key in settings and settings[key] is not None:
            return key, settings[key]
    return None


def resolve_params(config: MergeConfig, spec: MethodSpec, entries: list[ModelEntry], name: str, t: float) -> dict:
    """Each declared parameter's value for tensor `name` at layer position `t`, validated (per-model ones as
    lists of T values), and the method's cross-parameter check passed."""

    def value_of(param: Param, settings_chain: list[tuple[str, dict]]):
        for where, settings in settings_chain:
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
