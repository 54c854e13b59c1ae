"""Everything written to the output directory.

`ShardWriter` streams one safetensors file: the plan knows every name, dtype and shape up front, so the header
is written first and each tensor's bytes follow as soon as it is merged; nothing but the current tensor is held.

`OutputDir` owns the directory's life cycle. Shards are written under `.distmerge/tmp/` and renamed into place
when complete; a small record per finished shard lets a rerun of the same command resume; the index is written
last (a loader sees no model before it is whole), and then the state directory is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import DTYPES, INDEX_NAME
from .config import format_bytes
from .errors import OutputError, StorageError

STATE_DIR = ".distmerge"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
ALIGNMENT = 8


@dataclass
class ShardRecord:
    """What a worker returns for a finished shard: small, JSON-serialisable."""

    shard: str
    size: int
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> report row (stats, checksum, seconds)


class ShardWriter:
    """Writes one safetensors file, header first, tensors in the declared order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        self.path = path
        self._expected = list(entries)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            n = DTYPES[dtype][1]
            for dim in shape:
                n *= dim
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % ALIGNMENT)
        self.size = 8 + len(raw) + offset
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self._file.close()
            raise StorageError(f"writing {self.path} failed: {exc.strerror}; check free space and permissions") \
                from None

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append `tensor` (CPU, the declared dtype and shape); returns the sha256 of its bytes."""
        expected_name, dtype, shape = self._expected.pop(0)
        if name != expected_name or tensor.dtype != DTYPES[dtype][0] or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"shard {self.path.name}: expected {expected_name} {dtype} {shape}, got "
                                 f"{name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write(memoryview(data))
        return hashlib.sha256(memoryview(data)).hexdigest()

    def abort(self) -> None:
        """Give up on the shard: close and delete the partial file."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush to stable storage; the caller renames the file into place."""
        if self._expected:
            raise AssertionError(f"shard {self.path.name}: {len(self._expected)} tensors were not written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def _atomic_write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


class OutputDir:
    """The output directory of one merge run."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.state = self.path / STATE_DIR

    # ---- before the work ----------------------------------------------------------------------------------

    def prepare(self, fingerprint: str, force: bool, input_dirs: list[Path]) -> dict[str, ShardRecord]:
        """Make the directory ready; return the shards already finished by an interrupted run of the same merge."""
        for directory in input_dirs:
            resolved = self.path.resolve()
            if resolved == directory or directory in resolved.parents or resolved in directory.parents:
                raise OutputError(f"output {self.path} overlaps input checkpoint {directory}; choose another -o")
        run_file = self.state / "run.json"
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output {self.path} exists and is not a directory; choose another -o")
        if run_file.is_file():
            if json.loads(run_file.read_text()).get("fingerprint") == fingerprint and not force:
                shutil.rmtree(self.state / "tmp", ignore_errors=True)  # partial shards of the interrupted run
                return self._finished_shards()
            if not force:
                raise OutputError(
                    f"{self.path} holds an unfinished merge of a different config or different inputs; "
                    "rerun that merge to resume it, or pass --force to start this one over")
        elif self.path.is_dir() and any(self.path.iterdir()) and not force:
            what = "a finished merge" if (self.path / INDEX_NAME).exists() else "files"
            raise OutputError(f"{self.path} already holds {what}; pass --force to replace it, or choose another -o")
        if force and self.path.is_dir():
            self._clear()
        (self.state / "shards").mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_file, json.dumps({"fingerprint": fingerprint}))
        return {}

    def _clear(self) -> None:
        foreign = [p for p in self.path.iterdir() if p.is_dir() and not p.is_symlink() and p.name != STATE_DIR]
        if foreign:
            raise OutputError(f"--force would delete {self.path}, but it holds directories a merge never writes "
                              f"(e.g. {foreign[0].name}); remove them yourself or choose another -o")
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _finished_shards(self) -> dict[str, ShardRecord]:
        finished = {}
        for record_file in sorted((self.state / "shards").glob("*.json")):
            record = ShardRecord(**json.loads(record_file.read_text()))
            shard = self.path / record.shard
            if shard.is_file() and shard.stat().st_size == record.size:
                finished[record.shard] = record
        return finished

    def remember(self, key: str, compute):
        """A value computed once per run and kept in the state directory, so that a resumed run reuses it."""
        file = self.state / f"{key}.json"
        if file.is_file():
            return json.loads(file.read_text())
        value = compute()
        _atomic_write_text(file, json.dumps(value))
        return value

    def check_free_space(self, bytes_needed: int) -> None:
        free = shutil.disk_usage(self.path).free
        if free < bytes_needed * 1.02:
            raise StorageError(f"{self.path} has {format_bytes(free)} free but the merge writes "
                               f"{format_bytes(bytes_needed)}; free space or choose another -o")

    # ---- during the work (any worker) ----------------------------------------------------------------------

    def temp_path(self, shard: str) -> Path:
        return self.state / "tmp" / f"{shard}.{os.getpid()}.partial"

    def commit_shard(self, temp: Path, record: ShardRecord) -> None:
        os.replace(temp, self.path / record.shard)
        _atomic_write_text(self.state / "shards" / f"{record.shard}.json", json.dumps(asdict(record)))

    # ---- after the work (driver) ------------------------------------------------------------------------------

    def finalize(self, weight_map: dict[str, str], total_size: int, files: dict[str, bytes | Path]) -> None:
        """Write the small files (bytes, or a Path to copy), then the index (the sign that the model is whole),
        then drop the state directory."""
        for name, content in files.items():
            temp = self.path / f".{name}.tmp"
            if isinstance(content, Path):
                shutil.copyfile(content, temp)
            else:
                temp.write_bytes(content)
            os.replace(temp, self.path / name)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(self.path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        shutil.rmtree(self.state, ignore_errors=True)
