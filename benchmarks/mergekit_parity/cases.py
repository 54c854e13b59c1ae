"""What compare_mergekit.py compares: the input families, every method both tools have with its parameters, and
the input variants each method runs on (one mergekit YAML per method and variant).

Besides the input variants, every method runs with mergekit's defaults: a config that sets only what the user must
or means to (per model `weight` and `density`; slerp's `t`), everything else left to each tool's default. The
random methods (DARE, DELLA) run that at density 1, where both tools must give the same bytes, and below density
1 twice: with distmerge's own draws (the kept share and the norm of the merged task vector must agree within
sampling error) and with `distmerge: {rng: mergekit}` (the same bytes as `mergekit-yaml --random-seed`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import common

SMALL_SCALE = 0.002  # task vectors of ~1e-4 (norms) in the vectors and ~1e-3 in the matrices: gentle fine-tunes
WEIGHTS = (1.0, 0.7, 0.4)  # 0.7 and 0.4 are not binary fractions: rounding shows
SEED = 5  # `--random-seed` for mergekit and `distmerge: seed` for the random methods below density 1


@dataclass(frozen=True)
class Family:
    """A base and three experts on disk, in one dtype and layout."""

    label: str
    dtype: str  # float32 | bfloat16
    sharded: bool
    base: str
    experts: tuple[str, ...]


def make_families(work: Path, hidden: int, layers: int) -> dict[str, Family]:
    """float32 and bfloat16, each as one model.safetensors and as shards with an index, and the gentle family."""
    arguments = {"hidden": hidden, "intermediate": hidden * 11 // 4, "layers": layers, "heads": 4, "kv_heads": 2}
    directory = work / "inputs" / f"hidden{hidden}-layers{layers}"
    families = {}
    for dtype in ("float32", "bfloat16"):
        for sharded in (False, True):
            label = f"{'f32' if dtype == 'float32' else 'bf16'}-{'sharded' if sharded else 'single'}"
            # shards of about four hidden x hidden matrices: a dozen or more files
            shard_size = 4 * hidden * hidden * (2 if dtype == "bfloat16" else 4) if sharded else None
            paths = common.llama_family(directory / label, {"llama_config": arguments, "experts": 3, "dtype": dtype,
                                                            "shard_size": shard_size, "seed": 0})
            families[label] = Family(label, dtype, sharded, str(paths["base"]), tuple(map(str, paths["experts"])))
    families["f32-small"] = make_small_family(families["f32-single"], directory)
    families["f32-vocab"] = make_vocabulary_family(families["f32-single"], directory)
    return families


def make_small_family(family: Family, directory: Path) -> Family:
    """The float32 family with every task vector scaled by SMALL_SCALE, so that per-tensor statistics come near
    the epsilons that guard them (model_stock clamps the product of two task-vector norms at 1e-6)."""
    import torch

    from distmerge.synthetic import save_checkpoint

    directory = directory / "f32-small"
    experts = tuple(str(directory / Path(path).name) for path in family.experts)
    if not (directory / "base" / "config.json").exists():
        config = json.loads((Path(family.base) / "config.json").read_text())
        base = common.load_checkpoint(Path(family.base))
        save_checkpoint(directory / "base", base, config, dtype=torch.float32)
        for source, target in zip(family.experts, experts):
            expert = common.load_checkpoint(Path(source))
            small = {name: base[name] + SMALL_SCALE * (expert[name] - base[name]) for name in base}
            save_checkpoint(target, small, config, dtype=torch.float32)
    return Family("f32-small", "float32", False, str(directory / "base"), experts)


def make_vocabulary_family(family: Family, directory: Path) -> Family:
    """The float32 family with vocabularies that differ (for `tokenizer_source` and `tokenizer:`): the base and
    expert 3 as they are; expert 1 with the ids of w3 and w4 swapped and a new token w_new (its row: half its w3
    row); expert 2 without w5 (the rows after it move up) and a new special token <tool> (its row: its <s> row).
    Only expert 1 brings a plain new token: mergekit orders a union's models as a Python set, so tokens new in two
    models would take ids that change from run to run."""
    import torch

    from distmerge.synthetic import save_checkpoint

    directory = directory / "f32-vocab"
    experts = (str(directory / "expert1"), str(directory / "expert2"), family.experts[2])
    if not (directory / "expert2" / "config.json").exists():
        config = json.loads((Path(family.base) / "config.json").read_text())
        tokens = json.loads((Path(family.base) / "tokenizer.json").read_text())["model"]["vocab"]
        vocab = sorted(tokens, key=tokens.get)
        one = vocab[:3] + ["w4", "w3"] + vocab[5:] + ["w_new"]
        two = [token for token in vocab if token != "w5"] + ["<tool>"]
        for source, target, order, special in ((family.experts[0], experts[0], one, []),
                                               (family.experts[1], experts[1], two, ["<tool>"])):
            tensors = common.load_checkpoint(Path(source))
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                rows = tensors[name]
                new = {"w_new": 0.5 * rows[tokens["w3"]], "<tool>": rows[tokens["<s>"]]}
                tensors[name] = torch.stack([new[t] if t in new else rows[tokens[t]] for t in order])
            save_checkpoint(target, tensors, {**config, "vocab_size": len(order)}, dtype=torch.float32,
                            tokenizer=False)
            write_word_level_tokenizer(Path(target), [t for t in order if t not in special], special)
    return Family("f32-vocab", "float32", False, family.base, experts)


def write_word_level_tokenizer(path: Path, vocab: list[str], special: list[str]) -> None:
    """A WordLevel tokenizer like distmerge.synthetic's: `vocab` at ids 0.., then the `special` added tokens."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in ["<unk>", "<s>", "</s>", *special]])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


