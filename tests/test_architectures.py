"""The architectures distmerge merges, each as a tiny random model built with transformers: a base and two
fine-tunes (perturbed copies), merged with ties and rtsvm, and loaded back with transformers.

Every family must come back with no missing, unexpected or mismatched keys, its tied weights still tied and its
`config.json` architecture kept; ties' output must equal the NumPy reference tensor by tensor (as stored); and
`distmerge plan` must plan the same tensors from config.json alone as from the weights. Mixture-of-experts families
come in both layouts transformers reads: one matrix per expert (what `save_pretrained` writes, as the published
checkpoints are) and the fused 3-D tensors transformers 5 holds in memory (`save_original_format=False`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reference as ref  # noqa: E402
import reference_spectral as ref_spectral  # noqa: E402
from conftest import assert_user_error, run_cli, write_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_plan_work import CASES, assert_the_plan_declares_what_the_merge_runs  # noqa: E402

from distmerge.architecture import llama_tensor_shapes  # noqa: E402
from distmerge.checkpoint import Checkpoint, TensorInfo  # noqa: E402
from distmerge.config import load_config  # noqa: E402
from distmerge.estimates import describe, svd_count  # noqa: E402
from distmerge.moe_layout import model_layout_view  # noqa: E402
from distmerge.plan import build_plan  # noqa: E402
from distmerge.report import read_report  # noqa: E402
from distmerge.synthetic import write_tokenizer  # noqa: E402

ATTENTION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, vocab_size=64, max_position_embeddings=64)
MOE = dict(ATTENTION, moe_intermediate_size=8, num_experts_per_tok=2)

# family -> (architecture, model_type, config); every model as small as its config allows
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama", ATTENTION),
    "mistral": ("MistralForCausalLM", "mistral", ATTENTION),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", ATTENTION),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", ATTENTION),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", ATTENTION),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", ATTENTION),
    "phi3": ("Phi3ForCausalLM", "phi3", dict(ATTENTION, pad_token_id=0)),
    "gpt2": ("GPT2LMHeadModel", "gpt2", dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=64)),
    "bert": ("BertForMaskedLM", "bert", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, vocab_size=64, max_position_embeddings=64)),
    "mixtral": ("MixtralForCausalLM", "mixtral", dict(ATTENTION, intermediate_size=8, num_local_experts=4,
                                                      num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe", dict(MOE, num_experts=4, shared_expert_intermediate_size=8)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(MOE, num_experts=4)),
    # layer 0 dense, layer 1 routed experts plus a shared one, multi-head latent attention
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3", dict(
        MOE, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
        topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
# what the tests run on: every family as save_pretrained writes it, and the MoE families fused as well
CHECKPOINTS = list(FAMILIES) + [f"{family}:fused" for family in MOE_FAMILIES]


def build_model(family: str):
    architecture, model_type, config = FAMILIES[family]
    hf_config = transformers.AutoConfig.for_model(model_type, architectures=[architecture], **config)
    torch.manual_seed(0)
    return getattr(transformers, architecture)(hf_config).eval()


def fine_tune(model, seed: int):
    """A perturbed copy: every parameter (a tied one once) moved by noise of 1% of its scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = float(parameter.abs().mean()) or 1.0
            parameter.add_(0.01 * scale * torch.randn(parameter.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint name -> {"base": dir, "experts": [dir, dir]}, written once for the whole module."""
    root = tmp_path_factory.mktemp("architectures")
    written = {}
    for family in FAMILIES:
        models = [build_model(family)] + [fine_tune(build_model(family), seed) for seed in (1, 2)]
        layouts = {family: True}
        if family in MOE_FAMILIES:
            layouts[f"{family}:fused"] = False
        for name, original_format in layouts.items():
            dirs = [root / name.replace(":", "-") / role for role in ("base", "expert1", "expert2")]
            for model, path in zip(models, dirs):
                model.save_pretrained(path, save_original_format=original_format)
                write_tokenizer(path, model.config.vocab_size)  # mergekit copies the base model's
            written[name] = {"base": dirs[0], "experts": dirs[1:]}
    return written


def stored(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def load_merged(path: Path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(path, output_loading_info=True)
    return model, info


PARAMETERS = {"ties": {"density": 0.5}, "rtsvm": {}}


@pytest.fixture(scope="module")
def merged(checkpoints, tmp_path_factory):
    """merged(checkpoint, method): the output directory of that merge (with PARAMETERS), merged on first use."""
    root = tmp_path_factory.mktemp("merged")
    outputs = {}

    def get(name: str, method: str) -> Path:
        if (name, method) not in outputs:
            out = root / f"{name.replace(':', '-')}-{method}"
            cfg = write_config(root / f"{out.name}.yaml", method, checkpoints[name], parameters=PARAMETERS[method])
            run_cli("merge", cfg, "-o", out, "--quiet")
            outputs[name, method] = out
        return outputs[name, method]

    return get


@pytest.mark.parametrize("method", sorted(PARAMETERS))
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_merged_model_loads_with_transformers(name, method, checkpoints, merged):
    out = merged(name, method)
    model, info = load_merged(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    base_config = json.loads((checkpoints[name]["base"] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["architectures"] == base_config["architectures"]
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert set(stored(out)) == set(stored(checkpoints[name]["base"]))  # the layout it was given
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_ties_merges_every_tensor_as_transformers_holds_it(name, checkpoints, merged):
    """Each tensor of the model as transformers loads it against the NumPy reference on the inputs loaded the
    same way: a fused [experts, rows, cols] expert tensor is trimmed as a whole, as mergekit trims it, in both
    layouts (transformers fuses a checkpoint stored one matrix per expert when it loads it)."""
    def weights(path: Path) -> dict[str, torch.Tensor]:
        return {key: value for key, value in load_merged(path)[0].state_dict().items() if value.is_floating_point()}

    out = weights(merged(name, "ties"))
    base = weights(checkpoints[name]["base"])
    experts = [weights(path) for path in checkpoints[name]["experts"]]
    assert set(out) == set(base)
    for tensor, value in out.items():
        expected = ref.ties(base[tensor], [e[tensor] for e in experts], density=0.5)
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=0, atol=1e-6, err_msg=tensor)


def test_tsvm_decomposes_each_matrix_of_a_fused_expert_tensor(checkpoints, tmp_path):
    """A fused [experts, rows, cols] tensor is merged matrix by matrix (the reference on each), and `distmerge
    plan` declares one set of SVDs per expert matrix (that the merge runs them is
    test_the_plan_declares_what_the_merge_runs_on_stacks_and_conv1d)."""
    family = checkpoints["mixtral:fused"]
    cfg = write_config(tmp_path / "cfg.yaml", "tsvm", family, parameters={"svd": "gram"})
    base = stored(family["base"])
    matrices = sum(t.shape[0] if t.dim() == 3 else 1 for t in base.values() if t.dim() >= 2)
    assert svd_count(build_plan(load_config(cfg))) == 2 * matrices  # two tasks: one SVD each per matrix
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")

    out = stored(tmp_path / "out")
    experts = [stored(path) for path in family["experts"]]
    fused = [name for name, t in base.items() if t.dim() == 3]
    assert fused, "the fused layout has 3-D expert tensors"
    for name in fused:
        b = base[name].double().numpy()
        for e in range(b.shape[0]):
            deltas = [x[name][e].double().numpy() - b[e] for x in experts]
            expected = ref_spectral.tsvm(b[e], deltas)
            np.testing.assert_allclose(out[name][e].double().numpy(), expected, rtol=0, atol=2e-6,
                                       err_msg=f"{name}[{e}]")


LAYOUT_METHODS = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "tsvm": {}, "rtsvm": {},
                  "model_stock": {}}


@pytest.mark.parametrize("method", sorted(LAYOUT_METHODS))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_both_layouts_of_a_model_merge_to_the_same_model(family, method, checkpoints, tmp_path):
    """A checkpoint stored one matrix per expert is read as transformers 5 loads it (experts fused, Mixtral's
    `block_sparse_moe` named `mlp`) and written back as stored: the same tensors to merge, under the same names
    (parameters and random streams follow the names), as the fused layout of the same model, so the merged models
    are the same, bit for bit, as transformers loads them."""
    merged, names = {}, {}
    for name in (family, f"{family}:fused"):
        cfg = write_config(tmp_path / f"{name.replace(':', '-')}.yaml", method, checkpoints[name],
                           parameters=LAYOUT_METHODS[method])
        names[name] = [job.name for job in build_plan(load_config(cfg)).tensors]
        run_cli("merge", cfg, "-o", tmp_path / name.replace(":", "-"), "--quiet")
        merged[name] = load_merged(tmp_path / name.replace(":", "-"))[0].state_dict()
    assert names[family] == names[f"{family}:fused"]
    per_expert, fused = merged[family], merged[f"{family}:fused"]
    assert set(per_expert) == set(fused)
    assert [key for key in fused if not torch.equal(per_expert[key], fused[key])] == []


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_written_as_their_matrices_merge_in_blocks_of_experts(family, checkpoints, tmp_path,
                                                                             monkeypatch):
    """A fused expert tensor written back as one matrix per expert is cut into row blocks like any blockwise tensor
    (on a CPU, and under a memory budget): its rows are experts, and each block writes its experts' matrices in
    the stored order, with the bytes of the whole tensor."""
    from distmerge import engine

    cfg = write_config(tmp_path / "dare.yaml", "dare_ties", checkpoints[family],
                       parameters={"density": 0.5, "rescale": "inverse"})
    fused = {job.name: job for job in build_plan(load_config(cfg)).tensors
             if job.parts and job.parts[0].expert is not None}
    assert fused and all(job.blockwise for job in fused.values())
    monkeypatch.setattr(engine, "CPU_BLOCK_ENTRIES", 2**62)
    run_cli("merge", cfg, "-o", tmp_path / "whole", "--quiet")

    blocks = []
    merge_tensor = engine.merge_tensor

    def recording_merge_tensor(plan, job, device, inputs, first_pass=None, rows=None):
        blocks.append((job.name, rows))
        return merge_tensor(plan, job, device, inputs, first_pass, rows)

    monkeypatch.setattr(engine, "merge_tensor", recording_merge_tensor)
    monkeypatch.setattr(engine, "CPU_BLOCK_ENTRIES", 1)  # one row per block: one expert of a fused tensor
    run_cli("merge", cfg, "-o", tmp_path / "blocks", "--quiet")
    for name, job in fused.items():
        assert [rows for merged, rows in blocks if merged == name] == [(e, e + 1) for e in range(job.shape[0])]
    shards = {out: {p.name: p.read_bytes() for p in sorted((tmp_path / out).glob("*.safetensors"))}
              for out in ("whole", "blocks")}
    assert shards["blocks"] == shards["whole"]


def test_the_report_names_the_fused_tensor_of_each_stored_expert_matrix(checkpoints, merged):
    rows = {row["tensor"]: row for row in read_report(merged("mixtral", "ties"))[0]}
    stored_names = set(stored(checkpoints["mixtral"]["base"]))
    assert set(rows) == stored_names  # one row per tensor written
    assert rows["model.layers.1.block_sparse_moe.experts.3.w3.weight"]["merged_as"] == \
        "model.layers.1.mlp.experts.gate_up_proj"
    assert rows["model.layers.1.block_sparse_moe.gate.weight"]["merged_as"] == "model.layers.1.mlp.gate.weight"
    assert rows["model.layers.1.self_attn.q_proj.weight"].get("merged_as") is None


def test_mergekit_draws_are_refused_on_a_converted_layout(checkpoints, tmp_path):
    cfg = write_config(tmp_path / "dare.yaml", "dare_ties", checkpoints["qwen3_moe"], parameters={"density": 0.5},
                       distmerge={"rng": "mergekit"})
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "rng: mergekit",
                      str(checkpoints["qwen3_moe"]["base"]), "model.layers.0.mlp.experts.0.down_proj.weight",
                      "model.layers.0.mlp.experts.down_proj")
    assert not (tmp_path / "out").exists()


def test_fused_experts_merge_beside_a_padded_vocabulary_and_in_slices(checkpoints, tmp_path):
    """The layout view composes with the other views of an input: a vocabulary padded to 128 rows (the vocabulary
    tensors change, the experts do not) and a merge of `slices:` (the same layers, named through the slices)."""
    family = checkpoints["mixtral"]
    plain = write_config(tmp_path / "plain.yaml", "ties", family, parameters={"density": 0.5})
    padded = write_config(tmp_path / "padded.yaml", "ties", family, parameters={"density": 0.5},
                          tokenizer={"source": "base", "pad_to_multiple_of": 128})
    sources = [{"model": str(m), "layer_range": [0, 2], **({"parameters": {"density": 0.5}} if m != family["base"]
                                                            else {})} for m in [family["base"], *family["experts"]]]
    sliced = tmp_path / "sliced.yaml"
    sliced.write_text(json.dumps({"merge_method": "ties", "base_model": str(family["base"]),
                                  "slices": [{"sources": sources}]}))  # JSON is YAML
    outputs = {}
    for cfg in (plain, padded, sliced):
        run_cli("merge", cfg, "-o", tmp_path / cfg.stem, "--quiet")
        model, info = load_merged(tmp_path / cfg.stem)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], cfg.stem
        outputs[cfg.stem] = stored(tmp_path / cfg.stem)
    assert outputs["padded"]["model.embed_tokens.weight"].shape[0] == 128
    for name in ("padded", "sliced"):
        assert set(outputs[name]) == set(outputs["plain"])
        for key, value in outputs["plain"].items():
            if "embed_tokens" not in key and "lm_head" not in key:
                assert torch.equal(outputs[name][key], value), (name, key)


def expert_checkpoint(names: dict[str, tuple[int, ...]], model_type: str = "qwen3_moe", dtype: str = "BF16"):
    return Checkpoint("m", Path("/m"), {n: TensorInfo(n, dtype, shape, "/m/x.safetensors") for n, shape in
                                        names.items()}, {"model_type": model_type})


def test_only_complete_groups_of_expert_matrices_are_fused():
    """A layer's experts are fused only when experts 0 .. E-1 all have every matrix, of one dtype and shape;
    otherwise they stay as stored, as does a checkpoint that holds a tensor under a fused name already."""
    layer = "model.layers.0.mlp.experts"
    full = {f"{layer}.{e}.{p}.weight": (4, 6) for e in range(3) for p in ("gate_proj", "up_proj")}
    full |= {f"{layer}.{e}.down_proj.weight": (6, 4) for e in range(3)}
    view = model_layout_view(expert_checkpoint(full))
    assert set(view.tensors) == {f"{layer}.gate_up_proj", f"{layer}.down_proj"}
    assert view.tensors[f"{layer}.gate_up_proj"].shape == (3, 8, 6)
    assert [(p.name, p.expert, p.rows) for p in view.parts[f"{layer}.gate_up_proj"]][:3] == [
        (f"{layer}.0.gate_proj.weight", 0, (0, 4)), (f"{layer}.0.up_proj.weight", 0, (4, 8)),
        (f"{layer}.1.gate_proj.weight", 1, (0, 4))]

    no_up = {n: s for n, s in full.items() if n != f"{layer}.1.up_proj.weight"}
    assert set(model_layout_view(expert_checkpoint(no_up)).tensors) == (set(no_up) - {
        f"{layer}.{e}.down_proj.weight" for e in range(3)}) | {f"{layer}.down_proj"}
    gap = {n: s for n, s in full.items() if ".1." not in n}
    assert model_layout_view(expert_checkpoint(gap)).tensors.keys() == gap.keys()
    odd = dict(full, **{f"{layer}.2.gate_proj.weight": (5, 6)})
    assert f"{layer}.gate_up_proj" not in model_layout_view(expert_checkpoint(odd)).tensors
    both = dict(full, **{f"{layer}.down_proj": (3, 6, 4)})
    plain = expert_checkpoint(both)
    assert model_layout_view(plain) is plain
    dense = expert_checkpoint({"model.layers.0.mlp.down_proj.weight": (6, 4)}, model_type="mixtral")
    assert model_layout_view(dense) is dense


def test_a_fused_tensor_is_read_from_its_expert_matrices(checkpoints):
    """Expert e of the fused view is [gate_e; up_e] (or [w1_e; w3_e]), as transformers stacks them."""
    raw = Checkpoint.open(str(checkpoints["mixtral"]["base"]))
    view = model_layout_view(raw)
    fused = view.read("model.layers.1.mlp.experts.gate_up_proj")
    for e in range(fused.shape[0]):
        expected = torch.cat([raw.read(f"model.layers.1.block_sparse_moe.experts.{e}.w{i}.weight") for i in (1, 3)])
        assert torch.equal(fused[e], expected)
    assert torch.equal(view.read("model.layers.1.mlp.experts.down_proj", rows=(2, 4))[1],
                       raw.read("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    assert torch.equal(view.read("model.layers.1.mlp.gate.weight"),
                       raw.read("model.layers.1.block_sparse_moe.gate.weight"))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["mixtral:fused", "gpt2"])
def test_the_plan_declares_what_the_merge_runs_on_stacks_and_conv1d(name, case, checkpoints, tmp_path, monkeypatch):
    """Every method and backend of test_plan_work, on fused experts (E decompositions per stack) and on GPT-2's
    transposed weights (declared in the orientation they are decomposed)."""
    assert_the_plan_declares_what_the_merge_runs(case, checkpoints[name], tmp_path, monkeypatch)


def test_iso_cts_merges_conv1d_weights_as_out_by_in_matrices(checkpoints, tmp_path):
    """GPT-2 stores its linear layers [in, out]; Iso-CTS is not symmetric in the two sides (the common subspace
    is a left one), so it must see W^T."""
    family = checkpoints["gpt2"]
    cfg = write_config(tmp_path / "cfg.yaml", "iso_cts", family, parameters={"svd": "exact", "polar": "svd"})
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    out, base = stored(tmp_path / "out"), stored(family["base"])
    experts = [stored(path) for path in family["experts"]]
    name = "transformer.h.0.attn.c_attn.weight"
    b = base[name].double().numpy().T
    expected = ref_spectral.iso_cts(b, [x[name].double().numpy().T - b for x in experts])
    np.testing.assert_allclose(out[name].double().numpy().T, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plan_from_config_json_alone(name, checkpoints, tmp_path):
    """Models that have only their config.json are planned with the tensors `save_pretrained` writes (for the
    MoE families one matrix per expert: config.json does not say how a checkpoint not yet downloaded stores
    them, and that is how they are published)."""
    family = checkpoints[name]
    config_only = {}
    for role, path in [("base", family["base"])] + [(f"expert{i}", p) for i, p in enumerate(family["experts"])]:
        (tmp_path / role).mkdir()
        shutil.copy(path / "config.json", tmp_path / role / "config.json")
        config_only[path] = tmp_path / role
    with_weights = load_config(write_config(tmp_path / "real.yaml", "tsvm", family))
    without = load_config(write_config(
        tmp_path / "cfg.yaml", "tsvm", {"base": config_only[family["base"]],
                                         "experts": [config_only[p] for p in family["experts"]]}))
    real, planned = build_plan(with_weights), build_plan(without, config_only=True)
    assert [(t.name, t.shape) for t in planned.tensors] == [(t.name, t.shape) for t in real.tensors]
    assert svd_count(planned) == svd_count(real) > 0
    printed = run_cli("plan", tmp_path / "cfg.yaml").stdout
    assert f"SVDs          {svd_count(real)}" in printed and "derived from config.json" in printed
    assert describe(planned, "cpu").splitlines()[1] == describe(real, "cpu").splitlines()[1]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_llama_table_planning_falls_back_on_agrees_with_transformers(name, checkpoints):
    """Without transformers, config-only plans use distmerge's own table of the Llama family's tensors."""
    config = json.loads((checkpoints[name]["base"] / "config.json").read_text())
    saved = stored(checkpoints[name]["base"])
    assert llama_tensor_shapes(config) == {tensor: tuple(value.shape) for tensor, value in saved.items()}


def test_a_config_transformers_cannot_build_is_one_error(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["Nope"]}))
    cfg = write_config(tmp_path / "cfg.yaml", "ties", models=[{"model": str(tmp_path / "base")}],
                       base=tmp_path / "base")
    assert_user_error(run_cli("plan", cfg, check=False), str(tmp_path / "base"), "'Nope'", "download the weights")


# (label, method, parameters, top-level keys, mergekit-yaml arguments) of the MoE parity cases; weights are given
# because mergekit wants them
MOE_PARITY_CASES = [
    ("ties-0.5", "ties", {"density": 0.5, "weight": 1.0}, {}, []),
    ("ties-1", "ties", {"density": 1.0, "weight": 1.0}, {}, []),
    # mergekit's filters match transformers 5's names: `mlp` takes the experts and the router in every family
    ("ties-filter", "ties", {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}], "weight": 1.0}, {}, []),
    ("dare_ties-mergekit-draws", "dare_ties", {"density": 0.5, "weight": 1.0}, {"distmerge": {"rng": "mergekit"}},
     ["--random-seed", "7"]),
]
FUSED_ONLY = {"dare_ties-mergekit-draws"}  # refused on the per-expert layout: see test_mergekit_draws_need_...


@pytest.mark.peers
def test_moe_merges_match_mergekit_on_every_family_and_layout(checkpoints, tmp_path):
    """mergekit 0.1.5 reads both layouts into transformers 5's fused tensors (its architecture definitions name
    `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`; a per-expert checkpoint is converted on reading with
    transformers' conversion mapping), merges the router like any weight, and writes the fused layout; distmerge
    reads the same way and writes the layout it was given. Every case agrees exactly, trims, filters and DARE's
    draws included: distmerge's output compared as transformers loads it (fused), mergekit's as written. mergekit
    leaves DeepSeek-V3's routed experts out of its output when they are stored one matrix per expert
    (transformers then initialises them at random)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from peers.venvs import MERGEKIT, driver, ensure_peer_venv

    python, _ = ensure_peer_venv(MERGEKIT)
    jobs, outputs = [], {}
    for name in CHECKPOINTS:
        if name.split(":")[0] not in MOE_FAMILIES:
            continue
        for label, method, parameters, top, arguments in MOE_PARITY_CASES:
            if label in FUSED_ONLY and not name.endswith(":fused"):
                continue
            slug = f"{name.replace(':', '-')}-{label}"
            cfg = write_config(tmp_path / f"{slug}.yaml", method, checkpoints[name], dtype="float32",
                               parameters=parameters, **top)
            outputs[name, label] = {tool: tmp_path / tool / slug for tool in ("mergekit", "distmerge")}
            jobs.append([str(cfg), str(outputs[name, label]["mergekit"]), *arguments])
            run_cli("merge", cfg, "-o", outputs[name, label]["distmerge"], "--quiet", *arguments)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([str(python), str(driver("mergekit_batch.py")), str(tmp_path / "jobs.json"),
                    str(tmp_path / "failures.json")], check=True, capture_output=True)
    assert json.loads((tmp_path / "failures.json").read_text()) == {}

    for (name, label), out in outputs.items():
        theirs = stored(out["mergekit"])
        ours = load_merged(out["distmerge"])[0].state_dict() if name in MOE_FAMILIES else stored(out["distmerge"])
        left_out = set(ours) - set(theirs)
        if name == "deepseek_v3":
            assert left_out == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
        else:
            assert not left_out and set(theirs) == set(ours), (name, set(theirs) ^ set(ours))
        differ = {key: float((ours[key] - theirs[key]).abs().max()) for key in theirs
                  if not torch.equal(ours[key], theirs[key])}
        assert not differ, (name, label, differ)