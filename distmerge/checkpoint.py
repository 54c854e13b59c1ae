"""Hugging Face checkpoints on disk: where each tensor lives, its dtype and shape, and lazy reads by name.

Opening a checkpoint reads only its index and the JSON headers of its safetensors files; a tensor's bytes
are read when `read` asks for that tensor. Pickle weights are refused (unpickling can run code) and index
entries that point outside the checkpoint directory are refused.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, StorageError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")

# safetensors dtype codes -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
TORCH_TO_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CODE_TO_NAME = {code: name for name, code in TORCH_TO_CODE.items()}

MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # absolute path of the safetensors file holding it

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise StorageError(f"{path} is not a safetensors file (shorter than 8 bytes); re-download it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise StorageError(f"{path} has a corrupt safetensors header (length {header_len}); re-download it")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StorageError(f"{path} has a corrupt safetensors header (not JSON); re-download it") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise StorageError(
            f"{path} is truncated: its header needs {8 + header_len + data_end} bytes, the file has {size}; "
            "re-download or re-copy it"
        )
    return header


def _inside(directory: Path, relative: str) -> Path:
    """`directory / relative`, refusing anything that resolves outside `directory`."""
    if os.path.isabs(relative):
        raise CheckpointError(f"{directory / INDEX_NAME} names an absolute path {relative!r}; index paths must be "
                              "relative to the checkpoint directory")
    root = directory.resolve()
    target = (root / relative).resolve()
    if root != target and root not in target.parents:
        raise CheckpointError(f"{directory / INDEX_NAME} points outside its checkpoint directory ({relative!r}); "
                              "refusing to read it. Fix the index so every file lies inside the directory")
    return target


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve_model_dir(ref: str, base_dir: str = ".") -> Path:
    """A model reference -> its local directory.

    Tried in order: a directory relative to the current directory, one relative to `base_dir` (the config's
    directory), and a hub id (`org/name` or `org/name@revision`) in the local Hugging Face cache. Nothing is
    downloaded.
    """
    for candidate in (Path(ref).expanduser(), Path(base_dir) / Path(ref).expanduser()):
        if candidate.is_dir():
            return candidate.resolve()
        if candidate.exists():
            raise CheckpointError(f"model {ref!r} is a file; give the checkpoint directory that holds config.json")
    if not _HUB_ID.match(ref):
        raise CheckpointError(f"model {ref!r}: no such directory; give a checkpoint directory or a hub id (org/name)")
    repo_id, _, revision = ref.partition("@")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"
        raise CheckpointError(
            f"model {ref!r} is neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it first (`hf download {repo_id}`) or give its local path"
        ) from None


class Checkpoint:
    """One model in Hugging Face layout.

    `tensors` maps every tensor name to where it lives; `config` is its config.json (or {}). It holds no open
    files, so a Checkpoint travels to Ray actors cheaply.
    """

    def __init__(self, ref: str, path: Path, tensors: dict[str, TensorInfo], config: dict):
        self.ref = ref
        self.path = path
        self.tensors = tensors
        self.config = config

    @classmethod
    def open(cls, ref: str, base_dir: str = ".", config_only: bool = False) -> "Checkpoint":
        """`config_only`: when the directory has a config.json but no weights (planning a merge before the
        checkpoints are downloaded), derive the tensors from the architecture instead of refusing."""
        path = resolve_model_dir(ref, base_dir)
        config = _read_config(ref, path)
        if config_only and config and not any(path.glob("*.safetensors")):
            return cls(ref, path, _tensors_from_config(ref, config), config)
        return cls(ref, path, _index_tensors(ref, path), config)

    @property
    def has_weights(self) -> bool:
        return all(info.file for info in self.tensors.values())

    @property
    def files(self) -> list[str]:
        return sorted({info.file for info in self.tensors.values()})

    @property
    def num_layers(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` as stored (CPU, stored dtype); `rows=(start, stop)` reads only those rows.

        Each read opens its file anew: safetensors maps the whole file, and mapped pages count as the process's
        resident memory while the map lives, so a handle kept open through a merge holds every tensor it read.
        """
        info = self.tensors[name]
        try:
            with safe_open(info.file, framework="pt", device="cpu") as handle:
                if rows is None:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[rows[0]:rows[1]]
        except Exception as exc:
            raise StorageError(f"model {self.ref}: reading tensor {name} from {info.file} failed: {exc}") from None


def _index_tensors(ref: str, path: Path) -> dict[str, TensorInfo]:
    index_file = path / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"model {ref}: {index_file} is not a valid index (needs a `weight_map`); "
                                  "re-download the checkpoint") from None
        files = {rel: _inside(path, rel) for rel in sorted(set(weight_map.values()))}
    elif (path / SINGLE_NAME).is_file():
        weight_map = None
        files = {SINGLE_NAME: path / SINGLE_NAME}
    else:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
        if pickles:
            raise CheckpointError(
                f"model {ref} has only pickle weights ({', '.join(pickles[:3])}); distmerge does not unpickle "
                "checkpoint files because that can run arbitrary code. Convert it once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"model {ref} ({path}) has no {SINGLE_NAME} and no {INDEX_NAME}; "
                              "is it a Hugging Face checkpoint directory?")

    tensors: dict[str, TensorInfo] = {}
    for rel, file in files.items():
        if not file.is_file():
            raise CheckpointError(f"model {ref}: {rel} is listed in {INDEX_NAME} but missing; re-download it")
        header = read_safetensors_header(file)
        for name, entry in header.items():
            if weight_map is not None and weight_map.get(name) != rel:
                continue
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"model {ref}: tensor {name} in {file} has unsupported dtype {entry['dtype']}")
            start, end = entry["data_offsets"]
            info = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), str(file))
            if end - start != info.nbytes:
                raise StorageError(f"model {ref}: {file} has a corrupt header: tensor {name} of shape "
                                   f"{list(info.shape)} {info.dtype} needs {info.nbytes} bytes, the header gives it "
                                   f"{end - start}; re-download it")
            tensors[name] = info
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"model {ref}: tensor {missing[0]} is listed in {INDEX_NAME} under "
                                  f"{weight_map[missing[0]]} but that file does not hold it; re-download it")
    return tensors


def _tensors_from_config(ref: str, config: dict) -> dict[str, TensorInfo]:
    from .architecture import llama_tensor_shapes

    try:
        shapes = llama_tensor_shapes(config)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"model {ref} has no weights, and its config.json does not describe a Llama-family "
                              f"model distmerge can derive tensors from ({exc})") from None
    dtype = TORCH_TO_CODE.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), "BF16")
    return {name: TensorInfo(name, dtype, shape, "") for name, shape in shapes.items()}


def _read_config(ref: str, path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"model {ref}: {file} is not valid JSON") from None
