"""Sparsification: which task-vector entries survive, and how survivors are rescaled.

Selection never sorts a whole tensor. For non-negative floats the bit pattern orders like the value, so the top 16
bits of |x| (sign cleared) are a bucket index that orders like the magnitude: bfloat16 precision for float32
inputs. One histogram of those buckets finds the bucket holding the k-th largest magnitude; only that bucket's
members are then ranked, by histograms of their lower bits. The same histogram, summed over a whole
model, gives TIES its global thresholds.

Ties at the boundary are broken by position, as a stable sort would break them, so masks hold exactly the
requested number of entries and match mergekit's.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

HIGH_BINS = 1 << 15  # top 16 bits of a magnitude: sign bit 0, so 2^15 buckets
RANK_BLOCK_ENTRIES = 1 << 18  # entries ranked at once by one CPU thread
_TOP_WORD = 1 if sys.byteorder == "little" else 0  # which 16-bit half of a float32 holds its top bits


def _high_bits(values: torch.Tensor) -> torch.Tensor:
    """Flat int16 [numel], in logical order: the top 16 bits of |values| as float32."""
    words = values.to(torch.float32).reshape(-1).view(torch.int16)
    return words[_TOP_WORD::2] & 0x7FFF


def magnitude_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of |values| per bucket of their top 16 bits (bfloat16 precision), int64 [2^15]."""
    return torch.bincount(_high_bits(values), minlength=HIGH_BINS)


def _bucket_holding_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket b, rank of the k-th largest inside b counted from the top), for a histogram `counts`."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count of buckets >= b
    bucket = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[bucket] - counts[bucket])
    return bucket, k - above


def _kth_largest_members(values: torch.Tensor, k: int):
    """Where the k-th largest |value| lies: (high bits of every entry, its bucket, its rank counted from the top of
    the bucket, the bucket members' flat positions ascending, their magnitudes in the precision of `values`)."""
    flat = values.reshape(-1)
    high = _high_bits(flat)
    bucket, rank = _bucket_holding_kth_largest(torch.bincount(high, minlength=HIGH_BINS), k)
    positions = (high == bucket).nonzero().squeeze(1)
    return high, bucket, rank, positions, flat[positions].abs()