# case -> models: per-model parameters (None: the base + one model, for slerp, arcee_fusion and nearswap);
#         top: top-level parameters (every one a mergekit default or not, set explicitly in the input variants);
#         required: top-level parameters mergekit requires (kept in the defaults variant); sampled: per-model
#         parameters below density 1, for the random methods; base: sets base_model; base_listed: the base is
#         also the first entry of `models` (as mergekit configs often write it); method: the merge_method, where
#         the case is a second configuration of one (default: the case's name); extra_variants: labels of
#         on-request variants to run too; ungated: {variant label: why the gate does not apply to this case
#         there}; mergekit_writes: {YAML dtype: the dtype mergekit 0.1.5 writes instead} where, without
#         out_dtype, it does not write the YAML's dtype (float32 masks or factors promote its bfloat16 result);
#         vocabulary: top-level keys for the output vocabulary (`tokenizer_source`, `tokenizer`; "@N" names expert
#         N), run on the family whose vocabularies differ only (make_vocabulary_family)
BREADCRUMBS_MODELS = [{"weight": w, "density": d, "gamma": g}
                      for w, d, g in zip(WEIGHTS, (0.6, 0.5, 0.8), (0.05, 0.02, 0.1))]
DENSITY_1 = [{"weight": w, "density": 1.0} for w in WEIGHTS]  # DARE/DELLA: their random parts are off
SAMPLED = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, (0.5, 0.3, 0.7))]  # DELLA: epsilon 0.15 fits
RAM_EPSILON = [{"filter": "mlp", "value": 0.005}, {"value": 1e-5}]

