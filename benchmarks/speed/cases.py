"""What bench_speed.py measures: the model sizes, the merges every tool runs (one YAML each, the same file for
distmerge and mergekit), which peer each merge is compared with, and the targets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import common

SIZES = {  # name -> llama_config arguments, input shard size in bytes
    "0.5b": ({"hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 8, "vocab": 32000, "layers": 36},
             200_000_000),
    "tiny": ({"hidden": 64, "intermediate": 176, "heads": 4, "kv_heads": 2, "vocab": 256, "layers": 2}, 40_000),
}
N_EXPERTS = 3
WEIGHTS = (1.0, 0.7, 0.4)
ALPHA = 1.0
COMMON_FRACTION = 0.8  # iso_cts: distmerge's default, given to FusionBench's iso_cts (its configs' default too)


@dataclass(frozen=True)
class Merge:
    """One elementwise merge: per-model parameters of the first len(models) experts, top-level parameters, and
    where the base goes: `base_model` (set), `listed` (set and also the first entry of `models`, as the mergekit
    configs of the interpolations write it) or `none`; out_dtype_bfloat16 sets `out_dtype: bfloat16`."""

    models: list[dict]
    top: dict = field(default_factory=dict)
    base: str = "base_model"
    out_dtype_bfloat16: bool = False


WEIGHTED = [{"weight": w} for w in WEIGHTS]
HALF_DENSITY = [{"weight": w, "density": 0.5} for w in WEIGHTS]
ONE_EXPERT = [{}]
RAM_EPSILON = [{"filter": "mlp", "value": 0.005}, {"value": 1e-5}]

# The cases of compare_mergekit.py (mergekit_parity/cases.py) with density 0.5 where a method has one: their
# top-level keys are set explicitly where the tools' defaults differ, so both compute the same thing up to their
# random draws. `int8_mask` is left out (distmerge ignores it; in mergekit it only changes the masks' dtype).
# arcee_fusion and ramplus_tl get `out_dtype: bfloat16`: without it mergekit 0.1.5 writes them in float32 (its
# float32 masks or factors promote the result), twice the bytes of every other output.
ELEMENTWISE = {
    "linear": Merge(WEIGHTED, {"normalize": True}, base="none"),
    "task_arithmetic": Merge(WEIGHTED, {"lambda": 0.9}),
    "ties": Merge(HALF_DENSITY, {"normalize": True}),
    "breadcrumbs": Merge([{**m, "gamma": 0.01} for m in HALF_DENSITY], {"lambda": 0.9}),
    "breadcrumbs_ties": Merge([{**m, "gamma": 0.01} for m in HALF_DENSITY], {"normalize": False}),
    "dare_linear": Merge(HALF_DENSITY, {"rescale": True}),
    "dare_ties": Merge(HALF_DENSITY, {"rescale": True, "normalize": False}),
    "della": Merge([{**m, "epsilon": 0.1} for m in HALF_DENSITY], {"normalize": True, "lambda": 1.0, "rescale": True}),
    "della_linear": Merge([{**m, "epsilon": 0.1} for m in HALF_DENSITY], {"lambda": 0.9, "rescale": True}),
    "sce": Merge([{} for _ in WEIGHTS], {"select_topk": 0.5}),
    "model_stock": Merge([{} for _ in WEIGHTS]),
    # the classic mergekit SLERP recipe: per-module gradients over the layers, 0.5 elsewhere
    "slerp": Merge(ONE_EXPERT, {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                      {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                   base="listed"),
    "nuslerp": Merge(WEIGHTED[:2], base="listed"),
    "multislerp": Merge(WEIGHTED, base="listed"),
    "karcher": Merge([{} for _ in WEIGHTS], base="none"),
    "passthrough": Merge([{"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [1.0, 0.0]},
                                     {"value": 1.0}]}], base="none"),
    "arcee_fusion": Merge(ONE_EXPERT, base="listed", out_dtype_bfloat16=True),
    "nearswap": Merge(ONE_EXPERT, {"t": 0.005}, base="listed"),
    "ram": Merge([{} for _ in WEIGHTS], {"epsilon": RAM_EPSILON}),
    "ramplus_tl": Merge([{} for _ in WEIGHTS], {"r": 0.5, "alpha": 0.5, "epsilon": RAM_EPSILON},
                        out_dtype_bfloat16=True),
    # distmerge only, with their defaults (k 2, mask_lambda 0.6)
    "consensus_ta": Merge(WEIGHTED),
    "consensus_ties": Merge(HALF_DENSITY),
}
# run name -> (method, parameters besides alpha and exclude) on the spectral family. iso_c has no per-task SVDs
# (no `svd` parameter); iso_cts takes `svd: exact`, FusionBench's computation; rtsvm runs with its defaults.
SPECTRAL = {
    "tsvm_exact": ("tsvm", {"svd": "exact"}),
    "tsvm_auto": ("tsvm", {"svd": "auto"}),
    "rtsvm": ("rtsvm", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {"svd": "exact"}),
}
SPECTRAL_METHODS = tuple(dict.fromkeys(method for method, _ in SPECTRAL.values()))
METHODS = (*ELEMENTWISE, *SPECTRAL_METHODS)
WITHOUT_PEER = ("consensus_ta", "consensus_ties", "rtsvm")  # timed against the physical limit only
# mergekit's bfloat16 compute is too far from float32 here for a check (arcee_fusion's importance is a KL divergence
# of softmaxes; model_stock's r is ~0.01 on these nearly orthogonal task vectors, its merged task vector mostly below
# bfloat16's resolution): distmerge's outputs are checked against one more mergekit run of each, untimed, with
# `dtype: float32, out_dtype: bfloat16`, which compare_mergekit.py finds identical to distmerge's.
CHECKED_AGAINST_FLOAT32 = ("arcee_fusion", "model_stock")
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")  # different draws from mergekit's
SPECTRAL_EXCLUDED = ("model.embed_tokens.weight", "lm_head.weight")  # --spectral-average-embeddings
LIMITS = {"elementwise": "limit:read_write", "spectral": "limit:read_write_spectral"}  # when the families differ

# (ours, peer, the largest time ratio ours/peer allowed or None, memory at most the peer's divided by this or None);
# checked on the medians. The physical limit is a peer too: linear within 1.5x of reading and writing the bytes.
TARGETS = [
    ("distmerge:ties", "mergekit:ties", 1 / 10, 1.0),
    ("distmerge:linear", "mergekit:linear", 1 / 2, 1.0),
    ("distmerge:linear", "limit:read_write", 1.5, None),
    ("distmerge:dare_ties", "mergekit:dare_ties", 0.3, 1.0),
    ("distmerge:della", "mergekit:della", 0.3, 1.0),
    ("distmerge:tsvm_exact", "fusionbench:tsvm", 1 / 3, N_EXPERTS + 1.0),
    ("distmerge:tsvm_auto", "fusionbench:tsvm", 1 / 3, N_EXPERTS + 1.0),
]


def method_of(run: str) -> str:
    """The merge method of a distmerge run name (tsvm_exact -> tsvm)."""
    return SPECTRAL[run][0] if run in SPECTRAL else run


def runs_of(method: str) -> list[str]:
    """distmerge's run names for a method: tsvm runs twice, every other method once."""
    return [run for run in SPECTRAL if SPECTRAL[run][0] == method] or [method]


