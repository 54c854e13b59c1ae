"""End to end through the real CLI: generated HF checkpoints in, a merged model that transformers loads out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import run_cli, run_console_script, write_config

from distmerge import cli
from distmerge.runtime import local as local_runtime


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory, through its index (or model.safetensors)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.safetensors"))}


def test_linear_equals_the_mean_of_the_models(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "linear.yaml", "linear", family_fp32_single, base=None)
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    merged = read_model(tmp_path / "out")
    experts = [read_model(p) for p in family_fp32_single["experts"]]
    assert set(merged) == set(experts[0])
    for name, tensor in merged.items():
        expected = np.mean([e[name].double().numpy() for e in experts], axis=0)
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=3e-7, atol=1e-9)  # float32 round-off


def test_ties_on_sharded_bf16_loads_in_transformers(tmp_path, family_bf16_sharded):
    transformers = pytest.importorskip("transformers")
    models = [{"model": str(p), "parameters": {"weight": w, "density": d}}
              for p, w, d in zip(family_bf16_sharded["experts"], (1.0, 0.5, 0.8), (0.5, 0.3, 0.7))]
    cfg = write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded, models=models,
                       parameters={"lambda": 0.9})
    proc = run_cli("merge", cfg, "-o", tmp_path / "out", "--shard-size", "6KB")
    assert "merging:" in proc.stderr and "ETA" in proc.stderr  # progress is shown
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert not (out / ".distmerge").exists()  # the state directory is gone once the model is whole

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    merged = read_model(out)
    for name, param in model.state_dict().items():
        assert torch.equal(param, merged[name]), name
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w5 w9")["input_ids"] == [5, 9]

    card = (out / "README.md").read_text()
    assert "ties" in card and yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])["merge_method"] == "ties"
    report = pq.read_table(out / "merge_report.parquet").to_pylist()
    assert sorted(r["tensor"] for r in report) == sorted(merged)
    assert all(r["method"] == "ties" and r["seconds"] >= 0 and r["device"] == "cpu" for r in report)


def test_same_config_and_seed_give_the_same_bytes(tmp_path, family_bf16_sharded):
    models = [{"model": str(p), "parameters": {"density": 0.4}} for p in family_bf16_sharded["experts"]]
    cfg = write_config(tmp_path / "dare.yaml", "dare_ties", family_bf16_sharded, models=models)
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "1"]), ("d", ["--shard-size", "3KB"])):
        run_cli("merge", cfg, "-o", tmp_path / name, "--quiet", *extra)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    a, c, d = (read_model(tmp_path / n) for n in "acd")
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed must draw other masks"
    assert len(shard_bytes(tmp_path / "d")) > len(shard_bytes(tmp_path / "a"))
    assert all(torch.equal(a[k], d[k]) for k in a), "the shard layout must not change the values"


def test_interrupted_merge_resumes_to_the_same_bytes(tmp_path, family_bf16_sharded, monkeypatch):
    cfg = write_config(tmp_path / "ta.yaml", "task_arithmetic", family_bf16_sharded, parameters={"lambda": 0.5})
    run_cli("merge", cfg, "-o", tmp_path / "whole", "--quiet", "--shard-size", "4KB")

    real_run_unit = local_runtime.run_unit
    calls = []

    def run_two_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_unit(*args, **kwargs)

    monkeypatch.setattr(local_runtime, "run_unit", run_two_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", str(cfg), "-o", str(tmp_path / "resumed"), "--quiet", "--shard-size", "4KB"])
    assert exit_info.value.code == 130
    partial = tmp_path / "resumed"
    assert not (partial / "model.safetensors.index.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in partial.glob("model-*.safetensors")}
    assert len(finished) == 2
    monkeypatch.undo()

    proc = run_cli("merge", cfg, "-o", partial, "--shard-size", "4KB")
    assert "resuming: 2 of" in proc.stderr
    assert {n: (partial / n).stat().st_mtime_ns for n in finished} == finished  # finished shards were kept
    assert shard_bytes(partial) == shard_bytes(tmp_path / "whole")
    assert (partial / "model.safetensors.index.json").read_text() == (
        tmp_path / "whole" / "model.safetensors.index.json").read_text()


def test_existing_output_needs_force(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "lin.yaml", "linear", family_fp32_single, base=None)
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    proc = run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet", check=False)
    assert proc.returncode == 2 and "already holds a finished merge" in proc.stderr and "--force" in proc.stderr
    before = shard_bytes(tmp_path / "out")
    other = write_config(tmp_path / "lin2.yaml", "linear", family_fp32_single, base=None,
                         models=[{"model": str(p), "parameters": {"weight": w}}
                                 for p, w in zip(family_fp32_single["experts"], (1, 2, 3))])
    run_cli("merge", other, "-o", tmp_path / "out", "--quiet", "--force")
    assert shard_bytes(tmp_path / "out") != before


def test_tied_embeddings_stay_tied(tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import TINY
    from distmerge.synthetic import make_family

    family = make_family(tmp_path / "tied", n_experts=2, config={**TINY, "tie_word_embeddings": True})
    cfg = write_config(tmp_path / "ta.yaml", "task_arithmetic", family)
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    assert "lm_head.weight" not in read_model(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_hub_id_resolves_through_the_local_cache(tmp_path, family_fp32_single):
    """The real console script: huggingface_hub reads HF_HUB_CACHE when it is imported."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--base" / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(family_fp32_single["base"], target_is_directory=True)
    (cache / "models--acme--base" / "refs").mkdir()
    (cache / "models--acme--base" / "refs" / "main").write_text("a" * 40)
    cfg = write_config(tmp_path / "ta.yaml", "task_arithmetic", family_fp32_single, base="acme/base")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run_console_script("merge", cfg, "-o", tmp_path / "out", "--quiet", env=env)
    direct = write_config(tmp_path / "direct.yaml", "task_arithmetic", family_fp32_single)
    run_cli("merge", direct, "-o", tmp_path / "direct", "--quiet")
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "direct")


