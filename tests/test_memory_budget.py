"""`--memory-budget`: elementwise methods merge a tensor over the budget in row blocks, with the same bytes; a
tensor that cannot be cut and does not fit is refused before anything starts."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import assert_user_error, run_cli, write_config

from distmerge import engine
from distmerge.config import load_config
from distmerge.estimates import job_peak_bytes
from distmerge.plan import build_plan
from distmerge.writer import ShardWriter

BUDGET = "4KB"  # a few rows of the tiny family's largest tensors: most of them go in blocks
# method -> parameters of an entry-by-entry merge (MethodSpec.blockwise): these are cut into row blocks
BLOCKWISE = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "dare_ties": {"density": 0.6, "rescale": "inverse"},
    "dare_linear": {"density": 0.6, "rescale": "none"},
    "della": {"density": 0.5, "epsilon": 0.2, "rescale": "inverse"},
    "ties": {"density": 0.5, "trim_scope": "global", "rescale": "none"},
    "nearswap": {"t": 0.01},
}


def shard_files(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("method", sorted(BLOCKWISE))
def test_row_blocks_give_the_bytes_of_the_whole_tensor(method, family_bf16_sharded, tmp_path, monkeypatch):
    """Each block of rows is merged from the same rows of the inputs (random draws from the block's first entry
    on), so the shards are the same bytes; every stack of inputs stays within the budget."""
    models = family_bf16_sharded["experts"][:1] if method == "nearswap" else family_bf16_sharded["experts"]
    cfg = write_config(tmp_path / f"{method}.yaml", method, family_bf16_sharded,
                       models=[{"model": str(m)} for m in models], parameters=BLOCKWISE[method])
    run_cli("merge", cfg, "-o", tmp_path / "whole", "--quiet")

    stacks = []
    load = engine.InputStack.load

    def recording_load(self, plan, job, device, rows=None, check=True):
        base, stack = load(self, plan, job, device, rows, check)
        stacks.append((job, rows, (stack.numel() + (base.numel() if base is not None else 0)) * stack.element_size()))
        return base, stack

    monkeypatch.setattr(engine.InputStack, "load", recording_load)
    planned = run_cli("plan", cfg, "--memory-budget", BUDGET).stdout
    assert "tensor(s) merged in row blocks" in planned
    run_cli("merge", cfg, "-o", tmp_path / "blocks", "--quiet", "--memory-budget", BUDGET)
    assert shard_files(tmp_path / "blocks") == shard_files(tmp_path / "whole")
    blocked = [(job, rows, size) for job, rows, size in stacks if rows is not None]
    assert blocked and all(size <= 4000 for job, rows, size in blocked)
    assert {job.name for job, _, _ in blocked} >= {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}


@pytest.mark.parametrize("method", sorted(BLOCKWISE))
def test_cpu_row_blocks_give_the_bytes_of_whole_tensors(method, family_bf16_sharded, tmp_path, monkeypatch):
    """On a CPU a blockwise tensor is merged in cache-sized row blocks (`engine.CPU_BLOCK_ENTRIES` entries of each
    input), without a budget, with one torch thread fewer than the worker's: the bytes of whole tensors."""
    models = family_bf16_sharded["experts"][:1] if method == "nearswap" else family_bf16_sharded["experts"]
    cfg = write_config(tmp_path / f"{method}.yaml", method, family_bf16_sharded,
                       models=[{"model": str(m)} for m in models], parameters=BLOCKWISE[method])
    threads_before = torch.get_num_threads()
    monkeypatch.setattr(engine, "CPU_BLOCK_ENTRIES", 2**62)
    run_cli("merge", cfg, "-o", tmp_path / "whole", "--quiet", "--threads", "2")

    loads = []
    merge_tensor = engine.merge_tensor

    def recording_merge_tensor(plan, job, device, inputs, first_pass=None, rows=None):
        loads.append((job, rows, torch.get_num_threads()))
        return merge_tensor(plan, job, device, inputs, first_pass, rows)

    monkeypatch.setattr(engine, "merge_tensor", recording_merge_tensor)
    monkeypatch.setattr(engine, "CPU_BLOCK_ENTRIES", 300)
    run_cli("merge", cfg, "-o", tmp_path / "blocks", "--quiet", "--threads", "2")
    assert shard_files(tmp_path / "blocks") == shard_files(tmp_path / "whole")
    blocked = [(job, rows) for job, rows, threads in loads if rows is not None]
    assert {job.name for job, _ in blocked} >= {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}
    for job, rows, threads in loads:
        assert threads == (1 if job.blockwise else 2), job.name
        if rows is not None:  # as many whole rows as fit in 300 entries (at least one)
            row = job.numel // job.shape[0]
            assert rows[1] - rows[0] == min(job.shape[0] - rows[0], max(1, 300 // row)), (job.name, rows)
    assert not any(job.blockwise for job, _, _ in loads if len(job.shape) < 2)
    assert torch.get_num_threads() == threads_before


def test_the_report_hashes_the_bytes_written_in_blocks(family_bf16_sharded, tmp_path):
    cfg = write_config(tmp_path / "linear.yaml", "linear", family_bf16_sharded)
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet", "--memory-budget", BUDGET)
    from distmerge.report import read_report
    from safetensors import safe_open

    rows = {row["tensor"]: row for row in read_report(tmp_path / "out")[0]}
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in index.items():
        with safe_open(str(tmp_path / "out" / shard), "pt") as handle:
            data = handle.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
        assert rows[name]["sha256"] == hashlib.sha256(data).hexdigest(), name


def test_a_tensor_merged_whole_over_the_budget_is_refused(family_bf16_sharded, tmp_path):
    """TIES trims each tensor by its own top-k: it is merged whole, so a budget below one tensor's working set is
    refused with one error naming the tensor, before any output exists."""
    cfg = write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded, parameters={"density": 0.5})
    plan = build_plan(load_config(cfg))
    largest = max((job for job in plan.tensors if job.merge), key=lambda job: job_peak_bytes(plan, job))
    proc = run_cli("merge", cfg, "-o", tmp_path / "out", "--memory-budget", BUDGET, check=False)
    assert_user_error(proc, largest.name, "--memory-budget", "4.0 KB", "whole (as ties does with these parameters)")
    assert not (tmp_path / "out").exists()
    assert "over limit" in run_cli("plan", cfg, "--memory-budget", BUDGET).stdout


def test_without_a_budget_only_what_the_machine_cannot_hold_is_refused(family_bf16_sharded, tmp_path, monkeypatch):
    """The default budget (a quarter of the machine's memory) only cuts blocks; a merge is refused by default only
    where one tensor needs more than the whole machine."""
    from distmerge import plan as plan_module

    cfg = write_config(tmp_path / "ties.yaml", "ties", family_bf16_sharded, parameters={"density": 0.5})
    monkeypatch.setattr(plan_module, "machine_memory", lambda: 12_000)
    merged = build_plan(load_config(cfg))
    assert merged.memory_budget == 3_000 and merged.memory_limit == 12_000
    proc = run_cli("merge", cfg, "-o", tmp_path / "out", check=False)
    assert_user_error(proc, "needs", "this machine's 12.0 KB")


def test_mergekit_draws_are_one_sequence_per_tensor(family_bf16_sharded, tmp_path):
    """`rng: mergekit` draws a tensor's masks in one sequence, so nothing is cut: a small budget is refused."""
    cfg = write_config(tmp_path / "dare.yaml", "dare_linear", family_bf16_sharded,
                       parameters={"density": 0.5, "rescale": "none"}, distmerge={"rng": "mergekit"})
    assert not any(job.block_rows for job in build_plan(load_config(cfg)).tensors)
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", "--memory-budget", BUDGET, check=False),
                      "--memory-budget")


def test_the_shard_writer_takes_row_blocks_in_order_only(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors", [("a", "F32", (4, 2))], tmp_path / "x.safetensors")
    assert writer.write("a", torch.zeros(2, 2), (0, 2)) is None
    with pytest.raises(AssertionError, match="from row 2"):
        writer.write("a", torch.zeros(1, 2), (3, 4))
    writer.abort()
