"""The elementwise family against the NumPy reference written from docs/methods.md (tests/reference.py), hand-worked
cases, the equivalences docs/methods.md lists, and parameter validation from the declarations.

Test data are chosen so that float32 and float64 agree on everything discrete: base entries are multiples of 1/4
and task-vector entries multiples of 2^-16, so x_t = b + d_t and x_t - b are exact in float32 and the trim, rank
and sign decisions of distmerge (float32) and of the reference (float64) see the same numbers. Random methods are
compared with the reference fed the very draws distmerge's counter-based generator makes for that (seed, tensor,
model index).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import reference as ref
from conftest import assert_param_refused

from distmerge.errors import ConfigError
from distmerge.methods import TensorContext, get_method
from distmerge.methods.elementwise import sum_into_first_
from distmerge.methods.sampling import uniform

RTOL = 1e-5  # relative to the largest |expected| entry: float32 arithmetic against a float64 reference


# ---- helpers -----------------------------------------------------------------------------------------------------


def exact_problem(shape, n_models, seed, scale=1.0):
    """(base, [x_t]) in float64 with every x_t and x_t - b exactly representable in float32."""
    gen = np.random.default_rng(seed)
    base = gen.integers(-8, 9, size=shape) / 4.0
    deltas = [np.round(gen.standard_normal(shape) * scale * 2**16) / 2**16 for _ in range(n_models)]
    return base, [base + d for d in deltas]


def run(method, base, models, *, name="model.layers.0.mlp.w", seed=0, model_ids=None, dtype=torch.float32,
        thresholds=None, **overrides):
    """distmerge's result (as float64 numpy) and the TensorContext it filled."""
    spec = get_method(method)
    n_models = len(models)
    params = spec.defaults(n_models, **overrides)
    ctx = TensorContext(name=name, seed=seed, model_ids=tuple(model_ids or range(n_models)), first_pass=thresholds)
    base_t = None if base is None else torch.tensor(np.asarray(base), dtype=dtype)
    base_before = None if base_t is None else base_t.clone()
    stacked = torch.tensor(np.stack([np.asarray(x) for x in models]), dtype=dtype)
    out = spec.fn(base_t, stacked, params, ctx)
    assert out.dtype == dtype and tuple(out.shape) == np.shape(models[0])
    if base_t is not None:  # methods own `models`, not the base
        assert torch.equal(base_t, base_before), "the method overwrote the base tensor"
    return out.double().numpy(), ctx


def draws_for(seed, name, model_ids, shape):
    """The uniforms distmerge draws for each task (its own generator, by model index), as float64 numpy."""
    return [uniform(seed, name, i, shape, torch.device("cpu")).double().numpy() for i in model_ids]


def assert_unambiguous(draws, thresholds):
    """No draw within 1e-6 of its keep threshold: float32 and float64 then agree on every keep decision."""
    for u, p in zip(draws, thresholds):
        gap = np.min(np.abs(u - p))
        assert gap > 1e-6, f"test data ambiguous (draw {gap:.2e} from its threshold); pick another seed"


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30) if expected.size else 1.0
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rtol * scale, f"max error {err:.3e} vs scale {scale:.3e} (relative {err / scale:.3e})"


def take(value, n_models):
    return value[:n_models] if isinstance(value, list) else value


# ---- every method against the reference ------------------------------------------------------------------------

