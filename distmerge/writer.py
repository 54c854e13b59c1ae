"""Everything written to the output directory.

`ShardWriter` streams one safetensors file: the plan knows every name, dtype and shape up front, so the header
is written first and each tensor's bytes follow as soon as it is merged; nothing but the current tensor is held.

`OutputDir` owns the directory's life cycle. One merge at a time holds `OUT/.distmerge.lock` (an flock, which
dies with its process) from before anything is touched until the end. Shards are written under `.distmerge/tmp/`
and renamed into place when complete; a small record per finished shard lets a rerun of the same command resume;
the small files, then the index, are written last, each to a temporary file, flushed to disk and renamed (a
loader sees no model before it is whole), and then the state directory is removed. `--force` removes an old
index before anything else. Every failed write raises a `StorageError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import DTYPES, INDEX_NAME
from .config import format_bytes
from .errors import OutputError, StorageError

STATE_DIR = ".distmerge"
LOCK_NAME = ".distmerge.lock"  # beside STATE_DIR, so that clearing or removing the state keeps the lock
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
ALIGNMENT = 8
# Bytes written between two starts of their writeback: one start per small row block leaves the disk a queue of
# small writes that stalls the next ones (writing 1 GB in 2 MiB blocks: 2.6 s, against 0.7 s in 16 MiB starts).
WRITEBACK_BYTES = 2**24


@dataclass
class ShardRecord:
    """What a worker returns for a finished shard: small, JSON-serialisable."""

    shard: str
    size: int
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> report row (stats, checksum, seconds)


class ShardWriter:
    """Writes one safetensors file, header first, tensors in the declared order, to `path`; errors name `shard`,
    where the caller renames it once closed (a user knows the shard, not the temporary file)."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], shard: Path):
        self.path, self.shard = path, shard
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
        self._hash = None  # of the tensor being written, until its last row block
        self._unsynced = 0  # bytes written since the last start of writeback
        self._fd: int | None = None
        with storage_errors("writing", shard):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.abort()
            raise storage_error(exc, "writing", self.shard) from None

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> str | None:
        """Append `tensor` (CPU, the declared dtype and shape), or rows `rows` of it: its row blocks in order, from
        row 0. Returns the sha256 of the tensor's bytes once they are all written (None before)."""
        if self._hash is None:
            expected_name, dtype, shape = self._expected.pop(0)
            self._current, self._hash, self._next_row = (expected_name, dtype, shape), hashlib.sha256(), 0
        expected_name, dtype, shape = self._current
        first, last = rows or (0, shape[0] if shape else 1)
        block_shape = tuple(shape) if rows is None else (last - first, *shape[1:])
        if (name != expected_name or tensor.dtype != DTYPES[dtype][0] or tuple(tensor.shape) != block_shape
                or first != self._next_row):
            raise AssertionError(f"shard {self.path.name}: expected {expected_name} {dtype} {shape} from row "
                                 f"{self._next_row}, got {name} {tensor.dtype} {tuple(tensor.shape)} rows {rows}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write(memoryview(data))
        self._unsynced += len(data)
        if self._unsynced >= WRITEBACK_BYTES:
            self._start_writeback(self._unsynced)
            self._unsynced = 0
        self._hash.update(memoryview(data))
        self._next_row = last
        if rows is not None and last < shape[0]:
            return None
        digest, self._hash = self._hash.hexdigest(), None
        return digest

    def _start_writeback(self, length: int) -> None:
        """Start writing the last `length` bytes to disk now, so that `close`'s fsync waits for little (on Linux,
        fadvise DONTNEED starts the writeback of dirty pages without waiting, and keeps no clean page cached)."""
        if hasattr(os, "posix_fadvise"):
            end = os.lseek(self._fd, 0, os.SEEK_CUR)
            os.posix_fadvise(self._fd, end - length, length, os.POSIX_FADV_DONTNEED)

    def abort(self) -> None:
        """Give up on the shard: close and delete the partial file (best effort: this runs while failing)."""
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            if fd is not None:
                os.close(fd)
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush to stable storage; the caller renames the file into place."""
        if self._expected or self._hash is not None:
            raise AssertionError(f"shard {self.path.name}: {len(self._expected)} tensors were not written, "
                                 f"{'one' if self._hash is not None else 'none'} partly")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        except OSError as exc:
            self.abort()
            raise storage_error(exc, "writing", self.shard) from None


class WriteBehind:
    """Hashes and writes a shard's tensors on a second thread, one merged tensor behind the merge: on a CPU that is
    a third of an elementwise merge's time, now spent while the next tensor is read and merged. At most one merged
    tensor waits; `write` first waits for the one before, and re-raises the error of a failed write."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmerge-write")
        self._pending: Future | None = None

    def write(self, tensors: list[tuple[str, torch.Tensor, tuple[int, int] | None, dict]]) -> None:
        """Write each (name, tensor or row block, its rows or None, record) in order (ShardWriter.write); a
        tensor's sha256 goes to its record, under "sha256", with its last block. The tensors must stay unchanged
        until the next call."""
        self.wait()
        self._pending = self._thread.submit(self._write, tensors)

    def _write(self, tensors: list[tuple[str, torch.Tensor, tuple[int, int] | None, dict]]) -> None:
        for name, tensor, rows, record in tensors:
            digest = self.writer.write(name, tensor, rows)
            if digest is not None:
                record["sha256"] = digest

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last write, then close the shard."""
        try:
            self.wait()
        finally:
            self._thread.shutdown()
        self.writer.close()

    def abort(self) -> None:
        """Give up on the shard once no write is under way (the file descriptor must not close under one)."""
        self._thread.shutdown(wait=True)
        self.writer.abort()


def storage_error(exc: OSError, doing: str, path: Path) -> StorageError:
    """One line naming the file, why it failed and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space on that filesystem, then rerun the same command to resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make it writable or choose another -o, then rerun the same command"
    else:
        hint = "fix the cause, then rerun the same command to resume"
    return StorageError(f"{doing} {path} failed: {reason}; {hint}")


