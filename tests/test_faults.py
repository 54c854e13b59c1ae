"""Faults around the output directory: two merges at once, `--force` cut short, a full disk, a read-only location,
SIGTERM, and kills at several points. Each time: one `error:` line naming the path (exit 2) or a clean stop
(130 / 143), nothing that looks like a whole model unless it is one, and a rerun of the same command that ends
with the same bytes as an uninterrupted merge.

Faults are injected in this process where a subprocess adds nothing: a full disk is `os.write` (or `os.fsync`)
failing with ENOSPC for one file under the output, as the kernel reports it; the signal and crash tests run the
real `distmerge` script, slowed down by a `sitecustomize` that sleeps before each tensor.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import assert_user_error, run_cli, write_config

from distmerge import writer as writer_module
from distmerge.errors import OutputError
from distmerge.runtime import local as local_runtime
from distmerge.writer import LOCK_NAME, STATE_DIR, OutputLock

INDEX = "model.safetensors.index.json"
REPORT = "merge_report.parquet"
SHARD_SIZE = "4KB"  # the bf16 family then makes several shards


# ---- helpers --------------------------------------------------------------------------------------------------

def make_config(tmp_path: Path, family) -> Path:
    return write_config(tmp_path / "ta.yaml", "task_arithmetic", family, parameters={"lambda": 0.5})


def merge_args(cfg: Path, out: Path, *extra) -> list:
    return ["merge", cfg, "-o", out, "--quiet", "--shard-size", SHARD_SIZE, "--threads", "1", *extra]


def snapshot(out: Path) -> dict:
    """Every file under OUT with its bytes; the report reduced to what is deterministic (its seconds are not)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    report = files.pop(REPORT)
    files[REPORT] = pq.read_table(io.BytesIO(report)).select(["tensor", "shard", "sha256"]).to_pylist()
    return files


def assert_same_as_reference(out: Path, reference: dict) -> None:
    got = snapshot(out)
    assert sorted(got) == sorted(reference), "stray or missing files"  # no lock, no state, no temporary files
    for name in reference:
        assert got[name] == reference[name], name


def assert_not_complete(out: Path) -> None:
    """Nothing that looks like a whole model, and no temporary file beside the shards."""
    assert not (out / INDEX).exists()
    if out.exists():
        assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))], list(out.iterdir())
        assert not list(out.rglob("*.partial"))


def shard_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}


