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
_CHUNK = 1 << 22  # elements hashed per step: bounds the int64 scratch to 32 MB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def stream_key(seed: int, tensor_name: str, model_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniform(seed: int, tensor_name: str, model_index: int, shape, device, start: int = 0) -> torch.Tensor:
    """float32 draws in [0, 1) with 24 random bits each, elements `start ..` of the stream, shaped `shape`."""
    key = stream_key(seed, tensor_name, model_index)
    n = 1
    for dim in shape:
        n *= dim
    out = torch.empty(n, dtype=torch.float32, device=device)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        x = torch.arange(start + lo, start + hi, dtype=torch.int64, device=device)
        x.mul_(_signed(_GOLDEN)).add_(_signed(key))
        x.bitwise_xor_(_shift_right(x, 30)).mul_(_signed(_MUL1))
        x.bitwise_xor_(_shift_right(x, 27)).mul_(_signed(_MUL2))
        x.bitwise_xor_(_shift_right(x, 31))
        out[lo:hi] = _shift_right(x, 40).to(torch.float32).mul_(2.0**-24)
    return out.reshape(shape)