# Per-model values are written for 3 models and cut to T.
CASES = {
    "linear": [
        dict(weight=[1.0, 1.0, 1.0]),
        dict(weight=[0.5, 2.0, 1.25]),
        dict(weight=[0.3, 0.7, 1.1], normalize=False),
    ],
    "task_arithmetic": [
        dict(),
        dict(weight=[0.5, 2.0, 1.25], **{"lambda": 0.7}),
        dict(weight=[0.3, 0.7, 1.1], aggregate="mean", **{"lambda": 1.5}),
    ],
    "ties": [
        dict(density=[0.5, 0.5, 0.5]),
        dict(density=[0.5, 0.3, 0.8], weight=[1.0, 0.5, 2.0], **{"lambda": 0.8}),
        dict(density=[0.3, 0.7, 0.2], weight=[0.3, 0.7, 1.1], aggregate="sum"),
        dict(density=[0.4, 0.6, 0.25], rescale="l1", **{"lambda": 1.3}),
        dict(density=[1.0, 1.0, 1.0], weight=[1.0, 2.0, 0.5]),
        dict(density=[1.0, 0.5, 0.3], aggregate="sum", rescale="l1"),
    ],
    "dare_linear": [
        dict(density=[0.5, 0.5, 0.5]),  # mergekit's defaults: L1 rescale
        dict(density=[0.5, 0.5, 0.5], rescale="inverse"),  # the paper's 1/p
        dict(density=[0.3, 0.75, 0.9], weight=[1.0, 0.5, 2.0], rescale="inverse", **{"lambda": 0.8}),
        dict(density=[0.4, 0.6, 0.25], rescale="l1", aggregate="mean"),
        dict(density=[0.7, 0.2, 1.0], rescale="none", weight=[0.3, 0.7, 1.1]),
    ],
    "dare_ties": [
        dict(density=[0.5, 0.5, 0.5]),  # mergekit's defaults: L1 rescale, agreeing entries summed
        dict(density=[0.5, 0.5, 0.5], rescale="inverse", aggregate="mean"),  # the paper's 1/p, disjoint mean
        dict(density=[0.3, 0.75, 0.9], weight=[1.0, 0.5, 2.0], rescale="inverse", aggregate="mean",
             **{"lambda": 0.8}),
        dict(density=[0.4, 0.6, 0.25], rescale="l1", aggregate="sum"),
        dict(density=[0.7, 0.2, 1.0], rescale="none", aggregate="mean"),
    ],
    "breadcrumbs": [
        dict(density=[0.5, 0.5, 0.5]),
        dict(density=[0.5, 0.3, 0.8], gamma=[0.1, 0.05, 0.25], weight=[1.0, 0.5, 2.0], **{"lambda": 0.8}),
        dict(density=[0.9, 0.6, 0.4], gamma=[0.2, 0.0, 0.1], rescale="l1", aggregate="mean"),
    ],
    "breadcrumbs_ties": [
        dict(density=[0.5, 0.5, 0.5], gamma=[0.1, 0.1, 0.1]),  # mergekit's default: agreeing entries summed
        dict(density=[0.5, 0.5, 0.5], gamma=[0.1, 0.1, 0.1], aggregate="mean"),  # the disjoint mean
        dict(density=[0.5, 0.3, 0.8], gamma=[0.1, 0.05, 0.25], weight=[1.0, 0.5, 2.0], aggregate="sum"),
        dict(density=[0.9, 0.6, 0.4], gamma=[0.2, 0.0, 0.1], rescale="l1", aggregate="mean", **{"lambda": 1.2}),
    ],
    "della": [
        dict(density=[0.5, 0.5, 0.5]),  # mergekit's defaults: L1 rescale
        dict(density=[0.5, 0.5, 0.5], rescale="inverse"),  # the paper's 1/p
        dict(density=[0.4, 0.6, 0.3], epsilon=[0.1, 0.3, 0.2], weight=[1.0, 0.5, 2.0], rescale="inverse",
             **{"lambda": 0.8}),
        dict(density=[0.5, 0.7, 0.35], epsilon=[0.05, 0.2, 0.3], rescale="l1", aggregate="sum"),
        dict(density=[0.5, 1.0, 0.6], rescale="none"),
    ],
    "della_linear": [
        dict(density=[0.5, 0.5, 0.5]),  # mergekit's defaults: L1 rescale
        dict(density=[0.5, 0.5, 0.5], rescale="inverse"),  # the paper's 1/p
        dict(density=[0.4, 0.6, 0.3], epsilon=[0.1, 0.3, 0.2], weight=[1.0, 0.5, 2.0], rescale="inverse",
             aggregate="mean"),
        dict(density=[0.5, 0.7, 0.35], epsilon=[0.05, 0.2, 0.3], rescale="l1", **{"lambda": 1.4}),
        dict(density=[0.5, 1.0, 0.6], rescale="none"),
    ],
    "consensus_ta": [
        dict(),
        dict(k=1, mask_lambda=[0.4, 0.6, 1.0], **{"lambda": 0.8}),
        dict(k=2, mask_lambda=[0.2, 0.3, 0.25], weight=[1.0, 0.5, 2.0], aggregate="mean"),
    ],
    "consensus_ties": [
        dict(),
        dict(density=[0.5, 0.3, 0.8], k=1, mask_lambda=[0.4, 0.6, 1.0], **{"lambda": 0.8}),
        dict(density=[0.6, 0.6, 0.6], k=2, mask_lambda=[0.2, 0.3, 0.25], aggregate="sum", rescale="l1"),
    ],
    "model_stock": [dict(), dict(filter_wise=True)],
}

RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def expected_result(method, base, models, p, draws):
    """The reference's answer for resolved parameters `p` (distmerge's parameter names)."""
    lam = p.get("lambda", 1.0)
    if method == "linear":
        return ref.linear(models, p["weight"], p["normalize"])
    if method == "task_arithmetic":
        return ref.task_arithmetic(base, models, p["weight"], lam, p["aggregate"])
    if method == "ties":
        return ref.ties(base, models, p["weight"], p["density"], lam, p["aggregate"], p["rescale"])
    if method in ("dare_linear", "dare_ties"):
        masks = [u < d for u, d in zip(draws, p["density"])]
        fn = ref.dare_linear if method == "dare_linear" else ref.dare_ties
        return fn(base, models, masks, p["weight"], p["density"], lam, p["rescale"], p["aggregate"])
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        fn = ref.breadcrumbs if method == "breadcrumbs" else ref.breadcrumbs_ties
        return fn(base, models, p["weight"], p["density"], p["gamma"], lam, p["rescale"], p["aggregate"])
    if method in ("della", "della_linear"):
        fn = ref.della if method == "della" else ref.della_linear
        return fn(base, models, draws, p["weight"], p["density"], p["epsilon"], lam, p["rescale"], p["aggregate"])
    if method == "consensus_ta":
        return ref.consensus_ta(base, models, p["weight"], lam, p["mask_lambda"], p["k"], p["aggregate"])[0]
    if method == "consensus_ties":
        return ref.consensus_ties(base, models, p["weight"], p["density"], lam, p["mask_lambda"], p["k"],
                                  p["aggregate"], p["rescale"])[0]
    if method == "model_stock":
        return ref.model_stock(base, models, p["filter_wise"])[0]
    raise AssertionError(method)


