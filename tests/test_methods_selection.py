"""The selection methods (sce, arcee_fusion, nearswap, ram, ramplus_tl) against the NumPy references written from
docs/methods.md (tests/reference.py), hand-worked cases, edge cases (zero task vectors, tied variances, one model),
parameter validation, and `distmerge methods` / `plan` / `merge` on a tiny family.

The data are those of test_methods_elementwise.py (base entries multiples of 1/4, task-vector entries multiples of
2^-16: exact in float32), so float32 and the float64 reference see the same task vectors and take the same
discrete decisions (which entries count as changed, which variances are the largest); where a decision compares
a computed statistic with a threshold (arcee_fusion), the test first checks that no entry is near it.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import yaml

import reference as ref
from conftest import assert_param_refused, assert_user_error, run_cli, write_config
from test_cli_e2e import read_model
from test_methods_elementwise import assert_close, exact_problem, run

from distmerge.methods import get_method

SELECTION = ("sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl")
ONE_MODEL = {"arcee_fusion", "nearswap"}  # the base and exactly one other model

CASES = {
    "sce": [dict(), dict(select_topk=0.5), dict(select_topk=0.2), dict(select_topk=0.0)],
    "arcee_fusion": [dict()],
    "nearswap": [dict(t=0.5), dict(t=0.05), dict(t=3.0), dict(t=0.0)],
    "ram": [dict(), dict(epsilon=0.3), dict(epsilon=0.0)],
    "ramplus_tl": [dict(), dict(r=0.5, alpha=3.0, epsilon=0.3), dict(r=2.0, alpha=0.05)],
}


def expected_result(method, base, models, p):
    """The reference's answer for resolved parameters `p`."""
    if method == "sce":
        return ref.sce(base, models, p["select_topk"])
    if method == "arcee_fusion":
        return ref.arcee_fusion(base, models[0])[0]
    if method == "nearswap":
        return ref.nearswap(base, models[0], p["t"])
    if method == "ram":
        return ref.ram(base, models, p["epsilon"])
    if method == "ramplus_tl":
        return ref.ramplus_tl(base, models, p["r"], p["alpha"], p["epsilon"])
    raise AssertionError(method)


def assert_no_importance_near_the_threshold(base, model, margin=1e-4):
    """float32 and float64 agree on which entries arcee_fusion keeps: no importance within `margin` (relative)
    of the threshold."""
    _, importance, threshold = ref.arcee_fusion(base, model)
    gap = np.min(np.abs(importance - threshold)) / max(abs(threshold), 1e-30)
    assert gap > margin, f"test data ambiguous (importance {gap:.1e} from the threshold); pick another seed"


def ram_problem(shape, n_models, seed):
    """exact_problem with a third of each task vector's entries zero, so that entries are changed by none, one or
    several models."""
    base, models = exact_problem(shape, n_models, seed)
    gen = np.random.default_rng(seed + 1)
    return base, [np.where(gen.random(shape) < 1 / 3, base, x) for x in models]


REFERENCE_CASES = [
    pytest.param(method, i, shape, n_models, id=f"{method}-{i}-{'x'.join(map(str, shape))}-T{n_models}")
    for method, cases in CASES.items()
    for i in range(len(cases))
    for shape, n_models in ([((6, 10), 1), ((37,), 1), ((3, 4, 5), 1)] if method in ONE_MODEL
                            else [((6, 10), 3), ((37,), 2), ((3, 4, 5), 3), ((6, 10), 1)])
]


@pytest.mark.parametrize("method,case,shape,n_models", REFERENCE_CASES)
def test_method_matches_reference(method, case, shape, n_models):
    overrides = CASES[method][case]
    base, models = ram_problem(shape, n_models, seed=zlib.crc32(f"{method}/{case}/{shape}/{n_models}".encode()))
    spec = get_method(method)
    p = spec.defaults(n_models, **overrides)
    assert spec.check is None or spec.check(p) is None
    if method == "arcee_fusion":
        assert_no_importance_near_the_threshold(base, models[0])
    got, _ = run(method, base, models, **overrides)
    assert_close(got, expected_result(method, base, models, p))


FLOAT64_CASES = [("sce", dict()), ("sce", dict(select_topk=0.3)), ("arcee_fusion", dict()),
                 ("nearswap", dict(t=0.004)), ("ram", dict(epsilon=0.005)), ("ramplus_tl", dict(epsilon=0.005))]