def recorded_shard_times(out: Path) -> dict[str, int]:
    """The shards a rerun must keep: those with their record (a shard renamed just before its record was written
    is redone)."""
    recorded = {p.name.removesuffix(".json") for p in (out / STATE_DIR / "shards").glob("*.json")}
    return {name: t for name, t in shard_times(out).items() if name in recorded}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, family_bf16_sharded):
    """The uninterrupted merge every test compares with."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    run_cli(*merge_args(make_config(tmp, family_bf16_sharded), out))
    assert len(list(out.glob("model-*.safetensors"))) >= 4
    return snapshot(out)


def interrupt_run_unit(monkeypatch, at_call: int, action=None):
    """Raise KeyboardInterrupt when the local runtime starts its `at_call`-th unit (after `action`, if given)."""
    real = local_runtime.run_unit
    calls = []

    def run_unit(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            if action is not None:
                action()
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(local_runtime, "run_unit", run_unit)


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def fail_fd_calls(monkeypatch, name: str, match, err: int, after: int = 0) -> Counter:
    """Make `os.<name>(fd, ...)` fail with `err` for files whose path satisfies `match`, after `after` calls."""
    real = getattr(os, name)
    seen: Counter = Counter()

    def failing(fd, *args, **kwargs):
        path = fd_path(fd)
        if match(path):
            seen[path] += 1
            if seen[path] > after:
                raise OSError(err, os.strerror(err))
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, name, failing)
    return seen


# ---- two merges at once -------------------------------------------------------------------------------------------

def test_a_second_merge_into_the_same_output_is_refused_and_the_first_finishes(tmp_path, family_bf16_sharded,
                                                                                 reference, monkeypatch):
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    second = {}

    def run_the_second_merges():
        before = snapshot_names(out)
        second["plain"] = run_cli(*merge_args(cfg, out), check=False)
        second["force"] = run_cli(*merge_args(cfg, out, "--force"), check=False)
        assert snapshot_names(out) == before, "the refused merges touched the output"

    real = local_runtime.run_unit
    calls = []

    def run_unit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first merge has two shards done and holds the lock
            run_the_second_merges()
        return real(*args, **kwargs)

    monkeypatch.setattr(local_runtime, "run_unit", run_unit)
    run_cli(*merge_args(cfg, out))
    for proc in second.values():
        assert_user_error(proc, str(out), "being written by another distmerge merge", f"pid {os.getpid()}")
    assert_same_as_reference(out, reference)


def snapshot_names(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")}


def test_lock_refuses_a_second_holder_and_survives_a_release_race(tmp_path):
    out = tmp_path / "out"
    first = OutputLock(out)
    first.acquire()
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"]
    with pytest.raises(OutputError, match=f"pid {os.getpid()} on "):
        OutputLock(out).acquire()
    first.release()
    assert not out.exists(), "the directory made only for the lock is removed again"

    # A second process opens the lock file, then the holder releases (removing the file) before the second
    # process's flock: the second must notice that it locked a removed file and lock the new one instead.
    first = OutputLock(out)
    first.acquire()
    import fcntl

    real_flock = fcntl.flock
    raced = []

    def flock(fd, op):
        if not raced:
            raced.append(1)
            first.release()
        return real_flock(fd, op)

    second = OutputLock(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fcntl, "flock", flock)
        second.acquire()
    assert os.path.samestat(os.fstat(second._fd), os.stat(out / LOCK_NAME))
    with pytest.raises(OutputError):
        OutputLock(out).acquire()
    second.release()


def test_a_stale_lock_is_taken_over(tmp_path, family_bf16_sharded, reference, monkeypatch):
    """After a crash the kernel has dropped the flock but the file, naming the dead process, is still there."""
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    interrupt_run_unit(monkeypatch, at_call=3)
    assert run_cli(*merge_args(cfg, out), check=False).returncode == 130
    monkeypatch.undo()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "started": "yesterday"}))
    proc = run_cli("merge", cfg, "-o", out, "--shard-size", SHARD_SIZE, "--threads", "1")
    assert "resuming: 2 of" in proc.stderr
    assert_same_as_reference(out, reference)


def test_without_flock_the_merge_runs_after_a_warning(tmp_path, family_bf16_sharded, reference, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    proc = run_cli("merge", make_config(tmp_path, family_bf16_sharded), "-o", out, "--shard-size", SHARD_SIZE,
                   "--threads", "1")
    assert "warning: cannot lock" in proc.stderr and "No locks available" in proc.stderr
    assert_same_as_reference(out, reference)


# ---- kills at several points ---------------------------------------------------------------------------------------

def _interrupt_after_replace(monkeypatch, name: str, before: bool):
    """KeyboardInterrupt at the rename of the finished `name` into the output (before or after it happens)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name and before:
            raise KeyboardInterrupt
        result = real(src, dst, *args, **kwargs)
        if Path(dst).name == name:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(os, "replace", replace)


def _interrupt_mid_shard(monkeypatch):
    real = writer_module.ShardWriter.write
    calls = []

    def write(self, name, tensor, rows=None):
        calls.append(1)
        if len(calls) == 4:  # the second tensor of a later shard, its header and first tensor on disk
            raise KeyboardInterrupt
        return real(self, name, tensor, rows)

    monkeypatch.setattr(writer_module.ShardWriter, "write", write)


KILL_POINTS = {
    "before the first shard": lambda mp: interrupt_run_unit(mp, at_call=1),
    "mid-shard": _interrupt_mid_shard,
    "between shards": lambda mp: interrupt_run_unit(mp, at_call=3),
    "among the small files": lambda mp: _interrupt_after_replace(mp, "README.md", before=True),
    "writing the index": lambda mp: _interrupt_after_replace(mp, INDEX, before=True),
    "after the index, before the state is removed": lambda mp: _interrupt_after_replace(mp, INDEX, before=False),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_merge_interrupted_anywhere_resumes_to_the_same_bytes(tmp_path, family_bf16_sharded, reference,
                                                                monkeypatch, point):
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    KILL_POINTS[point](monkeypatch)
    proc = run_cli(*merge_args(cfg, out), check=False)
    assert proc.returncode == 130 and "rerun the same command to resume" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / LOCK_NAME).exists(), "the lock is released"
    if point.startswith("after the index"):
        assert (out / INDEX).read_bytes() == reference[INDEX]  # complete: every other file was in place before
    else:
        assert_not_complete(out)
    kept = shard_times(out)
    monkeypatch.undo()
    run_cli(*merge_args(cfg, out))
    assert {name: t for name, t in shard_times(out).items() if name in kept} == kept, "finished shards were redone"
    assert_same_as_reference(out, reference)


