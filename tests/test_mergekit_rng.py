"""`distmerge: {rng: mergekit}`: DARE and DELLA draw what `mergekit-yaml --random-seed N` draws.

The reference is mergekit's procedure written from its description (docs/methods.md, Random draws): torch's CPU
generator seeded with N, the tensors taken in the order of their names, and for each one torch.bernoulli called
once per model whose density is below 1. The `peers` test runs mergekit 0.1.5 itself (its scratch venv) and
compares the bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import reference as ref
from conftest import TINY, assert_user_error, run_cli, write_config

from distmerge.config import parse_config
from distmerge.methods import TensorContext, get_method, sampling
from distmerge.synthetic import make_family

REPO = Path(__file__).resolve().parents[1]


def bernoulli_masks_as_mergekit(seed: int, tensors: dict[str, tuple], densities: list[float]) -> dict:
    """{name: [mask per model with density < 1]}: torch's generator seeded once, tensors in name order."""
    generator = torch.Generator().manual_seed(seed)
    return {name: [torch.bernoulli(torch.full(shape, d), generator=generator).bool() for d in densities if d < 1]
            for name, shape in sorted(tensors.items())}


def mergekit_context(name: str, state: bytes | None, n_models: int) -> TensorContext:
    return TensorContext(name, seed=0, model_ids=tuple(range(n_models)), rng="mergekit", draw_state=state)


@pytest.mark.parametrize("skip_chunk", [sampling._MERGEKIT_SKIP_CHUNK, 7])
def test_generator_states_continue_one_seeded_stream_in_name_order(monkeypatch, skip_chunk):
    """Each tensor's state is where mergekit's stream stands when it reaches that tensor, whatever order the tensors
    are listed in, and however the generator is advanced (in steps of 7 draws, too)."""
    monkeypatch.setattr(sampling, "_MERGEKIT_SKIP_CHUNK", skip_chunk)
    tensors = {"model.layers.1.mlp.w": (3, 5), "lm_head.weight": (4, 6), "model.norm.weight": (9,),
               "model.layers.0.mlp.w": (2, 8)}
    densities = [0.5, 1.0, 0.3]
    drawing = sum(d < 1 for d in densities)
    draws = {name: int(np.prod(shape)) * drawing for name, shape in tensors.items()}
    draws["model.embed_tokens.weight"] = 0  # a tensor that draws nothing gets no state
    states = sampling.mergekit_generator_states(11, draws)
    assert set(states) == set(tensors)
    want = bernoulli_masks_as_mergekit(11, tensors, densities)
    for name, shape in tensors.items():
        ctx = mergekit_context(name, states[name], len(densities))
        got = [ctx.uniform(t, shape, torch.device("cpu")) < d for t, d in enumerate(densities) if d < 1]
        assert all(torch.equal(g, w) for g, w in zip(got, want[name])), name


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_methods_with_mergekit_draws_match_the_reference(method):
    """A lone tensor, so its state is the freshly seeded generator: the reference gets torch.bernoulli's masks
    (DARE) or the uniforms torch.bernoulli compares with (DELLA: kept where draw < p), in model order."""
    shape, densities, weights = (6, 10), [0.5, 0.3, 0.7], [1.0, 0.7, 0.4]
    gen = np.random.default_rng(zlib.crc32(method.encode()))
    base = gen.integers(-8, 9, size=shape) / 4.0
    models = [base + np.round(gen.standard_normal(shape) * 2**16) / 2**16 for _ in densities]
    state = sampling.mergekit_generator_states(3, {"w": 1})["w"]
    spec = get_method(method)
    p = spec.defaults(3, density=densities, weight=weights)
    stacked = torch.tensor(np.stack(models), dtype=torch.float32)
    got = spec.fn(torch.tensor(base, dtype=torch.float32), stacked, p, mergekit_context("w", state, 3))
    generator = torch.Generator().manual_seed(3)
    if method.startswith("dare"):
        masks = [torch.bernoulli(torch.full(shape, d), generator=generator).bool().numpy() for d in densities]
        fn = ref.dare_linear if method == "dare_linear" else ref.dare_ties
        want = fn(base, models, masks, weights, densities, 1.0, p["rescale"], p["aggregate"])
    else:
        draws = [torch.rand(shape, generator=generator).double().numpy() for _ in densities]
        fn = ref.della if method == "della" else ref.della_linear
        want = fn(base, models, draws, weights, densities, p["epsilon"], 1.0, p["rescale"], p["aggregate"])
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_rng_is_parsed_checked_and_fingerprinted():
    text = "merge_method: dare_ties\nbase_model: b\nmodels: [{model: m}]\n"
    default, mergekit = parse_config(text), parse_config(text + "distmerge: {rng: mergekit}\n")
    assert default.engine.rng == "distmerge" and mergekit.engine.rng == "mergekit"
    assert default.fingerprint() != mergekit.fingerprint()
    with pytest.raises(Exception, match=r"distmerge.rng.*distmerge, mergekit"):
        parse_config(text + "distmerge: {rng: numpy}\n")