@contextlib.contextmanager
def storage_errors(doing: str, path: Path):
    """Turn an OSError of the block into a StorageError about `path`."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, doing, path) from None


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    """Make the renames and removals in `path` durable (a no-op where the filesystem cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(temp: Path, path: Path, data: bytes) -> None:
    """Write `data` to `temp`, flush it to disk, rename it to `path`: readers see the old file or the whole new one,
    never a part. On failure the temporary file is removed and a StorageError names `path`."""
    with storage_errors("writing", path):
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    _write_durably(path.with_name(f".{path.name}.tmp"), path, text.encode())


def _read_json(path: Path):
    """The JSON in `path`, or None where it is missing or unreadable (a file cut short by a crash)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class OutputLock:
    """`OUT/.distmerge.lock`: an exclusive flock held by the one merge writing OUT, recording its pid and host.

    The kernel drops an flock when its process ends, however it ends, so a lock left by a crash is stale and the
    next merge takes it over. The file is removed on release while still locked; a process that opened it
    before then and locks it afterwards sees that the path no longer names the file it locked and starts over, so
    two holders never coexist. Only the driver of a Ray merge locks; its workers write under the lock it holds.
    Where the filesystem has no flock (some network filesystems), the merge runs unlocked after a warning.
    """

    def __init__(self, out: Path, log=print):
        self.out = out
        self.path = out / LOCK_NAME
        self.log = log
        self._fd: int | None = None
        self._created: list[Path] = []  # directories made for the lock, deepest first: removed again if left empty

    def acquire(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output {self.out} exists and is not a directory; choose another -o")
        missing = self.out
        while not missing.exists():
            self._created.append(missing)
            missing = missing.parent
        try:
            import fcntl
        except ImportError:  # no flock on this platform
            fcntl = None
        while True:
            try:
                self.out.mkdir(parents=True, exist_ok=True)  # again after a holder released and removed it
            except OSError as exc:
                self._remove_created()
                raise storage_error(exc, "creating", self.out) from None
            if fcntl is None:
                self._unlocked("this platform has no flock")
                return
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._remove_created()
                raise storage_error(exc, "creating", self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._describe(fd)
                os.close(fd)
                raise OutputError(f"{self.out} is being written by another distmerge merge ({holder}); wait for it "
                                  "to finish or stop it, or choose another -o") from None
            except OSError as exc:  # this filesystem has no flock: keep the file as a record, removed on release
                self._unlocked(exc.strerror or str(exc))
                break
            else:
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
            os.close(fd)  # released and removed by its holder between our open and our flock: open the new one
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError as exc:
            self.release()
            raise storage_error(exc, "writing", self.path) from None

    def _describe(self, fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has just started"

    def _unlocked(self, why: str) -> None:
        self.log(f"warning: cannot lock {self.path} ({why}); nothing stops a second merge into {self.out} "
                 "from running at the same time")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: see the class docstring
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for directory in self._created:
            try:
                directory.rmdir()  # only if nothing was written there
            except OSError:
                break
        self._created = []


class OutputDir:
    """The output directory of one merge run."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.state = self.path / STATE_DIR

    @contextlib.contextmanager
    def lock(self, log=print):
        """Hold OUT's lock for the block: a second merge into OUT is refused at once (OutputError)."""
        lock = OutputLock(self.path, log)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()

    @property
    def holds_finished_merge(self) -> bool:
        """An index and no state directory: a merge ended here (`finalize` writes the index last, then drops
        the state)."""
        return (self.path / INDEX_NAME).is_file() and not self.state.exists()

    # ---- before the work ----------------------------------------------------------------------------------

    def prepare(self, fingerprint: str, force: bool, input_dirs: list[Path]) -> dict[str, ShardRecord]:
        """Make the directory ready; return the shards already finished by an interrupted run of the same merge.

        An unfinished run of the same merge is resumed, with or without `force` (its finished shards are exactly
        what this run would write); anything else in the directory needs `force` and is then removed, the index
        first, so that an interrupted `--force` never leaves a directory that looks like a whole model."""
        for directory in input_dirs:
            resolved = self.path.resolve()
            if resolved == directory or directory in resolved.parents or resolved in directory.parents:
                raise OutputError(f"output {self.path} overlaps input checkpoint {directory}; choose another -o")
        run_file = self.state / "run.json"
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output {self.path} exists and is not a directory; choose another -o")
        if run_file.is_file():
            run = _read_json(run_file)
            if isinstance(run, dict) and run.get("fingerprint") == fingerprint:
                shutil.rmtree(self.state / "tmp", ignore_errors=True)  # partial files of the interrupted run
                return self._finished_shards()
            if not force:
                raise OutputError(
                    f"{self.path} holds an unfinished merge of a different config or different inputs; "
                    "rerun that merge to resume it, or pass --force to start this one over")
        elif [p for p in self._entries() if p.name != STATE_DIR] and not force:
            what = "a finished merge" if (self.path / INDEX_NAME).exists() else "files"
            raise OutputError(f"{self.path} already holds {what}; pass --force to replace it, or choose another -o")
        if force and self._entries():
            self._clear()
        elif self.state.exists():  # without run.json: left by a start that failed, or by a finished merge's end
            with storage_errors("removing", self.state):
                shutil.rmtree(self.state)
        with storage_errors("creating", self.state / "shards"):
            (self.state / "shards").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"fingerprint": fingerprint}))
        return {}

    def _entries(self) -> list[Path]:
        """What the directory holds, its lock aside."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name != LOCK_NAME]

    def _clear(self) -> None:
        """Remove a previous output: the index first (the sign that a model is whole), durably, then the rest."""
        entries = self._entries()
        foreign = [p for p in entries if p.is_dir() and not p.is_symlink() and p.name != STATE_DIR]
        if foreign:
            raise OutputError(f"--force would delete {self.path}, but it holds directories a merge never writes "
                              f"(e.g. {foreign[0].name}); remove them yourself or choose another -o")
        index = self.path / INDEX_NAME
        with storage_errors("removing", index):
            if index.is_file() or index.is_symlink():
                index.unlink()
                _fsync_dir(self.path)
        for entry in sorted(entries, key=lambda p: p.name == STATE_DIR):  # the old state last
            with storage_errors("removing", entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)

    def _finished_shards(self) -> dict[str, ShardRecord]:
        finished = {}
        for record_file in sorted((self.state / "shards").glob("*.json")):
            data = _read_json(record_file)
            if not isinstance(data, dict):
                continue  # cut short by a crash: the shard is merged again
            record = ShardRecord(**data)
            shard = self.path / record.shard
            if shard.is_file() and shard.stat().st_size == record.size:
                finished[record.shard] = record
        return finished

    def remember(self, key: str, compute):
        """A value computed once per run and kept in the state directory, so that a resumed run reuses it."""
        file = self.state / f"{key}.json"
        if file.is_file():
            value = _read_json(file)
            if value is not None:
                return value
        value = compute()
        atomic_write_text(file, json.dumps(value))
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
        with storage_errors("writing", self.path / record.shard):
            os.replace(temp, self.path / record.shard)
        atomic_write_text(self.state / "shards" / f"{record.shard}.json", json.dumps(asdict(record)))

    # ---- after the work (driver) ------------------------------------------------------------------------------

    def finalize(self, weight_map: dict[str, str], total_size: int, files: dict[str, bytes | Path]) -> None:
        """Write the small files (bytes, or a Path to copy), then the index (the sign that the model is whole),
        then drop the state directory. Each file goes to a temporary file in the state directory, is flushed to
        disk and renamed into place; a failure leaves no index, and the shards and state for a rerun to finish."""
        temp = self.state / "tmp"
        with storage_errors("creating", temp):
            temp.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            if isinstance(content, Path):
                with storage_errors("reading", content):
                    content = content.read_bytes()
            _write_durably(temp / name, self.path / name, content)
        _fsync_dir(self.path)  # the small files and the shards are on disk before the index says the model is whole
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        _write_durably(temp / INDEX_NAME, self.path / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        _fsync_dir(self.path)
        with contextlib.suppress(OSError):
            (self.state / "run.json").unlink()  # from here on the directory is a finished merge, whatever remains
        shutil.rmtree(self.state, ignore_errors=True)
