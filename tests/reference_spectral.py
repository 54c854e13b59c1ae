"""NumPy references for the spectral family, written from the method definitions (docs/methods.md; float64, SVD-based polar factors)."""

from __future__ import annotations

import math

import numpy as np


def polar(a: np.ndarray) -> np.ndarray:
    """The orthonormal factor P Q^T of a = P diag(s) Q^T."""
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def tsvm(base: np.ndarray, deltas: list[np.ndarray], alpha: float = 1.0, ranks: list[int] | None = None,
         spectrum=None):
    """b + alpha * U_o diag(S) V_o^T, each task contributing its leading k_t = floor(r/T) triplets (or `ranks`),
    their singular values mapped by `spectrum` (a function of one task's kept values) if given."""
    if base.ndim != 2:
        return base + alpha * np.mean(deltas, axis=0)
    r = min(base.shape)
    ranks = ranks or [r // len(deltas)] * len(deltas)
    us, ss, vs = [], [], []
    for d, k in zip(deltas, ranks):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(spectrum(s[:k]) if spectrum is not None else s[:k])
        vs.append(vt[:k].T)
    u, s, v = polar(np.concatenate(us, 1)), np.concatenate(ss), polar(np.concatenate(vs, 1))
    return base + alpha * (u * s) @ v.T


def iso_c(base, deltas, alpha=1.0):
    if base.ndim != 2:
        return base + alpha * np.mean(deltas, axis=0)
    u, s, vt = np.linalg.svd(np.sum(deltas, axis=0), full_matrices=False)
    return base + alpha * s.mean() * u @ vt


def iso_cts(base, deltas, alpha=1.0, common_fraction=0.8):
    if base.ndim != 2:
        return base + alpha * np.mean(deltas, axis=0)
    r, n_tasks = min(base.shape), len(deltas)
    # the task-specific share, rounded to a multiple of T, and at most the full rank
    per_task = min(round((r - int(r * common_fraction)) / n_tasks), r // n_tasks)
    common = r - per_task * n_tasks
    u, s, vt = np.linalg.svd(np.sum(deltas, axis=0), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common].T]
    for d in deltas:
        residual = d - us[0] @ (us[0].T @ d)
        ut, st, vtt = np.linalg.svd(residual, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vtt[:per_task].T)
    flat = np.concatenate(ss).mean()
    return base + alpha * flat * polar(np.concatenate(us, 1)) @ polar(np.concatenate(vs, 1)).T


def downweight_outliers(d: np.ndarray, m: float, weight: float, statistic: str = "mean"):
    """(d~, excess): entries with |d| > tau = m * stat(|d|) keep tau + weight * (|d| - tau) of their magnitude."""
    magnitude = np.abs(d)
    tau = m * (magnitude.mean() if statistic == "mean" else np.median(magnitude))
    excess = np.where(magnitude > tau, np.sign(d) * (magnitude - tau) * (1 - weight), 0.0)
    return d - excess, excess


def energy_rank(d: np.ndarray, eta: float, cap: int) -> int:
    s = np.linalg.svd(d, compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    return min(cap, int(np.argmax(share >= eta)) + 1)


def shrink_spectrum(s: np.ndarray, m: float, shrink: float) -> np.ndarray:
    """Values above tau = m * median(s) become tau + shrink * (s - tau)."""
    if s.size == 0:
        return s
    tau = m * np.median(s)
    return np.where(s > tau, tau + shrink * (s - tau), s)


def tail_statistic(d: np.ndarray, how: str, m: float = 3.0, statistic: str = "mean") -> float:
    """outlier_share: the fraction of |d| above m * stat(|d|); kurtosis: max(0, E[c^4] / E[c^2]^2 - 3), c = d - mean."""
    if how == "outlier_share":
        magnitude = np.abs(d)
        tau = m * (magnitude.mean() if statistic == "mean" else np.median(magnitude))
        return float(np.mean(magnitude > tau))
    c = d.ravel() - d.mean()
    m2 = np.mean(c**2)
    return max(0.0, float(np.mean(c**4) / m2**2 - 3)) if m2 > 0 else 0.0


def heavy_tail_weights(tails: list[float], strength: float) -> list[float]:
    """w_t proportional to 1 / (1 + strength * tail_t), averaging 1."""
    u = 1 / (1 + strength * np.asarray(tails, dtype=float))
    return list(len(u) * u / u.sum())


def effective_rank(d: np.ndarray) -> float:
    """(sum s^2)^2 / sum s^4; 0 for a zero matrix."""
    e = np.linalg.svd(d, compute_uv=False) ** 2
    return float(e.sum() ** 2 / (e**2).sum()) if e.sum() > 0 else 0.0


def model_rank_caps(model: list[list[np.ndarray]], budget: float) -> list[list[int]]:
    """rank_allocation: model. `model`: per matrix, its T task vectors. Each task's budget
    B = floor(budget * sum_m floor(r_m/T)) is shared over the matrices by effective rank in 1/1024ths:
    c_t(m) = min(floor(r_m/T), floor(B * e_t(m) / E_t))."""
    n_tasks = len(model[0])
    caps = [min(matrix[0].shape) // n_tasks for matrix in model]
    e = [[round(1024 * effective_rank(d)) for d in matrix] for matrix in model]
    b = math.floor(budget * sum(caps))
    totals = [sum(e[m][t] for m in range(len(model))) for t in range(n_tasks)]
    return [[min(caps[m], b * e[m][t] // totals[t]) if totals[t] else 0 for t in range(n_tasks)]
            for m in range(len(model))]