def group(label: str) -> str:
    """Which family a run label reads: the spectral runs may use shallower checkpoints than the others."""
    for name, limit in LIMITS.items():
        if label == limit:
            return name
    return "spectral" if method_of(label.split(":", 1)[1]) in SPECTRAL_METHODS else "elementwise"


def peer(run: str) -> str | None:
    """The label of the peer run that distmerge's run is compared with, or None for the distmerge-only methods."""
    method = method_of(run)
    if method in WITHOUT_PEER:
        return None
    return f"{'fusionbench' if method in SPECTRAL_METHODS else 'mergekit'}:{method}"


def peer_methods(methods: list[str], tool: str) -> list[str]:
    """The methods among `methods` that the peer tool ("mergekit" or "fusionbench") runs."""
    return [m for m in methods if (peer(m) or "").startswith(f"{tool}:")]


def wanted_labels(methods: list[str]) -> set[str]:
    """The run labels that --methods asks for (the physical limits always run)."""
    labels = set(LIMITS.values())
    for method in methods:
        labels |= {f"distmerge:{run}" for run in runs_of(method)}
        labels |= {p for p in [peer(method)] if p}
    return labels


def family(cache: Path, size: str, layers: int | None, log=None) -> dict:
    """The base and experts for these settings, generated on first use under cache/inputs/<key>, with what the
    report says about them."""
    arguments, shard_size = SIZES[size]
    arguments = {**arguments, **({"layers": layers} if layers else {})}
    settings = {"llama_config": arguments, "experts": N_EXPERTS, "dtype": "bfloat16", "shard_size": shard_size,
                "seed": 0, "generator": "distmerge.synthetic.make_family"}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / "inputs" / f"{size}-l{arguments['layers']}-{key}"
    paths = common.llama_family(root, settings, log)
    numel = json.loads((paths["base"] / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    return {"root": root, **paths, "settings": settings, "params": numel, "model_bytes": numel * 2,
            "shard_size": shard_size}


def families(cache: Path, size: str, layers: int | None, spectral_layers: int | None, log=None) -> dict[str, dict]:
    """{"elementwise": family, "spectral": family}: the same object when --spectral-layers does not change the
    depth."""
    elementwise = family(cache, size, layers, log)
    spectral = family(cache, size, spectral_layers, log) if spectral_layers else elementwise
    return {"elementwise": elementwise,
            "spectral": elementwise if spectral["root"] == elementwise["root"] else spectral}


def elementwise_config(method: str, fam: dict, compute: str = "bfloat16") -> dict:
    merge = ELEMENTWISE[method]
    doc: dict = {"merge_method": method}
    if merge.base != "none":
        doc["base_model"] = str(fam["base"])
    doc["models"] = [{"model": str(fam["base"])}] if merge.base == "listed" else []
    doc["models"] += [{"model": str(path), **({"parameters": parameters} if parameters else {})}
                      for path, parameters in zip(fam["experts"], merge.models)]
    if merge.top:
        doc["parameters"] = merge.top
    doc["dtype"] = compute
    if merge.out_dtype_bfloat16 or compute != "bfloat16":
        doc["out_dtype"] = "bfloat16"
    return doc


def spectral_config(run: str, fam: dict, exclude: list[str]) -> dict:
    method, parameters = SPECTRAL[run]
    return {"merge_method": method, "base_model": str(fam["base"]),
            "models": [{"model": str(p)} for p in fam["experts"]],
            "parameters": {"alpha": ALPHA, **parameters, **({"exclude": exclude} if exclude else {})},
            "dtype": "bfloat16"}


def configs(fams: dict[str, dict], directory: Path, exclude: list[str]) -> dict[str, Path]:
    """distmerge run name -> YAML path (for the mergekit methods, the same file for both tools), and
    `METHOD_float32` -> the YAML of mergekit's float32 run for the checks (CHECKED_AGAINST_FLOAT32)."""
    import yaml

    docs = {method: elementwise_config(method, fams["elementwise"]) for method in ELEMENTWISE}
    docs |= {f"{method}_float32": elementwise_config(method, fams["elementwise"], "float32")
             for method in CHECKED_AGAINST_FLOAT32}
    docs |= {run: spectral_config(run, fams["spectral"], exclude) for run in SPECTRAL}
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, doc in docs.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths
