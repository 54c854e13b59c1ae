"""Counter-based random numbers: draw i of a stream is a hash of (stream key, i).

A stream is keyed by (seed, tensor name, model index), so DARE and DELLA masks do not depend on which worker
or device computes a tensor, nor on the order tensors are processed, nor on whether a tensor is processed whole
or in row chunks. The hash is SplitMix64's finaliser, computed with wrapping int64 arithmetic, which CPU and
CUDA kernels implement identically.

`distmerge: {rng: mergekit}` replaces these streams, for DARE and DELLA, by the draws mergekit makes
(`mergekit_generator_states`); see TensorContext.uniform.
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
    # i * GOLDEN for i in the chunk, once: each chunk's counters are then one addition away (wrapping arithmetic)
    steps = torch.arange(chunk, dtype=torch.int64, device=device).mul_(_signed(_GOLDEN))
    state, shifted = (torch.empty(chunk, dtype=torch.int64, device=device) for _ in range(2))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x, scratch = state[:hi - lo], shifted[:hi - lo]
        torch.add(steps[:hi - lo], _signed((start + lo) * _GOLDEN + key), out=x)
        x.bitwise_xor_(_shift_right(x, 30, scratch)).mul_(_signed(_MUL1))
        x.bitwise_xor_(_shift_right(x, 27, scratch)).mul_(_signed(_MUL2))
        x.bitwise_xor_(_shift_right(x, 31, scratch))
        torch.mul(_shift_right(x, 40, scratch), 2.0**-24, out=out[lo:hi])  # 24 bits, exact in float32
    return out.reshape(shape)


# ---- `distmerge: {rng: mergekit}`: mergekit's own draws ----------------------------------------------------------

_MERGEKIT_SKIP_CHUNK = 1 << 20  # uniforms generated per step while advancing the generator


def mergekit_generator_states(seed: int, draws: dict[str, int]) -> dict[str, bytes]:
    """For each tensor that draws, the state of torch's CPU generator just before mergekit draws for it.

    `mergekit-yaml --random-seed SEED` seeds torch's global CPU generator with SEED, merges the tensors in the order
    of their names (its scheduler orders tasks by tensor name), and each DARE/DELLA sparsification calls
    torch.bernoulli once per model with density < 1: one 32-bit Mersenne-Twister output per entry, the same
    consumption as torch.rand. `draws` maps a tensor's name to the uniforms it takes (0: none). The generator is
    advanced through every tensor's draws once, here, so that any worker can merge any tensor from its state.
    """
    generator = torch.Generator().manual_seed(seed)
    scratch = torch.empty(min(_MERGEKIT_SKIP_CHUNK, max(draws.values(), default=0)))
    states = {}
    for name in sorted(draws):
        if not draws[name]:
            continue
        states[name] = bytes(generator.get_state().numpy())
        for lo in range(0, draws[name], scratch.numel()):
            scratch[:min(scratch.numel(), draws[name] - lo)].uniform_(generator=generator)
    return states


def generator_from_state(state: bytes) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator
