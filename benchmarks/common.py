"""What the benchmark scripts share: logging, what a result was measured on, writing results, synthetic checkpoint
families, reading checkpoints, and running a batch of merges in one driver process.

The scripts run as `python benchmarks/NAME.py`, so Python puts benchmarks/ first on sys.path and they import this
module as `common` (and the scratch venvs of the peer tools as `peers.venvs`). Imports of torch and distmerge stay
inside the functions that need them: the small subprocesses of bench_speed.py import this module too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"  # one folder per benchmark, holding its latest run


# ---- logging -----------------------------------------------------------------------------------------------------


def logger(name: str, clock: bool = False) -> Callable[[str], None]:
    """A function that prints `[name] message` to stderr at once (with clock: `[name HH:MM:SS] message`)."""

    def log(message: str) -> None:
        stamp = f" {time.strftime('%H:%M:%S')}" if clock else ""
        print(f"[{name}{stamp}] {message}", file=sys.stderr, flush=True)

    return log


# ---- provenance: what a result was measured on -------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return cpu_model()


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_bytes": memory_bytes(),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def machine_summary() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def git_revision() -> str:
    """The short commit, marked when distmerge/ has uncommitted changes (the numbers are then not that commit's)."""
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "distmerge"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (result.stdout.strip() or "unknown") + (" + uncommitted changes under distmerge/" if dirty else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line(script: str, argv: list[str]) -> str:
    """How the run was started, as a user would type it from the repository root."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


# ---- results -----------------------------------------------------------------------------------------------------


def write_markdown(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_results(directory: Path, name: str, markdown: str, data, indent: int = 2) -> Path:
    """NAME.md and NAME.json under `directory`; returns the markdown's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=indent, default=str))
    return write_markdown(directory / f"{name}.md", markdown)


# ---- checkpoints -------------------------------------------------------------------------------------------------


def llama_family(root: Path, settings: dict, log: Callable[[str], None] | None = None) -> dict:
    """A Llama-shaped base and experts made by `distmerge.synthetic.make_family` under `root`: {"base": path,
    "experts": [paths]}.

    settings: "llama_config" (llama_config's arguments), "experts", "dtype" (a torch dtype's name), "shard_size"
    (bytes, or None for one file) and "seed"; other keys are only recorded. Made once: root/settings.json holds the
    settings they were made with, and other settings make them anew.
    """
    stamp = root / "settings.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == settings):
        import torch

        from distmerge.architecture import llama_config
        from distmerge.synthetic import make_family

        shutil.rmtree(root, ignore_errors=True)
        if log:
            log(f"generating the base and {settings['experts']} experts under {root}")
        make_family(root, n_experts=settings["experts"], config=llama_config(**settings["llama_config"]),
                    dtype=getattr(torch, settings["dtype"]), shard_size=settings["shard_size"], seed=settings["seed"])
        stamp.write_text(json.dumps(settings, indent=1))
    return {"base": root / "base", "experts": [root / f"expert{i + 1}" for i in range(settings["experts"])]}


def load_checkpoint(directory: Path) -> dict:
    """Every tensor of a checkpoint directory, by name (all in memory: for small models)."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


class TensorReader:
    """The tensors of a checkpoint directory by name, read one at a time (for models too big to hold)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.handles = {file: safe_open(str(file), "pt") for file in sorted(Path(directory).glob("*.safetensors"))}
        self.files = {name: file for file, handle in self.handles.items() for name in handle.keys()}  # noqa: SIM118

    def __call__(self, name: str):
        return self.handles[self.files[name]].get_tensor(name)


# ---- running a batch of merges in one process --------------------------------------------------------------------
#
# Starting Python and torch costs seconds a process, so the parity comparisons hand each tool a list of merges that
# one driver process runs (distmerge_batch.py here, peers/*_batch.py in a peer's venv). A driver reads a JSON job
# list and writes {output directory: error text} for the jobs that failed.


def start_batch(python: Path, driver: Path, jobs: list, work: Path, tool: str, *extra: str) -> tuple:
    """Launch `python driver JOBS FAILURES *extra` over `jobs`; returns what finish_batch needs."""
    job_file, failure_file, log_file = (work / f"{tool}_{kind}" for kind in ("jobs.json", "failures.json", "log.txt"))
    job_file.write_text(json.dumps(jobs, default=str))
    failure_file.unlink(missing_ok=True)
    with open(log_file, "w") as log_stream:
        process = subprocess.Popen([str(python), str(driver), str(job_file), str(failure_file), *extra],
                                   stdout=log_stream, stderr=subprocess.STDOUT, cwd=work)
    return tool, process, failure_file, log_file


def finish_batch(tool: str, process: subprocess.Popen, failure_file: Path, log_file: Path) -> dict[str, str]:
    """Wait for a driver; its failed jobs as {output directory: error text}. A crashed driver stops the run."""
    process.wait()
    if process.returncode != 0 or not failure_file.exists():
        raise SystemExit(f"{tool} driver crashed (exit {process.returncode}):\n{log_file.read_text()[-4000:]}")
    return json.loads(failure_file.read_text())


def run_each(commands: dict[Path, list[str]]) -> dict[str, str]:
    """One process per merge (the console scripts as users run them): {output directory: error} of the failed."""
    failures = {}
    for out, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            failures[str(out)] = result.stderr[-2000:]
    return failures


def last_error_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]