@pytest.mark.parametrize("method,overrides", FLOAT64_CASES)
def test_float64_compute_matches_reference(method, overrides):
    """With float64 compute on generic float64 data the merged update is the reference's to float64 precision
    (sce's count and RAM+'s factor are float32 in both, as documented)."""
    shape = (8, 50)
    n_models = 1 if method in ONE_MODEL else 3
    p = get_method(method).defaults(n_models, **overrides)
    for data_seed in range(3):
        gen = np.random.default_rng(640 + data_seed)
        base = gen.standard_normal(shape)
        models = [base + 0.01 * gen.standard_normal(shape) * (gen.random(shape) < 0.6) for _ in range(n_models)]
        if method == "arcee_fusion":
            assert_no_importance_near_the_threshold(base, models[0], margin=1e-9)
        got, _ = run(method, base, models, dtype=torch.float64, **overrides)
        want = expected_result(method, base, models, p)
        assert_close(got - base, want - base, rtol=1e-9)


# ---- hand-worked cases -------------------------------------------------------------------------------------------

# Three task vectors of 4 entries (base 1):
#   d1 = [2,  1, -1, -1]
#   d2 = [2, -3,  3,  1]
#   d3 = [2,  2, -2,  1]
# select_topk 1: nothing masked. e = sign(sum) = [+, +, +, +] (sums 6, 0, 0, 1; 0 counts as +).
#   energies mean(d^2): 7/4, 23/4, 13/4 -> w = [7, 23, 13] / 43
#   entry 0: all agree -> 2;  entry 1: d1 = 1, d3 = 2 agree -> (7 * 1 + 13 * 2) / (7 + 13) = 1.65
#   entry 2: only d2 = 3 agrees -> 3;  entry 3: d2 = d3 = 1 agree -> 1
# select_topk 0.5: variances across the models [0, 14/3, 14/3, 8/9] (entries 1 and 2 are negatives of each
#   other: exactly equal); m = 3 nonzero -> floor(1.5) = 1 entry kept, the tie taken lowest index first: entry 1.
#   d' = [0, 1, 0, 0], [0, -3, 0, 0], [0, 2, 0, 0]; energies 1/4, 9/4, 4/4 -> w = [1, 9, 4] / 14
#   entry 1: sum 0 -> +; d1' and d3' agree -> (1 * 1 + 4 * 2) / (1 + 4) = 1.8; every other entry 0
SCE_DELTAS = [np.array([2.0, 1, -1, -1]), np.array([2.0, -3, 3, 1]), np.array([2.0, 2, -2, 1])]


@pytest.mark.parametrize("select_topk,want", [(1.0, [2, 1.65, 3, 1]), (0.5, [0, 1.8, 0, 0])])
def test_sce_hand_worked(select_topk, want):
    base = np.ones(4)
    models = [base + d for d in SCE_DELTAS]
    got, _ = run("sce", base, models, select_topk=select_topk)
    np.testing.assert_allclose(got, base + np.array(want), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.sce(base, models, select_topk), base + np.array(want), atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 70_001), (2, 5, 9, 31), (4, 1)])
def test_sce_variance_is_torchs_population_variance(shape, monkeypatch):
    """sce's variance across the models is float64 arithmetic rounded to float32, in chunks (here of 4096 entries,
    so that a chunk ends inside a row): the values of torch.var(0, unbiased=False), which accumulates in float64,
    and within round-off of NumPy's float64 variance."""
    from distmerge.methods import selection

    monkeypatch.setattr(selection, "VARIANCE_CHUNK", 4096)
    gen = torch.Generator().manual_seed(1)
    deltas = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16).float()
    got = selection.population_variance(deltas)
    assert got.shape == deltas.shape[1:] and got.dtype == torch.float32
    assert torch.equal(got, deltas.var(0, unbiased=False))
    np.testing.assert_allclose(got.numpy(), deltas.double().numpy().var(0), rtol=1e-6, atol=0)


