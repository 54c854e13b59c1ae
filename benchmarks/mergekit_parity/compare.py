"""compare_mergekit.py's measurements: every output tensor of distmerge against mergekit's; for random merges
whose draws differ, the kept share and the norm of the merged task vector against mergekit's, within sampling
error; and a probe of how torch's default sort breaks exact ties at a top-k boundary (where the two tools may keep
different entries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import math

import torch

from common import load_checkpoint

from .cases import SMALL_SCALE, Case, Family
from .explain import Explanation

# float32 round-off: differences up to this many float32 epsilons of the tensor's largest magnitude pass.
ROUNDOFF_EPS = 16
FLOAT32_EPS = torch.finfo(torch.float32).eps
# Two merges with independent draws agree within sampling error when their statistics differ by at most this many
# standard deviations of the difference (an upper bound on it, see SamplingCheck): 5 sigma of a normal is a false
# alarm once in 1.7 million comparisons. What it can see, measured on the parity run's dare_ties case: leaving out
# the rescale puts the norm 69 sigma away; `rescale: inverse` instead of L1 (0.2 sigma) and, with its weights, a
# mean instead of a sum (1.1 sigma) it cannot tell apart; the density-1 and `rng: mergekit` columns (identical
# bytes) pin those.
SAMPLING_Z = 5.0


@dataclass
class TensorDiff:
    name: str
    max_abs: float
    max_rel: float
    differing: int
    numel: int
    identical: bool
    within_roundoff: bool


def compare_tensor(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> TensorDiff:
    """distmerge's tensor against mergekit's; a relative difference is |a - b| / max(|a|, |b|)."""
    if ours.shape != theirs.shape:
        return TensorDiff(name, float("inf"), float("inf"), theirs.numel(), theirs.numel(), False, False)
    a, b = ours.double(), theirs.double()
    diff = (a - b).abs()
    differing = int((a != b).sum())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    larger = torch.maximum(a.abs(), b.abs())
    max_rel = float((diff / larger)[diff > 0].max()) if differing else 0.0
    identical = ours.dtype == theirs.dtype and torch.equal(ours.contiguous().view(torch.uint8),
                                                           theirs.contiguous().view(torch.uint8))
    scale = float(b.abs().max()) if b.numel() else 0.0
    return TensorDiff(name, max_abs, max_rel, differing, theirs.numel(), identical,
                      max_abs <= ROUNDOFF_EPS * FLOAT32_EPS * scale)


@dataclass(frozen=True)
class TaskVectorStatistics:
    """One tool's merged task vector m = merged - base, over every merged (floating-point) tensor, in float64."""

    numel: int
    kept: int  # entries where the merge moved away from the base
    square_sum: float  # ||m||^2
    fourth_sum: float  # sum of m_i^4

    @property
    def kept_share(self) -> float:
        return self.kept / self.numel

    @property
    def norm(self) -> float:
        return math.sqrt(self.square_sum)


def task_vector_statistics(merged: dict, base: dict) -> TaskVectorStatistics:
    numel = kept = 0
    square_sum = fourth_sum = 0.0
    for name, tensor in merged.items():
        if not tensor.is_floating_point():
            continue
        m = tensor.double() - base[name].double()
        numel += m.numel()
        kept += int((m != 0).sum())
        squares = m.square()
        square_sum += float(squares.sum())
        fourth_sum += float(squares.square().sum())
    return TaskVectorStatistics(numel, kept, square_sum, fourth_sum)


@dataclass(frozen=True)
class SamplingCheck:
    """Do two merges that drew independently agree within sampling error?

    Entries are dropped independently, so the kept count K is a sum of independent 0/1 variables with keep
    probabilities p_i: Var K = sum p_i (1 - p_i) <= n pbar (1 - pbar) (concavity), estimated with pbar = K / n.
    The squared norm S = sum m_i^2 is a sum of independent terms (given the per-tensor rescale factors), and
    Var(m_i^2) <= E[m_i^4], estimated by the observed m_i^4: Var S <= sum m_i^4. Each z is the difference over the
    square root of the two tools' variances summed. The L1 rescale factor of a tensor, shared by its entries, adds
    a variance the bound's slack covers: distmerge against itself over 8 seeds (28 pairs, each of the parity run's
    four random cases) gave share z up to 2.6, as a standard normal does, and norm z up to 1.05.
    """

    ours: TaskVectorStatistics
    theirs: TaskVectorStatistics

    @property
    def share_z(self) -> float:
        variance = sum(s.numel * s.kept_share * (1 - s.kept_share) for s in (self.ours, self.theirs))
        return abs(self.ours.kept - self.theirs.kept) / math.sqrt(variance) if variance else 0.0

    @property
    def norm_z(self) -> float:
        variance = self.ours.fourth_sum + self.theirs.fourth_sum
        return abs(self.ours.square_sum - self.theirs.square_sum) / math.sqrt(variance) if variance else 0.0

    @property
    def agrees(self) -> bool:
        return self.share_z <= SAMPLING_Z and self.norm_z <= SAMPLING_Z


