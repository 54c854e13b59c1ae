"""LoRA adapters as inputs: `model: base+adapter` and an adapter directory given as a model merge to the same
bytes as first merging the adapter into its base with PEFT's `merge_and_unload` (the independent reference) and
merging that model. Adapters are tiny random ones made with `peft` (a test-only dependency), with per-module
ranks and alphas, rsLoRA, an embedding target, a tensor saved whole (`modules_to_save`) and GPT-2's Conv1D."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_user_error, make_adapter, run_cli, write_config

from distmerge.synthetic import make_family

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def shard_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def merged_by_peft(base: Path, adapter: Path, out: Path, dtype=torch.float32) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    return out


LLAMA_ADAPTERS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "patterns, rsLoRA, embedding, modules_to_save": {
        "r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "up_proj", "embed_tokens"],
        "rank_pattern": {"o_proj": 2, "layers.1.mlp.up_proj": 6}, "alpha_pattern": {"up_proj": 3},
        "modules_to_save": ["lm_head"]},
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    return make_family(tmp_path_factory.mktemp("lora_family"), n_experts=1, config=TINY, dtype=torch.float32)


@pytest.mark.parametrize("lora", list(LLAMA_ADAPTERS))
def test_base_plus_adapter_merges_like_the_peft_merged_model(tmp_path, llama, lora):
    adapter = make_adapter(llama["base"], tmp_path / "adapter", LLAMA_ADAPTERS[lora])
    reference = merged_by_peft(llama["base"], adapter, tmp_path / "peft_merged")
    expert = str(llama["experts"][0])
    configs = {
        "reference": [{"model": str(reference)}, {"model": expert}],
        "base+adapter": [{"model": f"{llama['base']}+{adapter}"}, {"model": expert}],
        "adapter directory": [{"model": str(adapter)}, {"model": expert}],
    }
    outputs = {}
    for label, models in configs.items():
        cfg = write_config(tmp_path / f"{label}.yaml", "task_arithmetic", llama, models=models,
                           parameters={"weight": 0.7})
        run_cli("merge", cfg, tmp_path / label, "--quiet")
        outputs[label] = shard_tensors(tmp_path / label)
    base, merged = shard_tensors(llama["base"]), shard_tensors(reference)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert "model.layers.1.self_attn.q_proj.weight" in changed and "model.norm.weight" not in changed
    for label in ("base+adapter", "adapter directory"):
        assert outputs[label].keys() == outputs["reference"].keys()
        for name, tensor in outputs["reference"].items():
            assert torch.equal(outputs[label][name], tensor), (label, name)


def test_tensors_an_adapter_updates_are_merged_whole_and_the_rest_in_cpu_blocks(tmp_path, llama, monkeypatch):
    """An adapter's update reads the whole tensor, so the tensors it updates are not cut into row blocks (each
    block would read and update the whole tensor again); the others are, with the bytes of the PEFT reference."""
    from distmerge import engine
    from distmerge.config import load_config
    from distmerge.plan import build_plan

    adapter = make_adapter(llama["base"], tmp_path / "adapter", LLAMA_ADAPTERS["plain"])
    reference = merged_by_peft(llama["base"], adapter, tmp_path / "peft_merged")
    outputs = {}
    for label, first in (("reference", str(reference)), ("base+adapter", f"{llama['base']}+{adapter}")):
        cfg = write_config(tmp_path / f"{label}.yaml", "task_arithmetic", llama,
                           models=[{"model": first}, {"model": str(llama["experts"][0])}], parameters={"weight": 0.7})
        blockwise = {job.name for job in build_plan(load_config(cfg)).tensors if job.blockwise}
        monkeypatch.setattr(engine, "CPU_BLOCK_ENTRIES", 64)
        run_cli("merge", cfg, tmp_path / label, "--quiet")
        outputs[label] = shard_tensors(tmp_path / label)
        if label == "base+adapter":
            assert "model.layers.0.self_attn.q_proj.weight" not in blockwise
            assert {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= blockwise
    for name, tensor in outputs["reference"].items():
        assert torch.equal(outputs["base+adapter"][name], tensor), name


def test_a_bf16_adapter_on_a_bf16_base_matches_peft(tmp_path):
    family = make_family(tmp_path / "family", n_experts=1, config=TINY, dtype=torch.bfloat16)
    adapter = make_adapter(family["base"], tmp_path / "adapter", LLAMA_ADAPTERS["plain"], dtype=torch.bfloat16)
    reference = merged_by_peft(family["base"], adapter, tmp_path / "peft_merged", dtype=torch.bfloat16)
    for label, model in (("reference", str(reference)), ("lora", f"{family['base']}+{adapter}")):
        cfg = write_config(tmp_path / f"{label}.yaml", "linear", base=None,
                           models=[{"model": model}, {"model": str(family["experts"][0])}], out_dtype="bfloat16")
        run_cli("merge", cfg, tmp_path / label, "--quiet")
    ours, theirs = shard_tensors(tmp_path / "lora"), shard_tensors(tmp_path / "reference")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_gpt2_conv1d_adapter_matches_peft(tmp_path):
    """Conv1D stores [in, out]: the update is (B @ A) transposed (`fan_in_fan_out`)."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter",
                           {"r": 3, "lora_alpha": 5, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True})
    reference = merged_by_peft(base, adapter, tmp_path / "peft_merged")
    for label, model in (("reference", str(reference)), ("lora", f"{base}+{adapter}")):
        cfg = write_config(tmp_path / f"{label}.yaml", "linear", base=None, models=[{"model": model}])
        run_cli("merge", cfg, tmp_path / label, "--quiet")
    ours, theirs = shard_tensors(tmp_path / "lora"), shard_tensors(tmp_path / "reference")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_two_adapters_of_one_base_are_two_models(tmp_path, llama):
    """The same base with different adapters is not 'the same model listed twice'."""
    first = make_adapter(llama["base"], tmp_path / "a1", LLAMA_ADAPTERS["plain"], seed=1)
    second = make_adapter(llama["base"], tmp_path / "a2", LLAMA_ADAPTERS["plain"], seed=2)
    cfg = write_config(tmp_path / "two.yaml", "ties", llama, parameters={"density": 0.5},
                       models=[{"model": f"{llama['base']}+{first}"}, {"model": f"{llama['base']}+{second}"}])
    run_cli("merge", cfg, tmp_path / "out", "--quiet")
    twice = write_config(tmp_path / "twice.yaml", "ties", llama, parameters={"density": 0.5},
                         models=[{"model": f"{llama['base']}+{first}"}, {"model": str(first)}])
    assert_user_error(run_cli("merge", twice, tmp_path / "out2", check=False), "is the same model as `models[0]`")


