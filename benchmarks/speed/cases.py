"""What bench_speed.py measures: the model sizes, the merges both tools run (one YAML each), and the targets."""

from __future__ import annotations

import hashlib
import json
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

# method -> (per-model parameters, top-level parameters). Keys where the two tools' defaults differ are set
# explicitly (as in compare_mergekit.py), so both compute the same thing up to their random draws.
ELEMENTWISE = {
    "linear": ([{"weight": w} for w in WEIGHTS], {"normalize": True}),
    "ties": ([{"weight": w, "density": 0.5} for w in WEIGHTS], {"normalize": True}),
    "dare_ties": ([{"weight": w, "density": 0.5} for w in WEIGHTS], {"rescale": True, "normalize": False}),
    "della": ([{"weight": w, "density": 0.5, "epsilon": 0.1} for w in WEIGHTS],
              {"normalize": True, "lambda": 1.0, "rescale": True}),
}
METHODS = (*ELEMENTWISE, "tsvm")
TSVM_VARIANTS = {"tsvm_exact": "exact", "tsvm_auto": "auto"}
TSVM_EXCLUDED = ("model.embed_tokens.weight", "lm_head.weight")  # --tsvm-average-embeddings
LIMITS = {"elementwise": "limit:read_write", "tsvm": "limit:read_write_tsvm"}  # only when the families differ

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


def group(label: str) -> str:
    """Which family a run label reads: the tsvm runs may use shallower checkpoints than the others."""
    return "tsvm" if "tsvm" in label else "elementwise"


def wanted_labels(methods: list[str]) -> set[str]:
    """The run labels that --methods asks for (the physical limits always run)."""
    labels = set(LIMITS.values())
    labels |= {f"{tool}:{m}" for m in methods if m in ELEMENTWISE for tool in ("distmerge", "mergekit")}
    if "tsvm" in methods:
        labels |= {*(f"distmerge:{v}" for v in TSVM_VARIANTS), "fusionbench:tsvm"}
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


def families(cache: Path, size: str, layers: int | None, tsvm_layers: int | None, log=None) -> dict[str, dict]:
    """{"elementwise": family, "tsvm": family}: the same object when --tsvm-layers does not change the depth."""
    elementwise = family(cache, size, layers, log)
    tsvm = family(cache, size, tsvm_layers, log) if tsvm_layers else elementwise
    return {"elementwise": elementwise, "tsvm": elementwise if tsvm["root"] == elementwise["root"] else tsvm}


def elementwise_config(method: str, fam: dict) -> dict:
    models, top = ELEMENTWISE[method]
    doc: dict = {"merge_method": method}
    if method != "linear":
        doc["base_model"] = str(fam["base"])
    doc["models"] = [{"model": str(p), "parameters": m} for p, m in zip(fam["experts"], models)]
    doc["parameters"] = top
    doc["dtype"] = "bfloat16"
    return doc


def tsvm_config(svd: str, fam: dict, exclude: list[str]) -> dict:
    return {"merge_method": "tsvm", "base_model": str(fam["base"]),
            "models": [{"model": str(p)} for p in fam["experts"]],
            "parameters": {"alpha": ALPHA, "svd": svd, **({"exclude": exclude} if exclude else {})},
            "dtype": "bfloat16"}


def configs(fams: dict[str, dict], directory: Path, exclude: list[str]) -> dict[str, Path]:
    """method -> YAML path (the same file for both tools)."""
    import yaml

    docs = {method: elementwise_config(method, fams["elementwise"]) for method in ELEMENTWISE}
    docs |= {variant: tsvm_config(svd, fams["tsvm"], exclude) for variant, svd in TSVM_VARIANTS.items()}
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, doc in docs.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths
