"""Bad input gets one clear error naming the model, file, tensor or key, exit 2, no traceback, before heavy work,
and leaves no output behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_user_error, run_cli, run_console_script, write_config


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_single_file(model_dir: Path, edit) -> None:
    tensors = load_file(str(model_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def first_expert_replaced(tmp_path, family, make) -> list[dict]:
    """Models list whose first expert is a modified copy made by `make(copy_dir)`."""
    bad = copy_model(family["experts"][0], tmp_path / "bad_expert")
    make(bad)
    return [{"model": str(bad)}] + [{"model": str(p)} for p in family["experts"][1:]]


def test_missing_model_directory(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=[{"model": str(tmp_path / "nope")}])
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), str(tmp_path / "nope"),
                      "no such directory")
    assert not (tmp_path / "out").exists()


def test_hub_id_not_in_cache(tmp_path, family_fp32_single):
    """The real console script: huggingface_hub reads HF_HUB_CACHE when it is imported."""
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, base="acme/not-there")
    proc = run_console_script("merge", cfg, "-o", tmp_path / "out", check=False,
                   env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert_user_error(proc, "acme/not-there", "Hugging Face cache", "download")


def test_pickle_checkpoint_is_refused(tmp_path, family_fp32_single):
    def to_pickle(d: Path):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"not really a pickle")

    models = first_expert_replaced(tmp_path, family_fp32_single, to_pickle)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "bad_expert", "pytorch_model.bin",
                      "pickle")


@pytest.mark.parametrize("escape,message", [("../elsewhere.safetensors", "points outside its checkpoint directory"),
                                            ("/etc/passwd", "absolute path")])
def test_index_paths_must_stay_inside_the_checkpoint(tmp_path, family_bf16_sharded, escape, message):
    def redirect(d: Path):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = escape
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    models = first_expert_replaced(tmp_path, family_bf16_sharded, redirect)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_bf16_sharded, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "bad_expert", message)


def test_truncated_shard(tmp_path, family_bf16_sharded):
    def truncate(d: Path):
        shard = sorted(d.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])

    models = first_expert_replaced(tmp_path, family_bf16_sharded, truncate)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_bf16_sharded, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "model-00001", "truncated")


def test_header_whose_offsets_disagree_with_the_shape(tmp_path, family_fp32_single):
    """The reader trusts data_offsets only after checking them against shape and dtype."""
    def shrink_first_entry(d: Path):
        file = d / "model.safetensors"
        raw = file.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [header[name]["shape"][0] - 1, *header[name]["shape"][1:]]
        text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
        file.write_bytes(raw[:8] + text + raw[8 + header_len:])

    models = first_expert_replaced(tmp_path, family_fp32_single, shrink_first_entry)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "bad_expert", "corrupt header")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(tmp_path, family_fp32_single):
    def reshape(d: Path):
        edit_single_file(d, lambda t: t.update({"model.norm.weight": torch.ones(33)}))

    models = first_expert_replaced(tmp_path, family_fp32_single, reshape)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "bad_expert", "model.norm.weight",
                      "[33]", "[32]")


def test_missing_tensor(tmp_path, family_fp32_single):
    models = first_expert_replaced(tmp_path, family_fp32_single,
                                   lambda d: edit_single_file(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "bad_expert", "lacks 1 tensor",
                      "model.layers.1.mlp.up_proj.weight")


def test_integer_versus_float_tensor(tmp_path, family_fp32_single):
    def to_int(d: Path):
        edit_single_file(d, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))

    models = first_expert_replaced(tmp_path, family_fp32_single, to_int)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "bad_expert", "model.norm.weight",
                      "I32")


def test_nan_in_an_input_tensor_names_model_and_tensor_and_leaves_no_model(tmp_path, family_fp32_single):
    def poison(d: Path):
        def put_nan(t):
            t["model.layers.1.self_attn.v_proj.weight"][3, 4] = float("nan")
        edit_single_file(d, put_nan)

    models = first_expert_replaced(tmp_path, family_fp32_single, poison)
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", cfg, "-o", out, check=False), "bad_expert",
                      "model.layers.1.self_attn.v_proj.weight", "NaN")
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.rglob("*.partial"))
    assert_user_error(run_cli("validate", cfg, "--deep", check=False), "bad_expert", "NaN")


CONFIG_ERRORS = [
    ("density out of range", dict(method="ties", models="density", value=1.5), ["density: 1.5", "(0, 1]"]),
    ("gradient out of range", dict(method="ties", models="density", value=[0.5, 1.5]), ["density", "out of range",
                                                                                       "model.layers.1"]),
    ("unknown parameter", dict(method="ties", parameters={"densty": 0.5}), ["densty", "allowed: weight, density"]),
    ("per-model global", dict(method="ties", models="lambda", value=0.5), ["lambda", "top-level"]),
    ("della epsilon", dict(method="della", parameters={"density": 0.2, "epsilon": 0.3}), ["density - epsilon"]),
    ("unknown method", dict(method="tiess"), ["tiess", "is not a method", "ties"]),
    ("no base", dict(method="ties", base=None), ["needs `base_model`"]),
    ("slerp takes one model", dict(method="slerp"), ["exactly 1 model", "got 3"]),
    ("unknown top-level key", dict(method="ties", top={"merge_methd": "x"}), ["merge_methd", "allowed"]),
    ("slices", dict(method="ties", top={"slices": []}), ["slices", "not supported"]),
    ("bad dtype", dict(method="ties", top={"dtype": "int8"}), ["dtype: int8", "bfloat16"]),
    ("bad rescale", dict(method="dare_ties", parameters={"rescale": "l3"}), ["rescale", "inverse | l1 | none"]),
]


@pytest.mark.parametrize("case,spec,fragments", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_the_key_and_what_is_allowed(tmp_path, family_fp32_single, case, spec, fragments):
    models = None
    if "models" in spec:
        models = [{"model": str(p), "parameters": {spec["models"]: spec["value"]}} for p in family_fp32_single["experts"]]
    cfg = write_config(tmp_path / "c.yaml", spec["method"], family_fp32_single, models=models,
                       base=spec.get("base", "family"), parameters=spec.get("parameters", {}), **spec.get("top", {}))
    for command in (["validate", cfg], ["merge", cfg, "-o", tmp_path / "out"]):
        assert_user_error(run_cli(*command, check=False), *fragments)
    assert not (tmp_path / "out").exists()


def test_output_overlapping_an_input_is_refused(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single)
    target = family_fp32_single["experts"][0] / "merged"
    assert_user_error(run_cli("merge", cfg, "-o", target, "--force", check=False), "overlaps input")
    assert not target.exists()


def test_unfinished_merge_of_another_config_is_not_overwritten(tmp_path, family_fp32_single):
    out = tmp_path / "out"
    (out / ".distmerge").mkdir(parents=True)
    (out / ".distmerge" / "run.json").write_text(json.dumps({"fingerprint": "another"}))
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single)
    assert_user_error(run_cli("merge", cfg, "-o", out, check=False), "unfinished merge of a different config",
                      "--force")


def test_float16_overflow_is_reported(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, parameters={"lambda": 1e9},
                       out_dtype="float16")
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "float16", "out_dtype")


def test_cuda_without_a_gpu(tmp_path, family_fp32_single):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", "--device", "cuda", check=False),
                      "no CUDA device")


def test_bad_cli_values(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", "--shard-size", "lots", check=False),
                      "--shard-size", "2GB")
    (tmp_path / "list.yaml").write_text("- just a list\n")
    assert_user_error(run_cli("validate", tmp_path / "list.yaml", check=False), "mapping")


def test_not_enough_disk_space(tmp_path, family_fp32_single, monkeypatch):
    import shutil as shutil_module

    from distmerge.config import load_config
    from distmerge.errors import StorageError
    from distmerge.merge import merge

    real_disk_usage = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real_disk_usage(path)._replace(free=1000))
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single)
    with pytest.raises(StorageError, match="free but the merge writes"):
        merge(load_config(cfg), tmp_path / "out", quiet=True)
    assert not list((tmp_path / "out").glob("*.safetensors"))