def test_sce_count_of_kept_entries_is_rounded_in_float32():
    """floor(float32(m) * float32(select_topk)): with m = 90 and select_topk 0.7, float32 gives 63 (63.0), float64
    62 (62.99999999999999)."""
    assert int(90 * 0.7) == 62 and int(np.float32(90) * np.float32(0.7)) == 63
    base = np.zeros(90)
    ramp = np.arange(1, 91) / 8.0  # the variance of (ramp, 3 ramp) is ramp^2: the last entries vary most
    got, _ = run("sce", base, [base + ramp, base + 3 * ramp], select_topk=0.7)
    assert np.flatnonzero(got).tolist() == list(range(27, 90))


def test_sce_small_task_vectors_weigh_equally():
    """Total energy sum_t mean(d_t^2) below 1e-6: every model weighs 1/T (mergekit's guard).
    Energies here are 1.5625 and 2.8125 times 2^-24, about 2.6e-7 together.
    entry 0: both agree -> (1 + 3) / 2 = 2 (energy weights would give 2.29); entry 1: sum -1 -> -, d1 alone: -2;
    entry 2: sum 0 -> +, d1 = 0.5 alone; entry 3: both 1 -> 1 (all times 2^-12)."""
    base = np.zeros(4)
    small = [np.array([1.0, -2.0, 0.5, 1.0]) * 2**-12, np.array([3.0, 1.0, -0.5, 1.0]) * 2**-12]
    got, _ = run("sce", base, [base + d for d in small])
    np.testing.assert_allclose(got, np.array([2.0, -2.0, 0.5, 1.0]) * 2**-12, rtol=1e-6, atol=0)
    np.testing.assert_allclose(ref.sce(base, small), got, rtol=1e-6, atol=0)


