"""compare_fusionbench.py's measurements: every tensor of distmerge's output against FusionBench's float32 and
float64 results, the tolerance that judges them, and the conditioning of what each method orthogonalises."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import load_checkpoint

from .cases import Case


def relative(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||a - b||_F / scale (0 when both are equal, inf when the scale is 0 and they are not)."""
    diff = float(torch.linalg.vector_norm(a - b))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


@dataclass
class TensorResult:
    name: str
    shape: tuple[int, ...]
    max_abs: float  # max |distmerge - FusionBench|
    rel: float  # ||distmerge - FusionBench|| / ||FusionBench - base||
    rel_exact: float  # ||distmerge - FusionBench float64|| / ||FusionBench float64 - base||
    fb_rel_exact: float  # ||FusionBench - FusionBench float64|| / ||FusionBench float64 - base||
    from_average: float  # ||FusionBench - (b + alpha mean d)|| / ||FusionBench - base||: 0 when averaged

    def verdict(self, tol: Tolerance) -> str:
        if self.rel <= tol.rel:
            return "equal"
        return "round-off" if self.rel_exact <= tol.ratio * self.fb_rel_exact else "MISMATCH"


@dataclass(frozen=True)
class Tolerance:
    """A tensor passes when it is within `rel` of FusionBench's float32 result ("equal"), or when it is no farther
    from exact (float64) arithmetic than `ratio` times FusionBench's own float32 result is ("round-off")."""

    rel: float
    ratio: float


@dataclass
class CaseResult:
    case: Case
    polar: str
    error: str | None = None
    tensors: list[TensorResult] = field(default_factory=list)
    condition: float = float("nan")  # of the matrices orthogonalised for the worst tensor

    def worst(self, key: str = "rel") -> TensorResult | None:
        return max(self.tensors, key=lambda t: getattr(t, key), default=None)

    def top(self, key: str) -> float:
        worst = self.worst(key)
        return getattr(worst, key) if worst else float("nan")

    def verdict(self, tol: Tolerance) -> str:
        """equal, round-off or MISMATCH (the worst over tensors), or error."""
        if self.error or not self.tensors:
            return "error"
        verdicts = {t.verdict(tol) for t in self.tensors}
        return next(v for v in ("MISMATCH", "round-off", "equal") if v in verdicts)

    def passes(self, tol: Tolerance) -> bool:
        return self.verdict(tol) in ("equal", "round-off")

    def beyond(self, tol: Tolerance) -> int:
        """How many tensors are farther than tol.rel from FusionBench."""
        return sum(t.rel > tol.rel for t in self.tensors)


def compare_case(case: Case, polar: str, family: dict, dirs: dict[str, Path], alpha: float) -> CaseResult:
    """distmerge's output for `polar` against FusionBench's float32 output, tensor by tensor, in float64."""
    ours, theirs, exact = (load_checkpoint(dirs[k]) for k in (f"distmerge-{polar}", "fusionbench-float32",
                                                              "fusionbench-float64"))
    base = load_checkpoint(family["base"])
    experts = [load_checkpoint(p) for p in family["experts"][:case.tasks]]
    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))
        return CaseResult(case, polar, error=f"tensor names differ, e.g. {only[0]}")
    result = CaseResult(case, polar)
    for name in sorted(theirs):
        if ours[name].dtype != torch.float32 or ours[name].shape != theirs[name].shape:
            return CaseResult(case, polar, error=f"{name}: distmerge wrote {ours[name].dtype} "
                                                 f"{tuple(ours[name].shape)}, FusionBench {tuple(theirs[name].shape)}")
        b, a, t, x = (d[name].double() for d in (base, ours, theirs, exact))
        average = b + alpha * torch.stack([e[name].double() - b for e in experts]).mean(0)
        scale, exact_scale = float(torch.linalg.vector_norm(t - b)), float(torch.linalg.vector_norm(x - b))
        result.tensors.append(TensorResult(
            name, tuple(theirs[name].shape), float((a - t).abs().max()), relative(a, t, scale),
            relative(a, x, exact_scale), relative(t, x, exact_scale), relative(t, average, scale)))
    return result


def rank_corner_cases(families: dict, tasks: list[int]) -> list[str]:
    """(shape, T) where FusionBench's k = int(r * (1 / T)) differs from distmerge's r // T."""
    hits = []
    for family in families.values():
        for name, tensor in load_checkpoint(family["base"]).items():
            if tensor.dim() == 2:
                r = min(tensor.shape)
                hits += [f"{name} {tuple(tensor.shape)} T={T}" for T in tasks if int(r * (1 / T)) != r // T]
    return hits


def orthogonalised(method: str, deltas: torch.Tensor, common_fraction: float) -> list[torch.Tensor]:
    """The matrices whose polar factor the method takes, per METHODS.md (float64): tsvm and iso_cts orthogonalise
    the stacked leading singular vectors, iso_c the summed task vector."""
    n_tasks, rank = deltas.shape[0], min(deltas.shape[1:])
    if method == "iso_c":
        return [deltas.sum(0)]
    blocks = []
    if method == "iso_cts":
        common = int(rank * common_fraction)
        common = rank - round((rank - common) / n_tasks) * n_tasks
        U, _, Vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
        shared = U[:, :common]
        blocks.append((shared, Vh[:common].mT))
        deltas = deltas - shared @ (shared.mT @ deltas)
        per_task = (rank - common) // n_tasks
    else:
        per_task = rank // n_tasks
    for delta in deltas:
        U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
        blocks.append((U[:, :per_task], Vh[:per_task].mT))
    return [torch.cat([u for u, _ in blocks], 1), torch.cat([v for _, v in blocks], 1)]


def condition_number(case: Case, family: dict, name: str, common_fraction: float) -> float:
    """The largest sigma_max / sigma_min over the matrices `case.method` orthogonalises for tensor `name`."""
    base = load_checkpoint(family["base"])[name]
    if base.dim() != 2:
        return float("nan")
    deltas = torch.stack([(load_checkpoint(p)[name] - base).double() for p in family["experts"][:case.tasks]])
    worst = 0.0
    for matrix in orthogonalised(case.method, deltas, common_fraction):
        singular_values = torch.linalg.svdvals(matrix)
        worst = max(worst, float(singular_values[0] / singular_values[-1]))
    return worst


def tensor_kind(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)