def keep_thresholds(method, base, models, p):
    """What each task's draws are compared with (to check the test data is unambiguous)."""
    deltas = ref.task_vectors(base, models)
    if method.startswith("dare"):
        return [np.full(np.shape(d), dens) for d, dens in zip(deltas, p["density"])]
    return [ref.della_probability(d, dens, eps) if dens < 1 else np.full(np.shape(d), 2.0)
            for d, dens, eps in zip(deltas, p["density"], p["epsilon"])]


REFERENCE_CASES = [
    pytest.param(method, i, shape, n_models, id=f"{method}-{i}-{'x'.join(map(str, shape))}-T{n_models}")
    for method, cases in CASES.items()
    for i in range(len(cases))
    # every case in 2-D and 1-D; T = 2 and 3 alternate between them from case to case
    for shape, n_models in ([((6, 10), 3), ((37,), 2)] if i % 2 == 0 else [((6, 10), 2), ((37,), 3)])
]


@pytest.mark.parametrize("method,case,shape,n_models", REFERENCE_CASES)
def test_method_matches_reference(method, case, shape, n_models):
    overrides = {key: take(value, n_models) for key, value in CASES[method][case].items()}
    base, models = exact_problem(shape, n_models, seed=zlib.crc32(f"{method}/{case}/{shape}/{n_models}".encode()))
    name, seed, model_ids = "model.layers.3.self_attn.q_proj.weight", 7, tuple(range(10, 10 + n_models))
    spec = get_method(method)
    p = spec.defaults(n_models, **overrides)
    if spec.check is not None:
        assert spec.check(p) is None
    draws = draws_for(seed, name, model_ids, shape) if method in RANDOM else None
    if draws is not None:
        assert_unambiguous(draws, keep_thresholds(method, base, models, p))
    got, _ = run(method, None if method == "linear" else base, models, name=name, seed=seed, model_ids=model_ids,
                 **overrides)
    assert_close(got, expected_result(method, base, models, p, draws))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(6, 10), (37,)])
def test_slerp_matches_reference(t, shape):
    base, (model,) = exact_problem(shape, 1, seed=int(t * 10) + len(shape))
    base = base + 0.5  # keep the two vectors far from parallel and from opposite
    got, ctx = run("slerp", base, [model], t=t)
    want, dot = ref.slerp(base, model, t)
    assert abs(dot) < 0.99
    assert_close(got, want)
    assert ctx.stats["cosine"] == pytest.approx(dot, abs=1e-6)


def test_random_methods_use_the_draws_of_the_model_index_not_the_position():
    """The DARE mask of a model depends on (seed, tensor name, model index): listing the models in another order
    (with their indices) gives the same merge, and the mask matches the draws for that index."""
    base, models = exact_problem((8, 12), 3, seed=11)
    density = [0.5, 0.3, 0.7]
    straight, _ = run("dare_linear", base, models, name="w", seed=3, model_ids=(4, 9, 2), density=density)
    order = [2, 0, 1]
    permuted, _ = run("dare_linear", base, [models[i] for i in order], name="w", seed=3,
                      model_ids=tuple((4, 9, 2)[i] for i in order), density=[density[i] for i in order])
    assert_close(permuted, straight, rtol=1e-6)
    draws = draws_for(3, "w", (4, 9, 2), (8, 12))
    want = ref.dare_linear(base, models, [u < d for u, d in zip(draws, density)], density=density)
    assert_close(straight, want)
    # another seed draws other masks
    other, _ = run("dare_linear", base, models, name="w", seed=4, model_ids=(4, 9, 2), density=density)
    assert np.max(np.abs(other - straight)) > 1e-3


@pytest.mark.parametrize("rescale", ["none", "l1"])
def test_ties_global_trim_scope_keeps_entries_at_or_above_the_task_threshold(rescale):
    """trim_scope global: a first pass gives each task's threshold; entries with |d_t| >= it survive."""
    base, models = exact_problem((5, 8), 3, seed=5)
    deltas = ref.task_vectors(base, models)
    thresholds = tuple(float(np.quantile(np.abs(d), q)) for d, q in zip(deltas, [0.5, 0.7, 0.2]))
    got, _ = run("ties", base, models, thresholds=thresholds, trim_scope="global", density=[0.5, 0.3, 0.8],
                 rescale=rescale)
    assert_close(got, ref.ties(base, models, thresholds=thresholds, rescale_how=rescale))


def test_consensus_stats_report_the_kept_fraction():
    base, models = exact_problem((6, 10), 3, seed=2)
    _, ctx = run("consensus_ta", base, models, k=2)
    _, kept = ref.consensus_ta(base, models, k=2)
    assert 0 < kept < 1
    assert ctx.stats["kept_fraction"] == pytest.approx(kept)


def test_model_stock_reports_the_ratio():
    base, models = exact_problem((6, 10), 3, seed=4)
    models = [m + 0.5 * (models[0] - base) for m in models]  # correlated task vectors: 0 < r < 1
    _, ctx = run("model_stock", base, models)
    _, r = ref.model_stock(base, models)
    assert 0.05 < float(r[0]) < 0.95
    assert ctx.stats["ratio"] == pytest.approx(float(r[0]), rel=1e-5)


