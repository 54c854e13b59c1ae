"""Selection methods (docs/methods.md): each entry of the result takes the changes of the models that a per-tensor
rule selects for it, rather than a fixed mix of all of them.

`sce` keeps the entries where the models disagree most and weights the models by the energy of their changes,
`arcee_fusion` takes the model's change only where it is an outlier of importance, `nearswap` moves the base
toward the model where the two are already close, `ram` and `ramplus_tl` average each entry over the models that
changed it. These are mergekit 0.1.5's definitions, guards and roundings included (the parity run compares the
bytes); where distmerge departs from it, docs/methods.md says so.
"""

from __future__ import annotations

import math

import torch

from .elementwise import INT8_MASK, elected_sign, sum_into_first_, task_vectors
from .registry import Param, Work, entrywise, merge_method
from .sparsify import top_k_mask


def tensor_copies(copies: int):
    """The `work` of a method that needs `copies` tensor-sized temporaries and no decomposition."""

    def work(name: str, shape: tuple[int, ...], p: dict, n_tasks: int) -> Work:
        return Work(scratch=copies * math.prod(shape))

    return work


# ---- sce -----------------------------------------------------------------------------------------------------

SCE_DIVISOR_FLOOR = 1e-6  # the sum of the agreeing weights is clamped to at least this (mergekit's guard)
SCE_WEIGHT_FLOOR = 1e-6  # below this total energy, every model weighs 1/T (mergekit's guard)
VARIANCE_CHUNK = 1 << 16  # entries per step of `population_variance`: its float64 copies stay in cache


