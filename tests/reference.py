"""NumPy references for the elementwise and interpolation methods, written from the method definitions
(docs/methods.md), float64.

Nothing here imports distmerge: these are the definitions as the spec states them, with the conventions the spec
leaves open written down where they are chosen:

- how many entries "top-`density`" keeps: floor(density * n), at least one (mergekit's rule, which distmerge's
  docs adopt); equal magnitudes at the boundary are taken in index order (a stable sort), lowest index first;
- the TIES sign election works on the weighted task vectors w_t d'_t (identical to the unweighted ones for the
  positive weights the tests use); "0 counts as +" is for the elected sign only: an entry that is 0 has no sign
  and is never kept / counted in the disjoint mean's divisor;
- breadcrumbs: ranks ascending by magnitude, ties in index order; keep ranks [n_bot, n_bot + keep) with
  keep = floor(density n), n_top = floor(gamma n), n_bot = max(0, n - keep - n_top);
- DELLA ranks: per row (1-D tensors are one row), stable ascending ranks r = 0..n-1 mapped linearly onto
  [density - epsilon, density + epsilon];
- random methods take their randomness explicitly: DARE a keep mask per task, DELLA uniform draws per task
  (kept where draw < keep probability).

Default arguments are the methods' defaults, which are mergekit 0.1.5's (L1 rescale for DARE and DELLA; the mean
for linear, ties and della, the sum for the other task-vector methods).
"""

from __future__ import annotations

import numpy as np

# ---- building blocks ---------------------------------------------------------------------------------------------


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def task_vectors(base, models) -> list[np.ndarray]:
    base = f64(base)
    return [f64(x) - base for x in models]


def keep_count(density: float, n: int) -> int:
    return max(1, int(density * n))


def top_k_mask(magnitudes, k: int, prefer_low_index: bool = True) -> np.ndarray:
    """The k largest entries; equal values taken in index order (lowest first, or highest first)."""
    flat = f64(magnitudes).reshape(-1)
    n = flat.size
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask.reshape(np.shape(magnitudes))
    if prefer_low_index:
        order = np.argsort(-flat, kind="stable")  # descending, equal values by ascending index
    else:
        # ascending stable sort puts equal values in ascending index; read it from the end: descending value,
        # equal values by descending index
        order = np.argsort(flat, kind="stable")[::-1]
    mask[order[:min(k, n)]] = True
    return mask.reshape(np.shape(magnitudes))


def trim_mask(d, density: float) -> np.ndarray:
    """TIES trim: the top-density entries of |d|."""
    if density >= 1:
        return np.ones(np.shape(d), dtype=bool)
    return top_k_mask(np.abs(d), keep_count(density, np.size(d)))