def test_mergekit_draws_do_not_depend_on_the_shard_layout(tmp_path, family_fp32_single):
    """Many small shards (merged largest first) give the bytes of one shard: each tensor starts from its state."""
    models = [{"model": str(p), "parameters": {"density": d}} for p, d in zip(family_fp32_single["experts"],
                                                                              (0.5, 0.3, 0.7))]
    cfg = write_config(tmp_path / "dare.yaml", "dare_ties", family_fp32_single, models=models,
                       distmerge={"seed": 4, "rng": "mergekit"})
    outputs = {}
    for label, extra in (("one", []), ("many", ["--shard-size", "3KB"]), ("seed", ["--seed", "5"])):
        run_cli("merge", cfg, "-o", tmp_path / label, "--quiet", *extra)
        outputs[label] = read_all(tmp_path / label)
    assert all(torch.equal(outputs["one"][k], outputs["many"][k]) for k in outputs["one"])
    assert any(not torch.equal(outputs["one"][k], outputs["seed"][k]) for k in outputs["one"])


def test_mergekit_draws_are_refused_where_the_drawing_tensors_differ(tmp_path):
    """An lm_head.weight saved although the config ties it to the embedding is not merged here (the loader re-ties
    it); which tensors draw, and so mergekit's stream, would not line up."""
    family = make_family(tmp_path / "tied", n_experts=2, config=TINY)
    for directory in [family["base"], *family["experts"]]:
        config = json.loads((Path(directory) / "config.json").read_text())
        (Path(directory) / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    models = [{"model": str(p), "parameters": {"density": 0.5}} for p in family["experts"]]
    cfg = write_config(tmp_path / "dare.yaml", "dare_ties", family, models=models, distmerge={"rng": "mergekit"})
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "rng: mergekit", "lm_head.weight")


def read_all(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.peers
def test_mergekit_rng_gives_mergekits_bytes(tmp_path):
    """The same YAML through `mergekit-yaml --random-seed 5` (0.1.5, its scratch venv) and distmerge with
    `rng: mergekit`, density below 1: every tensor has the same bytes. Another seed in mergekit changes them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from peers.venvs import MERGEKIT, ensure_peer_venv

    peer_python, _ = ensure_peer_venv(MERGEKIT)
    family = make_family(tmp_path / "family", n_experts=3, config=TINY, dtype=torch.float32)
    for method in ("dare_ties", "della", "dare_linear", "della_linear"):
        doc = {"merge_method": method, "base_model": str(family["base"]),
               "models": [{"model": str(path), "parameters": {"weight": w, "density": d}}
                          for path, w, d in zip(family["experts"], (1.0, 0.7, 0.4), (0.5, 0.3, 0.7))],
               "dtype": "float32", "distmerge": {"seed": 5, "rng": "mergekit"}}
        cfg = tmp_path / f"{method}.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))  # mergekit ignores the `distmerge:` block
        for seed in (5, 6):
            subprocess.run([str(peer_python.parent / "mergekit-yaml"), str(cfg), str(tmp_path / f"mk-{method}-{seed}"),
                            "--random-seed", str(seed), "--no-lazy-unpickle", "--quiet", "--no-write-model-card"],
                           check=True, capture_output=True, timeout=600)
        run_cli("merge", cfg, "-o", tmp_path / f"dm-{method}", "--quiet")
        ours, theirs = read_all(tmp_path / f"dm-{method}"), read_all(tmp_path / f"mk-{method}-5")
        assert set(ours) == set(theirs)
        differing = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
        assert not differing, f"{method}: {len(differing)} tensors differ from mergekit's, e.g. {differing[0]}"
        other_seed = read_all(tmp_path / f"mk-{method}-6")
        assert any(not torch.equal(ours[name], other_seed[name]) for name in theirs), method
