"""Sparsification: which task-vector entries survive, and how survivors are rescaled.

Selection never sorts a whole tensor. The k-th largest magnitude comes from a radix select on the bit patterns
(for non-negative floats the bit pattern orders like the value): a histogram of the top 16 bits finds the bucket,
then one histogram per further 16 bits inside it, down to the exact value (two levels for float32, four for
float64). The top-16-bit histogram of float32 magnitudes, summed over a whole model, gives TIES its global
thresholds.

Ties at the boundary are broken by position, as a stable sort would break them, so masks hold exactly the
requested number of entries and match mergekit's.
"""

from __future__ import annotations

import torch

HIGH_BINS = 1 << 15  # top 16 bits of a non-negative float32: sign bit 0, so 2^15 buckets
SMALL = 1 << 16  # tensors up to this size select with torch.kthvalue: cheaper than 2^16-bucket histograms


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.to(torch.float32).contiguous().view(torch.int32).reshape(-1)


def magnitude_histogram(magnitudes: torch.Tensor) -> torch.Tensor:
    """Counts of |values| per bucket of their top 16 bits (bfloat16 precision), int64 [2^15]."""
    return torch.bincount(_bits(magnitudes) >> 16, minlength=HIGH_BINS)


def _bucket_holding_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket b, rank of the k-th largest inside b counted from the top), for a histogram `counts`."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count of buckets >= b
    bucket = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[bucket] - counts[bucket])
    return bucket, k - above


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The exact k-th largest of non-negative `magnitudes` (1 <= k <= numel), in their own precision
    (float64 stays float64; narrower floats are selected as float32, which holds them exactly)."""
    float_type, int_type = (torch.float64, torch.int64) if magnitudes.dtype == torch.float64 else (
        torch.float32, torch.int32)
    if magnitudes.numel() <= SMALL:  # below the histograms' fixed cost: a plain selection, same exact value
        flat = magnitudes.to(float_type).reshape(-1)
        return float(torch.kthvalue(flat, flat.numel() - k + 1).values)
    width = 64 if float_type == torch.float64 else 32
    candidates = magnitudes.to(float_type).contiguous().view(int_type).reshape(-1)
    prefix, rank = 0, k
    for shift in range(width - 16, -1, -16):
        digit = (candidates >> shift) & 0xFFFF
        bucket, rank = _bucket_holding_kth_largest(torch.bincount(digit, minlength=1 << 16), rank)
        prefix |= bucket << shift
        if shift:
            candidates = candidates[digit == bucket]
    return torch.tensor([prefix], dtype=int_type).view(float_type).item()


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


def top_k_mask(magnitudes: torch.Tensor, k: int, prefer_low_index: bool = True) -> torch.Tensor:
    """Bool mask of the k largest entries; equal values at the boundary are taken in index order
    (lowest first, or highest first with prefer_low_index=False)."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    tau = kth_largest(magnitudes, k)
    mask = magnitudes > tau
    need = k - int(torch.count_nonzero(mask))
    equal = magnitudes == tau
    n_equal = int(torch.count_nonzero(equal))
    if n_equal > need:
        positions = equal.reshape(-1).nonzero().squeeze(1)  # ascending; only the tied entries
        dropped = positions[need:] if prefer_low_index else positions[:n_equal - need]
        equal.reshape(-1)[dropped] = False
    return mask.logical_or_(equal)


def magnitude_keep_count(density: float, n: int) -> int:
    """How many entries TIES keeps (mergekit's rule: at least one)."""
    return max(1, int(density * n))


def breadcrumbs_mask(magnitudes: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the `gamma` fraction of largest magnitudes and the smallest ones, so that `density` remains.

    Ranks are ascending with ties in index order; kept ranks are [n_bot, n_bot + keep). When density + gamma
    exceeds 1 fewer top entries are dropped, so that the density is still met (as in mergekit).
    """
    n = magnitudes.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    at_least_bottom = top_k_mask(magnitudes, n - n_bot, prefer_low_index=False)
    in_top = top_k_mask(magnitudes, n - n_bot - keep, prefer_low_index=False)
    return at_least_bottom & ~in_top


def della_keep_probability(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: per row, keep probability rises linearly with the magnitude's rank, from
    density - epsilon (smallest) to density + epsilon (largest). Ranks within a row come from one stable
    row-wise sort (rows are short); 1-D tensors are one row."""
    rows = magnitudes.reshape(1, -1) if magnitudes.dim() < 2 else magnitudes.reshape(magnitudes.shape[0], -1)
    n_cols = rows.shape[1]
    dtype = torch.promote_types(rows.dtype, torch.float32)  # float64 compute keeps float64 probabilities
    probability = torch.empty_like(rows, dtype=dtype)
    step = max(1, (1 << 24) // max(1, n_cols))  # bound the sort's int64 scratch
    ramp = torch.arange(n_cols, dtype=dtype, device=rows.device)
    ramp = ramp / max(1, n_cols - 1) * (2 * epsilon) + (density - epsilon)
    for lo in range(0, rows.shape[0], step):
        order = torch.sort(rows[lo:lo + step], dim=1, stable=True).indices
        probability[lo:lo + step].scatter_(1, order, ramp.expand(order.shape[0], -1))
    return probability.reshape(magnitudes.shape)


def rescale_kept(delta: torch.Tensor, kept: torch.Tensor, how: str, keep_probability=None) -> torch.Tensor:
    """`delta` with dropped entries zeroed (in place) and survivors rescaled.

    inverse: divide survivors by their keep probability (DARE and DELLA papers);
    l1: scale the result to the L1 norm of the unmasked delta (mergekit);
    none: leave survivors as they are.
    """
    l1_before = delta.abs().sum() if how == "l1" else None
    delta.mul_(kept)
    if how == "inverse":
        delta.div_(keep_probability)
    elif how == "l1":
        l1_after = delta.abs().sum()
        if l1_before >= 1e-7 and l1_after >= 1e-7:
            delta.mul_(l1_before / l1_after)
    return delta
