"""Track 1: all-MiniLM-L6-v2 (BertModel) experts, one per task, and their evaluation.

An expert = the full encoder fine-tuned on one task + a linear head on the mean-pooled token states (the
pooling all-MiniLM-L6-v2 was trained with). The head starts from a linear probe fitted on the frozen base's
features (LP-FT), so the "frozen base + own head" row and the experts share the head's starting point.
The word-embedding table (30522 x 384, half of the parameters) stays frozen: it makes a CPU step about twice
as fast, and the merge methods still see every other tensor move. Encoders are saved as Hugging Face
safetensors checkpoints (what `distmerge merge` reads); heads are saved separately under cache/heads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .common import minilm_dir, seed_everything, train_loop, write_json

MAX_LEN = 64


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_encoder(path: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), dtype=torch.float32)


def save_base(out: Path) -> Path:
    """The pretrained encoder, re-saved as safetensors with its tokenizer: the merge's base_model."""
    if not (out / "config.json").exists():
        src = minilm_dir(out.parents[1])  # out is <cache>/encoder/base
        tmp = out.with_name(out.name + ".tmp")
        load_encoder(src).save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(src).save_pretrained(str(tmp))
        tmp.rename(out)
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def batches(tok, texts: list[str], batch_size: int, order: np.ndarray | None = None):
    """Tokenised batches; with order=None, sorted by length so padding is small (inference only)."""
    if order is None:
        order = np.argsort([len(t) for t in texts], kind="stable")
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        yield idx, enc


@torch.inference_mode()
def features(model, tok, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states, in the order of `texts`."""
    model.eval()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for idx, enc in batches(tok, texts, batch_size):
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out[idx] = mean_pool(h, enc["attention_mask"]).numpy()
    return out


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, xv: np.ndarray, yv: np.ndarray,
              decays=(1e-4, 1e-3, 1e-2)) -> dict:
    """Multinomial logistic regression by full-batch L-BFGS; the L2 strength is chosen on validation."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    best = None
    for wd in decays:
        head = torch.nn.Linear(x.shape[1], n_classes)
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=300, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(xt), yt) + wd * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = (head(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean()
        if best is None or acc > best[0]:
            best = (acc, wd, {k: v.detach().clone() for k, v in head.state_dict().items()})
    return {"val_acc": float(best[0]), "weight_decay": best[1], "state": best[2]}


def predict(feats: np.ndarray, head: dict) -> np.ndarray:
    w, b = head["weight"].numpy(), head["bias"].numpy()
    return (feats @ w.T + b).argmax(1)


class Classifier(torch.nn.Module):
    """The encoder with one linear head per task, on its mean-pooled last hidden states."""

    def __init__(self, encoder, head_states: dict[str, dict]):
        super().__init__()
        self.encoder = encoder
        self.heads = torch.nn.ModuleDict()
        for name, state in head_states.items():
            n, d = state["weight"].shape
            self.heads[name] = torch.nn.Linear(d, n)
            self.heads[name].load_state_dict(state)

    def forward(self, task: str, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.heads[task](mean_pool(h, attention_mask))


def finetune(base: Path, tasks: dict, head_inits: dict, out_dir: Path, head_paths: dict, *, steps: int, lr: float,
             head_lr: float, batch_size: int, warmup: float = 0.06, weight_decay: float = 0.01, seed: int = 0,
             log=print) -> dict:
    """LP-FT: the encoder (minus the word embeddings) and the heads, AdamW, linear warm-up then linear decay. One task
    makes its expert, all six the data-mixture model: each batch holds one task's examples (for its head), and an
    epoch is every task's batches in one shuffled order."""
    seed_everything(seed)
    tok = load_tokenizer(base)
    model = Classifier(load_encoder(base), head_inits)
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": enc_params, "lr": lr}, {"params": model.heads.parameters(), "lr": head_lr}],
                            weight_decay=weight_decay)
    texts = {n: [t for t, _ in task["train"]] for n, task in tasks.items()}
    labels = {n: torch.tensor([y for _, y in task["train"]]) for n, task in tasks.items()}
    rng = np.random.default_rng(seed)

    def epoch():
        if len(tasks) == 1:  # an expert's batches, tokenised as they are drawn
            (n,) = tasks
            yield from ((n, b) for b in batches(tok, texts[n], batch_size, rng.permutation(len(texts[n]))))
            return
        every = [(n, b) for n in tasks for b in batches(tok, texts[n], batch_size, rng.permutation(len(texts[n])))]
        yield from (every[i] for i in rng.permutation(len(every)))

    def loss_fn(batch):
        n, (idx, enc) = batch
        if len(idx) < 2:
            return None
        return torch.nn.functional.cross_entropy(model(n, enc["input_ids"], enc["attention_mask"]), labels[n][idx])

    model.train()
    run = train_loop(list(model.parameters()), opt, epoch, loss_fn, steps, warmup, log)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.encoder.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    for n, path in head_paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.heads[n].state_dict().items()}, str(path))
    examples = sum(len(t) for t in texts.values())
    info = {"steps": steps, "lr": lr, "head_lr": head_lr, "batch_size": batch_size, "seed": seed,
            "tasks": list(tasks), "train_examples": examples, "epochs": round(steps * batch_size / examples, 2), **run}
    write_json(out_dir.parent / f"{out_dir.name}.train.json", info)
    return info


def load_head(path: Path) -> dict:
    return load_file(str(path))


def evaluate_encoder(path: Path, tok, tasks: dict, heads: dict, split: str) -> dict[str, np.ndarray]:
    """Per task, a 0/1 vector: is the task head's prediction on this encoder's features right."""
    model = load_encoder(path)
    out = {}
    for name, task in tasks.items():
        texts = [t for t, _ in task[split]]
        y = np.array([l for _, l in task[split]])
        out[name] = (predict(features(model, tok, texts), heads[name]) == y).astype(np.int8)
    return out


def probe_steps_hint(n_train: int, batch_size: int, epochs: float) -> int:
    return int(math.ceil(epochs * n_train / batch_size))
