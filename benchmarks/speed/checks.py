"""Cheap correctness checks on the last round's outputs of bench_speed.py, so that a fast but wrong result cannot
hide: linear against an exact float64 reference for both tools; every other method that a peer has against the
peer's output (the merged task vectors: close for the deterministic methods, of the same size for the random
ones). The distmerge-only methods have nothing to be checked against here."""

from __future__ import annotations

from pathlib import Path

from common import TensorReader

from .cases import CHECKED_AGAINST_FLOAT32, RANDOM, SPECTRAL, WEIGHTS, group, peer


def bf16_ulp(magnitude):
    """One bfloat16 ulp at |x|: 2^(floor(log2|x|) - 7)."""
    import torch

    return torch.exp2(torch.floor(torch.log2(magnitude.clamp_min(torch.finfo(torch.bfloat16).tiny))) - 7)


def check_linear(tool: str, eps: float, fam: dict, merged_dir: Path) -> dict:
    """The tool's linear merge against the exact float64 weighted mean. The bound per entry is the output rounding
    (half a bfloat16 ulp) plus the compute precision's round-off on the sum of |terms| (4 eps: float32 eps for
    distmerge, bfloat16 eps for mergekit, which computes in bfloat16); a ratio above 1 is a wrong result."""
    import torch

    base, merged = TensorReader(fam["base"]), TensorReader(merged_dir)
    experts = [TensorReader(p) for p in fam["experts"]]
    total = sum(WEIGHTS)
    worst, beyond_half, count = 0.0, 0, 0
    for name in base.files:
        values = [e(name).double() for e in experts]
        exact = sum(w * v for w, v in zip(WEIGHTS, values)) / total
        terms = sum(w * v.abs() for w, v in zip(WEIGHTS, values)) / total
        ours = merged(name).double()
        ulp = bf16_ulp(torch.maximum(ours.abs(), exact.abs()))
        error = (ours - exact).abs()
        worst = max(worst, float((error / (0.5 * ulp + 4 * eps * terms)).max()))
        beyond_half += int((error > 0.5 * ulp + eps * terms).sum())
        count += error.numel()
    return {"check": f"{tool} linear vs exact float64 weighted mean", "max_error_over_bound": worst,
            "share_not_correctly_rounded": beyond_half / count, "ok": worst <= 1.0}


def task_vector_difference(base_dir: Path, ours_dir: Path, theirs_dir: Path) -> dict:
    """Our merged task vector (output - base) against the peer's: relative difference over all tensors and at the
    worst tensor, and the ratio of their norms."""
    base, ours, theirs = TensorReader(base_dir), TensorReader(ours_dir), TensorReader(theirs_dir)
    diff2 = ref2 = ours2 = 0.0
    worst_rel, worst_name, worst_min_dim = 0.0, "", 0
    for name in base.files:
        b = base(name).float()
        d_ours, d_theirs = ours(name).float() - b, theirs(name).float() - b
        tensor_diff2 = float((d_ours - d_theirs).pow(2).sum())
        tensor_ref2 = float(d_theirs.pow(2).sum())
        diff2, ref2, ours2 = diff2 + tensor_diff2, ref2 + tensor_ref2, ours2 + float(d_ours.pow(2).sum())
        rel = (tensor_diff2 / tensor_ref2) ** 0.5 if tensor_ref2 else 0.0
        if rel > worst_rel:
            worst_rel, worst_name, worst_min_dim = rel, name, min(b.shape, default=1)
    return {"rel_diff_all": (diff2 / ref2) ** 0.5 if ref2 else float("nan"), "worst_tensor_rel_diff": worst_rel,
            "worst_tensor": worst_name, "worst_tensor_min_dim": worst_min_dim, "norm_ratio_ours_over_peer": (ours2 / ref2) ** 0.5 if ref2 else float("nan")}


