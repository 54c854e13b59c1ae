"""Multi-stage merges in mergekit-multi's format: several YAML documents in one config, later ones naming earlier
ones as models. The result equals running each stage by hand (and the hand-worked arithmetic); a stage whose
config and inputs are unchanged is reused, one whose inputs changed is redone; an interrupted stage resumes; a
mistake in any stage is one error before the first stage starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY, assert_user_error, run_cli, write_config

from distmerge import cli
from distmerge.runtime import local as local_runtime
from distmerge.synthetic import make_family, save_checkpoint


def tensors(path: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        found.update(load_file(file))
    return found


def shard_times(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(Path(path).glob("*.safetensors"))}


@pytest.fixture
def family(tmp_path) -> dict:
    return make_family(tmp_path / "family", n_experts=3, config=TINY, dtype=torch.float32)


def stage_docs(family: dict) -> list[dict]:
    """Two named stages, each a task arithmetic of the base and one expert, and a final linear merge of both
    with the third expert."""
    base, (e1, e2, e3) = str(family["base"]), map(str, family["experts"])
    return [
        {"name": "helpful", "merge_method": "task_arithmetic", "base_model": base,
         "models": [{"model": e1, "parameters": {"weight": 0.5}}]},
        {"merge_method": "linear", "models": [{"model": "helpful"}, {"model": "honest"}, {"model": e3}]},
        {"name": "honest", "merge_method": "task_arithmetic", "base_model": base,
         "models": [{"model": e2, "parameters": {"weight": 0.25}}]},
    ]


def write_stages(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_stages_run_in_order_and_equal_the_stages_run_by_hand(tmp_path, family):
    cfg = write_stages(tmp_path / "multi.yaml", stage_docs(family))
    proc = run_cli("merge", cfg, tmp_path / "out", "-I", tmp_path / "stages")
    order = [line.split(" (")[0] for line in proc.stderr.splitlines() if " of 3)" in line]
    assert order == ["stage helpful", "stage honest", "final merge"]

    helpful, final, honest = stage_docs(family)
    by_hand = {}
    for name, doc in (("helpful", helpful), ("honest", honest)):
        doc = {k: v for k, v in doc.items() if k != "name"}
        run_cli("merge", write_stages(tmp_path / f"{name}.yaml", [doc]), tmp_path / name, "--quiet")
        by_hand[name] = str(tmp_path / name)
    final = {**final, "models": [{"model": by_hand["helpful"]}, {"model": by_hand["honest"]},
                                 final["models"][2]]}
    run_cli("merge", write_stages(tmp_path / "final.yaml", [final]), tmp_path / "final", "--quiet")
    assert {n: (tmp_path / "out" / n).read_bytes() for n in shard_times(tmp_path / "out")} == {
        n: (tmp_path / "final" / n).read_bytes() for n in shard_times(tmp_path / "final")}

    base, (e1, e2, e3) = tensors(family["base"]), [tensors(p) for p in family["experts"]]
    out = tensors(tmp_path / "out")
    for name in base:  # ((b + (e1 - b) / 2) + (b + (e2 - b) / 4) + e3) / 3
        expected = ((base[name] + 0.5 * (e1[name] - base[name])) + (base[name] + 0.25 * (e2[name] - base[name]))
                    + e3[name]) / 3
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6)


def test_an_unchanged_stage_is_reused_and_a_changed_input_redoes_what_depends_on_it(tmp_path, family):
    cfg = write_stages(tmp_path / "multi.yaml", stage_docs(family))
    stages = tmp_path / "out.stages"  # the default intermediate directory
    run_cli("merge", cfg, tmp_path / "out", "--quiet")
    helpful, honest = shard_times(stages / "helpful"), shard_times(stages / "honest")
    proc = run_cli("merge", cfg, tmp_path / "out", "--force")
    assert "stage helpful (1 of 3): up to date" in proc.stderr and "stage honest (2 of 3): up to date" in proc.stderr
    assert shard_times(stages / "helpful") == helpful and shard_times(stages / "honest") == honest

    expert = tensors(family["experts"][0])  # the first expert is fine-tuned further
    config = __import__("json").loads((Path(family["experts"][0]) / "config.json").read_text())
    save_checkpoint(family["experts"][0], {n: t * 1.5 for n, t in expert.items()}, config, dtype=torch.float32)
    proc = run_cli("merge", cfg, tmp_path / "out", "--force")
    assert "stage helpful (1 of 3): task_arithmetic" in proc.stderr
    assert "stage honest (2 of 3): up to date" in proc.stderr
    again = tmp_path / "again"
    run_cli("merge", cfg, again, "--quiet", "--no-lazy", "-I", tmp_path / "fresh")
    assert tensors(tmp_path / "out").keys() == tensors(again).keys()
    assert all(torch.equal(tensors(tmp_path / "out")[n], t) for n, t in tensors(again).items())


def test_an_interrupted_stage_resumes(tmp_path, family, monkeypatch):
    cfg = write_stages(tmp_path / "multi.yaml", stage_docs(family))
    run_cli("merge", cfg, tmp_path / "whole", "--quiet", "--shard-size", "20KB")
    shards = len(shard_times(tmp_path / "whole.stages" / "helpful"))  # as many in every stage
    real_run_unit, calls = local_runtime.run_unit, []

    def interrupt_in_the_second_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == shards + 4:  # stage honest's fourth shard
            raise KeyboardInterrupt
        return real_run_unit(*args, **kwargs)

    monkeypatch.setattr(local_runtime, "run_unit", interrupt_in_the_second_stage)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet", "--shard-size", "20KB"])
    assert exit_info.value.code == 130
    monkeypatch.undo()
    proc = run_cli("merge", cfg, tmp_path / "out", "--shard-size", "20KB")
    assert "stage helpful (1 of 3): up to date" in proc.stderr
    assert "stage honest (2 of 3): task_arithmetic" in proc.stderr and f"resuming: 3 of {shards}" in proc.stderr
    assert {n: (tmp_path / "out" / n).read_bytes() for n in shard_times(tmp_path / "out")} == {
        n: (tmp_path / "whole" / n).read_bytes() for n in shard_times(tmp_path / "whole")}


def broken(family: dict, how: str) -> list[dict]:
    docs = stage_docs(family)
    if how == "unknown parameter in a later stage":
        docs[1]["parameters"] = {"densty": 0.5}
    elif how == "missing model in a later stage":
        docs[1]["models"][2] = {"model": str(Path(family["base"]).parent / "nowhere")}
    elif how == "duplicate name":
        docs[2]["name"] = "helpful"
    elif how == "two unnamed":
        del docs[2]["name"]
    elif how == "cycle":
        docs[0]["models"].append({"model": "honest"})
        docs[2]["models"].append({"model": "helpful"})
    elif how == "unused stage":
        docs[1]["models"] = docs[1]["models"][1:]
    elif how == "bad name":
        docs[0]["name"] = "../up"
    return docs


@pytest.mark.parametrize("how, fragments", [
    ("unknown parameter in a later stage", ["densty", "not a parameter of linear"]),
    ("missing model in a later stage", ["nowhere", "no such directory"]),
    ("duplicate name", ["`name: helpful` is used twice"]),
    ("two unnamed", ["only one document may be unnamed"]),
    ("cycle", ["cycle: helpful -> honest -> helpful"]),
    ("unused stage", ["stage helpful", "is not used by the final merge"]),
    ("bad name", ["document 1", "a stage name must be"]),
])
def test_a_mistake_in_any_stage_is_one_error_before_any_stage_runs(tmp_path, family, how, fragments):
    cfg = write_stages(tmp_path / "multi.yaml", broken(family, how))
    assert_user_error(run_cli("merge", cfg, tmp_path / "out", check=False), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stages").exists()


def test_a_single_document_config_is_not_a_multi_stage_one(tmp_path, family):
    cfg = write_config(tmp_path / "one.yaml", "linear", family, base=None)
    run_cli("merge", cfg, tmp_path / "out", "--quiet")
    assert not (tmp_path / "out.stages").exists()


def test_validate_and_plan_check_every_stage(tmp_path, family):
    cfg = write_stages(tmp_path / "multi.yaml", stage_docs(family))
    for command in ("validate", "plan"):
        out = run_cli(command, cfg).stdout
        assert "stage helpful:" in out and "stage honest:" in out and out.count("tensors ") == 2, out
        assert "final merge: linear of stage(s) helpful, honest" in out
    bad = write_stages(tmp_path / "bad.yaml", broken(family, "unknown parameter in a later stage"))
    assert_user_error(run_cli("validate", bad, check=False), "densty")
