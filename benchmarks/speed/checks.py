"""Cheap correctness checks on the last round's outputs of bench_speed.py, so that a fast but wrong result cannot
hide: linear against an exact float64 reference for both tools; ties, dare_ties and della against mergekit; tsvm
against FusionBench."""

from __future__ import annotations

from pathlib import Path

from common import TensorReader

from .cases import TSVM_VARIANTS, WEIGHTS


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
    worst_rel, worst_name = 0.0, ""
    for name in base.files:
        b = base(name).float()
        d_ours, d_theirs = ours(name).float() - b, theirs(name).float() - b
        tensor_diff2 = float((d_ours - d_theirs).pow(2).sum())
        tensor_ref2 = float(d_theirs.pow(2).sum())
        diff2, ref2, ours2 = diff2 + tensor_diff2, ref2 + tensor_ref2, ours2 + float(d_ours.pow(2).sum())
        rel = (tensor_diff2 / tensor_ref2) ** 0.5 if tensor_ref2 else 0.0
        if rel > worst_rel:
            worst_rel, worst_name = rel, name
    return {"rel_diff_all": (diff2 / ref2) ** 0.5 if ref2 else float("nan"), "worst_tensor_rel_diff": worst_rel,
            "worst_tensor": worst_name, "norm_ratio_ours_over_peer": (ours2 / ref2) ** 0.5 if ref2 else float("nan")}


def agrees(method: str, diff: dict) -> bool:
    """Deterministic methods must agree closely with the peer; random ones (different draws) only in size."""
    if method == "ties":
        return diff["rel_diff_all"] < 0.1  # mergekit computes in bfloat16: ties among bfloat16 magnitudes at the cut
    if method in ("dare_ties", "della"):
        return 0.8 < diff["norm_ratio_ours_over_peer"] < 1.25
    if method == "tsvm_exact":
        return diff["worst_tensor_rel_diff"] < 0.02  # bfloat16 output of both: ~4e-3 of each entry
    return diff["rel_diff_all"] < 0.05


def check_outputs(fams: dict[str, dict], work: Path, labels: set[str]) -> list[dict]:
    """Every check whose runs are among `labels`."""
    import torch

    out = work / "out"
    checks = [check_linear(tool, eps, fams["elementwise"], out / f"{tool}-linear")
              for tool, eps in (("distmerge", torch.finfo(torch.float32).eps),
                                ("mergekit", torch.finfo(torch.bfloat16).eps))
              if f"{tool}:linear" in labels]
    pairs = [(m, f"distmerge-{m}", f"mergekit-{m}", "mergekit") for m in ("ties", "dare_ties", "della")]
    pairs += [(v, f"distmerge-{v}", "fusionbench-tsvm", "FusionBench") for v in TSVM_VARIANTS]
    for method, ours_dir, theirs_dir, peer in pairs:
        if not {ours_dir.replace("-", ":", 1), theirs_dir.replace("-", ":", 1)} <= labels:
            continue
        base = fams["tsvm" if method in TSVM_VARIANTS else "elementwise"]["base"]
        diff = task_vector_difference(base, out / ours_dir, out / theirs_dir)
        random = method in ("dare_ties", "della")
        checks.append({"check": f"{ours_dir} vs {theirs_dir} merged task vector", **diff, "ok": agrees(method, diff),
                       "note": f"different random draws from {peer}: only the size must match" if random else ""})
    return checks
