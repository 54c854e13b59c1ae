"""Counter-based random numbers: draw i of a stream is a hash of (stream key, i).

A stream is keyed by (seed, tensor name, model index), so DARE and DELLA masks do not depend on which worker
or device computes a tensor, nor on the order tensors are processed, nor on whether a tensor is processed whole
or in row chunks. The hash is SplitMix64's finaliser, computed with wrapping int64 arithmetic, which CPU and
CUDA kernels implement identically.
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
# Elements hashed per step. The hash is a dozen passes over its int64 scratch: on a CPU, scratch that stays in
# cache makes it 7x faster than 32 MB steps did; on a GPU, fewer and larger steps mean fewer kernel launches.
_CHUNK_CPU = 1 << 18
_CHUNK_CUDA = 1 << 22


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 bit patterns into `out` (torch's >> is arithmetic)."""
    return torch.bitwise_right_shift(x, bits, out=out).bitwise_and_((1 << (64 - bits)) - 1)


def stream_key(seed: int, tensor_name: str, model_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniform(seed: int, tensor_name: str, model_index: int, shape, device, start: int = 0) -> torch.Tensor:
    """float32 draws in [0, 1) with 24 random bits each, elements `start ..` of the stream, shaped `shape`."""
    key = stream_key(seed, tensor_name, model_index)
    device = torch.device(device)
    n = 1
    for dim in shape:
        n *= dim
    out = torch.empty(n, dtype=torch.float32, device=device)
    chunk = max(1, min(n, _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU))
    state, shifted = (torch.empty(chunk, dtype=torch.int64, device=device) for _ in range(2))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x, scratch = state[:hi - lo], shifted[:hi - lo]
        torch.arange(start + lo, start + hi, dtype=torch.int64, device=device, out=x)
        x.mul_(_signed(_GOLDEN)).add_(_signed(key))
        x.bitwise_xor_(_shift_right(x, 30, scratch)).mul_(_signed(_MUL1))
        x.bitwise_xor_(_shift_right(x, 27, scratch)).mul_(_signed(_MUL2))
        x.bitwise_xor_(_shift_right(x, 31, scratch))
        out[lo:hi].copy_(_shift_right(x, 40, scratch)).mul_(2.0**-24)
    return out.reshape(shape)