# ---- float64 compute ---------------------------------------------------------------------------------------------

FLOAT64_CASES = [
    ("linear", dict(weight=[0.3, 0.7, 1.1])),
    ("task_arithmetic", dict(weight=[0.3, 0.7, 1.1], **{"lambda": 0.9})),
    ("ties", dict(density=[1.0, 1.0, 1.0], weight=[0.3, 0.7, 1.1])),
    pytest.param("ties", dict(density=[0.5, 0.3, 0.7]), id="ties-trimmed"),
    pytest.param("breadcrumbs", dict(density=[0.5, 0.3, 0.7], gamma=[0.1, 0.1, 0.1]), id="breadcrumbs-trimmed"),
    pytest.param("breadcrumbs_ties", dict(density=[0.5, 0.3, 0.7], gamma=[0.1, 0.1, 0.1], aggregate="mean"),
                 id="breadcrumbs_ties-trimmed"),
    pytest.param("consensus_ties", dict(density=[0.5, 0.3, 0.7], k=1), id="consensus_ties-trimmed"),
    ("dare_linear", dict(density=[0.5, 0.3, 0.7], rescale="inverse")),
    ("dare_ties", dict(density=[0.5, 0.3, 0.7], rescale="l1", aggregate="mean")),
    ("dare_ties", dict(density=[0.5, 0.3, 0.7])),
    pytest.param("della", dict(density=[0.5, 0.3, 0.7], epsilon=[0.1, 0.2, 0.1], rescale="inverse"), id="della"),
    pytest.param("della_linear", dict(density=[0.5, 0.3, 0.7], epsilon=[0.1, 0.2, 0.1], rescale="inverse"),
                 id="della_linear"),
    pytest.param("della_linear", dict(density=[0.5, 0.3, 0.7], epsilon=[0.1, 0.2, 0.1]), id="della_linear-l1"),
    ("della", dict(density=[0.5, 0.3, 0.7], epsilon=[0.1, 0.2, 0.1], rescale="none")),
    ("consensus_ta", dict(k=2)),
    ("model_stock", dict()),
]


@pytest.mark.parametrize("method,overrides", FLOAT64_CASES)
def test_float64_compute_matches_reference(method, overrides):
    """With float64 compute (config `dtype: float64`) on generic float64 data the result is the reference's to
    float64 precision: the trim keeps exactly the top-k entries of the float64 magnitudes."""
    shape, name, seed = (8, 50), "w64", 1
    spec = get_method(method)
    p = spec.defaults(3, **overrides)
    for data_seed in range(4):
        gen = np.random.default_rng(64 + data_seed)
        base = gen.standard_normal(shape)
        models = [base + 0.01 * gen.standard_normal(shape) for _ in range(3)]
        draws = draws_for(seed, name, (0, 1, 2), shape) if method in RANDOM else None
        if draws is not None:
            assert_unambiguous(draws, keep_thresholds(method, base, models, p))
        got, _ = run(method, None if method == "linear" else base, models, name=name, seed=seed,
                     dtype=torch.float64, **overrides)
        want = expected_result(method, base, models, p, draws)
        assert_close(got - base, want - base, rtol=1e-9)  # the merged update, to float64 precision


# ---- hand-worked cases -------------------------------------------------------------------------------------------

# Three task vectors of 4 entries, density 0.5 -> each keeps floor(0.5 * 4) = 2 entries:
#   d1 = [ 3, -0.5, 0.25,  2]   |d1| top 2: 3, 2      -> d1' = [3,  0, 0,  2]
#   d2 = [-1, -4,   0.5,  -2]   |d2| top 2: 4, 2      -> d2' = [0, -4, 0, -2]
#   d3 = [ 2,  1,  -0.5, 0.25]  |d3| top 2: 2, 1      -> d3' = [2,  1, 0,  0]
# weights 1: sum = [5, -3, 0, 0] -> elected s = [+, -, +, +]  (entries 2 and 3: 0 counts as +)
#   entry 0: d1' 3 and d3' 2 agree         -> (3 + 2) / 2 = 2.5
#   entry 1: d2' -4 agrees, d3' +1 does not -> -4 / 1 = -4
#   entry 2: every entry trimmed            -> 0 / 0 -> 0
#   entry 3: sum 2 - 2 = 0 -> +; d1' 2 agrees, d2' -2 does not -> 2 / 1 = 2
# base b = [1, 1, 1, 1]: mean -> b + [2.5, -4, 0, 2] = [3.5, -3, 1, 3]
#                        sum  -> b + [5, -4, 0, 2]   = [6, -3, 1, 3]
# weights [1, 2, 1]: weighted sum = [3 + 2, -8 + 1, 0, 2 - 4] = [5, -7, 0, -2] -> s = [+, -, +, -]
#   entry 0: w1 d1' = 3, w3 d3' = 2 agree -> 5 / (1 + 1) = 2.5
#   entry 1: w2 d2' = -8 agrees           -> -8 / 2 = -4
#   entry 2: 0 / 0 -> 0
#   entry 3: w2 d2' = -4 agrees           -> -4 / 2 = -2
#   -> [3.5, -3, 1, -1]; with lambda 0.5: b + 0.5 [2.5, -4, 0, -2] = [2.25, -1, 1, 0]
TIES_BASE = np.ones(4)
TIES_DELTAS = [np.array([3, -0.5, 0.25, 2.0]), np.array([-1, -4, 0.5, -2.0]), np.array([2, 1, -0.5, 0.25])]