def _largest_members(members: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the `rank` largest of non-negative `members`, equal values in their given order, with no sort: a
    radix select over the 16-bit digits of their bit patterns, most significant first, finds the bit pattern of
    the rank-th largest. Task vectors of bfloat16 fine-tunes are multiples of a few ulps of their weights, so one
    bucket can hold a fifth of a tensor, where a stable sort took several times as long."""
    width = 8 * members.element_size()
    bits = members.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[width]).to(torch.int64)
    prefix = 0  # the top digits of the rank-th largest's bit pattern found so far
    for shift in range(width - 16, -1, -16):
        digit = (bits >> shift) & 0xFFFF
        if shift + 16 < width:  # members outside the prefix count in an extra bucket, below every digit
            digit = torch.where((bits >> (shift + 16)) == prefix, digit + 1, 0)
        else:
            digit += 1
        counts = torch.bincount(digit, minlength=(1 << 16) + 1)
        boundary, rank = _bucket_holding_kth_largest(counts, rank)
        prefix = (prefix << 16) | (boundary - 1)
    if rank == int(counts[boundary]):  # every member equal to the rank-th largest is kept
        kept = bits >= prefix
    else:  # the first `rank` of them in the given order
        equal = bits == prefix
        kept = (bits > prefix) | (equal & (equal.cumsum(0) <= rank))
    return kept.nonzero().squeeze(1)


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The exact k-th largest of non-negative `magnitudes` (1 <= k <= numel), in their own precision."""
    _, _, rank, _, members = _kth_largest_members(magnitudes, k)
    return float(members[_largest_members(members, rank)].min())


def bucket_value(bits: int) -> float:
    """The float32 whose bit pattern is `bits` (for the lower edge of a 16-bit bucket, pass `bucket << 16`)."""
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def threshold_from_histogram(counts: torch.Tensor, k: int) -> float:
    """Lower edge of the bucket that holds the k-th largest magnitude: keeping |d| >= it keeps at least k
    entries, and at most that bucket's count more (relative precision 2^-7, bfloat16's)."""
    if k <= 0:
        return float("inf")
    bucket, _ = _bucket_holding_kth_largest(counts, min(k, int(counts.sum())))
    return bucket_value(bucket << 16)


def top_k_mask(values: torch.Tensor, k: int, prefer_low_index: bool = True) -> torch.Tensor:
    """Bool mask of the k entries of largest magnitude |values|; equal magnitudes at the boundary are taken in
    index order (lowest first, or highest first with prefer_low_index=False)."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    high, bucket, rank, positions, members = _kth_largest_members(values, k)
    mask = high > bucket
    if not prefer_low_index:
        positions, members = positions.flip(0), members.flip(0)
    mask[positions[_largest_members(members, rank)]] = True
    return mask.reshape(values.shape)


def magnitude_keep_count(density: float, n: int) -> int:
    """How many entries TIES keeps (mergekit's rule: at least one)."""
    return max(1, int(density * n))


def breadcrumbs_mask(values: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the `gamma` fraction of largest magnitudes |values| and the smallest ones, so that `density` remains.

    Ranks are ascending with ties in index order; kept ranks are [n_bot, n_bot + keep). When density + gamma
    exceeds 1 fewer top entries are dropped, so that the density is still met (as in mergekit).
    """
    n = values.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    at_least_bottom = top_k_mask(values, n - n_bot, prefer_low_index=False)
    in_top = top_k_mask(values, n - n_bot - keep, prefer_low_index=False)
    return at_least_bottom & ~in_top


def _stable_ascending_order(rows: np.ndarray) -> np.ndarray:
    """Per row, the column order of ascending non-negative floats, equal values in column order: an LSD radix sort
    over the 16-bit digits of their bit patterns (numpy sorts 16-bit keys stably by counting), which on a CPU is
    several times faster than a comparison sort of the floats (2816 x 1024 float32 on two threads: 25 ms, against
    84 ms for torch.sort(stable=True))."""
    bits = rows.view(f"u{rows.itemsize}")
    row_starts = (np.arange(rows.shape[0]) * rows.shape[1])[:, None]
    order = None  # flat positions: gathers by flat index run several times faster than take_along_axis
    for shift in range(0, 8 * rows.itemsize, 16):
        digit = ((bits >> bits.dtype.type(shift)) & 0xFFFF).astype(np.uint16)
        if order is None:
            order = np.argsort(digit, axis=1, kind="stable") + row_starts
        else:
            order = np.take(order, np.argsort(np.take(digit, order), axis=1, kind="stable") + row_starts)
    return order - row_starts


def della_keep_probability(magnitudes: torch.Tensor, density: float, epsilon: float,
                           stable: bool = True) -> torch.Tensor:
    """DELLA's MagPrune: per row, keep probability rises linearly with the magnitude's rank, from
    density - epsilon (smallest) to density + epsilon (largest). Ranks within a row come from one stable
    row-wise sort (rows are short); 1-D tensors are one row. `stable=False` orders equal magnitudes as torch's
    default sort does (mergekit's ranks). On a CPU, blocks of rows are ranked on all of torch's threads."""
    rows = magnitudes.reshape(1, -1) if magnitudes.dim() < 2 else magnitudes.reshape(magnitudes.shape[0], -1)
    n_cols = rows.shape[1]
    dtype = torch.promote_types(rows.dtype, torch.float32)  # float64 compute keeps float64 probabilities
    probability = torch.empty_like(rows, dtype=dtype)
    ramp = torch.arange(n_cols, dtype=dtype, device=rows.device)
    ramp = ramp / max(1, n_cols - 1) * (2 * epsilon) + (density - epsilon)
    radix = stable and rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64)

    def rank_block(lo: int) -> None:
        block = rows[lo:lo + step]
        if radix:
            order = torch.from_numpy(_stable_ascending_order(block.contiguous().numpy()))
        else:
            order = torch.sort(block, dim=1, stable=stable).indices
        probability[lo:lo + step].scatter_(1, order, ramp.expand(order.shape[0], -1))

    # a thread's block stays in its caches; torch's sort (a GPU's) takes large blocks, which bound its int64 scratch
    step = max(1, (RANK_BLOCK_ENTRIES if radix else 1 << 24) // max(1, n_cols))
    starts = range(0, rows.shape[0], step)
    threads = torch.get_num_threads() if radix else 1
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads) as pool:  # numpy's sort and gathers release the GIL
            list(pool.map(rank_block, starts))
    else:
        for lo in starts:
            rank_block(lo)
    return probability.reshape(magnitudes.shape)


def rescale_kept(delta: torch.Tensor, kept: torch.Tensor, how: str, keep_probability=None) -> torch.Tensor:
    """`delta` with dropped entries zeroed (in place) and survivors rescaled.

    inverse: divide survivors by their keep probability (DARE and DELLA papers);
    l1: scale the result to the L1 norm of the unmasked delta (mergekit);
    none: leave survivors as they are.
    """
    l1_before = delta.abs().sum() if how == "l1" else None
    delta.mul_(kept.to(delta.dtype))  # a float 0/1 factor: several times faster than a boolean mask
    if how == "inverse":
        delta.div_(keep_probability)
    elif how == "l1":
        l1_after = delta.abs().sum()
        if l1_before >= 1e-7 and l1_after >= 1e-7:
            delta.mul_(l1_before / l1_after)
    return delta
