"""The merge config: mergekit's YAML as users write it, plus distmerge's own block.

    merge_method: ties
    base_model: meta-llama/Llama-3.1-8B          # local directory or hub id in the local HF cache
    models:
      - model: ./helpful
        parameters: {weight: 1.0, density: 0.5}
      - model: ./honest
        parameters: {weight: 0.5, density: [0.3, 0.7]}   # a gradient over the layers
    parameters: {lambda: 1.0}                    # for every model; per-model values override
    dtype: float32                               # compute precision (never below float32)
    out_dtype: bfloat16                          # saved dtype
    tokenizer_source: base                       # base, union, or a model reference (or a `tokenizer:` block)
    distmerge: {seed: 0, shard_size: 2GB, device: cpu}   # rng: mergekit draws as `mergekit-yaml --random-seed`

Parameter values follow mergekit: a scalar; a list of numbers, interpolated over the layers (the first value
applies to tensors outside the layers); or a list of `{filter, value}` pairs where the first filter that is a
substring of the tensor name wins (no filter matches all). This module parses and validates the text; it knows
nothing of tensors or Ray.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# Names users write for dtypes, mapped to the canonical torch name.
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "chat_template", "distmerge",
)
# mergekit keys that describe merges distmerge does not do; each gets its own explanation.
UNSUPPORTED_KEYS = {
    "modules": "per-module configs are not supported: list whole models under `models:`",
}

DEFAULT_SHARD_SIZE = 5 * 10**9
RNG_CHOICES = ("distmerge", "mergekit")


@dataclass(frozen=True)
class EngineSettings:
    """The `distmerge:` block: how to run, not what to compute. CLI flags override these."""

    seed: int = 0
    device: str | None = None  # None: cpu locally; under Ray, cuda when the cluster has GPUs
    shard_size: int = DEFAULT_SHARD_SIZE
    runtime: str = "local"
    workers: int | None = None
    threads: int | None = None  # CPU threads per worker; None: all cores locally, 1 per Ray CPU worker
    allow_crimes: bool = False  # mergekit's --allow-crimes: merge models whose config.json architectures differ
    copy_tokenizer: bool = True  # write the tokenizer files of `tokenizer_source` into the output
    write_model_card: bool = True  # write README.md describing the merge
    # random draws: "distmerge" (counter-based, keyed by seed, tensor and model) or "mergekit" (torch's CPU
    # generator, seeded and advanced as `mergekit-yaml --random-seed SEED` does; docs/methods.md, Random draws)
    rng: str = "distmerge"
    # bytes one worker may hold for one tensor's merge; None: a quarter of this machine's memory (see plan.py)
    memory_budget: int | None = None

    @staticmethod
    def parse(raw: Any) -> "EngineSettings":
        if raw is None:
            return EngineSettings()
        if not isinstance(raw, dict):
            raise ConfigError(f"`distmerge` must be a mapping, got {raw!r}")
        flags = ("allow_crimes", "copy_tokenizer", "write_model_card")
        allowed = {"seed", "device", "shard_size", "runtime", "workers", "threads", "rng", "memory_budget", *flags}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"unknown key `distmerge.{unknown[0]}`; allowed: {', '.join(sorted(allowed))}")
        settings = EngineSettings()
        if "seed" in raw:
            settings = replace(settings, seed=parse_seed(raw["seed"], "distmerge.seed"))
        if "device" in raw:
            settings = replace(settings, device=parse_device(raw["device"], "distmerge.device"))
        if "shard_size" in raw:
            settings = replace(settings, shard_size=parse_size(raw["shard_size"], "distmerge.shard_size"))
        if "memory_budget" in raw:
            settings = replace(settings, memory_budget=parse_size(raw["memory_budget"], "distmerge.memory_budget"))
        if "runtime" in raw:
            settings = replace(settings, runtime=parse_choice(raw["runtime"], ("local", "ray"), "distmerge.runtime"))
        if "workers" in raw:
            settings = replace(settings, workers=parse_positive_int(raw["workers"], "distmerge.workers"))
        if "threads" in raw:
            settings = replace(settings, threads=parse_positive_int(raw["threads"], "distmerge.threads"))
        for flag in flags:
            if flag in raw:
                settings = replace(settings, **{flag: parse_bool(raw[flag], f"distmerge.{flag}")})
        if "rng" in raw:
            settings = replace(settings, rng=parse_choice(raw["rng"], RNG_CHOICES, "distmerge.rng"))
        return settings


@dataclass(frozen=True)
class TokenEmbedding:
    """How one token's embedding (and head) rows are filled (mergekit's `tokenizer.tokens.TOKEN`): `kind` zero (a
    zero row), model (the row of this token in `model`) or model_token (the row of `token`, or of id `token_id`,
    in `model`); None: mergekit's default. `force`: every model gets this row, even those that have the token."""

    kind: str | None = None
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """The `tokenizer:` block (or `tokenizer_source:`): the output's vocabulary is `source`'s (union: every
    model's tokens; base; or a model's), plus `tokens` not in it; `pad_to_multiple_of` rounds the rows up."""

    source: str = "union"
    tokens: tuple[tuple[str, TokenEmbedding], ...] = ()
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """Layers `layer_range[0]` to `layer_range[1] - 1` of a model, as one input of a slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers, merged from the same number of layers of each source (mergekit's `slices:`)."""

    sources: tuple[SliceSource, ...]
    base_model: str | None = None  # this slice's base, instead of the top-level one
    parameters: dict = field(default_factory=dict)  # over the top-level `parameters`, under each source's own

    @property
    def num_layers(self) -> int:
        start, stop = self.sources[0].layer_range
        return stop - start


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    models: tuple[ModelEntry, ...]  # empty when the config gives `slices`
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None  # the `tokenizer:` block (never together with tokenizer_source)
    chat_template: str | None = None  # auto, a built-in name or a Jinja template (see chat_templates.py)
    engine: EngineSettings = field(default_factory=EngineSettings)
    base_dir: str = "."  # relative model paths resolve against the config file's directory
    slices: tuple[OutputSlice, ...] = ()  # instead of `models`: the output's layers, slice by slice

    def model_refs(self) -> list[str]:
        """Every model the config names as an input (base models included), each once, in order."""
        refs = [self.base_model] + [entry.model for entry in self.models]
        for output_slice in self.slices:
            refs += [output_slice.base_model] + [source.model for source in output_slice.sources]
        return list(dict.fromkeys(ref for ref in refs if ref is not None))

    @property
    def compute_dtype(self) -> str:
        """float64 when asked for; float32 otherwise. 16-bit compute only loses accuracy."""
        return "float64" if self.dtype == "float64" else "float32"

    def fingerprint(self) -> str:
        """Hash of everything that decides the output bytes (not of how the work is distributed)."""
        payload = {
            "merge_method": self.merge_method,
            "models": [[m.model, m.parameters] for m in self.models],
            "slices": [_slice_document(s) for s in self.slices],
            "base_model": self.base_model,
            "parameters": self.parameters,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            "tokenizer": _tokenizer_document(self.tokenizer),
            "chat_template": self.chat_template,
            "seed": self.engine.seed,
            "rng": self.engine.rng,
            "shard_size": self.engine.shard_size,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def to_yaml(self) -> str:
        """The config as a mergekit-style YAML document (for the model card)."""
        doc: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            doc["base_model"] = self.base_model
        if self.slices:
            doc["slices"] = [_slice_document(s) for s in self.slices]
        else:
            doc["models"] = [
                {"model": m.model, **({"parameters": m.parameters} if m.parameters else {})} for m in self.models
            ]
        for key in ("parameters", "dtype", "out_dtype", "tokenizer_source", "chat_template"):
            value = getattr(self, key)
            if value:
                doc[key] = value
        if self.tokenizer is not None:
            doc["tokenizer"] = _tokenizer_document(self.tokenizer)
        doc["distmerge"] = {"seed": self.engine.seed, "rng": self.engine.rng, "shard_size": self.engine.shard_size}
        return yaml.safe_dump(doc, sort_keys=False)


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(text, base_dir=str(path.resolve().parent), source=str(path))


def parse_config(text: str, base_dir: str = ".", source: str = "config") -> MergeConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    return config_from_document(raw, base_dir, source)


def config_from_document(raw: Any, base_dir: str = ".", source: str = "config") -> MergeConfig:
    """A MergeConfig from one parsed YAML document (`source` names it in errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping with at least `merge_method` and `models`")

    for key, why in UNSUPPORTED_KEYS.items():
        if key in raw:
            raise ConfigError(f"`{key}` in {source}: {why}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown key `{unknown[0]}` in {source}; allowed: {', '.join(TOP_LEVEL_KEYS)}")

    method = raw.get("merge_method")
    if not isinstance(method, str) or not method:
        raise ConfigError(f"`merge_method` is required in {source} and must be a method name (see `distmerge methods`)")

    models_raw, slices_raw = raw.get("models"), raw.get("slices")
    if (models_raw is None) == (slices_raw is None):
        raise ConfigError(f"{source} must give either `models` (whole models) or `slices` (layer ranges), "
                          f"{'not both' if models_raw is not None else 'and gives neither'}")
    if models_raw is not None and (not isinstance(models_raw, list) or not models_raw):
        raise ConfigError(f"`models` in {source} must be a non-empty list of `{{model: PATH_OR_HUB_ID}}` entries")
    models = tuple(_parse_model_entry(entry, i) for i, entry in enumerate(models_raw or []))
    slices = _parse_slices(slices_raw) if slices_raw is not None else ()

    base_model = raw.get("base_model")
    if base_model is not None:
        base_model = _parse_model_ref(base_model, "base_model")

    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"`parameters` must be a mapping of parameter names to values, got {parameters!r}")

    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None:
        tokenizer_source = _parse_model_ref(tokenizer_source, "tokenizer_source")
    if tokenizer_source is not None and raw.get("tokenizer") is not None:
        raise ConfigError(f"{source} gives both `tokenizer_source` and `tokenizer`; keep one (the block's `source` "
                          "is the tokenizer source)")

    return MergeConfig(
        merge_method=method,
        models=models,
        base_model=base_model,
        parameters=dict(parameters),
        dtype=parse_dtype(raw["dtype"], "dtype") if raw.get("dtype") is not None else None,
        out_dtype=parse_dtype(raw["out_dtype"], "out_dtype") if raw.get("out_dtype") is not None else None,
        tokenizer_source=tokenizer_source,
        tokenizer=_parse_tokenizer(raw.get("tokenizer")),
        chat_template=_parse_chat_template(raw.get("chat_template")),
        engine=EngineSettings.parse(raw.get("distmerge")),
        base_dir=base_dir,
        slices=slices,
    )


def _parse_slices(raw: Any) -> tuple[OutputSlice, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("`slices` must be a non-empty list of `{sources: [{model, layer_range: [a, b]}, ...]}`")
    slices = []
    for index, entry in enumerate(raw):
        key = f"slices[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise ConfigError(f"`{key}` must be a mapping with a non-empty list of `sources`, got {entry!r}")
        extra = sorted(set(entry) - {"sources", "base_model", "parameters"})
        if extra:
            why = (" (mergekit 0.1.5 ignores a per-slice merge method: set `merge_method` once, at the top)"
                   if extra[0] == "merge_method" else "")
            raise ConfigError(f"unknown key `{key}.{extra[0]}`; allowed: sources, base_model, parameters{why}")
        sources = tuple(_parse_slice_source(source, f"{key}.sources[{i}]") for i, source in enumerate(entry["sources"]))
        lengths = {source.layer_range[1] - source.layer_range[0] for source in sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources)
            raise ConfigError(f"`{key}`: every source of a slice gives the same number of layers, got {ranges}")
        base_model = entry.get("base_model")
        slices.append(OutputSlice(sources, _parse_model_ref(base_model, f"{key}.base_model") if base_model else None,
                                  _parse_parameters(entry.get("parameters"), f"{key}.parameters")))
    return tuple(slices)


def _parse_slice_source(raw: Any, key: str) -> SliceSource:
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"`{key}` must be a mapping with `model` and `layer_range`, got {raw!r}")
    extra = sorted(set(raw) - {"model", "layer_range", "parameters"})
    if extra:
        raise ConfigError(f"unknown key `{key}.{extra[0]}`; allowed: model, layer_range, parameters")
    layers = raw.get("layer_range")
    if (not isinstance(layers, list) or len(layers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                        for v in layers)
            or not 0 <= layers[0] < layers[1]):
        raise ConfigError(f"`{key}.layer_range: {layers!r}` must be [first, end] with 0 <= first < end (end not "
                          "included, as in mergekit)")
    return SliceSource(_parse_model_ref(raw["model"], f"{key}.model"), (layers[0], layers[1]),
                       _parse_parameters(raw.get("parameters"), f"{key}.parameters"))


def _parse_parameters(raw: Any, key: str) -> dict:
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"`{key}` must be a mapping, got {raw!r}")
    return dict(raw)


def _slice_document(output_slice: OutputSlice) -> dict:
    doc: dict[str, Any] = {"sources": [
        {"model": s.model, "layer_range": list(s.layer_range), **({"parameters": s.parameters} if s.parameters else {})}
        for s in output_slice.sources]}
    if output_slice.base_model:
        doc["base_model"] = output_slice.base_model
    if output_slice.parameters:
        doc["parameters"] = output_slice.parameters
    return doc


def _parse_tokenizer(raw: Any) -> TokenizerSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"`tokenizer` must be a mapping with `source`, `tokens` and `pad_to_multiple_of`, "
                          f"got {raw!r}")
    extra = sorted(set(raw) - {"source", "tokens", "pad_to_multiple_of"})
    if extra:
        raise ConfigError(f"unknown key `tokenizer.{extra[0]}`; allowed: source, tokens, pad_to_multiple_of")
    source = _parse_model_ref(raw.get("source", "union"), "tokenizer.source")
    tokens = raw.get("tokens") or {}
    if not isinstance(tokens, dict) or not all(isinstance(token, str) and token for token in tokens):
        raise ConfigError(f"`tokenizer.tokens` must map tokens (strings) to `{{source: ..., force: ...}}`, "
                          f"got {tokens!r}")
    pad = raw.get("pad_to_multiple_of")
    return TokenizerSettings(
        source=source, tokens=tuple((token, _parse_token(value, f"tokenizer.tokens.{token}"))
                                    for token, value in tokens.items()),
        pad_to_multiple_of=None if pad is None else parse_positive_int(pad, "tokenizer.pad_to_multiple_of"))


def _parse_token(raw: Any, key: str) -> TokenEmbedding:
    """mergekit's TokenEmbeddingConfig: `source` is a model reference, `{kind: zero}` or
    `{kind: model_token, model: M, token: T}` (or `token_id: N`), and `force` a flag."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or sorted(set(raw) - {"source", "force"}):
        raise ConfigError(f"`{key}` must be a mapping with `source` and/or `force`, got {raw!r}")
    force = parse_bool(raw.get("force", False), f"{key}.force")
    source = raw.get("source")
    if source is None:
        return TokenEmbedding(force=force)
    if isinstance(source, dict) and source.get("kind") == "zero":
        if set(source) != {"kind"}:
            raise ConfigError(f"`{key}.source: {{kind: zero}}` takes nothing else, got {source!r}")
        return TokenEmbedding(kind="zero", force=force)
    if isinstance(source, dict) and source.get("kind") == "model_token":
        extra = sorted(set(source) - {"kind", "model", "token", "token_id"})
        token, token_id = source.get("token"), source.get("token_id")
        if extra or "model" not in source or (token is None) == (token_id is None):
            raise ConfigError(f"`{key}.source` of kind model_token needs `model` and one of `token` or `token_id`, "
                              f"got {source!r}")
        if token_id is not None:
            token_id = parse_seed(token_id, f"{key}.source.token_id")
        elif not isinstance(token, str):
            raise ConfigError(f"`{key}.source.token: {token!r}` must be a token (a string)")
        return TokenEmbedding("model_token", _parse_model_ref(source["model"], f"{key}.source.model"), token,
                              token_id, force)
    if isinstance(source, dict) and "kind" in source:
        raise ConfigError(f"`{key}.source.kind: {source['kind']!r}` is not allowed; choose zero or model_token "
                          "(or give a model)")
    return TokenEmbedding("model", _parse_model_ref(source, f"{key}.source"), force=force)


def _tokenizer_document(settings: TokenizerSettings | None) -> dict | None:
    if settings is None:
        return None
    tokens = {}
    for token, embedding in settings.tokens:
        source = _token_source_document(embedding)
        tokens[token] = {**({"source": source} if source is not None else {}), "force": embedding.force}
    return {"source": settings.source, **({"tokens": tokens} if tokens else {}),
            **({"pad_to_multiple_of": settings.pad_to_multiple_of} if settings.pad_to_multiple_of else {})}


def _token_source_document(embedding: TokenEmbedding) -> dict | str | None:
    """A token's `source` as mergekit writes it (the inverse of `_parse_token`)."""
    if embedding.kind == "zero":
        return {"kind": "zero"}
    if embedding.kind == "model":
        return embedding.model
    if embedding.kind == "model_token":
        which = {"token": embedding.token} if embedding.token is not None else {"token_id": embedding.token_id}
        return {"kind": "model_token", "model": embedding.model, **which}
    return None


def _parse_chat_template(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"`chat_template: {value!r}` must be auto, a built-in template name or a Jinja template")
    return value


def _parse_model_ref(value: Any, key: str) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}}
        value = value["model"]
        if isinstance(value, dict):
            value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be a local directory or a hub id such as org/name, got {value!r}")
    return value.strip()