@pytest.mark.parametrize("weights,aggregate,lam,want", [
    ([1.0, 1.0, 1.0], "mean", 1.0, [3.5, -3, 1, 3]),
    ([1.0, 1.0, 1.0], "sum", 1.0, [6, -3, 1, 3]),
    ([1.0, 2.0, 1.0], "mean", 1.0, [3.5, -3, 1, -1]),
    ([1.0, 2.0, 1.0], "mean", 0.5, [2.25, -1, 1, 0]),
])
def test_ties_hand_worked(weights, aggregate, lam, want):
    models = [TIES_BASE + d for d in TIES_DELTAS]
    got, _ = run("ties", TIES_BASE, models, density=[0.5] * 3, weight=weights, aggregate=aggregate,
                 **{"lambda": lam})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.ties(TIES_BASE, models, weights, 0.5, lam, aggregate), want, atol=1e-12)


def test_dare_hand_worked():
    """density 0.5, rescale inverse: kept entries doubled; l1: scaled to the L1 norm of d. Draws for this tensor
    decide which are kept."""
    base = np.zeros(6)
    d = np.array([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    u = draws_for(0, "dare.w", (0,), (6,))[0]
    kept = u < 0.5
    assert 0 < kept.sum() < 6  # some kept, some dropped, else the case shows nothing
    got, _ = run("dare_linear", base, [base + d], name="dare.w", density=[0.5], rescale="inverse")
    np.testing.assert_allclose(got, np.where(kept, 2 * d, 0.0), atol=1e-6)
    # L1 of d is 21; survivors scaled to it (the default, mergekit's `rescale: true`)
    for l1 in ({}, {"rescale": "l1"}):
        got, _ = run("dare_linear", base, [base + d], name="dare.w", density=[0.5], **l1)
        np.testing.assert_allclose(got, np.where(kept, d, 0.0) * 21 / np.abs(d[kept]).sum(), atol=1e-5)


def test_breadcrumbs_hand_worked():
    """10 entries, density 0.5, gamma 0.2: drop the 2 largest and the 3 smallest magnitudes, keep 5."""
    d = np.array([0.1, -9.0, 0.3, 4.0, -0.2, 5.0, -6.0, 7.0, 8.0, 0.4])
    #  ascending |d|: 0.1 0.2 0.3 | 0.4 4 5 6 7 | 8 9  -> keep 0.4, 4, 5, -6, 7
    want = np.array([0, 0, 0, 4.0, 0, 5.0, -6.0, 7.0, 0, 0.4])
    got, _ = run("breadcrumbs", np.zeros(10), [d], density=[0.5], gamma=[0.2])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_della_hand_worked_probabilities():
    """One row of 5: ranks of |d| ascending map to density - eps .. density + eps in equal steps."""
    d = np.array([[0.5, -3.0, 1.0, 0.1, 2.0]])
    # ranks:           1     4    2    0    3  -> p = 0.3 + 0.4 * rank / 4 = 0.4 0.7 0.5 0.3 0.6
    p = np.array([[0.4, 0.7, 0.5, 0.3, 0.6]])
    np.testing.assert_allclose(ref.della_probability(d, 0.5, 0.2), p, atol=1e-12)
    u = draws_for(2, "della.w", (0,), (1, 5))[0]
    got, _ = run("della_linear", np.zeros((1, 5)), [d], name="della.w", seed=2, density=[0.5], epsilon=[0.2],
                 rescale="inverse")
    np.testing.assert_allclose(got, np.where(u < p, d / p, 0.0), rtol=1e-6)


def test_consensus_hand_worked():
    """Two tasks, lambda_t 0.6, k 2: D = d1 + d2; task t claims an entry when |d_t| > 0.6 |D - d_t|."""
    d1 = np.array([1.0, 1.0, 2.0, 0.0])
    d2 = np.array([1.0, 0.1, -2.0, 3.0])
    # D = [2, 1.1, 0, 3]; D - d1 = d2, D - d2 = d1
    # entry 0: 1 > 0.6 and 1 > 0.6 -> 2 votes, kept: 2
    # entry 1: 1 > 0.06 yes; 0.1 > 0.6 no -> 1 vote, dropped
    # entry 2: 2 > 1.2 twice -> kept, D = 0
    # entry 3: 0 > 1.8 no; 3 > 0 yes -> 1 vote, dropped
    want_k2 = np.array([2.0, 0.0, 0.0, 0.0])
    want_k1 = np.array([2.0, 1.1, 0.0, 3.0])
    base = np.full(4, -1.0)
    got, _ = run("consensus_ta", base, [base + d1, base + d2], k=2)
    np.testing.assert_allclose(got, base + want_k2, atol=1e-6)
    got, _ = run("consensus_ta", base, [base + d1, base + d2], k=1, **{"lambda": 2.0})
    np.testing.assert_allclose(got, base + 2 * want_k1, atol=1e-6)
    # the claim is strict: with mask_lambda 0.5, d1 = 1, d2 = 2 (D = 3): task 1 has 1 > 0.5 * 2 = 1, false;
    # task 2 has 2 > 0.5 * 1, true -> one vote, dropped at k = 2. Entry 1: 4 > 0.5 * 4 and 4 > 0.5 * 4 -> kept
    e1, e2 = np.array([1.0, 4.0]), np.array([2.0, 4.0])
    got, _ = run("consensus_ta", np.zeros(2), [e1, e2], k=2, mask_lambda=[0.5, 0.5])
    np.testing.assert_allclose(got, [0.0, 8.0], atol=1e-6)


def test_slerp_known_angles():
    # 90 degrees, t = 0.5: sin(45)/sin(90) for both -> (sqrt(2)/2) * (1, 0) + (sqrt(2)/2) * (0, 2)
    got, ctx = run("slerp", np.array([1.0, 0.0]), [np.array([0.0, 2.0])], t=0.5)
    np.testing.assert_allclose(got, [math.sqrt(0.5), 2 * math.sqrt(0.5)], atol=1e-6)
    assert ctx.stats["cosine"] == pytest.approx(0.0, abs=1e-7)
    # 90 degrees, t = 0.25: sin(67.5) (1, 0) + sin(22.5) (0, 2)
    got, _ = run("slerp", np.array([1.0, 0.0]), [np.array([0.0, 2.0])], t=0.25)
    np.testing.assert_allclose(got, [math.sin(3 * math.pi / 8), 2 * math.sin(math.pi / 8)], atol=1e-6)
    # 60 degrees, t = 0.5: both coefficients sin(30)/sin(60) = 1/sqrt(3); v1 = 3 (cos 60, sin 60)
    v1 = np.array([1.5, 1.5 * math.sqrt(3)])
    got, ctx = run("slerp", np.array([1.0, 0.0]), [v1], t=0.5)
    np.testing.assert_allclose(got, (np.array([1.0, 0.0]) + v1) / math.sqrt(3), atol=1e-6)
    assert ctx.stats["cosine"] == pytest.approx(0.5, abs=1e-6)
    # a 2x2 tensor is flattened: the same 60-degree pair laid out as matrices
    got, _ = run("slerp", np.array([[1.0, 0.0], [0.0, 0.0]]), [np.array([[1.5, 0.0], [0.0, 1.5 * math.sqrt(3)]])],
                 t=0.5)
    np.testing.assert_allclose(got, np.array([[2.5, 0.0], [0.0, 1.5 * math.sqrt(3)]]) / math.sqrt(3), atol=1e-6)


def test_slerp_endpoints_and_linear_fallback():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.2, 0.9, -0.4])
    np.testing.assert_allclose(run("slerp", a, [b], t=0.0)[0], a, atol=1e-6)
    np.testing.assert_allclose(run("slerp", a, [b], t=1.0)[0], b, atol=1e-6)
    t = 0.3
    # cos 0.9996 > 0.9995: linear interpolation
    near = np.array([0.9996, math.sqrt(1 - 0.9996**2), 0.0]) * 2
    np.testing.assert_allclose(run("slerp", a, [near], t=t)[0], (1 - t) * a + t * near, atol=1e-6)
    # cos 0.998 < 0.9995: spherical, measurably different from linear (~3e-4 relative)
    close = np.array([0.998, math.sqrt(1 - 0.998**2), 0.0]) * 2
    theta = math.acos(0.998)
    want = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * close) / math.sin(theta)
    got = run("slerp", a, [close], t=t)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.max(np.abs(want - ((1 - t) * a + t * close))) > 1e-4


