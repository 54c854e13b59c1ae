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
    steps: int = 300
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
    info = E.finetune(cache / "encoder" / "base", {name: task}, {name: init}, enc_dir, {name: head_path},
                      steps=cfg.steps, lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size, seed=cfg.seed,
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


BASE_WITH_HEADS = "base encoder + expert heads"


def base_with_expert_heads(cache: Path, data_key: str, cfg: TrainConfig, tasks: dict, log=print) -> dict:
    """The unmerged base encoder read by each expert's own head: what every merge starts from (lambda = 0)."""
    path = expert_paths(cache, data_key, cfg, "x")[0].parent / "base_with_heads.json"
    if path.exists():
        return read_json(path)
    tok = E.load_tokenizer(cache / "encoder" / "base")
    heads = {n: E.load_head(expert_paths(cache, data_key, cfg, n)[1]) for n in tasks}
    out = {s: {n: v.astype(int).tolist() for n, v in E.evaluate_encoder(cache / "encoder" / "base", tok, tasks, heads,
                                                                          s).items()} for s in ("val", "test")}
    write_json(path, out)
    log(f"{BASE_WITH_HEADS}: val {np.mean([np.mean(v) for v in out['val'].values()]):.3f} "
        f"test {np.mean([np.mean(v) for v in out['test'].values()]):.3f}")
    return out


def mixture_rows(cache: Path, data_key: str, cfg: TrainConfig, tasks: dict, log=print) -> dict:
    """The data-mixture baselines: one encoder fine-tuned on the union of the tasks' training data, with its own
    head per task (LP-FT from the same probes as the experts), scored on every task with those heads; with as many
    steps as all the experts together, and with as many as one expert."""
    rows = {}
    for label, steps in ((f"data mixture ({len(tasks)} x {cfg.steps} steps)", len(tasks) * cfg.steps),
                         (f"data mixture ({cfg.steps} steps)", cfg.steps)):
        mix = TrainConfig(**{**asdict(cfg), "steps": steps})
        root = cache / "encoder" / f"mixture_{data_key}_{mix.tag}"
        heads = {n: root / "heads" / f"{n}.safetensors" for n in tasks}
        if not (root / "encoder" / "config.json").exists():
            log(f"training {label}")
            inits = {n: E.load_head(probe_dir(cache, data_key) / f"{n}.safetensors") for n in tasks}
            E.finetune(cache / "encoder" / "base", tasks, inits, root / "encoder", heads, steps=mix.steps, lr=mix.lr,
                       head_lr=mix.head_lr, batch_size=mix.batch_size, seed=mix.seed,
                       log=lambda m: log(f"[mixture] {m}"))
        path = root / "scores.json"
        if not path.exists():
            tok = E.load_tokenizer(cache / "encoder" / "base")
            loaded = {n: E.load_head(h) for n, h in heads.items()}
            write_json(path, {s: {n: v.astype(int).tolist() for n, v in
                                  E.evaluate_encoder(root / "encoder", tok, tasks, loaded, s).items()}
                              for s in ("val", "test")})
        scores = read_json(path)
        log(f"{label}: val {np.mean([np.mean(v) for v in scores['val'].values()]):.3f} "
            f"test {np.mean([np.mean(v) for v in scores['test'].values()]):.3f}")
        rows[label] = scores["test"]
    return rows


def prepare(args, prof: dict, cache: Path, log=print) -> dict:
    """Track 1 up to the merges: splits, frozen-base probes, experts (trained once, cached) and their scores."""
    from . import methods as M
    from .data import data_key, load_tasks
    from .search import Context

    base_dir = cache / "encoder" / "base"
    key = data_key(prof["n_val"], prof["test_cap"], prof["train_cap"], 0)
    tasks = load_tasks(cache, prof["n_val"], prof["test_cap"], prof["train_cap"], tasks=prof["tasks"])
    names = list(tasks)
    sizes = ", ".join(f"{n} ({len(t['train'])}/{len(t['val'])}/{len(t['test'])})" for n, t in tasks.items())
    log(f"[encoder] tasks (train/val/test): {sizes}")
    probes = base_probes(cache, key, tasks, log=log)
    cfg = TrainConfig(steps=args.steps or prof["steps"], lr=args.lr or prof.get("lr", TrainConfig.lr), seed=args.seed)
    infos = train_experts(cache, key, cfg, tasks, jobs=args.jobs, threads=args.threads, log=log)
    experts = expert_scores(cache, key, cfg, tasks, log=log)
    with_heads = base_with_expert_heads(cache, key, cfg, tasks, log=log)
    mixture = mixture_rows(cache, key, cfg, tasks, log=log) if args.mixture else {}
    ctx = Context(root=cache / "merges" / f"encoder_{key}_{cfg.tag}", base=cache / "encoder" / "base",
                  experts=tuple(str(expert_paths(cache, key, cfg, n)[0]) for n in names),
                  heads=tuple(str(expert_paths(cache, key, cfg, n)[1]) for n in names), task_names=tuple(names),
                  tasks_file=cache / "data" / f"tasks_{key}.json", task_subset=tuple(names), threads=args.threads,
                  small_matrices=tuple(M.small_matrices(base_dir, len(names))))
    meta = {"data_key": key, "train": {**asdict(cfg), "per_task": infos},
            "splits": {n: {s: len(t[s]) for s in ("train", "val", "test")} for n, t in tasks.items()},
            "sources": {n: t["source"] for n, t in tasks.items()},
            "probe_weight_decay": {n: p["weight_decay"] for n, p in probes.items()},
            "expert_val": {n: float(np.mean(e["val"])) for n, e in experts.items()},
            "base_val": {n: float(np.mean(p["val"])) for n, p in probes.items()},
            "base_with_heads_val": {n: float(np.mean(v)) for n, v in with_heads["val"].items()}}
    return {"names": names, "ctx": ctx, "base": {n: p["test"] for n, p in probes.items()},
            "experts": {n: e["test"] for n, e in experts.items()}, "meta": meta,
            "extra_refs": {f"{BASE_WITH_HEADS} (λ=0)": with_heads["test"], **mixture},
            "title": f"Track 1: all-MiniLM-L6-v2, {len(names)} tasks, test accuracy / expert's (95% CI)"}
