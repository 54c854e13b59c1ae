"""`ray job submit ... -- distmerge merge ... --runtime ray` against a real `ray start --head`, with Ray 2.60's
token authentication on, writes the same bytes as a local merge, and the job's log shows the progress."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli, write_config

pytest.importorskip("ray")
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_dashboard(url: str, token: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(request, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up")


@pytest.fixture
def ray_head():
    """A head node with the Jobs API, token authentication on, its own ports and temp dir (short: Ray's socket
    paths must stay under 107 characters). Stopped by terminating its `ray start --block` process: `ray stop`
    would stop every Ray on the machine."""
    temp = Path(tempfile.mkdtemp(prefix="dmray", dir="/tmp"))
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(free_port()), "--num-cpus", "2",
         "--object-store-memory", str(100 * 2**20), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(url, token.read_text())
        yield url, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_merge_on_the_cluster(tmp_path, family_bf16_sharded, ray_head):
    url, env = ray_head
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    write_config(working_dir / "cfg.yaml", "ties", family_bf16_sharded,
                 models=[{"model": str(p), "parameters": {"density": 0.5}} for p in family_bf16_sharded["experts"]])
    run_cli("merge", working_dir / "cfg.yaml", "-o", tmp_path / "local", "--quiet", "--shard-size", "6000")

    out = tmp_path / "from_job"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(working_dir), "--",
         "distmerge", "merge", "cfg.yaml", "-o", str(out), "--runtime", "ray", "--workers", "2",
         "--shard-size", "6000"],
        env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in log, log
    assert "merging: 21/21 tensors" in log  # the driver's progress reaches `ray job logs`
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("*.safetensors"))}
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))} == local
    assert (out / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_ray_job_submit_without_the_token_is_refused(tmp_path, ray_head):
    url, env = ray_head
    no_auth = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([RAY, "job", "submit", "--address", url, "--", "python", "-c", "print(1)"],
                          env=no_auth, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and ("401" in proc.stderr + proc.stdout or "Unauthorized" in proc.stderr)