def ascending_ranks(values) -> np.ndarray:
    """Rank of every entry of a 1-D array in a stable ascending sort (ties: lower index, lower rank)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(len(values))
    return ranks


def breadcrumbs_mask(d, density: float, gamma: float) -> np.ndarray:
    flat = np.abs(f64(d)).reshape(-1)
    n = flat.size
    if density >= 1:
        return np.ones(np.shape(d), dtype=bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    ranks = ascending_ranks(flat)
    return ((ranks >= n_bot) & (ranks < n_bot + keep)).reshape(np.shape(d))


def della_probability(d, density: float, epsilon: float) -> np.ndarray:
    mags = np.abs(f64(d))
    rows = mags.reshape(1, -1) if mags.ndim < 2 else mags.reshape(mags.shape[0], -1)
    n_cols = rows.shape[1]
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        out[i] = density - epsilon + 2 * epsilon * ascending_ranks(row) / max(1, n_cols - 1)
    return out.reshape(mags.shape)


def rescale(d, kept, how: str, keep_probability=None) -> np.ndarray:
    """Dropped entries zeroed; survivors: inverse -> / keep probability; l1 -> L1 norm of the unmasked d; none."""
    d = f64(d)
    out = d * kept
    if how == "inverse":
        out = out / keep_probability
    elif how == "l1":
        before, after = np.abs(d).sum(), np.abs(out).sum()
        if before > 0 and after > 0:
            out = out * (before / after)
    elif how != "none":
        raise ValueError(how)
    return out


def weighted_combine(deltas, weights, aggregate: str) -> np.ndarray:
    """sum_t w_t d_t, divided by sum_t w_t for `mean`."""
    merged = sum(w * d for w, d in zip(weights, deltas))
    if aggregate == "mean":
        merged = merged / sum(weights)
    return merged


def elect_and_merge(deltas, weights, aggregate: str) -> np.ndarray:
    """TIES: s = sign(sum_t w_t d_t) with 0 -> +; m_t = [sign(w_t d_t) == s];
    mean: sum_t w_t m_t d_t / sum_t w_t m_t (0/0 -> 0); sum: the numerator alone."""
    weighted = [w * f64(d) for w, d in zip(weights, deltas)]
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    masks = [np.sign(wd) == elected for wd in weighted]
    numerator = sum(wd * m for wd, m in zip(weighted, masks))
    if aggregate == "sum":
        return numerator
    denominator = sum(w * m for w, m in zip(weights, masks))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def per_model(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# ---- the methods -------------------------------------------------------------------------------------------------


def linear(models, weights=None, normalize=True):
    n = len(models)
    weights = per_model(1.0 if weights is None else weights, n)
    merged = sum(w * f64(x) for w, x in zip(weights, models))
    return merged / sum(weights) if normalize else merged


def task_arithmetic(base, models, weights=1.0, lam=1.0, aggregate="sum"):
    deltas = task_vectors(base, models)
    return f64(base) + lam * weighted_combine(deltas, per_model(weights, len(deltas)), aggregate)


def ties(base, models, weights=1.0, density=1.0, lam=1.0, aggregate="mean", rescale_how="none",
         thresholds=None):
    """trim_scope tensor (or, with `thresholds`, keep |d_t| >= thresholds[t] as a first pass would give)."""
    deltas = task_vectors(base, models)
    n = len(deltas)
    densities, weights = per_model(density, n), per_model(weights, n)
    trimmed = []
    for t, (d, dens) in enumerate(zip(deltas, densities)):
        kept = np.abs(d) >= thresholds[t] if thresholds is not None else trim_mask(d, dens)
        trimmed.append(rescale(d, kept, rescale_how) if (thresholds is not None or dens < 1) else d)
    return f64(base) + lam * elect_and_merge(trimmed, weights, aggregate)


def _dare_deltas(base, models, density, keep_masks, rescale_how):
    deltas = task_vectors(base, models)
    densities = per_model(density, len(deltas))
    out = []
    for d, dens, kept in zip(deltas, densities, keep_masks):
        out.append(d if dens >= 1 else rescale(d, kept, rescale_how, keep_probability=dens))
    return out


def dare_linear(base, models, keep_masks, weights=1.0, density=1.0, lam=1.0, rescale_how="l1",
                aggregate="sum"):
    deltas = _dare_deltas(base, models, density, keep_masks, rescale_how)
    return f64(base) + lam * weighted_combine(deltas, per_model(weights, len(deltas)), aggregate)


def dare_ties(base, models, keep_masks, weights=1.0, density=1.0, lam=1.0, rescale_how="l1",
              aggregate="sum"):
    deltas = _dare_deltas(base, models, density, keep_masks, rescale_how)
    return f64(base) + lam * elect_and_merge(deltas, per_model(weights, len(deltas)), aggregate)


def _breadcrumbs_deltas(base, models, density, gamma, rescale_how):
    deltas = task_vectors(base, models)
    n = len(deltas)
    return [rescale(d, breadcrumbs_mask(d, dens, g), rescale_how)
            for d, dens, g in zip(deltas, per_model(density, n), per_model(gamma, n))]


def breadcrumbs(base, models, weights=1.0, density=1.0, gamma=0.01, lam=1.0, rescale_how="none",
                aggregate="sum"):
    deltas = _breadcrumbs_deltas(base, models, density, gamma, rescale_how)
    return f64(base) + lam * weighted_combine(deltas, per_model(weights, len(deltas)), aggregate)


def breadcrumbs_ties(base, models, weights=1.0, density=1.0, gamma=0.01, lam=1.0, rescale_how="none",
                     aggregate="sum"):
    deltas = _breadcrumbs_deltas(base, models, density, gamma, rescale_how)
    return f64(base) + lam * elect_and_merge(deltas, per_model(weights, len(deltas)), aggregate)


def della_deltas(base, models, draws, density=1.0, epsilon=0.15, rescale_how="l1"):
    deltas = task_vectors(base, models)
    n = len(deltas)
    out = []
    for d, u, dens, eps in zip(deltas, draws, per_model(density, n), per_model(epsilon, n)):
        if dens >= 1:
            out.append(d)
            continue
        p = della_probability(d, dens, eps)
        out.append(rescale(d, f64(u) < p, rescale_how, keep_probability=p))
    return out


def della(base, models, draws, weights=1.0, density=1.0, epsilon=0.15, lam=1.0, rescale_how="l1",
          aggregate="mean"):
    deltas = della_deltas(base, models, draws, density, epsilon, rescale_how)
    return f64(base) + lam * elect_and_merge(deltas, per_model(weights, len(deltas)), aggregate)


def della_linear(base, models, draws, weights=1.0, density=1.0, epsilon=0.15, lam=1.0, rescale_how="l1",
                 aggregate="sum"):
    deltas = della_deltas(base, models, draws, density, epsilon, rescale_how)
    return f64(base) + lam * weighted_combine(deltas, per_model(weights, len(deltas)), aggregate)


def consensus_mask(deltas, multi_task, mask_lambda, k) -> np.ndarray:
    """TALL masks m_t = |d_t| > lam_t |D - d_t|; entries claimed by at least k tasks."""
    lams = per_model(mask_lambda, len(deltas))
    votes = sum((np.abs(d) > lam_t * np.abs(multi_task - d)).astype(np.int64) for d, lam_t in zip(deltas, lams))
    return votes >= k


def consensus_ta(base, models, weights=1.0, lam=1.0, mask_lambda=0.6, k=2, aggregate="sum"):
    """D = sum_t w_t d_t (the task-arithmetic multi-task vector); b + lam * (mask * D)."""
    deltas = task_vectors(base, models)
    multi_task = weighted_combine(deltas, per_model(weights, len(deltas)), aggregate)
    mask = consensus_mask(deltas, multi_task, mask_lambda, k)
    return f64(base) + lam * (mask * multi_task), mask.mean()


def consensus_ties(base, models, weights=1.0, density=1.0, lam=1.0, mask_lambda=0.6, k=2, aggregate="mean",
                   rescale_how="none"):
    """D = the TIES merged task vector; masks from the untrimmed d_t; b + lam * (mask * D)."""
    deltas = task_vectors(base, models)
    multi_task = ties(np.zeros_like(f64(base)), deltas, weights, density, 1.0, aggregate, rescale_how)
    mask = consensus_mask(deltas, multi_task, mask_lambda, k)
    return f64(base) + lam * (mask * multi_task), mask.mean()


SLERP_DOT_THRESHOLD = 0.9995


def slerp(v0, v1, t):
    """Spherical interpolation of the flattened tensors (t=0: v0, t=1: v1); lerp when |cos| > 0.9995.

    The |.| (also falling back for nearly opposite vectors, where sin(theta) -> 0) is mergekit's reading of the
    spec's "the normalised dot product exceeds 0.9995"; the tests stay away from dot < -0.9995."""
    a, b = f64(v0), f64(v1)
    dot = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a + t * b, dot
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta), dot