METHODS: dict[str, dict] = {
    "linear": {"models": [{"weight": w} for w in WEIGHTS], "top": {"normalize": True}, "base": False},
    "task_arithmetic": {"models": [{"weight": w} for w in WEIGHTS], "top": {"lambda": 0.9}},
    "ties": {"models": [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": [0.2, 0.5]},
                        {"weight": 0.4, "density": 0.7}],
             "top": {"normalize": True, "int8_mask": True, "lambda": 1.1}},
    "breadcrumbs": {"models": BREADCRUMBS_MODELS, "top": {"lambda": 0.9}},
    "breadcrumbs_ties": {"models": BREADCRUMBS_MODELS, "top": {"int8_mask": True, "normalize": False}},
    "dare_linear": {"models": DENSITY_1, "top": {"int8_mask": True, "rescale": True}, "sampled": SAMPLED},
    "dare_ties": {"models": DENSITY_1, "top": {"int8_mask": True, "rescale": True, "normalize": False},
                  "sampled": SAMPLED},
    "della": {"models": [{**m, "epsilon": 0.1} for m in DENSITY_1],
              "top": {"normalize": True, "lambda": 1.0, "rescale": True}, "sampled": SAMPLED},
    "della_linear": {"models": [{**m, "epsilon": 0.1} for m in DENSITY_1], "top": {"lambda": 0.9, "rescale": True},
                     "sampled": SAMPLED},
    # the classic mergekit SLERP recipe: per-module gradients over the layers, 0.5 elsewhere
    "slerp": {"models": None, "top": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                            {"value": 0.5}]}, "required": ("t",)},
    # one model's tensors, scaled per module: the frankenmerge building block on whole models
    "passthrough": {"models": [{"scale": [{"filter": "o_proj", "value": 0.5},
                                          {"filter": "down_proj", "value": [1.0, 0.0]}, {"value": 1.0}]}],
                    "top": {}, "base": False},
    # task vectors, flattened (the defaults), t = 0.7 / 1.7
    "nuslerp": {"models": [{"weight": 1.0}, {"weight": 0.7}], "top": {}, "base_listed": True},
    "nuslerp rows": {"method": "nuslerp", "models": [{"weight": [1.0, 0.3]}, {"weight": 0.7}],
                     "top": {"nuslerp_flatten": False}, "base": False},
    "nuslerp columns": {"method": "nuslerp", "models": [{"weight": 0.4}, {"weight": 1.0}],
                        "top": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "multislerp": {"models": [{"weight": w} for w in WEIGHTS], "top": {}, "base_listed": True},
    "multislerp no base": {"method": "multislerp", "models": [{"weight": w} for w in WEIGHTS],
                           "top": {"normalize_weights": False}, "base": False},
    "karcher": {"models": [{} for _ in WEIGHTS], "top": {}, "base": False},
    # mergekit merges the base_model of a method that ignores it as a fourth model; on the gentle family the base
    # is ~1e-4 rad from the mean, an angle float32 acos cannot resolve, so mergekit's float32 steps are round-off
    "karcher with base": {"method": "karcher", "models": [{} for _ in WEIGHTS], "top": {"max_iter": 20},
                          "extra_variants": ("f32, task vectors x0.002, dtype float64",),
                          "ungated": {"f32, task vectors x0.002": (
                              "mergekit's float32 angles below ~3e-4 rad are round-off (acos of a dot product "
                              "within 6e-8 of 1); compare the float64 column, where both compute the angles "
                              "exactly")}},
    "model_stock": {"models": [{} for _ in WEIGHTS], "top": {}},
    # `slices:` instead of `models:` (see mergekit_slices): a frankenmerge of expert 1's layers 0-1 and expert 2's
    # layers 1-2 (4 layers from 3), a SLERP per layer range, TIES with per-source and per-slice parameters
    "passthrough frankenmerge": {"method": "passthrough", "base": False, "top": {},
                                 "slices": [{"sources": [(0, [0, 2])]}, {"sources": [(1, [1, 3])]}]},
    "slerp slices": {"method": "slerp", "top": {"t": [0.0, 1.0]}, "required": ("t",),
                     "slices": [{"sources": [("base", [0, 1]), (0, [0, 1])], "parameters": {"t": 0.2}},
                                {"sources": [("base", [1, 3]), (0, [1, 3])]}]},
    "ties slices": {"method": "ties", "top": {"normalize": True, "density": 0.6, "weight": 1.0}, "required": ("weight",),
                    "slices": [{"sources": [("base", [0, 2]), (0, [0, 2], {"weight": 1.0, "density": 0.5}),
                                            (1, [0, 2], {"weight": 0.7})], "parameters": {"density": 0.3}},
                               {"sources": [("base", [2, 3]), (1, [2, 3], {"weight": 0.4}), (2, [2, 3])]}]},
    "sce": {"models": [{} for _ in WEIGHTS], "top": {"select_topk": 0.5, "int8_mask": True}},
    "arcee_fusion": {"models": None, "top": {}, "mergekit_writes": {"bfloat16": "float32"}},
    "nearswap": {"models": None, "top": {"t": 0.005}, "required": ("t",)},
    # epsilon 0.005 on the MLPs: entries changed by none, one or several experts; mergekit's 1e-5 elsewhere
    "ram": {"models": [{} for _ in WEIGHTS], "top": {"epsilon": RAM_EPSILON}},
    "ramplus_tl": {"models": [{} for _ in WEIGHTS], "top": {"r": 0.5, "alpha": 0.5, "epsilon": RAM_EPSILON},
                   "mergekit_writes": {"bfloat16": "float32"}},
    # vocabularies that differ (make_vocabulary_family): the union, a model's tokenizer, the `tokenizer:` block with
    # per-token sources, `force` and padding (its padding rows tie exactly: task arithmetic, not TIES' top-k)
    "ties union": {"method": "ties", "models": [{"weight": w, "density": 0.5} for w in WEIGHTS],
                   "top": {"normalize": True}, "vocabulary": {"tokenizer_source": "union"}},
    "linear model's tokenizer": {"method": "linear", "models": [{"weight": w} for w in WEIGHTS], "top": {},
                                 "base": False, "vocabulary": {"tokenizer_source": "@0"}},
    "task_arithmetic tokenizer block": {
        "method": "task_arithmetic", "models": [{"weight": w} for w in WEIGHTS], "top": {"lambda": 0.9},
        "vocabulary": {"tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
            "w_new": {"source": {"kind": "model_token", "model": "@1", "token": "w6"}},
            "w7": {"source": "@2", "force": True}, "<new>": {"source": {"kind": "zero"}}}}}},
}
METHODS["ties slices union"] = {**METHODS["ties slices"], "vocabulary": {"tokenizer_source": "union"}}
VOCABULARIES = "f32, vocabularies differ"


