"""Track 1 set-up: base checkpoint, frozen-base linear probes, and one fine-tuned expert per task (all cached).

Everything here is keyed by its hyper-parameters, so a changed setting trains new experts next to the old ones
instead of silently reusing them.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import encoder as E
from .common import read_json, set_threads, write_json


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    lr: float = 2e-4
    head_lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    @property
    def tag(self) -> str:
        return f"s{self.steps}_lr{self.lr:g}_hlr{self.head_lr:g}_bs{self.batch_size}_seed{self.seed}"


def probe_dir(cache: Path, data_key: str) -> Path:
    return cache / "encoder" / f"probe_{data_key}"


def base_probes(cache: Path, data_key: str, tasks: dict, log=print) -> dict:
    """Linear probes on the frozen base: heads (for LP-FT init and the frozen-base row) + base correctness."""
    out = probe_dir(cache, data_key)
    summary_path = out / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    base = E.save_base(cache / "encoder" / "base")
    model = tok = None
    for name, task in tasks.items():
        head_path = out / f"{name}.safetensors"
        if name in summary and head_path.exists():
            continue
        feats = out / f"features_{name}.npz"  # the base's features, kept: the probe is cheap, they are not
        if feats.exists():
            x = dict(np.load(feats))
        else:
            if model is None:
                tok, model = E.load_tokenizer(base), E.load_encoder(base)
            x = {s: E.features(model, tok, [t for t, _ in task[s]]) for s in ("train", "val", "test")}
            out.mkdir(parents=True, exist_ok=True)
            np.savez(feats, **x)
        y = {s: np.array([l for _, l in task[s]]) for s in x}
        probe = E.fit_probe(x["train"], y["train"], len(task["labels"]), x["val"], y["val"])
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(probe["state"], str(head_path))
        summary[name] = {"weight_decay": probe["weight_decay"],
                         "val": (E.predict(x["val"], probe["state"]) == y["val"]).astype(int).tolist(),
                         "test": (E.predict(x["test"], probe["state"]) == y["test"]).astype(int).tolist()}
        write_json(summary_path, summary)
        log(f"probe {name}: val {np.mean(summary[name]['val']):.3f} test {np.mean(summary[name]['test']):.3f}")
    return {name: summary[name] for name in tasks}


def expert_paths(cache: Path, data_key: str, cfg: TrainConfig, name: str) -> tuple[Path, Path]:
    root = cache / "encoder" / f"experts_{data_key}_{cfg.tag}"
    return root / name, root / "heads" / f"{name}.safetensors"


def _train_one(args) -> tuple[str, dict]:
    cache, data_key, cfg, name, task, threads = args
    set_threads(threads)
    enc_dir, head_path = expert_paths(cache, data_key, cfg, name)
    init = E.load_head(probe_dir(cache, data_key) / f"{name}.safetensors")
    prefix = f"[{name}]"
    info = E.finetune(cache / "encoder" / "base", task, init, enc_dir, head_path, steps=cfg.steps, lr=cfg.lr,
                      head_lr=cfg.head_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                      log=lambda m: print(prefix, m, flush=True))
    return name, info


def train_experts(cache: Path, data_key: str, cfg: TrainConfig, tasks: dict, jobs: int, threads: int,
                  log=print) -> dict[str, dict]:
    """Fine-tune the experts that are not cached yet, `jobs` at a time (one process each)."""
    todo = [n for n in tasks if not (expert_paths(cache, data_key, cfg, n)[0] / "config.json").exists()
            or not expert_paths(cache, data_key, cfg, n)[1].exists()]
    if todo:
        log(f"training {len(todo)} expert(s) ({cfg.tag}): {', '.join(todo)}")
        work = [(cache, data_key, cfg, n, tasks[n], threads) for n in todo]
        if jobs > 1 and len(work) > 1:
            with mp.get_context("spawn").Pool(min(jobs, len(work))) as pool:
                list(pool.imap_unordered(_train_one, work))
        else:
            for w in work:
                _train_one(w)
    infos = {}
    for n in tasks:
        enc_dir, _ = expert_paths(cache, data_key, cfg, n)
        infos[n] = read_json(enc_dir.parent / f"{n}.train.json")
    write_json(expert_paths(cache, data_key, cfg, "x")[0].parent / "config.json", asdict(cfg))
    return infos


def expert_scores(cache: Path, data_key: str, cfg: TrainConfig, tasks: dict, log=print) -> dict:
    """Each expert on its own task (val and test): the normaliser of every merged score."""
    path = expert_paths(cache, data_key, cfg, "x")[0].parent / "scores.json"
    scores = read_json(path) if path.exists() else {}
    tok = E.load_tokenizer(cache / "encoder" / "base")
    for name, task in tasks.items():
        if name in scores:
            continue
        enc_dir, head_path = expert_paths(cache, data_key, cfg, name)
        heads = {name: E.load_head(head_path)}
        scores[name] = {s: E.evaluate_encoder(enc_dir, tok, {name: task}, heads, s)[name].astype(int).tolist()
                        for s in ("val", "test")}
        write_json(path, scores)
        log(f"expert {name}: val {np.mean(scores[name]['val']):.3f} test {np.mean(scores[name]['test']):.3f}")
    return {n: scores[n] for n in tasks}
