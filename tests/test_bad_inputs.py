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


# ties scans each input; linear and task_arithmetic scan only their result, and trace a non-finite one back (a
# zero weight as well: 0 * NaN and 0 * inf are NaN)
@pytest.mark.parametrize("method, value, weight", [("ties", float("nan"), 1.0), ("linear", float("nan"), 1.0),
                                                   ("linear", float("-inf"), 0.0),
                                                   ("task_arithmetic", float("inf"), 1.0)])
def test_nan_in_an_input_tensor_names_model_and_tensor_and_leaves_no_model(tmp_path, family_fp32_single, method,
                                                                           value, weight):
    def poison(d: Path):
        def put_value(t):
            t["model.layers.1.self_attn.v_proj.weight"][3, 4] = value
        edit_single_file(d, put_value)

    models = first_expert_replaced(tmp_path, family_fp32_single, poison)
    models[0]["parameters"] = {"weight": weight}
    cfg = write_config(tmp_path / "c.yaml", method, family_fp32_single, models=models,
                       base=None if method == "linear" else "family")
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", cfg, "-o", out, check=False), "bad_expert",
                      "model.layers.1.self_attn.v_proj.weight", "NaN")
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.rglob("*.partial"))
    assert_user_error(run_cli("validate", cfg, "--deep", check=False), "bad_expert", "NaN")



def test_a_result_outside_the_saved_dtype_is_an_overflow_not_a_corrupt_model(tmp_path, family_fp32_single):
    models = [{"model": str(p), "parameters": {"weight": 3e38}} for p in family_fp32_single["experts"]]
    cfg = write_config(tmp_path / "c.yaml", "linear", family_fp32_single, models=models, base=None,
                       parameters={"normalize": False})
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", check=False), "has values outside the range",
                      "lower lambda/weights")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()

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
    ("models and slices", dict(method="ties", top={"slices": []}), ["either `models`", "`slices`", "not both"]),
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


# ---- safetensors headers: checked completely when the checkpoint is opened ----------------------------------------

def rewrite_header(file: Path, edit, data_edit=lambda data: data) -> None:
    """Rewrite `file`'s JSON header with `edit(header)` (entries other than __metadata__, in file order; returns
    nothing) and its data section with `data_edit(data)`."""
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    edit({k: v for k, v in header.items() if k != "__metadata__"})
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + data_edit(raw[8 + header_len:]))


def by_offset(header: dict) -> list[str]:
    return sorted(header, key=lambda name: header[name]["data_offsets"])


def shift_last(header: dict, by: int) -> None:
    last = header[by_offset(header)[-1]]
    last["data_offsets"] = [o + by for o in last["data_offsets"]]


def overlap(header):  # the last tensor starts 8 bytes early, inside the one before it
    shift_last(header, -8)


def set_shape(shape):
    def edit(header):
        header[by_offset(header)[0]]["shape"] = shape
    return edit


def backwards(header):  # offsets [end, begin]
    name = by_offset(header)[0]
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]


HEADER_DEFECTS = [
    ("overlap", overlap, None, ["overlaps tensor"]),
    ("gap", lambda h: shift_last(h, 8), lambda d: d + bytes(8), ["bytes", "belong to no tensor", "between tensor"]),
    ("trailing bytes", lambda h: None, lambda d: d + bytes(16), ["16 bytes after tensor", "belong to no tensor"]),
    ("out of the file", lambda h: shift_last(h, 8), None, ["truncated or its header is corrupt", "ends at byte"]),
    ("negative shape", set_shape([-64, -32]), None, ["shape [-64, -32]", "non-negative integers"]),
    ("garbage shape", set_shape(["64", 32]), None, ["shape ['64', 32]", "non-negative integers"]),
    ("fractional shape", set_shape([64.0, 32]), None, ["shape [64.0, 32]", "non-negative integers"]),
    ("offsets backwards", backwards, None, ["end before they begin"]),
]


@pytest.mark.parametrize("case,edit,data_edit,fragments", HEADER_DEFECTS, ids=[c[0] for c in HEADER_DEFECTS])
def test_every_header_defect_is_refused_before_work(tmp_path, family_fp32_single, case, edit, data_edit, fragments):
    """Each defect is one safetensors itself refuses (checked here with its own loader), found by `validate` and
    by `merge` when the checkpoint is opened, named with model, file and tensor; the merge writes nothing."""
    from safetensors import safe_open

    bad_file = {}

    def corrupt(d: Path):
        file = d / "model.safetensors"
        names = []
        rewrite_header(file, lambda h: (names.extend(by_offset(h)), edit(h)), data_edit or (lambda data: data))
        bad_file.update(path=file, names=names)

    models = first_expert_replaced(tmp_path, family_fp32_single, corrupt)
    with pytest.raises(Exception):  # the independent check: safetensors refuses the file too
        with safe_open(str(bad_file["path"]), framework="pt") as handle:
            [handle.get_tensor(name) for name in handle.keys()]
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    out = tmp_path / "out"
    for command in (["validate", cfg], ["merge", cfg, "-o", out]):
        proc = run_cli(*command, check=False)
        assert_user_error(proc, "bad_expert", str(bad_file["path"]), "re-download", *fragments)
        assert any(f"tensor {name} " in proc.stderr for name in bad_file["names"]), proc.stderr
    assert not out.exists()