def test_model_stock_known_cosines():
    base = np.array([[1.0, 1.0], [1.0, 1.0]])
    d1 = np.array([[1.0, 0.0], [0.0, 0.0]])
    d2 = np.array([[0.5, math.sqrt(3) / 2], [0.0, 0.0]])  # cos 0.5 -> r = 2 * 0.5 / 1.5 = 2/3
    got, ctx = run("model_stock", base, [base + d1, base + d2])
    np.testing.assert_allclose(got, base + (2 / 3) * (d1 + d2) / 2, atol=1e-6)
    assert ctx.stats["ratio"] == pytest.approx(2 / 3, rel=1e-6)
    # three mutually orthogonal task vectors: cos 0 -> r 0 -> the base
    e = [np.array([[3.0, 0, 0]]), np.array([[0, -2.0, 0]]), np.array([[0, 0, 0.5]])]
    got, _ = run("model_stock", np.zeros((1, 3)) + 2, [2 + x for x in e])
    np.testing.assert_allclose(got, np.full((1, 3), 2.0), atol=1e-6)
    # identical directions (cos 1): r = 1 -> the mean of the models
    got, _ = run("model_stock", base, [base + d1, base + 3 * d1, base + 2 * d1])
    np.testing.assert_allclose(got, base + 2 * d1, atol=1e-6)
    # T = 3, pairwise cosines 0.5, 0.5, 0.5 would need 3 directions at 60 degrees: use cos(d1,d2)=0.5,
    # d3 = -d1 -> cosines 0.5, -1, -0.5 -> mean -1/3 -> r = 3(-1/3) / (1 + 2(-1/3)) = -3 -> b - 3 mean(d)
    d3 = -d1
    got, _ = run("model_stock", base, [base + d1, base + d2, base - d1])
    np.testing.assert_allclose(got, base - 3 * (d1 + d2 + d3) / 3, atol=1e-5)