def test_sce_divisor_floor():
    """A model whose weight is below 1e-6 and that alone has the elected sign is divided by the floor 1e-6, not by
    its own weight (mergekit's guard): energies 3/4 and 2^-24 -> w2 = 2^-24 / (3/4 + 2^-24), about 8e-8; at
    entry 2 only d2 is nonzero: w2 d2 / 1e-6. Elsewhere only d1 is: d1."""
    base = np.zeros(4)
    d1, d2 = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 0.0, -2.0, 0.0]) * 2**-12
    got, _ = run("sce", base, [base + d1, base + d2])
    w2 = 2**-24 / (0.75 + 2**-24)
    assert got[2] == pytest.approx(w2 * d2[2] / 1e-6, rel=1e-5)
    np.testing.assert_allclose(got[[0, 1, 3]], [1.0, 1.0, 1.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.sce(base, [d1, d2]), got, rtol=1e-5)


# Three task vectors, epsilon 0.1:
#   d1 = [0.5, 0.05, 0,  1, -2]      changed: [x, -, -, x, x]   (0.05 <= 0.1 does not count)
#   d2 = [0,   0,    0,  3,  1]      changed: [-, -, -, x, x]
#   d3 = [0,   0.5,  0, -1,  0]      changed: [-, x, -, x, -]
#   c  = [1, 1, 0, 3, 2]
# ram: [0.5, 0.5, 0, (1 + 3 - 1) / 3 = 1, (-2 + 1) / 2 = -0.5]
# ramplus_tl r 0.5, alpha 3: model 1 changes entry 0 alone and 3, 4 with others: rho 2/1 -> lambda 1 + 0.5 * 2 = 2;
#   model 3 changes entry 1 alone and entry 3 with others: rho 1 -> lambda 1.5; model 2 nothing alone (rho 2 / 0.1).
#   -> [0.5 * 2, 0.5 * 1.5, 0, 1, -0.5] = [1, 0.75, 0, 1, -0.5]; with alpha 1 both lambdas are 1.5
RAM_DELTAS = [np.array([0.5, 0.05, 0, 1, -2]), np.array([0.0, 0, 0, 3, 1]), np.array([0.0, 0.5, 0, -1, 0])]


@pytest.mark.parametrize("method,params,want", [
    ("ram", dict(epsilon=0.1), [0.5, 0.5, 0, 1, -0.5]),
    ("ramplus_tl", dict(r=0.5, alpha=3.0, epsilon=0.1), [1.0, 0.75, 0, 1, -0.5]),
    ("ramplus_tl", dict(r=0.5, alpha=1.0, epsilon=0.1), [0.75, 0.75, 0, 1, -0.5]),
    ("ramplus_tl", dict(r=0.0, epsilon=0.1), [0.5, 0.5, 0, 1, -0.5]),  # r 0: ram
])
def test_ram_hand_worked(method, params, want):
    base = np.full(5, -1.0)
    models = [base + d for d in RAM_DELTAS]
    got, _ = run(method, base, models, **params)
    np.testing.assert_allclose(got, base + np.array(want), rtol=0, atol=1e-6)
    fn = ref.ram if method == "ram" else ref.ramplus_tl
    np.testing.assert_allclose(fn(base, models, **params), base + np.array(want), atol=1e-7)


def test_nearswap_hand_worked():
    """t 0.5: w = clamp(0.5 / |x - b|, 0, 1) -> distances 0.25, 1, 2, 0 give w = 1, 0.5, 0.25, 1 (the floor 1e-6)."""
    base = np.array([1.0, 0.0, 0.0, 3.0])
    model = np.array([1.25, 1.0, -2.0, 3.0])
    got, _ = run("nearswap", base, [model], t=0.5)
    np.testing.assert_allclose(got, [1.25, 0.5, -0.5, 3.0], rtol=0, atol=1e-7)
    got, _ = run("nearswap", base, [model], t=0.0)
    np.testing.assert_array_equal(got, base)  # t 0: the base, exactly


def test_arcee_fusion_keeps_exactly_the_outliers_of_importance():
    """The kept entries are those of importance >= median + 1.5 IQR, the reported share is theirs, and the rest
    is the base bit for bit."""
    base, (model,) = exact_problem((16, 12), 1, seed=4)
    assert_no_importance_near_the_threshold(base, model)
    want, importance, threshold = ref.arcee_fusion(base, model)
    kept = importance >= threshold
    assert 0 < kept.mean() < 0.5
    got, ctx = run("arcee_fusion", base, [model])
    np.testing.assert_array_equal(got[~kept], base[~kept])
    np.testing.assert_allclose(got[kept], model[kept], rtol=0, atol=1e-6)
    assert ctx.stats["kept_fraction"] == pytest.approx(kept.mean())


def test_arcee_fusion_quartiles_hand_worked():
    """A 1-D tensor is one row: one KL for all its entries, so importance is |x - b| times one number. Distances
    (times 2^-4) 2 0 9 1 3 0 6 2 1, sorted 0 0 1 1 2 2 3 6 9: q1 (index 2) = 1, median (4) = 2, q3 (6) = 3 ->
    threshold 2 + 1.5 (3 - 1) = 5: the entries at distance 9 and 6 take the model's value."""
    base = np.zeros(9)
    distance = np.array([2, 0, 9, 1, 3, 0, 6, 2, 1]) / 16.0
    model = base + distance * np.where(np.arange(9) % 2 == 0, 1.0, -1.0)
    got, ctx = run("arcee_fusion", base, [model])
    np.testing.assert_array_equal(got, np.where(distance >= 5 / 16, model, base))
    assert ctx.stats["kept_fraction"] == pytest.approx(2 / 9)


def test_arcee_fusion_few_changed_rows_are_taken_whole():
    """Rows the model left alone have KL 0, hence importance 0: with 2 changed rows of 8, q1 = median = q3 = 0, the
    threshold is 0, and both changed rows are taken whole, small changes included."""
    base, (model,) = exact_problem((8, 6), 1, seed=5)
    model = np.where(np.arange(8)[:, None] < 6, base, model)
    model[6, 0] = base[6, 0] + 2**-16  # a tiny change in a changed row is taken too
    got, ctx = run("arcee_fusion", base, [model])
    np.testing.assert_array_equal(got[:6], base[:6])
    np.testing.assert_allclose(got[6:], model[6:], rtol=0, atol=1e-6)
    assert ctx.stats["kept_fraction"] == 1.0


# ---- edge cases --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,params", [("sce", {}), ("sce", {"select_topk": 0.4}), ("ram", {}),
                                           ("ramplus_tl", {}), ("nearswap", {"t": 0.1}), ("arcee_fusion", {})])
def test_unchanged_models_give_the_base(method, params):
    """All task vectors zero: the base, finite and bit for bit (no 0/0 anywhere)."""
    base, _ = exact_problem((5, 7), 1, seed=9)
    n_models = 1 if method in ONE_MODEL else 3
    got, _ = run(method, base, [base.copy() for _ in range(n_models)], **params)
    np.testing.assert_array_equal(got, base)


