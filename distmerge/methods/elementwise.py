"""The elementwise family (docs/methods.md): every output entry depends only on the same entry of the inputs,
apart from per-tensor statistics (magnitude thresholds, norms, cosines).

Task-vector methods share one pipeline, as in the TIES, DARE, Breadcrumbs and DELLA papers and in mergekit:
task vectors d_t = x_t - b, sparsified one by one; weighted by w_t; optionally a sign election keeps the entries
that agree with sign(sum_t w_t d_t); summed, and divided by sum_t w_t (over agreeing entries) when `aggregate` is
`mean`; scaled by lambda; added to the base.
"""

from __future__ import annotations

import math

import torch

from .registry import FirstPass, Param, TensorContext, entrywise, merge_method
from .sparsify import (
    breadcrumbs_mask,
    della_keep_probability,
    magnitude_histogram,
    magnitude_keep_count,
    rescale_kept,
    threshold_from_histogram,
    top_k_mask,
)

# ---- parameter declarations shared by several methods ----------------------------------------------------

WEIGHT = Param("weight", "float", 1.0, "weight w_t of this model", per_model=True)
DENSITY = Param("density", "float", 1.0, "fraction of task-vector entries kept", per_model=True,
                lo=0.0, lo_open=True, hi=1.0)
LAMBDA = Param("lambda", "float", 1.0, "scaling of the merged task vector")
INT8_MASK = Param("int8_mask", "bool", False, "accepted from mergekit configs; no effect (masks are boolean here)")


def aggregate(default: str) -> Param:
    return Param("aggregate", ("mean", "sum"), default,
                 "mean: divide by the sum of weights (of agreeing models after a sign election); sum: do not",
                 alias="normalize", bool_map={True: "mean", False: "sum"})


def rescale(default: str, choices: tuple[str, ...] = ("inverse", "l1", "none")) -> Param:
    return Param("rescale", choices, default,
                 "survivors of dropping: l1 = restore the L1 norm (mergekit's `rescale: true`), inverse = divide by "
                 "the keep probability (the DARE and DELLA papers), none", bool_map={True: "l1", False: "none"})


TRIM_SCOPE = Param("trim_scope", ("tensor", "global"), "tensor",
                   "top-density entries per tensor, or per task over the whole model (original TIES paper; "
                   "a first pass finds each task's threshold)")
GAMMA = Param("gamma", "float", 0.01, "fraction of largest-magnitude entries dropped", per_model=True,
              lo=0.0, hi=1.0, hi_open=True)
EPSILON = Param("epsilon", "float", 0.15, "half-width of DELLA's keep-probability ramp", per_model=True,
                lo=0.0, hi=0.5, hi_open=True)
MASK_LAMBDA = Param("mask_lambda", "float", 0.6, "TALL-mask threshold: task t claims an entry when "
                    "|d_t| > mask_lambda * |D - d_t|", per_model=True, lo=0.0)
AGREEMENT = Param("k", "int", 2, "entries are kept when at least k task masks claim them", lo=1)


# ---- the shared pipeline -----------------------------------------------------------------------------------