@dataclass(frozen=True)
class Variant:
    """How a method is run: which inputs, the YAML's dtype/out_dtype, and whether the gate applies."""

    label: str
    family: str
    dtype: str
    out_dtype: str | None = None
    defaults: bool = False  # only weight, density and required parameters: everything else is each tool's default
    sampled: bool = False  # the random methods below density 1 (their `sampled` models), seeded
    rng: str | None = None  # `distmerge: rng`
    on_request: bool = False  # only for the cases that list it under `extra_variants`

    @property
    def gated(self) -> bool:
        """Float32 inputs must give identical bytes or round-off (a sampled case with distmerge's own draws: the
        same statistics within sampling error)."""
        return self.family.startswith("f32")

    @property
    def statistical(self) -> bool:
        """Different random draws: compared by the kept share and the norm of the merged task vector."""
        return self.sampled and self.rng != "mergekit"


VARIANTS = (
    Variant("f32", "f32-single", "float32"),
    Variant("f32 sharded", "f32-sharded", "float32"),
    Variant(f"f32, task vectors x{SMALL_SCALE}", "f32-small", "float32"),
    Variant("bf16 in, f32 compute", "bf16-single", "float32"),
    Variant("bf16 sharded in, f32 compute, bf16 out", "bf16-sharded", "float32", out_dtype="bfloat16"),
    Variant("bf16 in, dtype bf16", "bf16-single", "bfloat16"),
    Variant("f32, mergekit defaults", "f32-single", "float32", defaults=True),
    Variant("f32, mergekit defaults, density < 1", "f32-single", "float32", defaults=True, sampled=True),
    Variant("f32, mergekit defaults, density < 1, rng: mergekit", "f32-single", "float32", defaults=True,
            sampled=True, rng="mergekit"),
    Variant(f"f32, task vectors x{SMALL_SCALE}, dtype float64", "f32-small", "float64", on_request=True),
    Variant(VOCABULARIES, "f32-vocab", "float32", on_request=True),  # only, and always, for the `vocabulary` cases
)