def test_bad_adapters_are_one_error_before_any_work(tmp_path, llama):
    adapter = make_adapter(llama["base"], tmp_path / "dora", {**LLAMA_ADAPTERS["plain"], "use_dora": True})
    cases = {
        "DoRA": (f"{llama['base']}+{adapter}", ["DoRA", "merge_and_unload"]),
        "not an adapter": (f"{llama['base']}+{llama['experts'][0]}", ["adapter_config.json", "not a LoRA adapter"]),
    }
    other = make_adapter(llama["base"], tmp_path / "wide", {"r": 2, "target_modules": ["q_proj"]})
    weights = shard_tensors(other)
    (other / "adapter_model.safetensors").unlink()
    from safetensors.torch import save_file

    save_file({name.replace("layers.0.", "layers.7."): t for name, t in weights.items()},
              other / "adapter_model.safetensors")
    cases["another base"] = (f"{llama['base']}+{other}", ["layers.7", "is this the adapter of that base"])
    for label, (model, fragments) in cases.items():
        cfg = write_config(tmp_path / "bad.yaml", "task_arithmetic", llama, models=[{"model": model}])
        proc = run_cli("merge", cfg, tmp_path / "out", check=False)
        assert_user_error(proc, *fragments)
        assert not (tmp_path / "out").exists(), label