def test_one_model():
    """sce: select_topk 1 returns the model (1 ulp), below 1 no entry has variance and the base comes back; ram
    and ramplus_tl (every changed entry is unique, rho = 0, lambda = 1) return the entries above epsilon."""
    base, (model,) = ram_problem((6, 10), 1, seed=12)
    np.testing.assert_allclose(run("sce", base, [model])[0], model, rtol=0, atol=1e-6 * np.abs(model).max())
    np.testing.assert_array_equal(run("sce", base, [model], select_topk=0.9)[0], base)
    above = np.where(np.abs(model - base) > 0.3, model, base)
    for method in ("ram", "ramplus_tl"):
        np.testing.assert_allclose(run(method, base, [model], epsilon=0.3)[0], above, rtol=0, atol=1e-6)


def test_sce_tied_variances_are_taken_lowest_index_first():
    """Six entries with the same variance; keeping floor(0.5 * 6) = 3 keeps the first three."""
    base = np.zeros(6)
    d = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    got, _ = run("sce", base, [base + d, base + 3 * d], select_topk=0.5)
    np.testing.assert_allclose(got[3:], 0.0, atol=0)
    assert np.all(got[:3] != 0)


def test_ramplus_tl_model_with_nothing_unique_stays_finite():
    """A model that changes entries only together with others has unique count 0: rho = shared / epsilon is
    capped at alpha, and no NaN reaches the result."""
    base = np.zeros(4)
    models = [base + np.array([1.0, 1.0, 0.0, 0.0]), base + np.array([1.0, 0.0, 1.0, 0.0])]
    got, _ = run("ramplus_tl", base, models, r=1.0, alpha=0.5)
    # model 2: entry 0 shared, entry 2 alone -> rho 1 -> lambda 1.5; model 1 likewise for entry 1
    np.testing.assert_allclose(got, [1.0, 1.5, 1.5, 0.0], atol=1e-6)
    models = [base + np.array([1.0, 1.0, 0.0, 0.0]), base + np.array([1.0, 1.0, 1.0, 0.0])]
    got, _ = run("ramplus_tl", base, models, r=1.0, alpha=0.5)  # model 1 has no unique entry
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [1.0, 1.0, 1.5, 0.0], atol=1e-6)


def test_methods_do_not_write_to_the_base():
    """run() asserts the base is left as it was; every method and a 3-D tensor."""
    base, models = ram_problem((3, 4, 5), 3, seed=21)
    for method in SELECTION:
        params = {"t": 0.5} if method == "nearswap" else {}
        run(method, base, models[:1] if method in ONE_MODEL else models, **params)


# ---- parameters ------------------------------------------------------------------------------------------------


def test_defaults_are_mergekits():
    assert get_method("sce").defaults(2) == {"select_topk": 1.0, "int8_mask": False}
    assert get_method("ram").defaults(2) == {"epsilon": 1e-5}
    assert get_method("ramplus_tl").defaults(2) == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert get_method("arcee_fusion").defaults(1) == {}
    nearswap = get_method("nearswap")
    message = nearswap.check(nearswap.defaults(1))
    assert "`t` has no default" in message
    for method in SELECTION:
        spec = get_method(method)
        assert spec.needs_base and not spec.random, method
        assert (spec.min_models, spec.max_models) == ((1, 1) if method in ONE_MODEL else (1, None)), method


@pytest.mark.parametrize("method,key,value,fragments", [
    ("sce", "select_topk", 1.5, ["select_topk", "out of range", "[0, 1]"]),
    ("sce", "select_topk", -0.1, ["select_topk", "[0, 1]"]),
    ("sce", "select_topk", float("nan"), ["select_topk", "must be a finite number"]),
    ("nearswap", "t", -0.01, ["`t: -0.01`", "out of range", "[0, inf]"]),
    ("nearswap", "t", "small", ["`t: 'small'`", "must be a finite number"]),
    ("ram", "epsilon", -1e-5, ["epsilon", "out of range", "[0, inf]"]),
    ("ramplus_tl", "epsilon", 0.0, ["epsilon", "out of range", "(0, inf]"]),
    ("ramplus_tl", "r", -0.1, ["`r: -0.1`", "[0, inf]"]),
    ("ramplus_tl", "alpha", -1.0, ["`alpha: -1.0`", "[0, inf]"]),
])
def test_param_check_rejects_with_key_and_range(method, key, value, fragments):
    assert_param_refused(method, key, value, "parameters (tensor w)", fragments)


