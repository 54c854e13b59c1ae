"""LoRA adapters as merge inputs: `model: base+path/to/adapter` (mergekit's syntax), or a PEFT adapter directory
where a model is expected (its base is `base_model_name_or_path` of adapter_config.json).

The adapter is applied to each targeted tensor of its base as the tensor is read, exactly as PEFT's
`merge_and_unload` applies it: `W += transpose?(B @ A) * scaling`, B @ A in float32 and the sum in W's dtype, with
`scaling = alpha / r` (`alpha / sqrt(r)` for rsLoRA) and per-module ranks and alphas from `rank_pattern` and
`alpha_pattern`. No merged model is ever written or held whole. Tensors the adapter saves whole
(`modules_to_save`) replace the base's. Adapters that are not plain LoRA (DoRA, LoRA biases, other PEFT types)
are refused by name, before any work.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, StorageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAVED_PREFIX = "base_model.model."  # PEFT saves adapter tensors under the wrapped model's name


@dataclass(frozen=True)
class LoraUpdate:
    """How one base tensor changes: the adapter tensors holding A and B (or, for a tensor saved whole, `whole`)."""

    a: str = ""
    b: str = ""
    scaling: float = 0.0
    transpose: bool = False  # Conv1D layers (fan_in_fan_out) and embeddings store the product transposed
    whole: str = ""


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter on disk: its safetensors file and, per base tensor name, the update it makes. Holds no open file,
    so it travels to Ray actors with its Checkpoint."""

    ref: str
    path: Path
    file: str
    updates: dict[str, LoraUpdate]

    @classmethod
    def open(cls, ref: str, path: Path, base_tensors: dict) -> "LoraAdapter":
        from .checkpoint import checkpoint_file, read_safetensors_header

        config = read_adapter_config(ref, path)
        file = checkpoint_file(ref, path, ADAPTER_WEIGHTS)
        if file is None:
            raise CheckpointError(f"LoRA adapter {ref}: {path / ADAPTER_WEIGHTS} is missing (adapters saved as "
                                  "pickles are not read); save it with `save_pretrained(safe_serialization=True)`")
        header = read_safetensors_header(file, ref, path / ADAPTER_WEIGHTS)
        updates = _updates(ref, config, header, base_tensors)
        return cls(ref, path, str(file), updates)

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Base tensor `name` (as stored) with the adapter's update, in the stored dtype."""
        update = self.updates.get(name)
        if update is None:
            return tensor
        try:
            with safe_open(self.file, framework="pt", device="cpu") as handle:
                merged = handle.get_tensor(update.whole).to(tensor.dtype) if update.whole else tensor.clone()
                if not update.a:
                    return merged
                a, b = handle.get_tensor(update.a).float(), handle.get_tensor(update.b).float()
        except Exception as exc:
            raise StorageError(f"LoRA adapter {self.ref}: reading {update.whole or update.a} from {self.file} "
                               f"failed: {exc}") from None
        delta = b @ a
        merged += (delta.T if update.transpose else delta) * update.scaling
        return merged


def read_adapter_config(ref: str, path: Path) -> dict:
    from .checkpoint import checkpoint_file

    file = checkpoint_file(ref, path, ADAPTER_CONFIG)
    try:
        config = json.loads(file.read_text()) if file is not None else None
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"LoRA adapter {ref}: {path / ADAPTER_CONFIG} is missing or not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"LoRA adapter {ref} is a {config['peft_type']} adapter; only LoRA adapters are read")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(key):
            raise CheckpointError(f"LoRA adapter {ref} uses {what} (`{key}: true`), which distmerge does not apply; "
                                  "merge it into its base with PEFT's merge_and_unload first")
    return config


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern that matches the end of the module's name, on a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _updates(ref: str, config: dict, header: dict, base_tensors: dict) -> dict[str, LoraUpdate]:
    pairs: dict[str, dict[str, str]] = {}
    wholes: dict[str, str] = {}  # base tensor -> the adapter tensor that replaces it
    for saved in header:
        name = saved.removeprefix(SAVED_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if match:
            module = match.group(1) or match.group(3)
            part = (match.group(2) or match.group(4))[-1]
            pairs.setdefault(module, {})[part] = saved
            continue
        if "lora_magnitude_vector" in name or ".lora_" in name:
            raise CheckpointError(f"LoRA adapter {ref}: tensor {saved} is not a LoRA A or B matrix distmerge knows")
        # saved whole: a module trained in full (`modules_to_save`), or a base layer PEFT saves beside its LoRA
        # (embeddings, which training may have resized)
        name = re.sub(r"\.(modules_to_save(\.default)?|base_layer)\.", ".", name)
        if name not in base_tensors:
            raise CheckpointError(f"LoRA adapter {ref}: tensor {saved} has no counterpart {name} in its base model; "
                                  "is this the adapter of that base?")
        if list(header[saved]["shape"]) != list(base_tensors[name].shape):
            raise CheckpointError(f"LoRA adapter {ref}: tensor {saved} has shape {header[saved]['shape']} but {name} "
                                  f"is {list(base_tensors[name].shape)}; resized vocabularies are not read yet")
        wholes[name] = saved
    updates: dict[str, LoraUpdate] = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"LoRA adapter {ref}: module {module} has lora_{next(iter(parts))} but not "
                                  f"lora_{'A' if 'B' in parts else 'B'}")
        target = f"{module}.weight"
        if target not in base_tensors:
            raise CheckpointError(f"LoRA adapter {ref}: module {module} has no tensor {target} in its base model; "
                                  "is this the adapter of that base?")
        a_shape, b_shape = header[parts["A"]]["shape"], header[parts["B"]]["shape"]
        embedding = "lora_embedding" in parts["A"]
        rank = a_shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        product = [a_shape[1], b_shape[0]] if transpose else [b_shape[0], a_shape[1]]
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank or product != list(base_tensors[target].shape):
            raise CheckpointError(f"LoRA adapter {ref}: module {module} makes an update of shape {product} from "
                                  f"A {a_shape} and B {b_shape}, but {target} is {list(base_tensors[target].shape)}")
        updates[target] = LoraUpdate(a=parts["A"], b=parts["B"], scaling=scaling, transpose=transpose,
                                     whole=wholes.get(target, ""))
    return {**{name: LoraUpdate(whole=saved) for name, saved in wholes.items()}, **updates}