def model_stock(base, models, filter_wise=False):
    """cos = mean pairwise cosine of the d_t; r = T cos / (1 + (T-1) cos); r mean_t x_t + (1 - r) b.
    filter_wise: one r per row (first axis)."""
    base = f64(base)
    deltas = task_vectors(base, models)
    n = len(deltas)
    rows = base.shape[0] if filter_wise and base.ndim >= 2 else 1
    flat = [d.reshape(rows, -1) for d in deltas]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            num = (flat[i] * flat[j]).sum(-1)
            den = np.linalg.norm(flat[i], axis=-1) * np.linalg.norm(flat[j], axis=-1)
            cosines.append(num / den)
    cos = np.mean(cosines, axis=0)
    r = n * cos / (1 + (n - 1) * cos)
    mean_x = np.mean([f64(x) for x in models], axis=0).reshape(rows, -1)
    out = r[:, None] * mean_x + (1 - r[:, None]) * base.reshape(rows, -1)
    return out.reshape(base.shape), r


# ---- interpolation: passthrough, nuslerp, multislerp, karcher (mergekit 0.1.5's definitions) --------------------


def passthrough(model, scale=1.0):
    return f64(model) * scale


def nuslerp(models, weights=(1.0, 1.0), base=None, flatten=True, row_wise=False):
    """Slerp from models[0] (t = 0) to models[1] (t = 1) at t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6),
    of the task vectors when a base is given (b + the interpolated task vector). The vectors: the whole tensor
    (flatten), else the slices along the first axis (row_wise) or along the last; each one on its own:
    cos = <v0 / max(|v0|, 1e-7), v1 / max(|v1|, 1e-7)> clipped to [-1, 1]; 1 - cos^2 <= 1e-16: linear."""
    v0, v1 = f64(models[0]), f64(models[1])
    if base is not None:
        v0, v1 = v0 - f64(base), v1 - f64(base)
    w0, w1 = weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)

    def one(x, y):
        cos = np.dot(x / max(np.linalg.norm(x), 1e-7), y / max(np.linalg.norm(y), 1e-7))
        cos = min(1.0, max(-1.0, cos))
        if 1 - cos * cos <= 1e-16:
            return (1 - t) * x + t * y
        theta = np.arccos(cos)
        return (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)

    if flatten or v0.ndim == 0:
        out = one(v0.ravel(), v1.ravel()).reshape(v0.shape)
    else:
        axis = 0 if row_wise else v0.ndim - 1
        a, b = np.moveaxis(v0, axis, -1), np.moveaxis(v1, axis, -1)
        rows = [one(x, y) for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))]
        out = np.moveaxis(np.array(rows).reshape(a.shape), -1, axis)
    return out if base is None else out + f64(base)