# How far distmerge's merged task vector may be from the peer's. mergekit computes in bfloat16 (distmerge in
# float32; both write bfloat16): plain arithmetic (task_arithmetic, slerp, nuslerp, multislerp, passthrough) agrees
# to bfloat16 round-off, rel_diff_all < ROUND_OFF; the methods of LOOSE to rel_diff_all < LOOSE_REL_DIFF, for the
# reason in their note (their values on the tiny family: 0.03-0.07, and 0.04 for ties at 0.5B).
ROUND_OFF = 0.02
LOOSE_REL_DIFF = 0.1
CUT = "mergekit's bfloat16 roundings move entries across the selection's cut"
LOOSE = {"ties": CUT, "breadcrumbs": CUT, "breadcrumbs_ties": CUT, "sce": CUT, "ram": CUT, "ramplus_tl": CUT,
         "nearswap": "mergekit's bfloat16 steps against task vectors capped at t per entry",
         "karcher": "mergekit iterates in bfloat16",
         "arcee_fusion": "mergekit takes the quartiles of a tensor over 10^6 entries from a random sample of 10^6 "
                         "(distmerge's are exact), which moves entries across the cut"}
NOTES = {
    **{run: "different random draws from mergekit: only the size must match" for run in RANDOM},
    **{run: "against mergekit's untimed run with `dtype: float32`: its bfloat16 compute is too coarse here"
       for run in CHECKED_AGAINST_FLOAT32},
    "iso_c": "worst tensor within 0.02 + 1/sqrt(min(rows, cols)): one near-null direction (see agrees)",
}
for _run, _why in LOOSE.items():
    NOTES[_run] = "; ".join(filter(None, [NOTES.get(_run), f"{_why}: rel_diff_all < {LOOSE_REL_DIFF}"]))


def agrees(run: str, diff: dict) -> bool:
    """Deterministic methods must agree closely with the peer; random ones (different draws) only in size."""
    if run in RANDOM:
        return 0.8 < diff["norm_ratio_ours_over_peer"] < 1.25
    if run == "iso_c":
        # Iso-C gives every direction of the task-vector sum the same singular value. A direction whose own is
        # round-off (below POLAR_RCOND of the largest) distmerge drops, by its pseudo-inverse rule, and
        # FusionBench's SVD keeps, pointing where round-off decides: one direction of such a matrix is
        # 1/sqrt(min(rows, cols)) of its norm. Over the whole model both agree to bfloat16 output.
        return (diff["rel_diff_all"] < 0.02
                and diff["worst_tensor_rel_diff"] < 0.02 + diff["worst_tensor_min_dim"] ** -0.5)
    if run in ("tsvm_exact", "iso_cts"):  # FusionBench's computation in float32 on both sides
        return diff["worst_tensor_rel_diff"] < 0.02  # bfloat16 output of both: ~4e-3 of each entry
    if run in SPECTRAL:  # another SVD route (tsvm_auto): round-off of its own
        return diff["rel_diff_all"] < 0.05
    return diff["rel_diff_all"] < (LOOSE_REL_DIFF if run in LOOSE else ROUND_OFF)


def check_outputs(fams: dict[str, dict], work: Path, labels: list[str]) -> list[dict]:
    """Every check whose runs are among the run labels `labels`, in their order."""
    import torch

    out = work / "out"
    checks = [check_linear(tool, eps, fams["elementwise"], out / f"{tool}-linear")
              for tool, eps in (("distmerge", torch.finfo(torch.float32).eps),
                                ("mergekit", torch.finfo(torch.bfloat16).eps))
              if f"{tool}:linear" in labels]
    for ours in [label for label in labels if label.startswith("distmerge:")]:
        run = ours.split(":", 1)[1]
        theirs = f"mergekit:{run}_float32" if run in CHECKED_AGAINST_FLOAT32 else peer(run)
        if run == "linear" or theirs not in labels:  # linear has its exact check above
            continue
        ours_dir, theirs_dir = ours.replace(":", "-"), theirs.replace(":", "-")
        diff = task_vector_difference(fams[group(ours)]["base"], out / ours_dir, out / theirs_dir)
        checks.append({"check": f"{ours_dir} vs {theirs_dir} merged task vector", **diff, "ok": agrees(run, diff),
                       "note": NOTES.get(run, "")})
    return checks
