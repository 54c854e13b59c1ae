"""Proving that a difference from mergekit is one of the documented ones (docs/methods.md, section 5), not assuming
it: the case's config is merged again by distmerge, in this process, with that one choice swapped for mergekit's
(monkeypatched here, for the duration of that merge; distmerge's own code is untouched). If that merge agrees with
mergekit's to round-off, the swapped choice is all that separated the two tools.

- tie-break: which entries of exactly equal magnitude at a top-k boundary are kept. distmerge keeps tied entries
  in index order; mergekit keeps them in the order that torch's default (unstable) sort of the CPU float32
  magnitudes gives: `torch.argsort(descending=True)` for TIES (mergekit's `magnitude`), an ascending
  `torch.sort` for Breadcrumbs (`magnitude_outliers`), `torch.topk` for SCE's variance mask.
- by design (clamp): model_stock's cosine of two task vectors. distmerge divides their dot product by the product
  of their norms; mergekit by that product clamped at 1e-6, which shrinks the cosine of small task vectors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from common import load_checkpoint

from .cases import METHODS, Case

TIE_BREAK = "tie-break"
CLAMP = "by design (clamp)"
MODEL_STOCK_NORM_CLAMP = 1e-6  # mergekit 0.1.5's lower bound on the product of two task-vector norms


def mergekit_magnitudes(values: torch.Tensor) -> torch.Tensor:
    """|values| flat, as mergekit sorts them on CPU: in float32."""
    return values.abs().reshape(-1).float()


def mask_of(values: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[chosen] = True
    return mask.reshape(values.shape)


def top_k_by(order_of_largest):
    """A stand-in for distmerge's sparsify.top_k_mask (same signature) that keeps the first k entries of
    `order_of_largest(magnitudes, k)`: mergekit's order of equal magnitudes instead of index order."""
    def top_k_mask(values: torch.Tensor, k: int, prefer_low_index: bool = True) -> torch.Tensor:
        if k >= values.numel():
            return torch.ones_like(values, dtype=torch.bool)
        if k <= 0:
            return torch.zeros_like(values, dtype=torch.bool)
        return mask_of(values, order_of_largest(mergekit_magnitudes(values), k))

    return top_k_mask


# TIES (mergekit's `magnitude`) and SCE (`sce_mask`) choose their k largest differently among equal magnitudes
argsort_top_k_mask = top_k_by(lambda magnitudes, k: torch.argsort(magnitudes, descending=True)[:k])
topk_top_k_mask = top_k_by(lambda magnitudes, k: torch.topk(magnitudes, k, largest=True).indices)


def sorted_breadcrumbs_mask(values: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """A stand-in for distmerge's sparsify.breadcrumbs_mask: the same ranks [n_bot, n_bot + keep) kept, taken
    from one ascending default sort of the magnitudes (mergekit's `magnitude_outliers`)."""
    n = values.numel()
    keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    return mask_of(values, torch.sort(mergekit_magnitudes(values), descending=False).indices[n_bot:n_bot + keep])


def clamped_mean_pairwise_cosine(flat: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """A stand-in for distmerge's elementwise.mean_pairwise_cosine: each cosine divides by
    max(|d_i| |d_j|, 1e-6), mergekit's clamped norm product, instead of |d_i| |d_j|."""
    n_models = flat.shape[0]
    return torch.stack([((flat[i] * flat[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=MODEL_STOCK_NORM_CLAMP))
                        .clamp(-1, 1) for i in range(n_models) for j in range(i + 1, n_models)]).mean(0)


@contextlib.contextmanager
def mergekit_top_k():
    """TIES, Breadcrumbs and SCE choose among tied magnitudes as mergekit does."""
    from distmerge.methods import elementwise, selection

    with mock.patch.object(elementwise, "top_k_mask", argsort_top_k_mask), \
            mock.patch.object(elementwise, "breadcrumbs_mask", sorted_breadcrumbs_mask), \
            mock.patch.object(selection, "top_k_mask", topk_top_k_mask):
        yield


@contextlib.contextmanager
def mergekit_clamped_cosine():
    """model_stock's cosines as mergekit computes them."""
    from distmerge.methods import elementwise

    with mock.patch.object(elementwise, "mean_pairwise_cosine", clamped_mean_pairwise_cosine):
        yield


# merge_method -> (the verdict a match proves, the swap that proves it)
SWAPS = {"ties": (TIE_BREAK, mergekit_top_k), "breadcrumbs": (TIE_BREAK, mergekit_top_k),
         "breadcrumbs_ties": (TIE_BREAK, mergekit_top_k), "sce": (TIE_BREAK, mergekit_top_k),
         "model_stock": (CLAMP, mergekit_clamped_cosine)}


def swap_for(case: Case):
    """(verdict, swap) where the case's method has a documented difference to test for, else None. distmerge
    never computes in bfloat16, so a `dtype: bfloat16` case differs by more than any swap."""
    if case.variant.dtype == "bfloat16" or case.variant.sampled:
        return None
    return SWAPS.get(METHODS[case.method].get("method", case.method))


@dataclass
class Explanation:
    """The outcome of re-merging a case with one choice made as mergekit makes it."""

    verdict: str  # what a match proves: TIE_BREAK or CLAMP
    differing_tensors: dict[str, int]  # where the original outputs differ: tensor -> differing elements
    # the swapped merge against mergekit's, per tensor (compare.TensorDiff)
    swapped: list = field(default_factory=list)
    error: str | None = None

    @property
    def proven(self) -> bool:
        return self.error is None and bool(self.swapped) and all(t.within_roundoff for t in self.swapped)

    @property
    def swapped_max_abs(self) -> float:
        return max((t.max_abs for t in self.swapped), default=0.0)


def explain(result, config: Path, theirs_dir: Path, work: Path):
    """Re-merge `config` with distmerge under the case's swap into work/swapped/<slug> and compare that with
    mergekit's output; None where the case has no swap."""
    from distmerge.config import load_config
    from distmerge.merge import merge

    from .compare import compare_tensor

    found = swap_for(result.case)
    if found is None:
        return None
    verdict, swap = found
    explanation = Explanation(verdict, {t.name: t.differing for t in result.tensors if t.differing})
    out = work / "swapped" / result.case.slug
    try:
        with swap():
            merge(load_config(config), out, force=True, quiet=True)
    except Exception as error:  # reported in the case's row; the case then keeps its DIFFERS verdict
        explanation.error = f"{type(error).__name__}: {error}"
        return explanation
    ours, theirs = load_checkpoint(out), load_checkpoint(theirs_dir)
    explanation.swapped = [compare_tensor(name, ours[name], theirs[name]) for name in sorted(theirs)]
    return explanation