def _parse_model_entry(entry: Any, index: int) -> ModelEntry:
    key = f"models[{index}]"
    if isinstance(entry, str):
        return ModelEntry(model=_parse_model_ref(entry, key))
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"`{key}` must be a mapping with a `model` key, got {entry!r}")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise ConfigError(f"unknown key `{key}.{extra[0]}`; allowed: model, parameters")
    return ModelEntry(model=_parse_model_ref(entry["model"], f"{key}.model"),
                      parameters=_parse_parameters(entry.get("parameters"), f"{key}.parameters"))


# ---- scalar parsers shared by the config and the CLI -----------------------------------------------------


def parse_dtype(value: Any, key: str) -> str:
    name = str(value).removeprefix("torch.").lower()
    if name not in DTYPE_NAMES:
        raise ConfigError(f"`{key}: {value}` is not a dtype; allowed: float32, bfloat16, float16, float64")
    return DTYPE_NAMES[name]


def parse_seed(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"`{key}: {value!r}` must be a non-negative integer")
    return value


def parse_positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{key}: {value!r}` must be a positive integer")
    return value


def parse_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{key}: {value!r}` must be true or false")
    return value


def parse_choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise ConfigError(f"`{key}: {value!r}` is not allowed; choose one of: {', '.join(choices)}")
    return value


