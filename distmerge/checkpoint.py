"""Hugging Face checkpoints on disk: where each tensor lives, its dtype and shape, and lazy reads by name.

Opening a checkpoint reads only its index and the JSON headers of its safetensors files; a tensor's bytes
are read when `read` asks for that tensor. Pickle weights are refused (unpickling can run code), and so are
files that lie outside the checkpoint: `checkpoint_file` decides where every file of a checkpoint may
be read (its directory, or for a snapshot in the Hugging Face cache, that model's cache repository, whose blobs
the snapshot links to).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, StorageError
from .lora import ADAPTER_CONFIG, LoraAdapter, is_adapter_dir, read_adapter_config

if TYPE_CHECKING:
    from .hub import HubAccess

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
    start: int | None = None  # where its bytes begin in that file (`read_safetensors_header`'s "start")

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


def read_safetensors_header(path: Path, model: str | None = None, shown: Path | str | None = None
                            ) -> dict[str, dict]:
    """The JSON header of a safetensors file, checked completely against the format and the file's size.

    Everything safetensors itself would refuse when a tensor is read is refused here, when the checkpoint is
    opened: a header that is not a JSON object, metadata that is not a map of strings, an entry without a known
    dtype, a shape of non-negative integers and two data offsets, offsets that disagree with dtype x shape, and
    offsets that do not tile the data section exactly (every byte after the header belongs to exactly one tensor:
    no overlap, no gap, nothing past the end). Each entry gains "start": the file offset of its first byte.
    Errors name `model` and `shown` (the file as the user names it; default `path`) and the tensor.
    """
    where = f"model {model}: {shown or path}" if model else f"{shown or path}"

    def corrupt(problem: str) -> StorageError:
        return StorageError(f"{where} has a corrupt header: {problem}; re-download it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise StorageError(f"{where} is not a safetensors file (shorter than 8 bytes); re-download it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise corrupt(f"length {header_len}, the file has {size} bytes")
            raw = f.read(header_len)
    except OSError as exc:
        raise StorageError(f"cannot read {where}: {exc.strerror}") from None
    try:
        if not raw.startswith(b"{"):
            raise ValueError
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise corrupt("not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("`__metadata__` is not a map of strings")

    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise corrupt(f"tensor {name} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupt(f"tensor {name} has no dtype")
        if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
            raise corrupt(f"tensor {name} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise corrupt(f"tensor {name} has data_offsets {offsets!r}, not two non-negative integers")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}, which distmerge does not read "
                                  f"(supported: {', '.join(DTYPES)}); convert the checkpoint or drop the model")
        begin, end = offsets
        if end < begin:
            raise corrupt(f"tensor {name} has data_offsets [{begin}, {end}], which end before they begin")
        nbytes = DTYPES[dtype][1] * math.prod(shape)
        if end - begin != nbytes:
            raise corrupt(f"tensor {name} of shape {shape} {dtype} needs {nbytes} bytes, the header gives it "
                          f"{end - begin}")
        if end > data_len:
            raise StorageError(
                f"{where} is truncated or its header is corrupt: tensor {name} ends at byte {8 + header_len + end}, "
                f"the file has {size} bytes; re-download or re-copy it")
        spans.append((begin, end, name))
        entry["start"] = 8 + header_len + begin
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise corrupt(f"tensor {name} (bytes {begin}-{end} of the data section) overlaps tensor {previous}")
        if begin > covered:
            after = f"between tensor {previous} and tensor {name}" if previous else f"before tensor {name}"
            raise corrupt(f"bytes {covered}-{begin} of the data section ({after}) belong to no tensor")
        covered, previous = end, name
    if covered != data_len:
        after = f"after tensor {previous}" if previous else "and no tensor"
        raise corrupt(f"the file has {data_len - covered} bytes {after} that belong to no tensor")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


HF_REPO_PREFIX = "models--"


def checkpoint_roots(directory: Path) -> tuple[Path, ...]:
    """The directories a file of the checkpoint in `directory` may really lie in, symlinks resolved.

    The checkpoint directory itself; and for a snapshot in a Hugging Face cache
    (`models--org--name/snapshots/<revision>/`, or a folder in one, whose files are symlinks into
    `../../blobs/`), the cache repository `models--org--name/` that holds it. Nothing else: not the rest of the
    cache, not another repository's blobs.
    """
    roots = [directory.resolve()]
    for revision in [directory.absolute(), *directory.absolute().parents]:
        snapshots = revision.parent
        if snapshots.name == "snapshots" and snapshots.parent.name.startswith(HF_REPO_PREFIX):
            roots.append(snapshots.parent.resolve())
            break
    return tuple(dict.fromkeys(roots))


def checkpoint_file(model: str, directory: Path, name: str, listed_in: str | None = None) -> Path | None:
    """Where file `name` of the checkpoint in `directory` may be read: its real path (symlinks resolved), or None
    when there is no such file. Every file distmerge reads from a checkpoint comes through here.

    Refused with a CheckpointError: an absolute `name`, one that climbs with `..` (`listed_in` names the file that
    listed it, e.g. the index), and a file whose symlinks lead outside `checkpoint_roots(directory)`.
    """
    source = f"{directory / listed_in}" if listed_in else f"{directory}"
    if os.path.isabs(name):
        raise CheckpointError(f"model {model}: {source} names an absolute path {name!r}; paths in a checkpoint must "
                              "be relative to the checkpoint directory")
    if ".." in Path(name).parts:
        raise CheckpointError(f"model {model}: {source} points outside its checkpoint directory ({name!r}); "
                              f"refusing to read it. Fix {listed_in or 'it'} so every file it names lies inside the "
                              "directory")
    path = directory / name
    if not os.path.lexists(path):
        return None
    real = path.resolve()
    roots = checkpoint_roots(directory)
    if not any(real == root or root in real.parents for root in roots):
        where = ("its checkpoint directory and its Hugging Face cache repository " f"{roots[-1]}" if len(roots) > 1
                 else "its checkpoint directory")
        raise CheckpointError(f"model {model}: {path} points outside {where} (it leads to {real}); refusing to "
                              "read it. Replace the link with the file itself, or re-download the model")
    return real if real.is_file() else None


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve_model_dir(ref: str, base_dir: str = ".", hub: "HubAccess | None" = None, weights: bool = True) -> Path:
    """A model reference -> its local directory.

    Tried in order: a directory relative to the current directory, one relative to `base_dir` (the config's
    directory), and a hub id (`org/name` or `org/name@revision`): its snapshot in the local Hugging Face cache,
    downloaded into it first unless `hub` forbids it (see `hub.hub_snapshot`; `weights=False`: only its small
    files are needed).
    """
    for candidate in (Path(ref).expanduser(), Path(base_dir) / Path(ref).expanduser()):
        if candidate.is_dir():
            return candidate.resolve()
        if candidate.exists():
            raise CheckpointError(f"model {ref!r} is a file; give the checkpoint directory that holds config.json")
    if not _HUB_ID.match(ref):
        raise CheckpointError(f"model {ref!r}: no such directory; give a checkpoint directory or a hub id (org/name)")
    from .hub import HubAccess, hub_snapshot  # hub imports this module

    return hub_snapshot(ref, hub or HubAccess(), weights)


def refuse_pickle_weights(ref: str, names: list[str]) -> None:
    """Refuse the checkpoint `ref` whose files (`names`, those of its directory or its hub repository) include
    pickle weights, called when it has no safetensors weights."""
    pickles = sorted(name for name in set(names) if any(fnmatch.fnmatch(name, p) for p in PICKLE_PATTERNS))
    if pickles:
        raise CheckpointError(
            f"model {ref} has only pickle weights ({', '.join(pickles[:3])}); distmerge does not unpickle "
            "checkpoint files because that can run arbitrary code. Convert it once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )


class Checkpoint:
    """One model in Hugging Face layout.

    `tensors` maps every tensor name to where it lives; `config` is its config.json (or {}). It holds no open
    files, so a Checkpoint travels to Ray actors cheaply.
    """

    def __init__(self, ref: str, path: Path, tensors: dict[str, TensorInfo], config: dict,
                 adapter: LoraAdapter | None = None):
        self.ref = ref
        self.path = path
        self.tensors = tensors
        self.config = config
        self.adapter = adapter  # a LoRA adapter applied to the tensors as they are read

    @classmethod
    def open(cls, ref: str, base_dir: str = ".", config_only: bool = False, hub: "HubAccess | None" = None
             ) -> "Checkpoint":
        """`ref` is a model, `model+adapter` (mergekit's LoRA syntax) or a LoRA adapter directory. `config_only`:
        when the directory has a config.json but no weights (planning a merge before the checkpoints are
        downloaded), derive the tensors from the architecture instead of refusing (and download no weights).
        `hub`: whether a hub id not in the local cache is downloaded (default: yes, unless HF_HUB_OFFLINE)."""
        path, adapter_path = _model_and_adapter_dirs(ref, base_dir, hub, weights=not config_only)
        config = _read_config(ref, path)
        if config_only and config and not any(path.glob("*.safetensors")):
            tensors = _tensors_from_config(ref, config)
        else:
            tensors = _index_tensors(ref, path)
        adapter = LoraAdapter.open(ref, adapter_path, tensors) if adapter_path is not None else None
        return cls(ref, path, tensors, config, adapter)

    @property
    def directories(self) -> list[Path]:
        """The directories its files are read from (an output must not overlap any)."""
        return [self.path] + ([self.adapter.path] if self.adapter else [])

    @property
    def identity(self) -> tuple[Path, Path | None]:
        """What makes two references the same model: the real directories of the model and of its adapter."""
        return self.path.resolve(), self.adapter.path.resolve() if self.adapter else None

    def file(self, name: str) -> Path | None:
        """The real path of file `name` of this checkpoint (e.g. `tokenizer.json`), None when it has none;
        a CheckpointError when it lies outside the checkpoint (see `checkpoint_file`)."""
        return checkpoint_file(self.ref, self.path, name)

    @property
    def has_weights(self) -> bool:
        return all(info.file for info in self.tensors.values())

    @property
    def files(self) -> list[str]:
        adapter = {self.adapter.file} if self.adapter else set()
        return sorted({info.file for info in self.tensors.values()} | adapter)

    @property
    def num_layers(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` as stored (CPU, stored dtype); `rows=(start, stop)` reads only those rows."""
        info = self.tensors[name]
        whole = rows is None or self.adapter is not None  # an adapter's update needs the whole tensor
        try:
            tensor = read_rows(info, None if whole else rows)
        except OSError as exc:
            raise StorageError(f"model {self.ref}: reading tensor {name} from {info.file} failed: "
                               f"{exc.strerror or exc}") from None
        if self.adapter is None:
            return tensor
        tensor = self.adapter.apply(name, tensor)
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def reads_rows_alone(self, name: str) -> bool:
        """Whether `read(name, rows)` reads only those rows (an adapter's update reads the whole tensor)."""
        return self.adapter is None or name not in self.adapter.updates


def read_rows(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor's bytes (rows `rows[0]:rows[1]` of them only, when given) read into fresh memory with plain
    reads at the offsets its checked header gives (`read_safetensors_header`).

    Not through a memory map: mapped pages count as the process's resident memory while the map lives, and
    faulting them in one page at a time costs more than the copy a read makes.
    """
    dtype, width = DTYPES[info.dtype]
    first, last = rows or (0, info.shape[0] if info.shape else 1)
    shape = (last - first, *info.shape[1:]) if info.shape else ()
    row_bytes = math.prod(info.shape[1:]) * width
    data = torch.empty(math.prod(shape) * width, dtype=torch.uint8)
    view, done = memoryview(data.numpy()), 0
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start + first * row_bytes)
        while done < len(view):
            count = f.readinto(view[done:])
            if not count:
                raise OSError(f"the file ends {len(view) - done} bytes short of the tensor's end (was it changed "
                              "during the merge?); rerun the same command to resume")
            done += count
    return data.view(dtype).view(shape)


class CheckpointView(Checkpoint):
    """An input read differently from how it is stored (another vocabulary, another layout): its own tensor table
    and reads, and the files, directories and identity of the checkpoint it wraps."""

    def __init__(self, inner: Checkpoint, tensors: dict[str, TensorInfo]):
        super().__init__(inner.ref, inner.path, tensors, inner.config)
        self.inner = inner

    def reads_rows_alone(self, name: str) -> bool:
        return self.inner.reads_rows_alone(name)

    @property
    def files(self) -> list[str]:
        return self.inner.files

    @property
    def directories(self) -> list[Path]:
        return self.inner.directories

    @property
    def identity(self) -> tuple:
        return self.inner.identity


def _model_and_adapter_dirs(ref: str, base_dir: str, hub: "HubAccess | None", weights: bool
                            ) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None) for `model+adapter`, an adapter directory or a model."""
    model_ref, plus, adapter_ref = ref.partition("+")
    if plus:
        if "+" in adapter_ref:
            raise CheckpointError(f"model {ref!r}: write one model and one LoRA adapter as `model+adapter`")
        adapter = resolve_model_dir(adapter_ref, base_dir, hub)
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"model {ref!r}: {adapter} has no {ADAPTER_CONFIG}, so it is not a LoRA adapter "
                                  "(`model+adapter` applies a PEFT LoRA adapter to its model)")
        return resolve_model_dir(model_ref, base_dir, hub, weights), adapter
    directory = resolve_model_dir(ref, base_dir, hub, weights)
    if not is_adapter_dir(directory):
        return directory, None
    base = read_adapter_config(ref, directory).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"LoRA adapter {ref}: {directory / ADAPTER_CONFIG} names no `base_model_name_or_path`; "
                              "write the model as `base+adapter`")
    return resolve_model_dir(base, base_dir, hub, weights), directory