def test_methods_validate_and_plan_commands(tmp_path, family_bf16_sharded):
    listing = run_cli("methods").stdout
    mergekit_015 = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce",
                    "arcee_fusion", "nearswap", "passthrough", "ram", "ramplus_tl")  # its registry's 20
    for name in mergekit_015 + ("consensus_ta", "consensus_ties", "tsvm", "rtsvm", "iso_c", "iso_cts"):
        assert f"\n{name}: " in "\n" + listing, name
    assert "density" in run_cli("methods", "ties").stdout
    cfg = write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded)
    assert run_cli("validate", cfg, "--deep").stdout.strip().endswith("ok")
    plan = run_cli("plan", cfg).stdout
    assert "tensors       21" in plan and "read" in plan and "peak memory" in plan
    one_unit = run_cli("plan", cfg, "--workers", "2").stdout
    assert "1 shard(s) feed 2 workers; a smaller shard_size" in one_unit
    small = run_cli("plan", cfg, "--workers", "2", "--shard-size", "8KB").stdout
    assert "shard(s) feed" not in small and "tensors       21 in 1 shard" not in small


def test_global_trim_keeps_each_tasks_top_share_of_the_whole_model(tmp_path, family_fp32_single):
    density = 0.3
    models = [{"model": str(p), "parameters": {"density": density}} for p in family_fp32_single["experts"]]
    cfg = write_config(tmp_path / "ties.yaml", "ties", family_fp32_single, models=models,
                       parameters={"trim_scope": "global"}, dtype="float32")
    proc = run_cli("merge", cfg, "-o", tmp_path / "out")
    assert "pass 1 of 2" in proc.stderr
    merged, base = read_model(tmp_path / "out"), read_model(family_fp32_single["base"])
    experts = [read_model(p) for p in family_fp32_single["experts"]]
    names = sorted(base)
    # Reference: each task keeps |d| >= its global threshold, the k-th largest magnitude over the whole model
    # rounded down to 16-bit-prefix precision (the documented rule); then the TIES election and disjoint mean.
    deltas = [{n: e[n].double().numpy() - base[n].double().numpy() for n in names} for e in experts]
    kept = []
    for d in deltas:
        flat = np.sort(np.abs(np.concatenate([d[n].ravel() for n in names])).astype(np.float32))[::-1]
        kth = flat[int(density * flat.size) - 1]
        threshold = np.frombuffer((np.frombuffer(kth.tobytes(), np.uint32) & 0xFFFF0000).tobytes(), np.float32)[0]
        kept.append({n: np.where(np.abs(d[n]).astype(np.float32) >= threshold, d[n], 0.0) for n in names})
    for n in names:
        stack = np.stack([k[n] for k in kept])
        sign = np.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(stack) == sign
        divisor = agree.sum(0)
        expected = base[n].double().numpy() + np.where(divisor > 0, (stack * agree).sum(0) / np.maximum(divisor, 1), 0)
        np.testing.assert_allclose(merged[n].double().numpy(), expected, rtol=0, atol=2e-6, err_msg=n)