def multislerp(models, weights, base=None, normalize_weights=True, eps=1e-8):
    """Barycentric interpolation on the sphere, as the method's write-up describes it: project the unit vectors
    u_t = d_t / (|d_t| + eps) (d_t: task vectors with a base, else the models) to the tangent plane at their
    normalised weighted mean m, take the weighted sum of the projections, map it back with the exponential map
    (its norm padded with eps), scale by sum_t w_t |d_t|. One model: that model. A weighted mean shorter than eps:
    with two models, or when every d_t is zero, sum_t w_t d_t (+ b); else an error."""
    if len(models) == 1:
        return f64(models[0])
    base = None if base is None else f64(base)
    shape = np.shape(models[0])
    deltas = [(f64(x) if base is None else f64(x) - base).ravel() for x in models]
    w = f64(weights)
    if normalize_weights:
        w = w / w.sum()
    norms = [np.linalg.norm(d) for d in deltas]
    units = [d / (n + eps) for d, n in zip(deltas, norms)]
    mean = sum(wt * u for wt, u in zip(w, units))
    if np.linalg.norm(mean) < eps:
        if len(models) != 2 and any(norms):
            raise ValueError("the weighted mean of the unit vectors is zero")
        out = sum(wt * d for wt, d in zip(w, deltas))
    else:
        mean = mean / np.linalg.norm(mean)
        tangent = sum(wt * (u - np.dot(u, mean) * mean) for wt, u in zip(w, units))
        length = np.linalg.norm(tangent) + eps
        out = (mean * np.cos(length) + tangent * np.sin(length) / length) * sum(wt * n for wt, n in zip(w, norms))
    out = out.reshape(shape)
    return out if base is None else out + base


def karcher(models, max_iter=10, tol=1e-5):
    """The weighted (uniform) Karcher mean of the models' directions, by Riemannian gradient steps, times the mean
    of their norms. Models with norm <= tol have no direction (their norm still counts in the mean norm). Start:
    the normalised mean of the directions (the first direction if that mean is shorter than tol). A step: the mean
    of the log maps Log_m(u) = theta / sin(theta) (u - cos(theta) m) over directions with theta >= tol; stop when
    it is shorter than tol, else m <- Exp_m(step), renormalised. Returns (result, steps taken)."""
    if len(models) == 1:
        return f64(models[0]), 0
    shape = np.shape(models[0])
    flat = [f64(x).ravel() for x in models]
    norms = [np.linalg.norm(x) for x in flat]
    units = [x / n for x, n in zip(flat, norms) if n > tol]
    if not units:
        return np.zeros(shape), 0
    mean = np.mean(units, axis=0)
    mean = units[0] if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    steps = 0
    for _ in range(max_iter):
        logs = []
        for u in units:
            cos = min(1.0, max(-1.0, np.dot(mean, u)))
            theta = np.arccos(cos)
            logs.append(np.zeros_like(u) if theta < tol else theta / np.sin(theta) * (u - cos * mean))
        step = np.mean(logs, axis=0)
        length = np.linalg.norm(step)
        if length < tol:
            break
        mean = np.cos(length) * mean + np.sin(length) * step / length
        mean = mean / np.linalg.norm(mean) if np.linalg.norm(mean) > tol else mean
        steps += 1
    return (np.mean(norms) * mean).reshape(shape), steps


# ---- counter-based uniforms (pure Python integers, no torch) -----------------------------------------------------

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment
MIX1 = 0xBF58476D1CE4E5B9  # SplitMix64 finaliser multipliers
MIX2 = 0x94D049BB133111EB


