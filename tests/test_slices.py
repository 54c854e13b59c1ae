"""`slices:` as mergekit reads them. A frankenmerge stacks layer ranges of several models into a deeper model
whose config says so and which transformers loads; each slice merges its own ranges with its own parameters,
gradients running over the slice's layers; a source's parameters rank above its slice's, which rank above the
top level. Checked against the inputs themselves and the NumPy references; mergekit's own bytes are compared in
benchmarks/compare_mergekit.py (its slice cases)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import reference as ref
from conftest import assert_user_error, run_cli

from distmerge.architecture import llama_config
from distmerge.config import load_config
from distmerge.plan import build_plan
from distmerge.synthetic import make_family

THREE_LAYERS = llama_config(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, vocab=64)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """A 3-layer base and three experts, float32; the base's config carries a per-layer list."""
    family = make_family(tmp_path_factory.mktemp("slices"), n_experts=3, config=THREE_LAYERS, dtype=torch.float32)
    for path in [family["base"], *family["experts"]]:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"] * 3}))
    return family


def write(tmp_path: Path, doc: dict, name: str = "cfg.yaml") -> Path:
    (tmp_path / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / name


def source(path, first: int, end: int, **parameters) -> dict:
    return {"model": str(path), "layer_range": [first, end], **({"parameters": parameters} if parameters else {})}


def test_a_frankenmerge_stacks_layer_ranges_into_a_deeper_model(tmp_path, family):
    e1, e2 = family["experts"][:2]
    cfg = write(tmp_path, {"merge_method": "passthrough", "dtype": "float32",
                           "slices": [{"sources": [source(e1, 0, 2)]}, {"sources": [source(e2, 1, 3)]}]})
    run_cli("merge", cfg, tmp_path / "out", "--quiet")
    out, first, second = tensors(tmp_path / "out"), tensors(e1), tensors(e2)
    where = {0: (first, 0), 1: (first, 1), 2: (second, 1), 3: (second, 2)}  # output layer -> (input, its layer)
    for name, tensor in out.items():
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if layer is None:  # embeddings from the first slice's model, the final norm and head from the last's
            expected = (first if "embed" in name else second)[name]
        else:
            model, source_layer = where[layer]
            expected = model[name.replace(f"layers.{layer}.", f"layers.{source_layer}.")]
        assert torch.equal(tensor, expected), name
    assert {n for n in out if "layers." in n} == {n.replace("layers.0.", f"layers.{i}.") for i in range(4)
                                                   for n in first if "layers.0." in n}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["layer_types"] == ["full_attention"] * 4
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and len(model.model.layers) == 4


def test_slerp_per_layer_range_takes_each_slices_own_t(tmp_path, family):
    """Slice 0 (layer 0) at t = 0.2; slice 1 (layers 1-2) along the top-level gradient [0, 1] over its own two
    layers: layer 1 at t = 0 (the base), layer 2 at t = 1 (the expert)."""
    base, e1 = family["base"], family["experts"][0]
    cfg = write(tmp_path, {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": [0.0, 1.0]},
                           "slices": [{"sources": [source(base, 0, 1), source(e1, 0, 1)], "parameters": {"t": 0.2}},
                                      {"sources": [source(base, 1, 3), source(e1, 1, 3)]}]})
    run_cli("merge", cfg, tmp_path / "out", "--quiet")
    out, b, x = tensors(tmp_path / "out"), tensors(base), tensors(e1)
    name = "model.layers.{}.mlp.down_proj.weight"
    np.testing.assert_allclose(out[name.format(0)].numpy(), ref.slerp(b[name.format(0)], x[name.format(0)], 0.2)[0],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(out[name.format(1)], b[name.format(1)]) and torch.equal(out[name.format(2)], x[name.format(2)])
    # outside the layers: the first slice's settings (t = 0.2) for the embeddings, the last slice's (t = 0) after
    np.testing.assert_allclose(out["model.embed_tokens.weight"].numpy(),
                               ref.slerp(b["model.embed_tokens.weight"], x["model.embed_tokens.weight"], 0.2)[0],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])


def test_a_sources_parameters_rank_above_its_slices_above_the_top_level(tmp_path, family):
    base, (e1, e2, e3) = family["base"], family["experts"]
    cfg = write(tmp_path, {
        "merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.9, "lambda": 0.5},
        "slices": [{"sources": [source(base, 0, 2), source(e1, 0, 2, density=0.2), source(e2, 0, 2)],
                    "parameters": {"density": [0.4, 0.6]}},
                   {"sources": [source(base, 2, 3), source(e2, 2, 3), source(e3, 2, 3, weight=0.5)],
                    "parameters": {"lambda": 0.8}}]})
    plan = build_plan(load_config(cfg))
    params = {job.name: job.params for job in plan.tensors}
    layer = "model.layers.{}.self_attn.q_proj.weight"
    assert params[layer.format(0)]["density"] == [0.2, 0.4] and params[layer.format(1)]["density"] == [0.2, 0.6]
    assert params[layer.format(0)]["lambda"] == 0.5
    assert params[layer.format(2)]["density"] == [0.9, 0.9] and params[layer.format(2)]["weight"] == [1.0, 0.5]
    assert params[layer.format(2)]["lambda"] == 0.8
    run_cli("merge", cfg, tmp_path / "out", "--quiet")
    out, b = tensors(tmp_path / "out"), tensors(base)
    x = [tensors(p) for p in (e1, e2, e3)]
    np.testing.assert_allclose(
        out[layer.format(2)].numpy(),
        ref.ties(b[layer.format(2)], [x[1][layer.format(2)], x[2][layer.format(2)]], weights=[1.0, 0.5],
                 density=0.9, lam=0.8, aggregate="mean"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(  # output layer 1 is slice 0's second layer: layer 1 of e1 and e2
        out[layer.format(1)].numpy(),
        ref.ties(b[layer.format(1)], [x[0][layer.format(1)], x[1][layer.format(1)]], density=[0.2, 0.6], lam=0.5,
                 aggregate="mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("edit, fragments", [
    (lambda d: d["slices"][0]["sources"].__setitem__(1, source("{e1}", 0, 1)),
     ["slices[0]", "the same number of layers"]),
    (lambda d: [s.__setitem__("layer_range", [2, 4]) for s in d["slices"][1]["sources"]],
     ["layer_range [2, 4]", "runs past its 3 layers"]),
    (lambda d: d.__setitem__("models", [{"model": "{e1}"}]), ["either `models`", "not both"]),
    (lambda d: d["slices"][0].__setitem__("merge_method", "ties"), ["slices[0].merge_method", "set `merge_method` once"]),
    (lambda d: d["slices"][1]["sources"].pop(), ["slices[1]", "0 model(s) besides its base"]),
    (lambda d: d["slices"][1]["sources"].append(source("{e2}", 2, 3)),
     ["slices[1]` gives 2 model(s)", "`slices[0]` 1"]),
    (lambda d: d["slices"][1]["sources"].pop(0), ["slices[1]", "base model", "not among its sources"]),
    (lambda d: d["slices"][0]["sources"][0].__setitem__("layer_range", [2, 1]), ["layer_range: [2, 1]"]),
    (lambda d: d["slices"][0]["sources"][1].__setitem__("parameters", {"lambda": 2}),
     ["`lambda` is set once", "slices[0].sources[1].parameters"]),
])
def test_a_bad_slice_is_one_error_before_any_work(tmp_path, family, edit, fragments):
    doc = {"merge_method": "task_arithmetic", "base_model": "{base}",
           "slices": [{"sources": [source("{base}", 0, 2), source("{e1}", 0, 2)]},
                      {"sources": [source("{base}", 2, 3), source("{e1}", 2, 3)]}]}
    edit(doc)
    text = yaml.safe_dump(doc).replace("'{base}'", str(family["base"])).replace("'{e1}'", str(family["experts"][0]))
    text = text.replace("'{e2}'", str(family["experts"][1]))
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert_user_error(run_cli("merge", cfg, tmp_path / "out", check=False), *fragments)
    assert not (tmp_path / "out").exists()
