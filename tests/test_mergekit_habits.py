"""A mergekit user's command line and config run unchanged: `distmerge merge CONFIG OUT` with mergekit-yaml's
flags (aliases give the same bytes as distmerge's own spelling, flags without meaning here are accepted,
dangerous ones refused with a reason), the base model listed among the models, and mergekit's architecture check
with --allow-crimes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli, write_config


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.safetensors"))}


@pytest.fixture
def dare(tmp_path, family_fp32_single) -> Path:
    return write_config(tmp_path / "dare.yaml", "dare_ties", family_fp32_single, parameters={"density": 0.5})


def test_mergekit_yaml_command_line_gives_the_same_bytes_as_distmerges_own(tmp_path, dare):
    run_cli("merge", dare, "-o", tmp_path / "own", "--seed", "7", "--threads", "1", "--shard-size", "20KB")
    run_cli("merge", dare, tmp_path / "mk", "--random-seed", "7", "-j", "1", "--out-shard-size", "20K",
            "--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--safe-serialization", "--async-write",
            "--write-threads", "2", "-v", "--allow-crimes", "--copy-tokenizer", "--write-model-card")
    run_cli("merge", dare, tmp_path / "seed0", "--threads", "1", "--shard-size", "20KB")
    assert shard_bytes(tmp_path / "mk") == shard_bytes(tmp_path / "own") and len(shard_bytes(tmp_path / "own")) > 1
    assert shard_bytes(tmp_path / "seed0") != shard_bytes(tmp_path / "own")  # the seed was used
    assert {p.name for p in (tmp_path / "mk").iterdir()} == {p.name for p in (tmp_path / "own").iterdir()}


def test_no_copy_tokenizer_and_no_model_card(tmp_path, dare):
    run_cli("merge", dare, tmp_path / "out", "--no-copy-tokenizer", "--no-write-model-card", "--quiet")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & {"tokenizer.json", "tokenizer_config.json", "README.md"}
    assert "config.json" in names and "model.safetensors.index.json" in names


@pytest.mark.parametrize("args, fragments", [
    (["--trust-remote-code"], ["--trust-remote-code", "never runs code"]),
    (["--no-safe-serialization"], ["--no-safe-serialization", "only writes safetensors"]),
    (["--transformers-cache", "/tmp/x"], ["--transformers-cache", "HF_HUB_CACHE"]),
    (["-o", "elsewhere"], ["OUT and -o/--out give different values"]),
    (["--device", "cpu", "--cuda"], ["--device and --cuda give different values"]),
    (["--out-shard-size", "5GB"], ["--out-shard-size 5GB", "5B (5e9 bytes)"]),
])
def test_refused_and_conflicting_flags_are_one_error(tmp_path, dare, args, fragments):
    proc = run_cli("merge", dare, tmp_path / "out", *args, check=False)
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_missing_output_directory_is_one_error(dare):
    assert_user_error(run_cli("merge", dare, check=False), "Missing the output directory")


def test_the_base_model_listed_among_the_models_is_left_out(tmp_path, family_fp32_single):
    """mergekit configs often list the base under `models:` with no parameters; it is not a task."""
    experts = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in family_fp32_single["experts"]]
    plain = write_config(tmp_path / "plain.yaml", "ties", family_fp32_single, models=experts)
    listed = write_config(tmp_path / "listed.yaml", "ties", family_fp32_single,
                          models=[{"model": str(family_fp32_single["base"])}] + experts)
    run_cli("merge", plain, tmp_path / "plain", "--quiet")
    run_cli("merge", listed, tmp_path / "listed", "--quiet")
    assert shard_bytes(tmp_path / "listed") == shard_bytes(tmp_path / "plain")


def test_different_architectures_need_allow_crimes(tmp_path, family_fp32_single):
    """Tensors that match by name and shape are not enough: as in mergekit, config.json's `architectures` must
    agree unless --allow-crimes says otherwise."""
    import shutil

    other = tmp_path / "mistral"
    shutil.copytree(family_fp32_single["experts"][0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    cfg = write_config(tmp_path / "crime.yaml", "task_arithmetic", family_fp32_single,
                       models=[{"model": str(other)}, {"model": str(family_fp32_single["experts"][1])}])
    proc = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert_user_error(proc, str(other), "MistralForCausalLM", "LlamaForCausalLM", "--allow-crimes")
    assert not (tmp_path / "out").exists()
    run_cli("merge", cfg, tmp_path / "out", "--allow-crimes", "--quiet")
    assert shard_bytes(tmp_path / "out")