def stream_key(seed: int, tensor_name: str, model_index: int) -> int:
    """First 8 bytes (little endian) of sha256("seed\\0name\\0index")."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def splitmix64_finalise(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def uniform_draw(key: int, i: int) -> float:
    """Draw i of the stream keyed `key`: the finaliser of key + i * golden (mod 2^64), top 24 bits / 2^24."""
    return (splitmix64_finalise(key + i * GOLDEN) >> 40) / float(1 << 24)


# ---- selection methods (sce, arcee_fusion, nearswap, ram, ramplus_tl) --------------------------------------------
# Two roundings are part of these definitions (mergekit 0.1.5 forms them from integer tensors, so they are float32
# whatever the compute dtype): sce's count floor(float32(m) * float32(select_topk)) and RAM+'s factor lambda_t.


def sce(base, models, select_topk=1.0):
    """Keep the top floor(select_topk * m) entries by population variance across the models (m = entries with
    nonzero variance; ties lowest index first); elect e = sign(sum_t d_t) (0 -> +); weight w_t = mean(d_t^2) /
    sum_s mean(d_s^2) (1/T each when that sum is < 1e-6); result b + sum_t w_t a_t d_t / max(sum_t w_t a_t, 1e-6),
    a_t = [sign(d_t) == e]."""
    deltas = task_vectors(base, models)
    if select_topk < 1:
        variance = np.var(np.stack(deltas), axis=0)
        kept = int(np.float32(np.count_nonzero(variance)) * np.float32(select_topk))
        mask = top_k_mask(variance, kept)
        deltas = [d * mask for d in deltas]
    elected = np.where(sum(deltas) >= 0, 1.0, -1.0)
    energy = np.array([np.mean(d**2) for d in deltas])
    weights = energy / energy.sum() if energy.sum() >= 1e-6 else np.full(len(deltas), 1.0 / len(deltas))
    agree = [np.sign(d) == elected for d in deltas]
    numerator = sum(w * a * d for w, a, d in zip(weights, agree, deltas))
    divisor = np.maximum(sum(w * a for w, a in zip(weights, agree)), 1e-6)
    return f64(base) + numerator / divisor


def softmax_rows(x) -> np.ndarray:
    """softmax along the last axis."""
    x = f64(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def arcee_fusion_importance(base, model) -> np.ndarray:
    """|x - b| * KL(p || q) of its row, p = softmax(x) + 1e-8, q = softmax(b) + 1e-8 along the last axis."""
    p, q = softmax_rows(model) + 1e-8, softmax_rows(base) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    return np.abs(f64(model) - f64(base)) * kl


def arcee_fusion(base, model):
    """(result, importance, threshold): b + (x - b) where importance >= median + 1.5 (q3 - q1), the quartiles the
    entries at floor(q (n - 1)) of the ascending order of all importances."""
    importance = arcee_fusion_importance(base, model)
    ordered = np.sort(importance.reshape(-1))
    q1, median, q3 = (ordered[int(q * (ordered.size - 1))] for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    kept = importance >= threshold
    return f64(base) + (f64(model) - f64(base)) * kept, importance, threshold


def nearswap(base, model, t):
    """w = clip(t / max(|x - b|, 1e-6), 0, 1); w x + (1 - w) b."""
    base, model = f64(base), f64(model)
    weight = np.clip(t / np.maximum(np.abs(model - base), 1e-6), 0.0, 1.0)
    return weight * model + (1 - weight) * base


def ram(base, models, epsilon=1e-5):
    """b + the mean over the models that changed an entry (|d_t| > epsilon) of their d_t; 0 where none did."""
    deltas = task_vectors(base, models)
    changed = [np.abs(d) > epsilon for d in deltas]
    count = sum(c.astype(np.int64) for c in changed)
    total = sum(d * c for d, c in zip(deltas, changed))
    return f64(base) + np.where(count > 0, total / np.maximum(count, 1), 0.0)


def ramplus_tl(base, models, r=0.1, alpha=0.2, epsilon=1e-5):
    """ram, except that an entry only model t changed takes lambda_t d_t, lambda_t = 1 + r clip(rho_t, 0, alpha),
    rho_t = shared_t / max(unique_t, epsilon): the numbers of entries model t changes together with others / alone
    (in float32)."""
    deltas = task_vectors(base, models)
    changed = [np.abs(d) > epsilon for d in deltas]
    count = sum(c.astype(np.int64) for c in changed)
    merged = np.where(count > 1, sum(d * c for d, c in zip(deltas, changed)) / np.maximum(count, 1), 0.0)
    for d, c in zip(deltas, changed):
        unique, shared = int(np.sum(c & (count == 1))), int(np.sum(c & (count > 1)))
        rho = np.float32(shared) / np.float32(max(unique, epsilon))
        factor = np.float32(1) + np.float32(r) * np.clip(rho, np.float32(0), np.float32(alpha))
        merged = merged + np.where(c & (count == 1), float(factor) * d, 0.0)
    return f64(base) + merged
