"""Small synthetic Llama-shaped checkpoints: a base and experts fine-tuned from it, in Hugging Face layout.

Experts differ from the base the way real fine-tunes do: a low-rank update plus a few heavy-tailed outlier
entries plus small dense noise. Used by the example, the tests and the benchmarks; written with safetensors'
own `save_file`, so tests read checkpoints that distmerge did not write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .architecture import llama_config, llama_tensor_shapes
from .plan import natural_key


def random_base(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in llama_tensor_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = 0.02 * torch.randn(shape, generator=gen)
    return tensors


def expert_from(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01, rank: int = 4,
                outlier_share: float = 0.002, outlier_scale: float = 8.0) -> dict[str, torch.Tensor]:
    """base + (low-rank update + sparse heavy-tailed outliers + dense noise), per tensor."""
    gen = torch.Generator().manual_seed(seed)
    expert = {}
    for name in sorted(base, key=natural_key):
        weight = base[name]
        if weight.dim() == 2:
            rows, cols = weight.shape
            k = min(rank, rows, cols)
            delta = (torch.randn(rows, k, generator=gen) @ torch.randn(k, cols, generator=gen)) * (scale / k**0.5)
        else:
            delta = scale * torch.randn(weight.shape, generator=gen)
        outliers = torch.rand(weight.shape, generator=gen) < outlier_share
        delta += outliers * torch.randn(weight.shape, generator=gen) * scale * outlier_scale
        delta += 0.1 * scale * torch.randn(weight.shape, generator=gen)
        expert[name] = weight + delta
    return expert


def write_tokenizer(path: Path, vocab_size: int) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in list(vocab.items())[:3]],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 256,
    }))


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                    dtype: torch.dtype = torch.bfloat16, shard_size: int | None = None, tokenizer: bool = True) -> Path:
    """Write `tensors` in HF layout: one model.safetensors, or shards of at most `shard_size` bytes + index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors, key=natural_key)
    data = {name: tensors[name].to(dtype).contiguous() for name in names}
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(path, config["vocab_size"])
    if shard_size is None:
        save_file(data, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    groups, size = [[]], 0
    for name in names:
        nbytes = data[name].numel() * data[name].element_size()
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: data[name] for name in group}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in group})
    total = sum(t.numel() * t.element_size() for t in data.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def make_family(out_dir: str | Path, n_experts: int = 3, config: dict | None = None, dtype=torch.bfloat16,
                shard_size: int | None = None, seed: int = 0, names: list[str] | None = None) -> dict:
    """A base and `n_experts` experts under `out_dir`; returns {"base": path, "experts": [paths]}."""
    out_dir = Path(out_dir)
    config = config or llama_config()
    base = random_base(config, seed)
    names = names or [f"expert{i + 1}" for i in range(n_experts)]
    paths = {"base": save_checkpoint(out_dir / "base", base, config, dtype, shard_size), "experts": []}
    for i, name in enumerate(names):
        expert = expert_from(base, seed=seed * 1000 + i + 1)
        paths["experts"].append(save_checkpoint(out_dir / name, expert, config, dtype, shard_size))
    return paths
