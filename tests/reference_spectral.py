"""NumPy references for the spectral family, written from the method definitions (docs/methods.md; float64, SVD-based polar factors)."""

from __future__ import annotations

import numpy as np


def polar(a: np.ndarray) -> np.ndarray:
    """The orthonormal factor P Q^T of a = P diag(s) Q^T."""
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def tsvm(base: np.ndarray, deltas: list[np.ndarray], alpha: float = 1.0, ranks: list[int] | None = None):
    """b + alpha * U_o diag(S) V_o^T, each task contributing its leading k_t = floor(r/T) triplets."""
    if base.ndim != 2:
        return base + alpha * np.mean(deltas, axis=0)
    r = min(base.shape)
    ranks = ranks or [r // len(deltas)] * len(deltas)
    us, ss, vs = [], [], []
    for d, k in zip(deltas, ranks):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
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
