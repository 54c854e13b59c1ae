"""Models named by hub id, read from a local Hugging Face cache laid out as huggingface_hub lays it out: every
snapshot file a relative symlink into the repository's `blobs/`. Files may be read through links that stay in
their cache repository, and through no other link."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import distmerge
from conftest import assert_user_error, run_cli, run_console_script, write_config

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path, revision: str = REVISION) -> Path:
    """`source`'s files stored in `cache` the way `hf download repo_id` stores them; returns the snapshot dir.

    models--org--name/refs/main holds the commit hash, blobs/<sha256> the contents, snapshots/<hash>/<file> a
    relative symlink ../../blobs/<sha256> (huggingface_hub names LFS blobs by their sha256, others by git's etag;
    either is just a file name here)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def hub_env(cache: Path) -> dict:
    """huggingface_hub reads HF_HUB_CACHE when imported, so the console script runs in a new process; it imports
    the distmerge these tests import (this checkout, whichever one is installed)."""
    tested = str(Path(distmerge.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (tested, os.environ.get("PYTHONPATH")) if p)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def small_files(out: Path) -> dict[str, bytes]:
    """What the output must take over unchanged from its inputs (the model card and report name the inputs as
    written in the config, hub id or path, so they are left out)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("README.md", "merge_report.parquet")}


@pytest.fixture
def with_generation_config(tmp_path):
    """A family copied, the base given a generation_config.json the merge must copy."""
    def copy(family: dict) -> dict:
        paths = {"base": tmp_path / "family" / "base", "experts": []}
        shutil.copytree(family["base"], paths["base"])
        (paths["base"] / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        paths["experts"] = [Path(p) for p in family["experts"]]
        return paths
    return copy


@pytest.mark.parametrize("family_name", ["family_bf16_sharded", "family_fp32_single"])
def test_models_by_hub_id_merge_like_the_same_directories(tmp_path, request, family_name, with_generation_config):
    family = with_generation_config(request.getfixturevalue(family_name))
    cache = tmp_path / "hub"
    ids = {"acme/base": family["base"], **{f"acme/expert{i}": p for i, p in enumerate(family["experts"])}}
    for repo_id, source in ids.items():
        snapshot = cache_repo(cache, repo_id, source)
        assert all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in snapshot.iterdir())
    by_id = write_config(tmp_path / "by_id.yaml", "ties", base="acme/base",
                         models=[{"model": i, "parameters": {"density": 0.5}} for i in ids if i != "acme/base"])
    direct = write_config(tmp_path / "direct.yaml", "ties", family,
                          models=[{"model": str(p), "parameters": {"density": 0.5}} for p in family["experts"]])
    run_console_script("merge", by_id, "-o", tmp_path / "by_id", "--quiet", "--shard-size", "6KB",
                       env=hub_env(cache))
    run_cli("merge", direct, "-o", tmp_path / "direct", "--quiet", "--shard-size", "6KB")
    got, want = small_files(tmp_path / "by_id"), small_files(tmp_path / "direct")
    assert got == want
    assert sum(name.endswith(".safetensors") for name in got) > 1
    assert {"generation_config.json", "tokenizer.json", "config.json", "model.safetensors.index.json"} <= set(got)
    assert all(not p.is_symlink() for p in (tmp_path / "by_id").iterdir())  # copies, not links into the cache


def test_a_hub_id_whose_snapshot_links_into_another_repository_is_refused(tmp_path, family_fp32_single):
    cache = tmp_path / "hub"
    snapshot = cache_repo(cache, "acme/base", family_fp32_single["base"])
    other = cache_repo(cache, "evil/other", family_fp32_single["experts"][0])
    weights = snapshot / "model.safetensors"
    weights.unlink()
    weights.symlink_to(os.path.relpath((other / "model.safetensors").resolve(), snapshot))
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, base="acme/base")
    for command in (["validate", cfg], ["merge", cfg, "-o", tmp_path / "out"]):
        proc = run_console_script(*command, env=hub_env(cache), check=False)
        assert_user_error(proc, "acme/base", str(weights), "models--evil--other", "points outside")
    assert not (tmp_path / "out").exists()


def relink(link: Path, target: str) -> None:
    link.unlink()
    link.symlink_to(target)


def refuse_everywhere(tmp_path, cfg: Path, *fragments: str) -> None:
    """validate, plan and merge all refuse before any work; the merge leaves no output."""
    for command in (["validate", cfg], ["plan", cfg], ["merge", cfg, "-o", tmp_path / "out"]):
        assert_user_error(run_cli(*command, check=False), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("victim", ["a shard", "config.json", "tokenizer.json",
                                    "model.safetensors.index.json"])
def test_a_snapshot_file_linking_out_of_its_repository_is_refused(tmp_path, family_bf16_sharded, victim):
    """Given as the snapshot directory, so the test runs in-process: the same rule applies to the path."""
    snapshot = cache_repo(tmp_path / "hub", "acme/base", family_bf16_sharded["base"])
    if victim == "a shard":
        victim = sorted(p.name for p in snapshot.glob("model-*.safetensors"))[1]
    assert (snapshot / victim).is_symlink()
    relink(snapshot / victim, "/etc/hostname")
    cfg = write_config(tmp_path / "c.yaml", "ties", family_bf16_sharded, base=snapshot)
    refuse_everywhere(tmp_path, cfg, str(snapshot / victim), "points outside", "/etc/hostname")


def test_an_index_entry_climbing_into_the_blobs_is_refused(tmp_path, family_bf16_sharded):
    """`..` in an index entry is refused by name, even where it would land inside the cache repository."""
    snapshot = cache_repo(tmp_path / "hub", "acme/base", family_bf16_sharded["base"])
    index_link = snapshot / "model.safetensors.index.json"
    index = json.loads(index_link.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = os.path.relpath((snapshot / index["weight_map"][first]).resolve(), snapshot)
    assert index["weight_map"][first].startswith("../../blobs/")
    index_link.unlink()
    index_link.write_text(json.dumps(index))
    cfg = write_config(tmp_path / "c.yaml", "ties", family_bf16_sharded, base=snapshot)
    refuse_everywhere(tmp_path, cfg, str(index_link), "points outside its checkpoint directory", "../../blobs/")


def test_a_tokenizer_linked_to_a_system_file_is_not_copied(tmp_path, family_fp32_single):
    """A plain directory: the tokenizer the merge would copy into its output links out of the checkpoint."""
    base = tmp_path / "base"
    shutil.copytree(family_fp32_single["base"], base)
    relink(base / "tokenizer.json", "/etc/passwd")
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, base=base)
    refuse_everywhere(tmp_path, cfg, str(base), "tokenizer.json", "points outside its checkpoint directory",
                      "/etc/passwd")


def test_a_tokenizer_source_linking_out_is_refused(tmp_path, family_fp32_single):
    source = tmp_path / "tok"
    shutil.copytree(family_fp32_single["experts"][1], source)
    relink(source / "tokenizer_config.json", "/etc/hostname")
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, tokenizer_source=str(source))
    refuse_everywhere(tmp_path, cfg, str(source / "tokenizer_config.json"), "points outside")


def test_links_inside_a_plain_checkpoint_directory_are_followed(tmp_path, family_fp32_single):
    """A link that stays inside its checkpoint directory is read; the output holds the file, not the link."""
    base = tmp_path / "base"
    shutil.copytree(family_fp32_single["base"], base)
    (base / "store").mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (base / name).rename(base / "store" / name)
        (base / name).symlink_to(Path("store") / name)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, base=base)
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    direct = write_config(tmp_path / "d.yaml", "ties", family_fp32_single)
    run_cli("merge", direct, "-o", tmp_path / "direct", "--quiet")
    assert small_files(tmp_path / "out") == small_files(tmp_path / "direct")
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()
