"""Scratch virtual environments for the peer tools the benchmarks run (mergekit, FusionBench).

Shared by compare_mergekit.py, compare_fusionbench.py and bench_speed.py. A peer venv lives outside the repository
(default ~/.cache/distmerge/peers/NAME), is created on first use, and gets exactly pinned requirements, torch
included (`torch==2.13.0`: the CPU wheel on disk, not a multi-GB CUDA build). The drivers beside this file run
in those venvs; nothing of the peers is imported into this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS_DIR = Path.home() / ".cache" / "distmerge" / "peers"
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    """A peer tool: its pinned requirements, an import check, and (optionally) a --no-deps fallback install."""

    name: str
    requirements: tuple[str, ...]
    modules: tuple[str, ...]  # what the drivers import: the venv is ready when these import
    minimal_deps: tuple[str, ...] = ()  # with these, `minimal` installs the last requirement with --no-deps

    @property
    def default_venv(self) -> Path:
        return PEERS_DIR / "-".join(self.requirements[-1].split("=="))


MERGEKIT = Peer("mergekit", (TORCH, "mergekit==0.1.5"), ("mergekit.scripts.run_yaml",))

FUSIONBENCH = Peer(
    "fusion-bench",
    (TORCH, "fusion-bench==0.2.33"),
    ("fusion_bench.method.task_singular_vector.utils.TSVM_utils", "fusion_bench.method.isotropic_merging.iso_utils",
     "safetensors.torch"),
    # What importing TSVM_utils and iso_utils needs when fusion-bench is installed with --no-deps (found by
    # trying: fusion_bench/__init__ pulls in hydra/omegaconf, lightning, transformers, datasets, peft, ...).
    minimal_deps=("packaging", "omegaconf", "bidict", "hydra-core", "lightning-utilities", "rich", "lightning",
                  "transformers", "accelerate", "datasets", "peft", "safetensors"),
)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def driver(name: str) -> Path:
    """A driver script of this folder, to be run by a peer venv's python."""
    return HERE / name


def package_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions in the environment of `python` (missing packages are left out)."""
    result = subprocess.run([str(python), str(driver("package_versions.py")), *packages], capture_output=True,
                            text=True, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def imports_ok(python: Path, modules: tuple[str, ...]) -> str | None:
    """None when `modules` import in the venv of `python`, else the last line of its error."""
    result = subprocess.run([str(python), "-c", f"import {', '.join(modules)}"], capture_output=True, text=True,
                            check=False)
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {result.returncode}"


def pip_install(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                          check=False)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]


def ensure_peer_venv(peer: Peer, venv: Path | None = None, mode: str = "auto",
                     log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> tuple[Path, str]:
    """The python of `peer`'s scratch venv and how its packages got there; creates the venv and installs what is
    missing. Refuses a venv inside the repository.

    mode `full` installs the pinned requirements with their dependencies; `minimal` (only for a peer with
    minimal_deps) installs torch and minimal_deps, then the peer itself with --no-deps; `auto` tries full and
    falls back to minimal when the full install fails or the imports do not work.
    """
    venv = (venv or peer.default_venv).expanduser()
    if venv.resolve().is_relative_to(REPO):
        raise SystemExit(f"--venv {venv} is inside the repository; give a path outside it")
    if mode not in ("auto", "full", "minimal") or (mode == "minimal" and not peer.minimal_deps):
        raise SystemExit(f"install mode {mode!r} is not available for {peer.name}")
    python = venv_python(venv)
    marker = venv / "distmerge-peer.json"
    wanted = dict(req.split("==") for req in peer.requirements)
    if python.exists():
        have = package_versions(python, tuple(wanted))
        if (all(have.get(n, "").split("+")[0] == v for n, v in wanted.items())
                and imports_ok(python, peer.modules) is None):
            route = json.loads(marker.read_text()).get("route", "?") if marker.exists() else "found installed"
            return python, route
    else:
        log(f"creating the scratch venv {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    route, errors = None, []
    if mode in ("auto", "full"):
        log(f"installing {' '.join(peer.requirements)} into {venv} (a few minutes)")
        result = pip_install(python, *peer.requirements)
        error = _last_line(result) if result.returncode else imports_ok(python, peer.modules)
        if error is None:
            route = f"pip install {' '.join(peer.requirements)}"
        else:
            errors.append(f"full install: {error}")
    if route is None and peer.minimal_deps and mode in ("auto", "minimal"):
        log(f"installing {peer.name} with --no-deps plus the packages its imports need")
        first = pip_install(python, *peer.requirements[:-1], *peer.minimal_deps)
        second = pip_install(python, "--no-deps", peer.requirements[-1])
        failed = next((r for r in (first, second) if r.returncode), None)
        error = _last_line(failed) if failed else imports_ok(python, peer.modules)
        if error is None:
            route = (f"pip install {' '.join(peer.requirements[:-1])} {' '.join(peer.minimal_deps)}; "
                     f"pip install --no-deps {peer.requirements[-1]}")
        else:
            errors.append(f"minimal install: {error}")
    if route is None:
        raise SystemExit(f"could not set up {peer.name} in {venv}:\n" + "\n".join(errors))
    marker.write_text(json.dumps({"route": route}))
    return python, route