def population_variance(deltas: torch.Tensor) -> torch.Tensor:
    """The variance over the models (dim 0, population) of each entry, computed in float64 and rounded to the
    deltas' dtype. torch's CPU `var` accumulates float32 in float64 too, so the values are the same (apart from a
    rare double rounding), at a tenth of its time: over 3 models its strided reduction took 360 ms per 2.9M
    entries on a 2-core machine, two cache-sized float64 passes 34 ms."""
    flat = deltas.reshape(deltas.shape[0], -1)
    variance = torch.empty(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for lo in range(0, flat.shape[1], VARIANCE_CHUNK):
        x = flat[:, lo:lo + VARIANCE_CHUNK].double()
        variance[lo:lo + VARIANCE_CHUNK] = (x - x.mean(0)).square_().mean(0)  # x is the deltas when float64
    return variance.reshape(deltas.shape[1:])


def high_variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries whose task vectors vary most across the models: the top floor(select_topk * m) of the variance
    over the models (population variance), m the number of entries with nonzero variance. The product is rounded
    to float32, as mergekit forms it from an integer tensor; equal variances at the boundary are taken lowest
    index first."""
    variance = population_variance(deltas)
    kept = int(torch.count_nonzero(variance) * select_topk)
    return top_k_mask(variance, kept)


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_t = mean(d_t^2) / sum_s mean(d_s^2), in the compute dtype; 1/T each when the total is below 1e-6."""
    energy = torch.stack([delta.square().mean() for delta in deltas])
    total = float(energy.sum())
    if total < SCE_WEIGHT_FLOOR:
        return torch.ones_like(energy) / energy.numel()
    return energy / total


@merge_method("sce", needs_base=True, work=tensor_copies(4),
              params=(Param("select_topk", "float", 1.0, "fraction of the entries with nonzero variance across the "
                            "models that are kept (those of largest variance)", lo=0.0, hi=1.0), INT8_MASK),
              reference="https://arxiv.org/abs/2408.07990",
              summary="keep the top select_topk entries by variance across the models, elect signs, "
                      "mean weighted by each model's mean squared change")
def sce(base, models, p, ctx):
    deltas = task_vectors(base, models)
    if p["select_topk"] < 1:
        deltas.mul_(high_variance_mask(deltas, p["select_topk"]))
    elected = elected_sign(deltas)
    weights = energy_weights(deltas)
    divisor, taken = torch.zeros_like(base), torch.empty_like(base)
    for delta, weight in zip(deltas, weights):
        # the model's weight where its entry has the elected sign (an entry that is 0 never agrees), else 0
        torch.mul(delta, elected, out=taken).gt_(0).mul_(weight)
        divisor.add_(taken)
        delta.mul_(taken)
    merged = sum_into_first_(deltas)
    return merged.div_(divisor.clamp_(min=SCE_DIVISOR_FLOOR)).add_(base)


# ---- arcee_fusion ------------------------------------------------------------------------------------------------

FUSION_SOFTMAX_EPS = 1e-8  # added to both softmax distributions before the KL divergence (mergekit's guard)


def interquartile_threshold(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1) over all entries, each quartile the entry at position floor(q (n - 1)) of the
    ascending order, computed in the values' dtype."""
    flat = values.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.kthvalue(flat, position + 1).values for position in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


@merge_method("arcee_fusion", needs_base=True, min_models=1, max_models=1, params=(), work=tensor_copies(4),
              reference="https://arcee.ai",
              summary="take the model's change where its importance |x - b| * KL(softmax(x) || softmax(b)) (per "
                      "row) reaches median + 1.5 IQR, keep the base elsewhere")
def arcee_fusion(base, models, p, ctx):
    model = models[0]
    p_model = torch.softmax(model, dim=-1).add_(FUSION_SOFTMAX_EPS)
    p_base = torch.softmax(base, dim=-1).add_(FUSION_SOFTMAX_EPS)
    divergence = p_model.div(p_base).log_().mul_(p_model).sum(-1, keepdim=True)  # per row (along the last axis)
    del p_model, p_base
    delta = model.sub_(base)
    importance = delta.abs().mul_(divergence)
    kept = importance >= interquartile_threshold(importance)
    ctx.stats["kept_fraction"] = int(kept.count_nonzero()) / kept.numel()
    return delta.mul_(kept).add_(base)


# ---- nearswap ----------------------------------------------------------------------------------------------------

NEARSWAP_DISTANCE_FLOOR = 1e-6  # |x - b| is clamped to at least this before dividing (mergekit's guard)


def check_nearswap(p: dict) -> str | None:
    if p["t"] is None:
        return "`t` has no default (as in mergekit): set it in the top-level `parameters`, e.g. `t: 0.001`"
    return None


@merge_method("nearswap", needs_base=True, min_models=1, max_models=1, check=check_nearswap, blockwise=entrywise,
              params=(Param("t", "float", None, "distance below which an entry takes the model's value "
                            "(required)", lo=0.0),),
              reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
              summary="w = clamp(t / |x - b|, 0, 1) per entry; w x + (1 - w) b: the model's value where it is "
                      "within t of the base, interpolated toward the base farther away")
def nearswap(base, models, p, ctx):
    model = models[0]
    # t * (1 / |x - b|): how torch rounds a number divided by a tensor, which is what mergekit writes
    weight = (base - model).abs_().clamp_(min=NEARSWAP_DISTANCE_FLOOR).reciprocal_().mul_(p["t"]).clamp_(0, 1)
    return model.mul_(weight).add_((1 - weight).mul_(base))


# ---- ram and ramplus_tl ------------------------------------------------------------------------------------------


def ram_epsilon(lo_open: bool) -> Param:
    return Param("epsilon", "float", 1e-5, "a task-vector entry counts as changed when |d| > epsilon", lo=0.0,
                 lo_open=lo_open)


def reinforcement(n_shared: int, n_unique: int, p: dict) -> float:
    """RAM+'s factor lambda_t = 1 + r clamp(rho_t, 0, alpha), rho_t = n_shared / max(n_unique, epsilon), computed
    in float32 (mergekit divides integer counts, which gives float32, whatever the compute dtype)."""
    rho = torch.tensor(n_shared, dtype=torch.float32) / torch.tensor(max(n_unique, p["epsilon"]), dtype=torch.float32)
    return float(1 + p["r"] * rho.clamp(0, p["alpha"]))


def reinforced_agent_merge(base, models, p, reinforce: bool) -> torch.Tensor:
    """b + sum_t [|d_t| > epsilon] d_t / c, c = the number of models that changed the entry (0 where none did);
    with `reinforce`, entries only model t changed are scaled by its lambda_t."""
    epsilon = p["epsilon"]
    deltas = task_vectors(base, models)
    changed_by = torch.zeros_like(base)  # c per entry (small integers, exact in floating point)
    changed = torch.empty_like(base)  # per model: 1.0 where it changed the entry, else 0.0
    for delta in deltas:
        changed_by.add_(torch.abs(delta, out=changed).gt_(epsilon))
    only_one = changed_by == 1 if reinforce else None
    divisor = changed_by.clamp_(min=1)
    for delta in deltas:
        torch.abs(delta, out=changed).gt_(epsilon)
        delta.mul_(changed).div_(divisor)  # c = 1 divides exactly: a model's own entries stay as they are
        if reinforce:
            n_changed = int(changed.count_nonzero())
            n_unique = int(changed.mul_(only_one).count_nonzero())
            factor = reinforcement(n_changed - n_unique, n_unique, p)
            delta.mul_(changed.fill_(1).masked_fill_(only_one, factor))  # lambda_t where c = 1, else 1
    return sum_into_first_(deltas).add_(base)


@merge_method("ram", needs_base=True, params=(ram_epsilon(lo_open=False),),
              reference="https://arxiv.org/abs/2601.13572",
              summary="each entry: the mean of the task-vector entries with |d_t| > epsilon (0 where none); "
                      "added to the base")
def ram(base, models, p, ctx):
    return reinforced_agent_merge(base, models, p, reinforce=False)


@merge_method("ramplus_tl", needs_base=True, work=tensor_copies(4),
              params=(Param("r", "float", 0.1, "strength of the reinforcement of a model's unique entries", lo=0.0),
                      Param("alpha", "float", 0.2, "cap on the shared-to-unique ratio rho_t", lo=0.0),
                      ram_epsilon(lo_open=True)),
              reference="https://arxiv.org/abs/2601.13572",
              summary="ram, with the entries only model t changed scaled by 1 + r min(alpha, shared_t / unique_t) "
                      "(counts within the tensor)")
def ramplus_tl(base, models, p, ctx):
    return reinforced_agent_merge(base, models, p, reinforce=True)