# ---- --force cut short -------------------------------------------------------------------------------------------

def _interrupt_unlinks(monkeypatch, out: Path, after_index: int):
    """KeyboardInterrupt `after_index` removals after the old index is removed (0: right after it)."""
    real = os.unlink
    state = {"index_gone": False, "count": 0}

    def unlink(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        if state["index_gone"]:
            state["count"] += 1
            if state["count"] == after_index:
                raise KeyboardInterrupt
        elif Path(path) == out / INDEX:
            state["index_gone"] = True
            if after_index == 0:
                raise KeyboardInterrupt
        return result

    monkeypatch.setattr(os, "unlink", unlink)


FORCE_KILL_POINTS = {
    "right after the old index is removed": lambda mp, out: _interrupt_unlinks(mp, out, 0),
    "midway through removing the old files": lambda mp, out: _interrupt_unlinks(mp, out, 3),
    "before the first new shard": lambda mp, out: interrupt_run_unit(mp, at_call=1),
    "between new shards": lambda mp, out: interrupt_run_unit(mp, at_call=3),
}


@pytest.mark.parametrize("point", list(FORCE_KILL_POINTS))
def test_force_over_a_finished_output_cut_short_never_looks_complete(tmp_path, family_bf16_sharded, reference,
                                                                     monkeypatch, point):
    out = tmp_path / "out"
    other = write_config(tmp_path / "linear.yaml", "linear", family_bf16_sharded, base=None)
    run_cli("merge", other, "-o", out, "--quiet", "--shard-size", "3KB")  # a finished merge of another config
    assert (out / INDEX).exists()
    cfg = make_config(tmp_path, family_bf16_sharded)
    FORCE_KILL_POINTS[point](monkeypatch, out)
    proc = run_cli(*merge_args(cfg, out, "--force"), check=False)
    assert proc.returncode == 130, proc.stderr
    assert_not_complete(out)
    monkeypatch.undo()
    plain = run_cli(*merge_args(cfg, out), check=False)  # without --force: resumes, or refuses what it cannot
    if plain.returncode != 0:
        assert_user_error(plain, str(out), "already holds files", "--force")  # not "a finished merge"
        run_cli(*merge_args(cfg, out, "--force"))
    assert_same_as_reference(out, reference)


def test_force_resumes_an_unfinished_run_of_the_same_merge(tmp_path, family_bf16_sharded, reference, monkeypatch):
    """The same command, --force included, keeps the finished shards of its own interrupted run."""
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    interrupt_run_unit(monkeypatch, at_call=3)
    assert run_cli(*merge_args(cfg, out, "--force"), check=False).returncode == 130
    kept = shard_times(out)
    monkeypatch.undo()
    proc = run_cli("merge", cfg, "-o", out, "--force", "--shard-size", SHARD_SIZE, "--threads", "1")
    assert "resuming: 2 of" in proc.stderr
    assert {n: t for n, t in shard_times(out).items() if n in kept} == kept
    assert_same_as_reference(out, reference)


# ---- a full disk, a read-only location -------------------------------------------------------------------------------

def _in_state(out: Path, *parts) -> str:
    return str(out.joinpath(STATE_DIR, *parts))


DISK_FAULTS = {
    # name: (os call, which file (from OUT), calls that succeed first, errno)
    "shard header": ("write", lambda out, p: p.endswith(".partial"), 0, errno.ENOSPC),
    # (shards 7, 8 and 12 hold three tensors each: header, then one write per tensor)
    "shard data": ("write", lambda out, p: p.endswith(".partial") and "00007" in p, 2, errno.ENOSPC),
    "shard data, quota": ("write", lambda out, p: p.endswith(".partial") and "00008" in p, 1, errno.EDQUOT),
    "shard flush": ("fsync", lambda out, p: p.endswith(".partial") and "00002" in p, 0, errno.ENOSPC),
    "shard data, remounted read-only": ("write", lambda out, p: p.endswith(".partial") and "00012" in p, 2,
                                        errno.EROFS),
    "shard record": ("write", lambda out, p: p.startswith(_in_state(out, "shards", ".model-00002")), 0,
                     errno.ENOSPC),
    "run.json": ("write", lambda out, p: p == _in_state(out, ".run.json.tmp"), 0, errno.ENOSPC),
    "config.json": ("write", lambda out, p: p == _in_state(out, "tmp", "config.json"), 0, errno.ENOSPC),
    "tokenizer.json": ("write", lambda out, p: p == _in_state(out, "tmp", "tokenizer.json"), 0, errno.ENOSPC),
    "README.md": ("fsync", lambda out, p: p == _in_state(out, "tmp", "README.md"), 0, errno.ENOSPC),
    REPORT: ("write", lambda out, p: p == _in_state(out, "tmp", REPORT), 0, errno.ENOSPC),
    "index": ("write", lambda out, p: p == _in_state(out, "tmp", INDEX), 0, errno.ENOSPC),
}
SMALL_FILES = ("config.json", "tokenizer.json", "README.md", REPORT, "index")


@pytest.mark.parametrize("fault", list(DISK_FAULTS))
def test_a_failed_write_is_one_error_and_a_rerun_finishes(tmp_path, family_bf16_sharded, reference, monkeypatch,
                                                          fault):
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    call, match, after, err = DISK_FAULTS[fault]
    seen = fail_fd_calls(monkeypatch, call, lambda p: match(out, p), err, after)
    proc = run_cli(*merge_args(cfg, out), check=False)
    assert seen, "the fault was never reached"
    assert_user_error(proc, str(out), os.strerror(err), "rerun the same command")
    assert not any(temp in proc.stderr for temp in (".partial", ".tmp", f"{STATE_DIR}/tmp")), "names a temporary file"
    assert_not_complete(out)
    assert not (out / LOCK_NAME).exists()
    if fault in SMALL_FILES:  # every shard and the state survive for the rerun
        assert len(shard_times(out)) == len(list((out / STATE_DIR / "shards").glob("*.json"))) >= 4
        assert not list((out / STATE_DIR / "tmp").iterdir()), "the temporary file was removed"
    kept = recorded_shard_times(out)
    monkeypatch.undo()
    proc = run_cli("merge", cfg, "-o", out, "--shard-size", SHARD_SIZE, "--threads", "1")
    if fault in SMALL_FILES:
        assert "resuming: " in proc.stderr
    assert {n: t for n, t in shard_times(out).items() if n in kept} == kept
    assert_same_as_reference(out, reference)


def _read_only(monkeypatch, location: Path) -> str:
    """Make `location` refuse writes; returns what was done. Unprivileged: chmod, which the kernel enforces. As
    root (chmod does not stop root): every call distmerge makes to create, open for writing, rename or remove a
    path under `location` fails with EROFS, as on a read-only mount."""
    if os.geteuid() != 0:
        for directory in [location, *[p for p in location.rglob("*") if p.is_dir()]]:
            directory.chmod(0o555)  # undone by _writable
        return "chmod"
    inside = lambda path: str(Path(os.fspath(path)).absolute()).startswith(str(location))  # noqa: E731
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guard(real, is_write=lambda *args, **kwargs: True):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and inside(path) and is_write(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: bool(flags & writes)))
    for name in ("mkdir", "replace", "rename", "unlink", "rmdir", "truncate"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    return "EROFS"


def _writable(location: Path) -> None:
    if os.geteuid() != 0:
        for directory in [location, *[p for p in location.rglob("*") if p.is_dir()]]:
            directory.chmod(0o755)


@pytest.mark.parametrize("case", ["new output", "resuming an interrupted merge"])
def test_a_read_only_output_location(tmp_path, family_bf16_sharded, reference, monkeypatch, case):
    cfg = make_config(tmp_path, family_bf16_sharded)
    if case == "new output":
        location = tmp_path / "ro"
        location.mkdir()
        out = location / "out"
    else:
        out = location = tmp_path / "out"
        interrupt_run_unit(monkeypatch, at_call=3)
        assert run_cli(*merge_args(cfg, out), check=False).returncode == 130
        monkeypatch.undo()
    kept = shard_times(out) if out.exists() else {}
    how = _read_only(monkeypatch, location)
    try:
        proc = run_cli(*merge_args(cfg, out), check=False)
    finally:
        monkeypatch.undo()
        _writable(location)
    assert_user_error(proc, str(out), "make it writable or choose another -o")
    assert ("Read-only file system" if how == "EROFS" else "Permission denied") in proc.stderr
    assert_not_complete(out)
    assert shard_times(out) == kept if out.exists() else not kept
    run_cli(*merge_args(cfg, out))
    assert_same_as_reference(out, reference)


def test_the_runtime_does_not_replace_the_sigterm_handler(tmp_path, family_bf16_sharded, reference, monkeypatch):
    """ray.init installs its own SIGTERM handler (sys.exit(15)) in the driver; the CLI's must stay in force."""
    from distmerge import cli
    from distmerge import merge as merge_module

    real_make_runtime = merge_module.make_runtime

    def make_runtime_like_ray(*args, **kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        return real_make_runtime(*args, **kwargs)

    seen = []
    real_run_unit = local_runtime.run_unit

    def run_unit(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_run_unit(*args, **kwargs)

    monkeypatch.setattr(merge_module, "make_runtime", make_runtime_like_ray)
    monkeypatch.setattr(local_runtime, "run_unit", run_unit)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    run_cli(*merge_args(make_config(tmp_path, family_bf16_sharded), out))
    assert seen and all(handler is cli._on_sigterm for handler in seen)
    assert signal.getsignal(signal.SIGTERM) is before, "cli.main restores the handler it replaced"
    assert_same_as_reference(out, reference)


# ---- the real process: SIGTERM, SIGKILL ---------------------------------------------------------------------------

SLOW_SITECUSTOMIZE = '''
import os, time
if os.environ.get("DISTMERGE_TEST_SLOW_S"):
    import distmerge.engine as engine
    _real = engine.merge_tensor
    def _slow(*args, **kwargs):
        time.sleep(float(os.environ["DISTMERGE_TEST_SLOW_S"]))
        return _real(*args, **kwargs)
    engine.merge_tensor = _slow
'''


def start_slow_merge(tmp_path: Path, cfg: Path, out: Path) -> subprocess.Popen:
    """The installed `distmerge` script (as conftest.run_console_script finds it), 0.15 s per tensor slower."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_SITECUSTOMIZE)
    env = {**os.environ, "DISTMERGE_TEST_SLOW_S": "0.15",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    script = Path(sys.executable).with_name("distmerge")
    return subprocess.Popen([str(script), *map(str, merge_args(cfg, out))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_shards(proc: subprocess.Popen, out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("model-*.safetensors"))) < count:
        if proc.poll() is not None:
            raise AssertionError(f"the merge ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no shard was finished in time")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path, family_bf16_sharded, reference):
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    proc = start_slow_merge(tmp_path, cfg, out)
    wait_for_shards(proc, out, 3)  # shards are recorded one after another: 3 in place means 2 recorded
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith(
        "terminated (SIGTERM); rerun the same command to resume"), stderr
    assert_not_complete(out)
    assert not (out / LOCK_NAME).exists(), "the lock is released"
    kept = recorded_shard_times(out)
    assert len(kept) >= 2
    rerun = run_cli("merge", cfg, "-o", out, "--shard-size", SHARD_SIZE, "--threads", "1")
    assert re.search(r"resuming: [1-9]\d* of", rerun.stderr)  # a shard renamed just before its record may be redone
    assert {n: t for n, t in shard_times(out).items() if n in kept} == kept
    assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_a_killed_merge_leaves_a_stale_lock_that_the_rerun_takes_over(tmp_path, family_bf16_sharded, reference):
    cfg, out = make_config(tmp_path, family_bf16_sharded), tmp_path / "out"
    proc = start_slow_merge(tmp_path, cfg, out)
    wait_for_shards(proc, out, 2)
    proc.kill()
    proc.communicate(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind, but no longer locked
    assert not (out / INDEX).exists()
    kept = recorded_shard_times(out)
    rerun = run_cli("merge", cfg, "-o", out, "--shard-size", SHARD_SIZE, "--threads", "1")
    assert re.search(r"resuming: [1-9]\d* of", rerun.stderr)
    assert {n: t for n, t in shard_times(out).items() if n in kept} == kept
    assert_same_as_reference(out, reference)