def _index_tensors(ref: str, path: Path) -> dict[str, TensorInfo]:
    index_file = checkpoint_file(ref, path, INDEX_NAME)
    single = checkpoint_file(ref, path, SINGLE_NAME) if index_file is None else None
    if index_file is not None:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"model {ref}: {path / INDEX_NAME} is not a valid index (needs a `weight_map` "
                                  "from tensor names to file names); re-download the checkpoint") from None
        files = {rel: checkpoint_file(ref, path, rel, listed_in=INDEX_NAME) for rel in sorted(set(weight_map.values()))}
    elif single is not None:
        weight_map = None
        files = {SINGLE_NAME: single}
    else:
        refuse_pickle_weights(ref, [p.name for p in path.iterdir()])
        raise CheckpointError(f"model {ref} ({path}) has no {SINGLE_NAME} and no {INDEX_NAME}; "
                              "is it a Hugging Face checkpoint directory?")

    tensors: dict[str, TensorInfo] = {}
    for rel, file in files.items():
        if file is None:
            raise CheckpointError(f"model {ref}: {rel} is listed in {INDEX_NAME} but missing; re-download it")
        header = read_safetensors_header(file, ref, path / rel)  # every entry checked, listed or not
        for name, entry in header.items():
            if weight_map is not None and weight_map.get(name) != rel:
                continue
            tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), str(file), entry["start"])
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"model {ref}: tensor {missing[0]} is listed in {INDEX_NAME} under "
                                  f"{weight_map[missing[0]]} but that file does not hold it; re-download it")
    return tensors


def _tensors_from_config(ref: str, config: dict) -> dict[str, TensorInfo]:
    from .architecture import tensor_shapes

    try:
        shapes = tensor_shapes(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"model {ref} has no weights, and distmerge cannot derive its tensors from its "
                              f"config.json ({exc}); download the weights first (without transformers installed, only "
                              "Llama-family configs are planned from config.json alone)") from None
    dtype = TORCH_TO_CODE.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), "BF16")
    return {name: TensorInfo(name, dtype, shape, "") for name, shape in shapes.items()}


def _read_config(ref: str, path: Path) -> dict:
    file = checkpoint_file(ref, path, "config.json")
    if file is None:
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"model {ref}: {path / 'config.json'} is not a JSON object; re-download it")
    return config