# ---- the CLI on a tiny family ------------------------------------------------------------------------------------

CLI_PARAMETERS = {"sce": {"select_topk": 0.5}, "arcee_fusion": {}, "nearswap": {"t": 0.001}, "ram": {},
                  "ramplus_tl": {"r": 0.5, "alpha": 0.5}}


def selection_config(tmp_path, method, family, **top):
    models = [{"model": str(p)} for p in family["experts"][:1 if method in ONE_MODEL else 3]]
    parameters = {**CLI_PARAMETERS[method], **top}
    return write_config(tmp_path / f"{method}.yaml", method, family, models=models, dtype="float32",
                        **({"parameters": parameters} if parameters else {}))


def test_methods_command_lists_them():
    listing = "\n" + run_cli("methods").stdout
    for method in SELECTION:
        assert f"\n{method}: " in listing, method
    assert "select_topk [global, float in [0, 1], default 1.0]" in run_cli("methods", "sce").stdout
    assert "t [global, float in [0, inf], default None]" in run_cli("methods", "nearswap").stdout


@pytest.mark.parametrize("method", SELECTION)
def test_plan_and_merge_match_the_reference(tmp_path, family_fp32_single, method):
    """`distmerge plan` plans every tensor; `distmerge merge` writes what the reference computes, tensor by tensor."""
    cfg = selection_config(tmp_path, method, family_fp32_single)
    plan = run_cli("plan", cfg).stdout
    assert "tensors       21" in plan and "peak memory" in plan
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    merged, base = read_model(tmp_path / "out"), read_model(family_fp32_single["base"])
    n_models = 1 if method in ONE_MODEL else 3
    experts = [read_model(p) for p in family_fp32_single["experts"][:n_models]]
    p = get_method(method).defaults(n_models, **CLI_PARAMETERS[method])
    assert set(merged) == set(base)
    for name in base:
        b, xs = base[name].double().numpy(), [e[name].double().numpy() for e in experts]
        got = merged[name].double().numpy()
        if method == "arcee_fusion":
            assert_fusion_mask_matches_away_from_the_threshold(got, b, xs[0])
        else:
            assert_close(got, expected_result(method, b, xs, p))


def assert_fusion_mask_matches_away_from_the_threshold(got, base, model, band=1e-2):
    """Each entry is the base or the model; which one is the reference's choice, except within `band` (relative)
    of the threshold. The experts' gentle changes make the KL divergences small differences of nearly equal
    terms: float32 computes them to about 1e-3 relative, so entries that close to the threshold may go either
    way (mergekit computes the same float32 numbers: the parity run compares the bytes)."""
    _, importance, threshold = ref.arcee_fusion(base, model)
    took_model = got != base
    np.testing.assert_allclose(got[took_model], model[took_model], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[~took_model], base[~took_model])
    changed = model != base
    differs = changed & (took_model != (importance >= threshold))
    assert np.all(np.abs(importance[differs] - threshold) <= band * threshold), "a clear-cut entry was misjudged"
    assert differs.sum() <= 0.01 * changed.sum()


@pytest.mark.parametrize("method,change,fragments", [
    ("nearswap", {"parameters": {}}, ["nearswap", "`t` has no default"]),
    ("nearswap", {"models": 2}, ["nearswap", "exactly 1 model(s) besides the base model", "got 2"]),
    ("arcee_fusion", {"models": 3}, ["arcee_fusion", "exactly 1 model(s)", "got 3"]),
    ("sce", {"parameters": {"weight": 0.5}}, ["`weight`", "not a parameter of sce", "select_topk"]),
    ("ram", {"parameters": {"epsilon": -1.0}}, ["`epsilon: -1.0`", "out of range"]),
])
def test_bad_configs_are_refused_before_merging(tmp_path, family_fp32_single, method, change, fragments):
    cfg = selection_config(tmp_path, method, family_fp32_single)
    doc = yaml.safe_load(cfg.read_text())
    if "models" in change:
        doc["models"] = [{"model": str(p)} for p in family_fp32_single["experts"][:change["models"]]]
    if "parameters" in change:
        doc["parameters"] = change["parameters"]
    cfg.write_text(yaml.safe_dump(doc))
    assert_user_error(run_cli("plan", cfg, check=False), *fragments)