@dataclass
class CaseResult:
    case: Case
    error: str | None = None
    tensors: list[TensorDiff] = field(default_factory=list)
    dtypes: str = ""
    sampling: SamplingCheck | None = None  # the cases whose random draws differ between the tools
    # beyond round-off in a method with a documented difference: distmerge's merge with mergekit's choice there
    explanation: Explanation | None = None

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.tensors), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((t.max_rel for t in self.tensors), default=0.0)

    @property
    def differing(self) -> int:
        return sum(t.differing for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def identical(self) -> bool:
        return self.error is None and all(t.identical for t in self.tensors)

    @property
    def within_roundoff(self) -> bool:
        return self.error is None and all(t.within_roundoff for t in self.tensors)

    @property
    def passes(self) -> bool:
        """What the gate asks: no error, and round-off (or agreement within sampling error where draws differ, or a
        difference proven to be a documented one: see explain.py)."""
        if self.sampling is not None:
            return self.error is None and self.sampling.agrees
        return self.within_roundoff or (self.error is None and self.explanation is not None
                                        and self.explanation.proven)

    @property
    def worst(self) -> str:
        worst = max(self.tensors, key=lambda t: t.max_abs, default=None)
        return worst.name if worst and worst.max_abs > 0 else ""


def compare_case(case: Case, ours_dir: Path, theirs_dir: Path, base_dir: Path) -> CaseResult:
    """distmerge's output against mergekit's, tensor by tensor (names and dtypes must match); for a case whose
    draws differ, also their task vectors' statistics (against the base in `base_dir`)."""
    ours, theirs = load_checkpoint(ours_dir), load_checkpoint(theirs_dir)
    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))
        return CaseResult(case, error=f"tensor names differ, e.g. {only[0]}")
    result = CaseResult(case, tensors=[compare_tensor(name, ours[name], theirs[name]) for name in sorted(theirs)])
    dtypes = {(str(ours[n].dtype).removeprefix("torch."), str(theirs[n].dtype).removeprefix("torch.")) for n in theirs}
    result.dtypes = ", ".join(f"{o}/{t}" for o, t in sorted(dtypes))
    # mergekit writing another dtype than the YAML's where METHODS records that it does is its known behaviour
    # (the values are still compared); any other difference of dtypes is an error
    if any(o != t and t != case.mergekit_writes for o, t in dtypes):
        result.error = f"output dtypes differ (distmerge/mergekit): {result.dtypes}"
    if case.variant.statistical:
        base = load_checkpoint(base_dir)
        result.sampling = SamplingCheck(task_vector_statistics(ours, base), task_vector_statistics(theirs, base))
    return result


# ---- how exact ties at a top-k boundary are broken ---------------------------------------------------------------


@dataclass
class TieProbe:
    label: str
    boundaries: int = 0  # (tensor, expert, density, direction) boundaries looked at
    ambiguous: int = 0  # of which the k-th magnitude is shared by more entries than the cut keeps
    lowest_first: int = 0  # ... and torch's default (unstable) sort kept the lowest-index tied entries
    highest_first: int = 0  # ... or the highest-index ones (anything else: neither)


def index_order_choice(tied: torch.Tensor, need: int, lowest: bool) -> torch.Tensor:
    return tied[:need] if lowest else tied[tied.numel() - need:]


def probe_boundary(probe: TieProbe, magnitudes: torch.Tensor, k: int, descending: bool) -> None:
    """Where an exact tie straddles the cut after the first k entries of torch.sort(magnitudes, descending), which
    tied entries does the default sort (stable=False, what mergekit calls) put before the cut?"""
    ordered = torch.sort(magnitudes, descending=descending, stable=True)
    boundary = ordered.values[k - 1]
    tied = (magnitudes == boundary).nonzero().flatten()
    before = int((magnitudes > boundary).sum() if descending else (magnitudes < boundary).sum())
    need = k - before
    probe.boundaries += 1
    if tied.numel() <= need:
        return
    probe.ambiguous += 1
    chosen = torch.sort(magnitudes, descending=descending).indices[:k]
    chosen_tied = chosen[magnitudes[chosen] == boundary].sort().values
    if torch.equal(chosen_tied, index_order_choice(tied, need, lowest=True)):
        probe.lowest_first += 1
    elif torch.equal(chosen_tied, index_order_choice(tied, need, lowest=False)):
        probe.highest_first += 1


def probe_task_vectors(label: str, base: dict, experts: list[dict], device: str, densities) -> TieProbe:
    """Every tensor and expert's float32 task vector, cut at every density from both ends."""
    probe = TieProbe(label)
    for name, b in base.items():
        for expert in experts:
            magnitudes = (expert[name].float() - b.float()).abs().reshape(-1).to(device)
            for density in densities:
                k = max(1, int(density * magnitudes.numel()))
                probe_boundary(probe, magnitudes, k, descending=True)  # TIES: keep the k largest
                probe_boundary(probe, magnitudes, magnitudes.numel() - k, descending=False)  # drop the smallest
    return probe


def tie_probes(families: dict[str, Family], densities=tuple(i / 20 for i in range(1, 20))) -> list[TieProbe]:
    """For float32 task vectors from the float32, small float32 and bfloat16 inputs, on CPU (and CUDA if any)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    descriptions = {"f32-single": "float32 inputs", "f32-small": f"float32 inputs, task vectors x{SMALL_SCALE}",
                    "bf16-single": "bfloat16 inputs"}
    probes = []
    for label, description in descriptions.items():
        base = load_checkpoint(Path(families[label].base))
        experts = [load_checkpoint(Path(path)) for path in families[label].experts]
        probes += [probe_task_vectors(f"{description}, {device}", base, experts, device, densities)
                   for device in devices]
    return probes