def parse_device(value: Any, key: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ConfigError(f"`{key}: {value!r}` must be cpu or cuda")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, key: str) -> int:
    """'2GB', '500MiB', 2000000000 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"`{key}: {value!r}` is not a size; write for example 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_mergekit_size(value: Any, key: str) -> int:
    """mergekit's --out-shard-size: bytes, with K, M or B for thousands, millions and billions ('5B')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"`{key} {value}` is not a size; write for example 5B (5e9 bytes), 500M or 2000000000")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---- parameter settings: scalars, gradients over layers, filters -------------------------------------------


def resolve_setting(setting: Any, tensor_name: str, t: float, key: str) -> Any:
    """The value of one parameter setting for one tensor, `t` being its position in the layer stack (0..1)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        raise ConfigError(f"parameter `{key}` is an empty list; give a value, a gradient or filter entries")
    if all(isinstance(item, dict) for item in setting):
        for item in setting:
            extra = sorted(set(item) - {"filter", "value"})
            if extra or "value" not in item:
                raise ConfigError(f"parameter `{key}`: each filter entry needs `value` (and optional `filter`), got {item!r}")
            flt = item.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return resolve_setting(item["value"], tensor_name, t, key)
        return None
    if any(isinstance(item, (dict, list)) for item in setting):
        raise ConfigError(f"parameter `{key}`: a gradient must be a list of plain values, got {setting!r}")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
    if not numeric:  # booleans and strings pick the nearest-below entry, as mergekit does
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    lo = int(scaled)
    hi = min(len(setting) - 1, lo + 1)
    frac = scaled - lo
    return (1 - frac) * setting[lo] + frac * setting[hi]


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_position(tensor_name: str, num_layers: int | None) -> float:
    """Where a tensor sits in the layer stack, 0 for the first layer and 1 for the last.

    Tensors outside the layers (embeddings, final norm, head) get 0, and the only layer of a one-layer model
    gets 1, as in mergekit.
    """
    match = LAYER_INDEX.search(tensor_name)
    if not match or not num_layers:
        return 0.0
    if num_layers < 2:
        return 1.0
    return min(1.0, int(match.group(1)) / (num_layers - 1))
