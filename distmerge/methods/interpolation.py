"""Whole-tensor copies and interpolation on spheres (docs/methods.md): `passthrough`, `nuslerp`, `multislerp` and
`karcher`, as mergekit 0.1.5 defines them. Apart from passthrough, an output entry depends on the norms and angles
of whole tensors (or of their rows or columns), not only on the same entry of the inputs.

Scalars that steer the computation (angles, norms, coefficients) are float64 Python numbers or tensors; the tensors
themselves stay in the compute dtype.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .elementwise import WEIGHT
from .registry import Param, Work, entrywise, merge_method


def no_scratch(name: str, shape: tuple[int, ...], p: dict, n_tasks: int) -> Work:
    return Work()


def one_tensor_of_scratch(name: str, shape: tuple[int, ...], p: dict, n_tasks: int) -> Work:
    return Work(scratch=math.prod(shape))


# ---- passthrough ---------------------------------------------------------------------------------------------


def scaled_(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """tensor * scale, in place; the tensor itself (the same bits) when scale is 1."""
    return tensor if scale == 1 else tensor.mul_(scale)


@merge_method("passthrough", needs_base=False, base_is_model=True, min_models=1, max_models=1, work=no_scratch,
              blockwise=entrywise,
              params=(Param("scale", "float", 1.0, "multiplies the model's tensor (mergekit: none, i.e. 1)",
                            per_model=True),),
              summary="the one model's tensor, times its scale (usually a filter, e.g. 0 for some projections)")
def passthrough(base, models, p, ctx):
    return scaled_(models[0], p["scale"][0])


# ---- nuslerp -------------------------------------------------------------------------------------------------

NUSLERP_NORM_FLOOR = 1e-7  # vector norms below this are raised to it before dividing (a zero vector stays zero)
NUSLERP_COLINEAR = 1e-16  # 1 - cos^2 at or below this: parallel or opposite, interpolate linearly


def nuslerp_position(weights: list[float]) -> float:
    """t = w_2 / (w_1 + w_2): 0 gives the first model, 1 the second; 0.5 when the weights sum to (nearly) zero."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def slerp_vectors_(v0: torch.Tensor, v1: torch.Tensor, t: float, dim: int | None) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) of each vector along `dim` (None: the whole tensor
    is one vector), with the angle between the directions and the norms of the inputs left as they are. The result
    overwrites v0 (v1 is overwritten too)."""
    norm0 = torch.linalg.vector_norm(v0, dim=dim, keepdim=True).clamp_(min=NUSLERP_NORM_FLOOR).double()
    norm1 = torch.linalg.vector_norm(v1, dim=dim, keepdim=True).clamp_(min=NUSLERP_NORM_FLOOR).double()
    # (v0 * v1).sum(), not a BLAS dot, whose last bits change with the thread count
    cos = ((v0 * v1).sum(dim=dim, keepdim=True).double() / (norm0 * norm1)).clamp_(-1, 1)
    colinear = 1 - cos.square() <= NUSLERP_COLINEAR
    theta = torch.acos(cos)
    # where colinear, sin(theta) may be 0: that branch is not taken
    coef0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta)).to(v0.dtype)
    coef1 = torch.where(colinear, t, torch.sin(t * theta) / torch.sin(theta)).to(v0.dtype)
    return v0.mul_(coef0).add_(v1.mul_(coef1))


@merge_method("nuslerp", needs_base=False, optional_base=True, min_models=2, max_models=2,
              work=one_tensor_of_scratch,
              params=(WEIGHT,
                      Param("nuslerp_flatten", "bool", True, "interpolate the whole tensor as one vector"),
                      Param("nuslerp_row_wise", "bool", False,
                            "without flattening: interpolate the vectors along the first dimension (the columns of "
                            "a matrix) instead of the last (its rows)")),
              reference="https://en.wikipedia.org/wiki/Slerp",
              summary="spherical interpolation of two models (or of their task vectors when a base is given) at "
                      "t = w_2 / (w_1 + w_2), per tensor, row or column")
def nuslerp(base, models, p, ctx):
    v0, v1 = (models[0], models[1]) if base is None else (models[0].sub_(base), models[1].sub_(base))
    dim = None if p["nuslerp_flatten"] else 0 if p["nuslerp_row_wise"] else -1
    merged = slerp_vectors_(v0, v1, nuslerp_position(p["weight"]), dim)
    return merged if base is None else merged.add_(base)


# ---- multislerp ----------------------------------------------------------------------------------------------


def check_multislerp(p: dict) -> str | None:
    """Weights divided by their sum must not sum to zero."""
    if p["normalize_weights"] and abs(sum(p["weight"])) < 1e-8:
        return (f"the weights {p['weight']} sum to zero, so they cannot be normalized; change them or set "
                "normalize_weights: false")
    return None


@merge_method("multislerp", needs_base=False, optional_base=True, min_models=1, work=one_tensor_of_scratch,
              params=(WEIGHT,
                      Param("normalize_weights", "bool", True, "divide the weights by their sum"),
                      Param("eps", "float", 1e-8, "added to every norm before dividing by it; below it, the mean "
                                                  "direction counts as zero", lo=0.0, lo_open=True)),
              check=check_multislerp,
              reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              summary="the weighted mean direction of the unit task vectors (or models, without a base), at the "
                      "weighted mean of their norms")
def multislerp(base, models, p, ctx):
    n_models = models.shape[0]
    if n_models == 1:
        return models[0]
    deltas = models if base is None else models.sub_(base)
    flat = deltas.reshape(n_models, -1)
    weights, eps = p["weight"], p["eps"]
    if p["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    norms = [float(torch.linalg.vector_norm(d)) for d in flat]
    direction = torch.zeros_like(flat[0])
    for d, w, norm in zip(flat, weights, norms):
        direction.add_(d, alpha=w / (norm + eps))
    length = float(torch.linalg.vector_norm(direction))
    if length < eps:
        if n_models > 2 and any(norms):
            raise ConfigError(
                f"multislerp, tensor {ctx.name}: the weighted mean of the unit task vectors is zero (opposite "
                "vectors whose weights balance), so it has no direction; change the weights")
        # two models (or nothing to interpolate): the weighted sum, as mergekit falls back to
        for d, w in zip(flat, weights):
            d.mul_(w)
        merged = torch.sum(flat, dim=0, out=direction)
    else:
        # mergekit projects the unit vectors onto the tangent plane at the mean direction m and maps their
        # weighted sum back with the exponential map; that sum is exactly zero (the weighted sum of the units is
        # |direction| m), padded to eps, so the map returns m cos(eps)
        mean_norm = sum(w * norm for w, norm in zip(weights, norms))
        merged = direction.mul_(mean_norm * math.cos(eps) / length)
    merged = merged.reshape(deltas.shape[1:])
    return merged if base is None else merged.add_(base)


# ---- karcher -------------------------------------------------------------------------------------------------


def karcher_work(name: str, shape: tuple[int, ...], p: dict, n_tasks: int) -> Work:
    """The mean, the tangent step and one vector for the angles."""
    return Work(scratch=3 * math.prod(shape))


def angle_between(a: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor) -> float:
    """The angle between unit vectors a and b, 2 atan2(|b - a|, |b + a|), accurate at every angle; acos of a float32
    dot product is not at small ones (a cosine within 6e-8 of 1 rounds to 1: below ~3e-4 rad the angle is 0 or
    round-off)."""
    apart = float(torch.linalg.vector_norm(torch.sub(b, a, out=buffer)))
    together = float(torch.linalg.vector_norm(torch.add(b, a, out=buffer)))
    return 2 * math.atan2(apart, together)


@merge_method("karcher", needs_base=False, base_is_model=True, min_models=1, work=karcher_work,
              params=(Param("max_iter", "int", 10, "most gradient steps on the sphere", lo=0),
                      Param("tol", "float", 1e-5, "stop when the tangent step is shorter; norms and angles below it "
                                                  "count as zero", lo=0.0, lo_open=True)),
              reference="https://arxiv.org/abs/2603.04972",
              summary="the Karcher (Riemannian) mean of the models' directions on the unit sphere, at their mean "
                      "norm")
def karcher(base, models, p, ctx):
    n_models = models.shape[0]
    ctx.stats["iterations"] = 0
    if n_models == 1:
        return models[0]
    tol = p["tol"]
    flat = models.reshape(n_models, -1)
    norms = [float(torch.linalg.vector_norm(x)) for x in flat]
    units = [x.div_(norm) for x, norm in zip(flat, norms) if norm > tol]  # each model's direction, in place
    if not units:
        return models[0].zero_()
    share = 1 / len(units)
    mean = torch.zeros_like(units[0])
    for unit in units:
        mean.add_(unit, alpha=share)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = mean.copy_(units[0]) if mean_norm < tol else mean.div_(mean_norm)
    tangent, buffer = torch.empty_like(mean), torch.empty_like(mean)
    steps = 0
    for _ in range(p["max_iter"]):
        # the log map of every direction at the mean, averaged: sum_t share theta_t / sin(theta_t) (u_t - cos_t m)
        tangent.zero_()
        along_mean = 0.0
        for unit in units:
            theta = angle_between(mean, unit, buffer)
            if theta < tol:
                continue
            coefficient = share * theta / math.sin(theta)
            tangent.add_(unit, alpha=coefficient)
            along_mean += coefficient * math.cos(theta)
        tangent.sub_(mean, alpha=along_mean)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)  # the exp map at the mean
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean.div_(length)
        steps += 1
    ctx.stats["iterations"] = steps
    return mean.mul_(sum(norms) / n_models).reshape(models.shape[1:])