def task_vectors(base: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
    """d_t = x_t - b, in place in `models`."""
    return models.sub_(base)


def sparsify(deltas: torch.Tensor, p: dict, ctx: TensorContext, how: str) -> None:
    """Zero the dropped entries of each task vector (in place) and rescale the survivors.

    magnitude: TIES top-density by magnitude (or |d_t| >= the task's threshold from the global-trim first pass,
    ctx.first_pass); random: DARE Bernoulli(density);
    breadcrumbs: drop the largest gamma and the smallest; della: rank-dependent Bernoulli per row.
    """
    for t in range(deltas.shape[0]):
        delta, density = deltas[t], p["density"][t]
        if how == "magnitude":
            if ctx.first_pass is not None:
                kept = delta.abs() >= ctx.first_pass[t]
            elif density < 1:
                kept = top_k_mask(delta, magnitude_keep_count(density, delta.numel()))
            else:
                continue
            rescale_kept(delta, kept, p["rescale"])
        elif how == "breadcrumbs":
            if density < 1:
                rescale_kept(delta, breadcrumbs_mask(delta, density, p["gamma"][t]), p["rescale"])
        elif how == "random":
            if density < 1:
                kept = ctx.uniform(t, delta.shape, delta.device) < density
                rescale_kept(delta, kept, p["rescale"], keep_probability=density)
        elif how == "della":
            if density < 1:
                # mergekit's draws fall on mergekit's ranks: equal magnitudes ordered as its (unstable) sort does
                probability = della_keep_probability(delta.abs(), density, p["epsilon"][t],
                                                     stable=not ctx.draws_as_mergekit)
                kept = ctx.uniform(t, delta.shape, delta.device) < probability
                rescale_kept(delta, kept, p["rescale"], keep_probability=probability)
        else:
            raise ValueError(how)


def sum_into_first_(stack: torch.Tensor) -> torch.Tensor:
    """sum over dim 0, accumulated in order into stack[0] (the same bits as stack.sum(0), without a new tensor
    whose fresh pages cost more than the additions)."""
    total = stack[0]
    for row in stack[1:]:
        total.add_(row)
    return total


def elected_sign(deltas: torch.Tensor) -> torch.Tensor:
    """e = sign(sum_t deltas_t) per entry, with 0 counted as positive: +1.0 or -1.0 (a new tensor)."""
    return deltas.sum(0).ge_(0).mul_(2).sub_(1)


def combine(deltas: torch.Tensor, weights: list[float], how: str, elect_sign: bool) -> torch.Tensor:
    """The merged task vector from sparsified task vectors (consumes `deltas`).

    With `elect_sign`, the elected sign is e = sign(sum_t w_t d_t) (zero counts as positive) and each task keeps
    only the entries whose weighted sign agrees; `mean` then divides by the sum of the agreeing weights (0/0 -> 0).
    """
    for t, w in enumerate(weights):
        deltas[t].mul_(w)
    if not elect_sign:
        merged = sum_into_first_(deltas)
        if how == "mean":
            total = sum(weights)
            merged.div_(total if abs(total) >= 1e-8 else 1.0)
        return merged
    elected = elected_sign(deltas)
    # An entry agrees when x_t * e > 0. Multiplying by e = +-1 is exact, so relu(x_t * e) * e is x_t where it
    # agrees and 0 elsewhere, and sign(relu(x_t * e)) is the agreement as 1.0/0.0: float arithmetic throughout,
    # which runs several times faster than masking with booleans.
    agreeing = deltas.mul_(elected).clamp_(min=0)
    merged = agreeing.sum(0)
    if how == "mean":
        divisor = torch.zeros_like(merged)
        for t, w in enumerate(weights):
            divisor.add_(agreeing[t].sign_(), alpha=w)
        merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return merged.mul_(elected)


def apply_to_base(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """b + scale * merged, rounding as b + (scale * merged) (mergekit's order)."""
    if scale != 1:
        merged.mul_(scale)
    return merged.add_(base)


def task_arithmetic_family(base, models, p, ctx, how: str | None, elect_sign: bool) -> torch.Tensor:
    deltas = task_vectors(base, models)
    if how is not None:
        sparsify(deltas, p, ctx, how)
    merged = combine(deltas, p["weight"], p["aggregate"], elect_sign)
    return apply_to_base(base, merged, p["lambda"])


# ---- trim_scope: global — the first pass -------------------------------------------------------------------


def trims_globally(p: dict) -> bool:
    return p["trim_scope"] == "global"


def check_global_trim(ps: list[dict]) -> str | None:
    """One threshold per task serves the whole model: one scope and one density per model everywhere."""
    if len({p["trim_scope"] for p in ps}) > 1 or len({tuple(p["density"]) for p in ps}) > 1:
        return ("`trim_scope: global` needs one `trim_scope` and one `density` per model for the whole model "
                "(no gradients or filters on them)")
    return None


def magnitude_histograms(base: torch.Tensor, models: torch.Tensor, p: dict, ctx: TensorContext) -> torch.Tensor:
    """Per-task counts [T, 2^15] of |d_t| per magnitude bucket (int64): summed over tensors, the whole model's."""
    deltas = task_vectors(base, models)
    return torch.stack([magnitude_histogram(delta) for delta in deltas])


def global_thresholds(counts: torch.Tensor, p: dict) -> list[float]:
    """Each task's magnitude threshold: the bucket edge that keeps its top `density` share of the whole model."""
    total = int(counts[0].sum())
    return [threshold_from_histogram(counts[t], magnitude_keep_count(density, total)) if density < 1 else 0.0
            for t, density in enumerate(p["density"])]


GLOBAL_TRIM = FirstPass("trim thresholds", wanted=trims_globally, check=check_global_trim,
                        statistic=magnitude_histograms, finish=global_thresholds)


def trims_per_entry(p: dict) -> bool:
    """TIES without a per-tensor statistic: thresholds from the whole model's first pass (or nothing trimmed), and
    no L1 rescale (which takes the tensor's norm)."""
    return p["rescale"] == "none" and (trims_globally(p) or all(density >= 1 for density in p["density"]))


def rescales_per_entry(p: dict) -> bool:
    """DARE and DELLA keep each entry by its own draw (DELLA: by its rank in its row); only the L1 rescale, which
    takes the tensor's norms, needs the whole tensor."""
    return p["rescale"] != "l1"


# ---- the methods ---------------------------------------------------------------------------------------------


def check_linear(p: dict) -> str | None:
    if p["normalize"] and abs(sum(p["weight"])) < 1e-8:
        return f"the weights {p['weight']} sum to zero, so their mean is undefined; change them or set normalize: false"
    return None


@merge_method("linear", needs_base=False, summary="weighted mean of the models: sum_t w_t x_t / sum_t w_t",
              params=(WEIGHT, Param("normalize", "bool", True, "divide by the sum of weights")), check=check_linear,
              reference="https://arxiv.org/abs/2203.05482", blockwise=entrywise, non_finite_reaches_output=True)
def linear(base, models, p, ctx):
    weights = p["weight"]
    for t, w in enumerate(weights):
        models[t].mul_(w)
    merged = sum_into_first_(models)
    if p["normalize"]:
        merged.div_(sum(weights))
    return merged


@merge_method("task_arithmetic", needs_base=True, summary="b + lambda * sum_t w_t d_t",
              params=(WEIGHT, LAMBDA, aggregate("sum"), INT8_MASK), reference="https://arxiv.org/abs/2212.04089",
              blockwise=entrywise, non_finite_reaches_output=True)
def task_arithmetic(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, None, elect_sign=False)


TIES_PARAMS = (WEIGHT, DENSITY, LAMBDA, aggregate("mean"), TRIM_SCOPE, rescale("none", ("l1", "none")), INT8_MASK)


@merge_method("ties", needs_base=True, params=TIES_PARAMS, first_pass=GLOBAL_TRIM, blockwise=trims_per_entry,
              reference="https://arxiv.org/abs/2306.01708",
              summary="trim each d_t to its top-density magnitudes, elect signs, disjoint weighted mean")
def ties(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "magnitude", elect_sign=True)


DARE_PARAMS = (WEIGHT, DENSITY, LAMBDA, rescale("l1"), INT8_MASK)


def mergekit_bernoulli_draws(shape: tuple[int, ...], p: dict) -> int:
    """mergekit draws one Bernoulli mask the size of the tensor per model whose density is below 1."""
    return math.prod(shape) * sum(density < 1 for density in p["density"])


@merge_method("dare_linear", needs_base=True, params=DARE_PARAMS + (aggregate("sum"),), random=True,
              mergekit_draws=mergekit_bernoulli_draws, blockwise=rescales_per_entry,
              reference="https://arxiv.org/abs/2311.03099",
              summary="drop entries with probability 1 - density, rescale survivors, task arithmetic")
def dare_linear(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "random", elect_sign=False)


@merge_method("dare_ties", needs_base=True, params=DARE_PARAMS + (aggregate("sum"),), random=True,
              mergekit_draws=mergekit_bernoulli_draws, blockwise=rescales_per_entry,
              reference="https://arxiv.org/abs/2311.03099",
              summary="DARE drop and rescale, then TIES sign election; agreeing entries summed (or averaged)")
def dare_ties(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "random", elect_sign=True)


BREADCRUMBS_PARAMS = (WEIGHT, DENSITY, GAMMA, LAMBDA, rescale("none", ("l1", "none")), INT8_MASK)


@merge_method("breadcrumbs", needs_base=True, params=BREADCRUMBS_PARAMS + (aggregate("sum"),),
              reference="https://arxiv.org/abs/2312.06795",
              summary="drop the largest gamma and the smallest entries so density remains, task arithmetic")
def breadcrumbs(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "breadcrumbs", elect_sign=False)


@merge_method("breadcrumbs_ties", needs_base=True, params=BREADCRUMBS_PARAMS + (aggregate("sum"),),
              reference="https://arxiv.org/abs/2312.06795",
              summary="breadcrumbs mask, then TIES sign election; agreeing entries summed (or averaged)")
def breadcrumbs_ties(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "breadcrumbs", elect_sign=True)


def check_della(p: dict) -> str | None:
    for density, epsilon in zip(p["density"], p["epsilon"]):
        if density < 1 and not (density - epsilon > 0 and density + epsilon <= 1):
            return (f"della needs 0 < density - epsilon and density + epsilon <= 1, "
                    f"got density {density:g}, epsilon {epsilon:g}")
    return None


DELLA_PARAMS = (WEIGHT, DENSITY, EPSILON, LAMBDA, rescale("l1"), INT8_MASK)


@merge_method("della", needs_base=True, params=DELLA_PARAMS + (aggregate("mean"),), random=True, check=check_della,
              mergekit_draws=mergekit_bernoulli_draws, blockwise=rescales_per_entry,
              reference="https://arxiv.org/abs/2406.11617",
              summary="per-row keep probability rising with magnitude rank (MagPrune), rescale, TIES election")
def della(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "della", elect_sign=True)


@merge_method("della_linear", needs_base=True, params=DELLA_PARAMS + (aggregate("sum"),), random=True,
              check=check_della, mergekit_draws=mergekit_bernoulli_draws, blockwise=rescales_per_entry,
              reference="https://arxiv.org/abs/2406.11617", summary="DELLA's MagPrune and rescale, task arithmetic")
def della_linear(base, models, p, ctx):
    return task_arithmetic_family(base, models, p, ctx, "della", elect_sign=False)


def consensus(base, models, p, ctx, elect_sign: bool):
    """TALL-mask consensus: keep entries of the multi-task vector D that at least k tasks claim."""
    deltas = task_vectors(base, models)
    raw = deltas.clone() if elect_sign else deltas
    if elect_sign:
        sparsify(deltas, p, ctx, "magnitude")
        multi_task = combine(deltas, p["weight"], p["aggregate"], elect_sign=True)
    else:
        multi_task = combine(deltas.clone(), p["weight"], p["aggregate"], elect_sign=False)
    votes = torch.zeros_like(multi_task, dtype=torch.int32)
    for t in range(raw.shape[0]):
        votes += raw[t].abs() > (multi_task - raw[t]).abs_().mul_(p["mask_lambda"][t])
    multi_task.mul_(votes >= p["k"])
    ctx.stats["kept_fraction"] = float((votes >= p["k"]).float().mean())
    return apply_to_base(base, multi_task, p["lambda"])


@merge_method("consensus_ta", needs_base=True, params=(WEIGHT, LAMBDA, MASK_LAMBDA, AGREEMENT, aggregate("sum")),
              reference="https://arxiv.org/abs/2405.07813",
              summary="task arithmetic restricted to entries that at least k TALL masks claim")
def consensus_ta(base, models, p, ctx):
    return consensus(base, models, p, ctx, elect_sign=False)


@merge_method("consensus_ties", needs_base=True,
              params=(WEIGHT, DENSITY, LAMBDA, MASK_LAMBDA, AGREEMENT, aggregate("mean"), TRIM_SCOPE,
                      rescale("none", ("l1", "none"))),
              first_pass=GLOBAL_TRIM, reference="https://arxiv.org/abs/2405.07813",
              summary="TIES merge restricted to entries that at least k TALL masks claim")
def consensus_ties(base, models, p, ctx):
    return consensus(base, models, p, ctx, elect_sign=True)


SLERP_DOT_THRESHOLD = 0.9995


@merge_method("slerp", needs_base=True, min_models=1, max_models=1,
              params=(Param("t", "float", 0.5, "interpolation position: 0 gives the base, 1 the other model",
                            lo=0.0, hi=1.0),),
              reference="https://en.wikipedia.org/wiki/Slerp",
              summary="spherical interpolation between the base (t=0) and one other model (t=1)")
def slerp(base, models, p, ctx):
    t = p["t"]
    v0, v1 = base.reshape(-1), models[0].reshape(-1)
    norm0, norm1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    norm0 = norm0 if norm0 > 1e-8 else torch.ones_like(norm0)
    norm1 = norm1 if norm1 > 1e-8 else torch.ones_like(norm1)
    # (v0 * v1).sum(), not torch.dot: BLAS's dot changes its last bits with the thread count
    dot = float(((v0 * v1).sum() / (norm0 * norm1)).clamp(-1, 1))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        coef0, coef1 = 1 - t, t
    else:
        theta = torch.acos(torch.tensor(dot, dtype=torch.float64))
        coef0 = float(torch.sin((1 - t) * theta) / torch.sin(theta))
        coef1 = float(torch.sin(t * theta) / torch.sin(theta))
    ctx.stats["cosine"] = dot
    return models[0].mul_(coef1).add_(base, alpha=coef0)


def mean_pairwise_cosine(flat: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The mean over task pairs i < j of the cosine of `flat[i]` and `flat[j]` ([T, rows, n], one cosine per row),
    `norms` their norms. A cosine is scale-free: divide by the norms themselves (mergekit clamps their product at
    1e-6, which shrinks the cosine of small task vectors); a zero task vector has cosine 0."""
    n_models = flat.shape[0]
    cosines = [
        torch.where(norms[i] * norms[j] > 0, (flat[i] * flat[j]).sum(-1) / (norms[i] * norms[j]), 0.0).clamp(-1, 1)
        for i in range(n_models) for j in range(i + 1, n_models)
    ]
    return torch.stack(cosines).mean(0)


@merge_method("model_stock", needs_base=True, min_models=2,
              params=(Param("filter_wise", "bool", False, "one ratio per row instead of per tensor"),),
              reference="https://arxiv.org/abs/2403.19522",
              summary="r = T cos / (1 + (T-1) cos) from the mean pairwise cosine of task vectors; "
                      "r * mean_t x_t + (1 - r) * b")
def model_stock(base, models, p, ctx):
    n_models = models.shape[0]
    deltas = task_vectors(base, models)
    rows = base.shape[0] if p["filter_wise"] and base.dim() >= 2 else 1
    flat = deltas.reshape(n_models, rows, -1)
    cos = mean_pairwise_cosine(flat, torch.linalg.vector_norm(flat, dim=-1))
    denominator = 1 + (n_models - 1) * cos
    singular = denominator.abs() < 1e-6  # opposite updates: keep the base rather than amplify them
    ratio = torch.where(singular, 0.0, n_models * cos / torch.where(singular, 1.0, denominator))
    ctx.stats["ratio"] = float(ratio.mean())
    # r * mean_t x_t + (1 - r) * b  ==  b + r * mean_t d_t
    merged = deltas.mean(0).reshape(rows, -1).mul_(ratio.unsqueeze(-1)).reshape(base.shape)
    return merged.add_(base)
