"""Checkpoint.read against safetensors' own loader, for every dtype distmerge accepts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.checkpoint import DTYPES, Checkpoint
from distmerge.errors import StorageError


@pytest.fixture
def every_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"t.{dtype}".replace("torch.", ""): (torch.randn(5, 7, generator=gen) * 50).to(dtype)
        for dtype, _ in DTYPES.values()
    }
    tensors["scalar"] = torch.tensor(3.5)
    tensors["stack"] = torch.randn(4, 3, 2, generator=gen)  # rows of a 3-D tensor are its leading index
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_read_returns_what_safetensors_loads(every_dtype):
    expected = load_file(str(every_dtype / "model.safetensors"))
    ckpt = Checkpoint.open(str(every_dtype))
    for name, want in expected.items():
        got = ckpt.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(as_bytes(got), as_bytes(want)), name
        if want.dim() and want.shape[0] >= 3:
            assert torch.equal(as_bytes(ckpt.read(name, rows=(1, 3))), as_bytes(want[1:3])), name


def test_a_file_cut_short_after_opening_is_a_storage_error_naming_the_tensor(every_dtype):
    """The header was checked against the file's size when the checkpoint was opened; a file that shrinks later
    (another process rewriting it) is one error naming the model, the tensor and the file, never short data."""
    file = every_dtype / "model.safetensors"
    ckpt = Checkpoint.open(str(every_dtype))
    last = max((info for info in ckpt.tensors.values() if info.nbytes), key=lambda info: info.start)
    with open(file, "r+b") as f:
        f.truncate(last.start + 1)
    with pytest.raises(StorageError, match=rf"model {every_dtype}: reading tensor {last.name} from .*short"):
        ckpt.read(last.name)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)