def test_header_checks_accept_what_safetensors_writes(tmp_path):
    """Zero-size tensors, scalars and tensors in any order of offsets pass, as safetensors reads them."""
    from distmerge.checkpoint import read_safetensors_header

    file = tmp_path / "x.safetensors"
    save_file({"b": torch.ones(3), "a": torch.zeros(0, 4), "c": torch.tensor(2.0), "d": torch.ones(2, 0)}, str(file))
    rewrite_header(file, lambda h: None)  # a re-serialised header, entries in another order than their bytes
    header = read_safetensors_header(file)
    assert {name: entry["shape"] for name, entry in header.items()} == {"b": [3], "a": [0, 4], "c": [], "d": [2, 0]}
    assert {k: v.shape for k, v in load_file(str(file)).items()} == {
        "b": torch.Size([3]), "a": torch.Size([0, 4]), "c": torch.Size([]), "d": torch.Size([2, 0])}


# ---- configs that would make a broken or surprising model -----------------------------------------------------

@pytest.mark.parametrize("method", ["ties", "linear"])
def test_reference_model_without_config_json_is_refused_but_still_planned(tmp_path, family_fp32_single, method):
    """ties takes config.json from its base, linear (no base) from models[0]; without it the merged model could
    not be loaded. `plan` still runs: it writes nothing."""
    no_config = copy_model(family_fp32_single["base"] if method == "ties" else family_fp32_single["experts"][0],
                           tmp_path / "no_config")
    (no_config / "config.json").unlink()
    if method == "ties":
        cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, base=no_config)
    else:
        cfg = write_config(tmp_path / "c.yaml", "linear", family_fp32_single, base=None,
                           models=[{"model": str(no_config)}] + [{"model": str(p)}
                                                                 for p in family_fp32_single["experts"][1:]])
    for command in (["validate", cfg], ["merge", cfg, "-o", tmp_path / "out"]):
        assert_user_error(run_cli(*command, check=False), str(no_config / "config.json"), "missing",
                          "base model" if method == "ties" else "models[0]", "could not be loaded")
    assert not (tmp_path / "out").exists()
    assert "tensors       21" in run_cli("plan", cfg).stdout


def test_a_model_listed_twice_is_refused(tmp_path, family_fp32_single):
    """Whatever the spelling (here a link to the same directory): merged twice, it would count double."""
    expert = family_fp32_single["experts"][1]
    alias = tmp_path / "alias"
    alias.symlink_to(expert, target_is_directory=True)
    models = [{"model": str(family_fp32_single["experts"][0])}, {"model": str(expert)},
              {"model": "alias", "parameters": {"weight": 0.5}}]
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single, models=models)
    for command in (["validate", cfg], ["plan", cfg], ["merge", cfg, "-o", tmp_path / "out"]):
        assert_user_error(run_cli(*command, check=False), "`models[2]` (alias)", f"`models[1]` ({expert}",
                          "weight: 2.0")
    assert not (tmp_path / "out").exists()
    same_string = write_config(tmp_path / "s.yaml", "model_stock", family_fp32_single,
                               models=[{"model": str(expert)}, {"model": str(expert)}])
    assert_user_error(run_cli("validate", same_string, check=False), "`models[1]`", "`models[0]`",
                      "model_stock has no per-model weight, so list it once")


# ---- command-line usage errors: one line, like every other user error --------------------------------------------

USAGE_ERRORS = [
    ("unknown option", ["merge", "{cfg}", "-o", "{out}", "--forc"], ["--forc", "--force", "distmerge merge --help"]),
    ("unknown command", ["marge", "{cfg}"], ["marge", "distmerge --help"]),
    ("missing argument", ["validate"], ["Missing argument 'CONFIG'", "distmerge validate --help"]),
    ("missing output", ["merge", "{cfg}"], ["Missing the output directory", "distmerge merge --help"]),
    ("option without value", ["merge", "{cfg}", "-o"], ["'-o' requires an argument"]),
    ("bad choice", ["merge", "{cfg}", "-o", "{out}", "--runtime", "slurm"], ["--runtime", "'slurm'", "'local', 'ray'"]),
    ("bad int", ["merge", "{cfg}", "-o", "{out}", "--seed", "abc"], ["--seed", "'abc' is not a valid integer"]),
    ("out of range", ["plan", "{cfg}", "--gpus", "0"], ["--gpus", "0 is not in the range"]),
    ("bad float", ["plan", "{cfg}", "--read-gbps", "fast"], ["--read-gbps", "'fast'"]),
]


@pytest.mark.parametrize("case,args,fragments", USAGE_ERRORS, ids=[c[0] for c in USAGE_ERRORS])
def test_usage_errors_are_one_error_line(tmp_path, family_fp32_single, case, args, fragments):
    cfg = write_config(tmp_path / "c.yaml", "ties", family_fp32_single)
    args = [a.format(cfg=cfg, out=tmp_path / "out") for a in args]
    proc = run_cli(*args, check=False)
    assert_user_error(proc, *fragments)
    assert "Usage:" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_help_still_works():
    for args in (["--help"], ["merge", "--help"], ["plan", "-h"]):
        proc = run_cli(*args)
        assert proc.stdout.startswith("Usage: distmerge") and "--help" in proc.stdout and proc.stderr == "", args
    assert "merge " in run_cli("--help").stdout and "--shard-size" in run_cli("merge", "--help").stdout
    bare = run_cli(check=False)  # no command: the help, not an error line
    assert "Usage: distmerge" in bare.stdout + bare.stderr and "error:" not in bare.stderr
