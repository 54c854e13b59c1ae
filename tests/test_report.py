"""merge_report.parquet holds what the method did to each tensor, checked against a NumPy recomputation from
the input checkpoints; `distmerge report` summarises it and draws the per-layer plots."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import load_file

import reference_spectral as ref
from conftest import run_cli, write_config


def load(path):
    return {k: v.astype(np.float64) for k, v in load_file(str(path / "model.safetensors")).items()}


def test_rtsvm_report_content_and_summary(tmp_path, family_fp32_single):
    cfg = write_config(tmp_path / "rtsvm.yaml", "rtsvm", family_fp32_single, dtype="float32",
                       parameters={"svd": "exact", "eta": 0.8, "outlier_m": 3.0})
    out = tmp_path / "out"
    run_cli("merge", cfg, "-o", out, "--quiet")
    table = pq.read_table(out / "merge_report.parquet")
    rows = {r["tensor"]: r for r in table.to_pylist()}

    base = load(family_fp32_single["base"])
    experts = [load(p) for p in family_fp32_single["experts"]]
    name = "model.layers.1.mlp.gate_proj.weight"
    row = rows[name]
    assert row["shape"] == [64, 32] and row["method"] == "rtsvm" and row["device"] == "cpu" and row["seconds"] > 0
    assert row["weights"] == [1.0, 1.0, 1.0] and row["svd"] == ["exact"] * 3
    deltas = [e[name] - base[name] for e in experts]
    shares = [np.mean(np.abs(d) > 3.0 * np.abs(d).mean()) for d in deltas]
    np.testing.assert_allclose(row["outlier_share"], shares)
    weighted = [ref.downweight_outliers(d, 3.0, 0.0)[0] for d in deltas]
    assert row["rank_kept"] == [ref.energy_rank(w, 0.8, 32 // 3) for w in weighted]
    for w, k, kept in zip(weighted, row["rank_kept"], row["energy_kept"]):
        s = np.linalg.svd(w, compute_uv=False)
        assert abs(kept - np.sum(s[:k] ** 2) / np.sum(s**2)) < 1e-5
    assert "rank_kept" not in rows["model.norm.weight"] or rows["model.norm.weight"]["rank_kept"] is None

    proc = run_cli("report", out)
    assert "rank kept" in proc.stdout and "outliers" in proc.stdout and "expert1" in proc.stdout
    for png in ("rank_kept.png", "outlier_share.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rtsvm_model_rank_allocation_reports_the_caps_of_the_whole_models_budget(tmp_path, family_fp32_single):
    """`rank_allocation: model` end to end: a first pass over the checkpoints, then every matrix's rank caps as
    a NumPy recomputation from the inputs gives them (effective ranks of the outlier-weighted task vectors)."""
    cfg = write_config(tmp_path / "rtsvm.yaml", "rtsvm", family_fp32_single, dtype="float32",
                       parameters={"svd": "exact", "rank_allocation": "model", "rank_budget": 0.5})
    out = tmp_path / "out"
    proc = run_cli("merge", cfg, "-o", out)
    assert "rank budget (pass 1 of 2)" in proc.stderr
    rows = {r["tensor"]: r for r in pq.read_table(out / "merge_report.parquet").to_pylist()}

    base = load(family_fp32_single["base"])
    experts = [load(p) for p in family_fp32_single["experts"]]
    matrices = sorted(name for name in base if base[name].ndim == 2 and name in rows)
    weighted = [[ref.downweight_outliers(e[name] - base[name], 3.0, 0.0)[0] for e in experts] for name in matrices]
    caps = ref.model_rank_caps(weighted, 0.5)
    assert [rows[name]["rank_cap"] for name in matrices] == caps
    assert all(kept <= cap for name, c in zip(matrices, caps) for kept, cap in zip(rows[name]["rank_kept"], c))
    assert len({cap for c in caps for cap in c}) > 1
    assert rows["model.norm.weight"].get("rank_cap") is None