def test_model_stock_filter_wise_ratio_per_row():
    base = np.zeros((2, 2))
    d1 = np.array([[1.0, 0.0], [1.0, 0.0]])
    d2 = np.array([[0.0, 1.0], [1.0, 0.0]])  # row 0 orthogonal (r 0), row 1 identical (r 1)
    got, _ = run("model_stock", base, [d1, d2], filter_wise=True)
    np.testing.assert_allclose(got, [[0.0, 0.0], [1.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_cosine_is_scale_invariant(filter_wise):
    """A cosine does not depend on the scale of the vectors: small task vectors (entries ~3e-5, as in
    lightly fine-tuned tensors) get the same ratio r as large ones."""
    gen = np.random.default_rng(0)
    shape = (6, 10)
    common = gen.standard_normal(shape)
    base = np.zeros(shape)
    for scale in (1.0, 3e-5):
        # float32-representable models, so the reference sees exactly what distmerge sees
        models = [np.float32((common + gen.standard_normal(shape)) * scale).astype(np.float64) for _ in range(3)]
        want, r = ref.model_stock(base, models, filter_wise)
        assert np.all((r > 0.1) & (r < 1.0)), r  # a real interpolation, not a degenerate ratio
        got, _ = run("model_stock", base, models, filter_wise=filter_wise)
        assert_close(got, want)


def test_model_stock_opposite_updates_stay_finite():
    base = np.zeros(4)
    d = np.array([1.0, -2.0, 0.5, 3.0])
    got, _ = run("model_stock", base, [base + d, base - d])  # cos -1: 1 + (T-1) cos = 0
    assert np.all(np.isfinite(got))


# ---- the equivalences docs/methods.md lists ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 9), (40,)])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.25]])
def test_ties_density_one_agreeing_signs_is_weighted_mean(shape, weights):
    gen = np.random.default_rng(len(shape))
    sign = np.where(gen.random(shape) < 0.5, -1.0, 1.0)
    base = gen.standard_normal(shape)
    deltas = [sign * (0.1 + gen.random(shape)) for _ in range(3)]
    lam = 0.8
    got, _ = run("ties", base, [base + d for d in deltas], density=[1.0] * 3, weight=weights, **{"lambda": lam})
    want = base + lam * sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    assert_close(got, want)


@pytest.mark.parametrize("shape", [(7, 9), (40,)])
def test_task_arithmetic_one_model_lambda_one_returns_the_model(shape):
    gen = np.random.default_rng(1)
    base, model = gen.standard_normal(shape), gen.standard_normal(shape)
    got, _ = run("task_arithmetic", base, [model])
    want = torch.tensor(model, dtype=torch.float32).double().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())  # (x - b) + b: 1 ulp at most


@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_linear_equal_weights_is_the_mean(n_models):
    gen = np.random.default_rng(n_models)
    models = [gen.standard_normal((4, 6)) for _ in range(n_models)]
    got, _ = run("linear", None, models, weight=[2.5] * n_models)
    assert_close(got, np.mean(models, axis=0))


def test_dare_density_one_is_task_arithmetic():
    base, models = exact_problem((5, 6), 3, seed=8)
    weights = [0.5, 1.0, 2.0]
    got, _ = run("dare_linear", base, models, density=[1.0] * 3, weight=weights, **{"lambda": 0.7})
    assert_close(got, ref.task_arithmetic(base, models, weights, 0.7))


# ---- parameter validation from the declarations ------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    assert get_method("breadcrumbs").defaults(2)["gamma"] == [0.01, 0.01]
    assert get_method("della").defaults(2)["epsilon"] == [0.15, 0.15]
    p = get_method("consensus_ta").defaults(3)
    assert p["mask_lambda"] == [0.6] * 3 and p["k"] == 2
    p = get_method("ties").defaults(2)
    assert p["aggregate"] == "mean" and p["trim_scope"] == "tensor" and p["lambda"] == 1.0 and p["weight"] == [1.0] * 2
    # mergekit 0.1.5's defaults (its registry.py): `rescale: true` (L1) for DARE and DELLA; `normalize` true for
    # ties and della, false for the others
    for method in ("dare_linear", "dare_ties", "della", "della_linear"):
        assert get_method(method).defaults(2)["rescale"] == "l1", method
    for method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        assert get_method(method).defaults(2)["rescale"] == "none", method
    aggregates = {method: get_method(method).defaults(2)["aggregate"]
                  for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                 "breadcrumbs_ties", "della", "della_linear")}
    assert aggregates == {"task_arithmetic": "sum", "ties": "mean", "dare_linear": "sum", "dare_ties": "sum",
                          "breadcrumbs": "sum", "breadcrumbs_ties": "sum", "della": "mean", "della_linear": "sum"}
    assert all(get_method(m).defaults(2)["lambda"] == 1.0 and get_method(m).defaults(2)["int8_mask"] is False
               and get_method(m).defaults(2)["density"] == [1.0, 1.0] for m in aggregates if m != "task_arithmetic")
    assert get_method("model_stock").defaults(3)["filter_wise"] is False
    assert get_method("linear").defaults(2)["normalize"] is True


@pytest.mark.parametrize("method,key,value,fragments", [
    ("ties", "density", 0.0, ["density", "out of range", "(0, 1]"]),
    ("ties", "density", 1.5, ["density", "out of range", "(0, 1]"]),
    ("ties", "density", -0.1, ["density", "(0, 1]"]),
    ("ties", "density", "0.5", ["density", "must be a finite number", "(0, 1]"]),
    ("ties", "density", True, ["density", "must be a finite number"]),
    ("ties", "density", None, ["density", "must be a finite number"]),
    ("breadcrumbs", "gamma", 1.0, ["gamma", "out of range", "[0, 1)"]),
    ("breadcrumbs", "gamma", -0.01, ["gamma", "[0, 1)"]),
    ("della", "epsilon", 0.5, ["epsilon", "out of range", "[0, 0.5)"]),
    ("consensus_ta", "k", 0, ["`k: 0`", "out of range", "int in [1, inf]"]),
    ("consensus_ta", "k", 2.5, ["`k: 2.5`", "must be an integer"]),
    ("consensus_ta", "mask_lambda", -1.0, ["mask_lambda", "[0, inf]"]),
    ("slerp", "t", 1.2, ["`t: 1.2`", "out of range", "[0, 1]"]),
    ("ties", "rescale", "inverse", ["rescale", "not allowed", "l1 | none"]),
    ("dare_ties", "rescale", "L1", ["rescale", "not allowed", "inverse | l1 | none"]),
    ("ties", "trim_scope", True, ["trim_scope", "not allowed", "tensor | global"]),
    ("ties", "aggregate", "median", ["aggregate", "mean | sum"]),
    ("ties", "int8_mask", "yes", ["int8_mask", "true or false"]),
    ("linear", "normalize", 1, ["normalize", "true or false"]),
])
def test_param_check_rejects_with_key_and_range(method, key, value, fragments):
    assert_param_refused(method, key, value, "parameters of model m1 (tensor w)", fragments)


@pytest.mark.parametrize("method,key", [("ties", "density"), ("breadcrumbs", "gamma"), ("della", "epsilon"),
                                        ("slerp", "t"), ("consensus_ta", "mask_lambda")])
def test_param_check_rejects_nan_in_a_ranged_parameter(method, key):
    with pytest.raises(ConfigError, match=key):
        get_method(method).param(key).check(float("nan"), "parameters")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_param_check_int_rejects_non_finite_with_a_config_error(value):
    with pytest.raises(ConfigError, match="`k: "):
        get_method("consensus_ta").param("k").check(value, "parameters")


@pytest.mark.parametrize("method,key,value,want", [
    ("ties", "density", 1, 1.0),
    ("ties", "density", 0.25, 0.25),
    ("breadcrumbs", "gamma", 0, 0.0),
    ("consensus_ta", "k", 3.0, 3),
    ("consensus_ta", "mask_lambda", 0, 0.0),
    ("slerp", "t", 0, 0.0),
    ("dare_ties", "rescale", True, "l1"),  # mergekit's `rescale: true` is L1 rescaling
    ("dare_ties", "rescale", False, "none"),
    ("ties", "rescale", True, "l1"),
    ("ties", "aggregate", True, "mean"),  # mergekit's `normalize: true`
    ("ties", "aggregate", False, "sum"),
    ("ties", "aggregate", "sum", "sum"),
    ("ties", "int8_mask", True, True),
    ("ties", "weight", -0.5, -0.5),
])
def test_param_check_accepts_and_converts(method, key, value, want):
    got = get_method(method).param(key).check(value, "parameters")
    assert got == want and type(got) is type(want)


def test_normalize_is_the_mergekit_alias_of_aggregate():
    for method in ("ties", "dare_ties", "dare_linear", "task_arithmetic", "della", "breadcrumbs_ties"):
        table = get_method(method).names_with_aliases()
        assert table["normalize"].name == "aggregate", method
        assert table["normalize"].check(True, "parameters") == "mean"
        assert table["normalize"].check(False, "parameters") == "sum"
    # linear's own `normalize` is a bool, not an alias
    assert get_method("linear").names_with_aliases()["normalize"].kind == "bool"


def test_cross_parameter_checks():
    della = get_method("della")
    message = della.check(della.defaults(2, density=[0.1, 0.5], epsilon=[0.15, 0.15]))
    assert message and "density" in message and "epsilon" in message and "0.1" in message
    assert della.check(della.defaults(2, density=[0.5, 0.9], epsilon=[0.15, 0.1])) is None
    assert della.check(della.defaults(2, density=[0.9, 0.5], epsilon=[0.15, 0.15])) is not None  # 1.05 > 1
    assert della.check(della.defaults(2, density=[1.0, 0.5], epsilon=[0.15, 0.15])) is None  # density 1: no drop
    linear = get_method("linear")
    message = linear.check(linear.defaults(2, weight=[1.0, -1.0]))
    assert message and "sum to zero" in message
    assert linear.check(linear.defaults(2, weight=[1.0, -1.0], normalize=False)) is None


def test_sum_into_first_has_the_bits_of_torch_sum():
    """The in-place sum linear and task arithmetic use must round exactly as stack.sum(0) does."""
    gen = torch.Generator().manual_seed(3)
    for n_tasks in (2, 3, 5):
        scales = torch.logspace(-4, 4, n_tasks).view(n_tasks, 1)
        stack = torch.randn(n_tasks, 100_003, generator=gen) * scales
        want = stack.sum(0)
        assert torch.equal(sum_into_first_(stack.clone()), want)
