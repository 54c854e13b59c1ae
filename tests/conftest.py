"""Shared fixtures: small generated checkpoints in Hugging Face layout, and CLI runners.

Checkpoints are written with safetensors' own `save_file` (distmerge.synthetic), never by distmerge's writer,
so what the tests read is independent of what they test. `run_cli` runs the CLI in this process (what
`distmerge` does after Python starts: `cli.main`, its exit code, stdout and stderr); `run_console_script` runs the
installed `distmerge` script in a new process, for the few tests about the process itself (signals, environment
read at import, the entry point).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Tests never reach the network: no Ray usage reports, no Hugging Face hub calls.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distmerge.architecture import llama_config
from distmerge.synthetic import make_family

TINY = llama_config(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)


@pytest.fixture(scope="session")
def family_bf16_sharded(tmp_path_factory):
    """Base + 3 experts, bfloat16, sharded (about 3 shards each)."""
    return make_family(tmp_path_factory.mktemp("bf16_sharded"), n_experts=3, config=TINY, dtype=torch.bfloat16,
                       shard_size=8_000)


@pytest.fixture(scope="session")
def family_fp32_single(tmp_path_factory):
    """Base + 3 experts, float32, one model.safetensors each."""
    return make_family(tmp_path_factory.mktemp("fp32_single"), n_experts=3, config=TINY, dtype=torch.float32)


def write_config(path: Path, method: str, family: dict | None = None, models=None, base="family", **top) -> Path:
    """A mergekit-style YAML: `models` defaults to the family's experts without parameters."""
    doc = {"merge_method": method}
    if base == "family":
        doc["base_model"] = str(family["base"])
    elif base is not None:
        doc["base_model"] = str(base)
    if models is None:
        models = [{"model": str(p)} for p in family["experts"]]
    doc["models"] = models
    doc.update(top)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """`distmerge ARGS` in this process: `cli.main`'s exit code and what it printed."""
    from distmerge import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with _environment(env or {}), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.main([str(arg) for arg in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    proc = subprocess.CompletedProcess(["distmerge", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"distmerge {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def _environment(overrides: dict):
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_console_script(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """The installed `distmerge` console script, in a new process, the way users run it."""
    script = Path(sys.executable).with_name("distmerge")
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"distmerge {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one `error:` line (after any progress lines) naming every fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, proc.stderr)


def assert_param_refused(method: str, key: str, value, where: str, fragments: list[str]) -> None:
    """The declared parameter `key` of `method` refuses `value` with an error that starts with `where` (the config
    location the caller names) and contains every fragment."""
    from distmerge.errors import ConfigError
    from distmerge.methods import get_method

    with pytest.raises(ConfigError) as info:
        get_method(method).param(key).check(value, where)
    message = str(info.value)
    assert message.startswith(where), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def make_adapter(base: Path, out: Path, lora: dict, dtype=torch.float32, seed: int = 0) -> Path:
    """A random LoRA adapter of `base` (B is not zero, so it changes the model), saved as PEFT saves it."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = peft.LoraConfig(init_lora_weights=False, **lora)
    peft.get_peft_model(model, config).save_pretrained(out)
    settings = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(base)}))
    return out