@dataclass(frozen=True)
class Case:
    method: str
    variant: Variant

    @property
    def gated(self) -> bool:
        """The run fails when this case is neither identical nor round-off."""
        return self.variant.gated and self.variant.label not in METHODS[self.method].get("ungated", {})

    @property
    def slug(self) -> str:
        label = self.variant.label
        for old, new in ((",", ""), (":", ""), (" < ", "_below_"), (" ", "_")):
            label = label.replace(old, new)
        return f"{self.method}__{label}"

    @property
    def mergekit_arguments(self) -> list[str]:
        """What mergekit-yaml needs besides the YAML: the seed of the random cases."""
        return ["--random-seed", str(SEED)] if self.variant.sampled else []

    @property
    def mergekit_writes(self) -> str | None:
        """The dtype mergekit writes instead of the YAML's `dtype` in this case, where METHODS records one."""
        if self.variant.out_dtype:
            return None
        return METHODS[self.method].get("mergekit_writes", {}).get(self.variant.dtype)


def cases_for(methods: list[str]) -> list[Case]:
    """Every variant of every case; the variants below density 1 only for the random methods, on-request ones
    where asked for."""
    def runs(method: str, variant: Variant) -> bool:
        spec = METHODS[method]
        if "vocabulary" in spec or variant.label == VOCABULARIES:
            return "vocabulary" in spec and variant.label == VOCABULARIES
        return ((not variant.sampled or "sampled" in spec)
                and (not variant.on_request or variant.label in spec.get("extra_variants", ())))

    return [Case(method, variant) for method in methods for variant in VARIANTS if runs(method, variant)]


def mergekit_config(case: Case, family: Family) -> dict:
    """The YAML document a mergekit user would write for this case."""
    spec, variant = METHODS[case.method], case.variant
    doc: dict = {"merge_method": spec.get("method", case.method)}
    if spec.get("base", True):
        doc["base_model"] = family.base
    models = spec["sampled"] if variant.sampled else spec.get("models")
    parameters = dict(spec["top"])
    if variant.defaults:
        models = models and [{k: v for k, v in m.items() if k in ("weight", "density")} for m in models]
        parameters = {k: v for k, v in parameters.items() if k in spec.get("required", ())}
    if "slices" in spec:
        doc["slices"] = mergekit_slices(spec["slices"], family)
    elif models is None:  # the base and one other model
        doc["models"] = [{"model": family.base}, {"model": family.experts[0]}]
    else:
        doc["models"] = [{"model": family.base}] if spec.get("base_listed") else []
        doc["models"] += [{"model": path, **({"parameters": params} if params else {})}
                          for path, params in zip(family.experts, models)]
    if parameters:
        doc["parameters"] = parameters
    doc["dtype"] = variant.dtype
    if variant.out_dtype:
        doc["out_dtype"] = variant.out_dtype
    if "vocabulary" in spec:
        doc.update(with_experts(spec["vocabulary"], family))
    if variant.sampled:  # mergekit ignores this block; it gets the seed as --random-seed
        doc["distmerge"] = {"seed": SEED, **({"rng": variant.rng} if variant.rng else {})}
    return doc


def with_experts(value, family: Family):
    """`value` with every "@N" replaced by expert N's path."""
    if isinstance(value, dict):
        return {with_experts(k, family): with_experts(v, family) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("@") and value[1:].isdigit():
        return family.experts[int(value[1:])]
    return value


def mergekit_slices(slices: list[dict], family: Family) -> list[dict]:
    """`slices:` from (model, layer_range[, parameters]) sources, the model "base" or an expert's index."""
    def source(model, layer_range, parameters=None) -> dict:
        path = family.base if model == "base" else family.experts[model]
        return {"model": path, "layer_range": layer_range, **({"parameters": parameters} if parameters else {})}

    return [{"sources": [source(*entry) for entry in s["sources"]],
             **({"parameters": s["parameters"]} if "parameters" in s else {})} for s in slices]


def write_configs(cases: list[Case], families: dict[str, Family], work: Path) -> dict[Case, Path]:
    import yaml

    directory = work / "configs"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        path = directory / f"{case.slug}.yaml"
        path.write_text(yaml.safe_dump(mergekit_config(case, families[case.variant.family]), sort_keys=False))
        paths[case] = path
    return paths
