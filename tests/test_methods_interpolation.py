"""passthrough, nuslerp, multislerp and karcher against the NumPy references written from their definitions
(tests/reference.py), hand-worked edge cases (the ends of t, zero, parallel and opposite vectors, one model), what
a base_model is to each method (plans and merges through the CLI), and parameter validation.

Inputs are float32 values held in float64, so the float32 code and the float64 reference see the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference as ref
from conftest import assert_param_refused, run_cli, write_config
from safetensors.torch import load_file

from pathlib import Path

from distmerge.config import load_config
from distmerge.errors import ConfigError
from distmerge.methods import TensorContext, get_method
from distmerge.plan import build_plan

RTOL = 1e-5  # relative to the largest |expected| entry: float32 arithmetic against a float64 reference
NAME = "model.layers.1.mlp.down_proj.weight"


def problem(shape, n_models, seed, spread=0.1):
    """(base, [x_t]) in float64 holding float32 values: x_t = b + spread * noise (spread 1 or more: models far
    apart on the sphere)."""
    gen = np.random.default_rng(seed)
    as_float32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731
    base = as_float32(gen.standard_normal(shape))
    return base, [as_float32(base + spread * gen.standard_normal(shape)) for _ in range(n_models)]


def run(method, base, models, **overrides):
    """distmerge's result (float64 numpy) and the TensorContext it filled."""
    spec = get_method(method)
    params = spec.defaults(len(models), **overrides)
    if spec.check is not None:
        assert spec.check(params) is None
    ctx = TensorContext(name=NAME, model_ids=tuple(range(len(models))))
    base_t = None if base is None else torch.tensor(np.asarray(base), dtype=torch.float32)
    base_before = None if base_t is None else base_t.clone()
    out = spec.fn(base_t, torch.tensor(np.stack([np.asarray(x) for x in models]), dtype=torch.float32), params, ctx)
    assert out.dtype == torch.float32 and tuple(out.shape) == np.shape(models[0])
    if base_t is not None:
        assert torch.equal(base_t, base_before), "the method overwrote the base tensor"
    return out.double().numpy(), ctx


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rtol * scale, f"max error {err:.3e} vs scale {scale:.3e} (relative {err / scale:.3e})"


SHAPES = [(6, 10), (37,), (3, 4, 5)]


# ---- passthrough -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("scale", [1.0, 0.3, 0.0, -2.0])
def test_passthrough_is_the_model_times_its_scale(shape, scale):
    _, (model,) = problem(shape, 1, seed=1)
    got, _ = run("passthrough", None, [model], scale=[scale])
    assert_close(got, ref.passthrough(model, scale), rtol=1e-7)
    if scale == 1.0:
        assert np.array_equal(got, model)  # the same bits


# ---- nuslerp ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference(shape, flatten, row_wise, with_base):
    base, models = problem(shape, 2, seed=len(shape) + 2 * flatten + row_wise, spread=1.0)
    weights = [1.0, 0.7]
    got, _ = run("nuslerp", base if with_base else None, models, weight=weights, nuslerp_flatten=flatten,
                 nuslerp_row_wise=row_wise)
    want = ref.nuslerp(models, weights, base if with_base else None, flatten=flatten, row_wise=row_wise)
    assert_close(got, want)


def test_nuslerp_row_wise_interpolates_the_columns_and_otherwise_the_rows():
    """Not flattened, each row (or, with row_wise, each column) is interpolated on its own: as the whole-vector
    slerp of that row (column) alone."""
    _, (a, b) = problem((5, 8), 2, seed=3, spread=1.0)
    rows, _ = run("nuslerp", None, [a, b], nuslerp_flatten=False)
    for i in range(5):
        assert_close(rows[i], ref.nuslerp([a[i], b[i]]))
    columns, _ = run("nuslerp", None, [a, b], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(8):
        assert_close(columns[:, j], ref.nuslerp([a[:, j], b[:, j]]))
    assert np.max(np.abs(rows - columns)) > 1e-3


@pytest.mark.parametrize("weights,t", [([1.0, 0.0], 0.0), ([0.0, 2.0], 1.0), ([1.0, -1.0], 0.5),
                                       ([3.0, 1.0], 0.25), ([2.0, -1.0], -1.0)])
def test_nuslerp_weights_set_t(weights, t):
    """t = w_2 / (w_1 + w_2), 0.5 when the weights cancel; the ends return the models, beyond them it extrapolates
    along the great circle."""
    _, models = problem((4, 9), 2, seed=5, spread=1.0)
    got, _ = run("nuslerp", None, models, weight=weights)
    assert_close(got, ref.nuslerp(models, (1 - t, t)))
    if t in (0.0, 1.0):
        assert np.array_equal(got, models[int(t)])


def test_nuslerp_zero_vectors_are_at_a_right_angle():
    """A zero vector has cosine 0 with anything (its norm is raised to 1e-7, not divided by): theta = pi/2, so
    the result is sin((1 - t) pi/2) v0 + sin(t pi/2) v1, e.g. sin(3 pi / 8) v1 at t = 0.75 for a zero v0."""
    _, (a, b) = problem((3, 6), 2, seed=6, spread=1.0)
    a[1] = 0.0
    got, _ = run("nuslerp", None, [a, b], weight=[1.0, 3.0], nuslerp_flatten=False)
    assert_close(got[1], math.sin(3 * math.pi / 8) * b[1])
    assert_close(got, ref.nuslerp([a, b], (1.0, 3.0), flatten=False))
    whole, _ = run("nuslerp", None, [a, np.zeros_like(b)], weight=[1.0, 3.0])
    assert_close(whole, math.sin(math.pi / 8) * a)


@pytest.mark.parametrize("v1,want", [([0, 6, 0, 0], [0, 3.75, 0, 0]),  # parallel: 0.75 * 3 + 0.25 * 6
                                     ([0, -1, 0, 0], [0, 2.0, 0, 0])])  # opposite: 0.75 * 3 - 0.25 * 1
def test_nuslerp_parallel_and_opposite_vectors_interpolate_linearly(v1, want):
    got, _ = run("nuslerp", None, [np.array([0, 3.0, 0, 0]), np.array(v1, dtype=float)], weight=[3.0, 1.0])
    np.testing.assert_array_equal(got, want)


def test_nuslerp_nearly_parallel_vectors_are_the_linear_interpolation():
    """Nearly parallel: the spherical coefficients tend to 1 - t and t, so either branch gives the lerp."""
    _, (a,) = problem((7, 5), 1, seed=7)
    b = 2 * a + 1e-6 * np.sign(a)
    got, _ = run("nuslerp", None, [a, b], weight=[1.0, 0.7])
    t = 0.7 / 1.7
    assert_close(got, (1 - t) * a + t * b)


# ---- multislerp ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("n_models", [2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_reference(shape, n_models, with_base, normalize_weights):
    base, models = problem(shape, n_models, seed=10 * n_models + len(shape), spread=0.5)
    weights = [1.0, 0.7, 0.4, 1.3][:n_models]
    got, _ = run("multislerp", base if with_base else None, models, weight=weights,
                 normalize_weights=normalize_weights)
    want = ref.multislerp(models, weights, base if with_base else None, normalize_weights=normalize_weights)
    assert_close(got, want)


def test_multislerps_tangent_step_leaves_the_weighted_mean_direction():
    """The reference follows the method's write-up (tangent plane at the mean, exponential map back); the result
    is the normalised weighted mean of the unit vectors at the weighted mean norm (docs/methods.md), also with a
    large eps, where the exponential map shrinks it by cos(eps)."""
    base, models = problem((6, 7), 3, seed=12, spread=1.0)
    weights = np.array([0.5, 0.3, 0.2])
    deltas = [m - base for m in models]
    norms = [np.linalg.norm(d) for d in deltas]
    for eps in (1e-8, 0.05):
        direction = sum(w * d / (n + eps) for w, d, n in zip(weights, deltas, norms))
        closed_form = base + math.cos(eps) * np.dot(weights, norms) * direction / np.linalg.norm(direction)
        want = ref.multislerp(models, weights, base, eps=eps)
        np.testing.assert_allclose(want, closed_form, rtol=1e-12, atol=1e-12)
        got, _ = run("multislerp", base, models, weight=list(weights), eps=eps)
        assert_close(got, want)


def test_multislerp_of_one_model_is_that_model():
    base, (model,) = problem((5, 5), 1, seed=13)
    got, _ = run("multislerp", base, [model], weight=[0.3])
    assert np.array_equal(got, model)


def test_multislerp_parallel_task_vectors_add_their_weighted_norms():
    """d_2 = 3 d_1: one direction, length w_1 |d_1| + w_2 |d_2|: b + (0.25 + 0.75 * 3) d_1 with weights 1, 3."""
    base, (model,) = problem((4, 6), 1, seed=14)
    delta = model - base
    got, _ = run("multislerp", base, [base + delta, base + 3 * delta], weight=[1.0, 3.0])
    assert_close(got, base + 2.5 * delta)


def test_multislerp_balanced_opposite_pair_falls_back_to_the_weighted_sum():
    """d_2 = -2 d_1 with equal weights: the unit vectors cancel, so the result is 0.5 d_1 + 0.5 d_2 = -0.5 d_1.
    (|d_1| = 1 and |d_2| = 2: every step is exact in float32, the cancellation too.)"""
    base = np.array([1.0, 2.0, -1.0, 0.5])
    delta = np.array([0.5, -0.5, 0.5, -0.5])
    got, _ = run("multislerp", base, [base + delta, base - 2 * delta])
    assert_close(got, base - 0.5 * delta)


def test_multislerp_balanced_opposite_vectors_of_three_models_are_refused():
    base = np.zeros(4)
    delta = np.array([0.5, -0.5, 0.5, -0.5])
    with pytest.raises(ConfigError, match=rf"multislerp, tensor {NAME}: .*zero.*change the weights"):
        run("multislerp", base, [delta, -delta, 2 * delta], weight=[1.0, 2.0, 1.0])


def test_multislerp_without_task_vectors_is_the_base():
    """Every model equal to the base (a frozen tensor): the base, whatever the number of models."""
    base, _ = problem((3, 5), 0, seed=15)
    got, _ = run("multislerp", base, [base, base, base])
    assert np.array_equal(got, base)


def test_multislerp_zero_task_vector_adds_neither_direction_nor_length():
    base, models = problem((4, 5), 2, seed=16, spread=0.5)
    got, _ = run("multislerp", base, models + [base], weight=[1.0, 0.5, 0.5])
    assert_close(got, ref.multislerp(models + [base], [1.0, 0.5, 0.5], base))
    # with the weights normalised over all three, the direction is that of the two others, shorter by 1/2
    two, _ = run("multislerp", base, models, weight=[1.0, 0.5])
    assert_close(got - base, (two - base) * 1.5 / 2)


# ---- karcher ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_karcher_matches_reference_for_models_far_apart(shape, n_models):
    _, models = problem(shape, n_models, seed=20 + n_models + len(shape), spread=2.0)
    got, ctx = run("karcher", None, models)
    want, steps = ref.karcher(models)
    assert (steps > 0) == (n_models > 2)  # two directions: their normalised mean is the geodesic midpoint already
    assert ctx.stats["iterations"] == steps
    assert_close(got, want)


def test_karcher_of_close_models_is_the_normalised_mean_direction():
    """Fine-tunes of one base are close on the sphere: the normalised mean of the directions is already the
    Karcher mean to tol, no step is taken, and the result is that direction at the mean norm."""
    _, models = problem((8, 9), 3, seed=21, spread=0.01)
    got, ctx = run("karcher", None, models)
    assert ctx.stats["iterations"] == 0
    units = [m / np.linalg.norm(m) for m in models]
    direction = np.mean(units, axis=0)
    assert_close(got, np.mean([np.linalg.norm(m) for m in models]) * direction / np.linalg.norm(direction))


@pytest.mark.parametrize("overrides", [{"max_iter": 0}, {"max_iter": 1}, {"tol": 0.2}, {"tol": 1e-3}])
def test_karcher_parameters_match_reference(overrides):
    _, models = problem((6, 10), 3, seed=22, spread=2.0)
    got, ctx = run("karcher", None, models, **overrides)
    want, steps = ref.karcher(models, **overrides)
    assert ctx.stats["iterations"] == steps
    assert_close(got, want)


def test_karcher_resolves_small_angles():
    """Three models ~1e-3 rad apart and a fourth ~1.5e-4 rad from their mean: its angle is above tol but below what
    acos of a float32 dot product resolves (a cosine within 6e-8 of 1 rounds to 1, an angle of 0). Measured
    accurately, the normalised mean is the Karcher mean to tol (no step), as in float64."""
    gen = np.random.default_rng(25)
    base = gen.standard_normal((16, 16))
    models = [base + 1e-3 * gen.standard_normal((16, 16)) for _ in range(3)]
    models.append(np.mean(models, axis=0) + 2e-4 * gen.standard_normal((16, 16)))
    models = [m.astype(np.float32).astype(np.float64) for m in models]
    got, ctx = run("karcher", None, models)
    want, steps = ref.karcher(models)
    assert steps == 0 and ctx.stats["iterations"] == 0
    assert_close(got, want, rtol=5e-7)


def test_karcher_of_one_model_is_that_model():
    _, (model,) = problem((3, 3), 1, seed=23)
    got, _ = run("karcher", None, [model])
    assert np.array_equal(got, model)


def test_karcher_zero_model_has_no_direction_but_counts_in_the_mean_norm():
    _, models = problem((4, 6), 2, seed=24, spread=2.0)
    with_zero = models + [np.zeros((4, 6))]
    got, _ = run("karcher", None, with_zero)
    want, _ = ref.karcher(with_zero)
    assert_close(got, want)
    two, _ = run("karcher", None, models)
    assert_close(got, two * 2 / 3)  # the same direction, at (|x_1| + |x_2| + 0) / 3
    all_zero, _ = run("karcher", None, [np.zeros(5), np.zeros(5)])
    assert np.array_equal(all_zero, np.zeros(5))


@pytest.mark.parametrize("second,want", [([-1.0, 0, 0], [2.0, 0, 0]),  # opposite: the first direction
                                         ([6.0, 0, 0], [4.5, 0, 0])])  # parallel: that direction
def test_karcher_opposite_and_parallel_models(second, want):
    """Opposite directions average to zero, so the mean starts (and stays) at the first direction; at the mean
    norm (3 + 1) / 2. Parallel ones: that direction at (3 + 6) / 2."""
    got, ctx = run("karcher", None, [np.array([3.0, 0, 0]), np.array(second)])
    np.testing.assert_array_equal(got, want)
    assert ctx.stats["iterations"] == 0


# ---- what base_model is ----------------------------------------------------------------------------------------


def plan_of(tmp_path, method, family, models, base="family", **top):
    return build_plan(load_config(write_config(tmp_path / "cfg.yaml", method, family, models=models, base=base,
                                               **top)))


def real(paths) -> list[Path]:
    return [Path(p).resolve() for p in paths]


def read_model(path: Path) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(Path(path).glob("*.safetensors")) for name, t in load_file(file).items()}


def test_nuslerp_and_multislerp_take_a_given_base_as_origin(tmp_path, family_fp32_single):
    base, experts = family_fp32_single["base"], family_fp32_single["experts"]
    listed = [{"model": str(base)}] + [{"model": str(p)} for p in experts[:2]]
    plan = plan_of(tmp_path, "nuslerp", family_fp32_single, listed)  # the listed base is skipped
    assert plan.base is not None and real(m.path for m in plan.models) == real(experts[:2])
    plan = plan_of(tmp_path, "multislerp", family_fp32_single, None, base=None)
    assert plan.base is None and len(plan.models) == 3


def test_nuslerp_needs_exactly_two_models_besides_the_base(tmp_path, family_fp32_single):
    with pytest.raises(ConfigError, match=r"nuslerp` needs exactly 2 model\(s\) besides the base model .*got 3"):
        plan_of(tmp_path, "nuslerp", family_fp32_single, None)
    with pytest.raises(ConfigError, match=r"nuslerp` needs exactly 2 model\(s\) under `models`, got 3$"):
        plan_of(tmp_path, "nuslerp", family_fp32_single, None, base=None)


def test_karcher_merges_a_base_model_as_one_more_model(tmp_path, family_fp32_single):
    """As mergekit does for a method that ignores the base: appended after the listed models, or where listed."""
    base, experts = family_fp32_single["base"], family_fp32_single["experts"]
    plan = plan_of(tmp_path, "karcher", family_fp32_single, None)
    assert real(m.path for m in plan.models) == real([*experts, base]) and plan.model_ids == (0, 1, 2, 3)
    listed = [{"model": str(experts[0])}, {"model": str(base)}, {"model": str(experts[1])}]
    plan = plan_of(tmp_path, "karcher", family_fp32_single, listed)
    assert real(m.path for m in plan.models) == real([experts[0], base, experts[1]])


def test_passthrough_takes_one_model_counting_a_base_model(tmp_path, family_fp32_single):
    base, experts = family_fp32_single["base"], family_fp32_single["experts"]
    with pytest.raises(ConfigError, match=r"passthrough` needs exactly 1 model\(s\) under `models`, got 2 "
                                          r"\(base_model counts: passthrough merges it as one more model"):
        plan_of(tmp_path, "passthrough", family_fp32_single, [{"model": str(experts[0])}])
    plan = plan_of(tmp_path, "passthrough", family_fp32_single, [{"model": str(base)}])
    assert real(m.path for m in plan.models) == real([base])


E2E = {
    "passthrough": dict(models=[{"model": "E0", "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                        {"value": 0.5}]}}], base=None),
    "nuslerp": dict(models=[{"model": "BASE"}, {"model": "E0", "parameters": {"weight": 1.0}},
                            {"model": "E1", "parameters": {"weight": 0.6}}], parameters={"nuslerp_flatten": False}),
    "multislerp": dict(models=[{"model": f"E{i}", "parameters": {"weight": w}} for i, w in enumerate((1.0, 0.5, 2.0))],
                       base=None),
    "karcher": dict(models=[{"model": "E0"}, {"model": "E1"}], parameters={"max_iter": 5}),
}


def e2e_expected(method, name, base, experts):
    if method == "passthrough":
        return ref.passthrough(experts[0], 0.0 if "o_proj" in name else 0.5)
    if method == "nuslerp":
        return ref.nuslerp(experts[:2], (1.0, 0.6), base, flatten=False)
    if method == "multislerp":
        return ref.multislerp(experts, (1.0, 0.5, 2.0))
    return ref.karcher(experts[:2] + [base], max_iter=5)[0]  # the base_model is the third model


@pytest.mark.parametrize("method", sorted(E2E))
def test_merge_plan_and_methods_through_the_cli(method, tmp_path, family_fp32_single):
    spec = E2E[method]
    paths = {"BASE": family_fp32_single["base"], **{f"E{i}": p for i, p in enumerate(family_fp32_single["experts"])}}
    models = [{**m, "model": str(paths[m["model"]])} for m in spec["models"]]
    top = {"parameters": spec["parameters"]} if "parameters" in spec else {}
    cfg = write_config(tmp_path / "cfg.yaml", method, family_fp32_single, models=models,
                       base=spec.get("base", "family"), **top)
    n_models = {"passthrough": 1, "nuslerp": 2, "multislerp": 3, "karcher": 3}[method]
    plan_text = run_cli("plan", cfg).stdout
    assert f"method        {method} ({n_models} models" in plan_text
    assert ("counting base model" in plan_text) == (method == "karcher")  # the base is one of karcher's models
    assert run_cli("methods", method).stdout.startswith(f"{method}: ")
    run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet")
    merged = read_model(tmp_path / "out")
    base = read_model(paths["BASE"])
    experts = [read_model(p) for p in family_fp32_single["experts"]]
    for name, tensor in merged.items():
        want = e2e_expected(method, name, base[name].double().numpy(), [e[name].double().numpy() for e in experts])
        assert_close(tensor.double().numpy(), want)


# ---- parameters ------------------------------------------------------------------------------------------------


def test_defaults_are_mergekits():
    assert get_method("passthrough").defaults(1) == {"scale": [1.0]}
    assert get_method("nuslerp").defaults(2) == {"weight": [1.0, 1.0], "nuslerp_flatten": True,
                                                 "nuslerp_row_wise": False}
    assert get_method("multislerp").defaults(2) == {"weight": [1.0, 1.0], "normalize_weights": True, "eps": 1e-8}
    assert get_method("karcher").defaults(2) == {"max_iter": 10, "tol": 1e-5}


@pytest.mark.parametrize("method,key,value,fragments", [
    ("karcher", "tol", 0.0, ["`tol: 0.0`", "out of range", "(0, inf]"]),
    ("karcher", "max_iter", -1, ["`max_iter: -1`", "out of range", "int in [0, inf]"]),
    ("karcher", "max_iter", 2.5, ["`max_iter: 2.5`", "must be an integer"]),
    ("multislerp", "eps", -1e-8, ["`eps: -1e-08`", "out of range", "(0, inf]"]),
    ("multislerp", "normalize_weights", "yes", ["normalize_weights", "true or false"]),
    ("nuslerp", "nuslerp_flatten", 1, ["nuslerp_flatten", "true or false"]),
    ("nuslerp", "nuslerp_row_wise", None, ["nuslerp_row_wise", "true or false"]),
    ("nuslerp", "weight", float("nan"), ["weight", "must be a finite number"]),
    ("passthrough", "scale", "half", ["scale", "must be a finite number"]),
])
def test_param_check_rejects_with_key_and_range(method, key, value, fragments):
    assert_param_refused(method, key, value, "parameters of model m1 (tensor w)", fragments)


def test_multislerp_refuses_normalizing_weights_that_sum_to_zero():
    spec = get_method("multislerp")
    message = spec.check(spec.defaults(2, weight=[1.0, -1.0]))
    assert message and "sum to zero" in message and "normalize_weights: false" in message
    assert spec.check(spec.defaults(2, weight=[1.0, -1.0], normalize_weights=False)) is None


def test_a_config_error_names_the_parameter(tmp_path, family_fp32_single):
    with pytest.raises(ConfigError, match=r"`tol: -1.0` is out of range"):
        plan_of(tmp_path, "karcher", family_fp32_single, None, base=None, parameters={"tol": -1})
    with pytest.raises(ConfigError, match=r"`nuslerp_flatten` is set once for the whole merge"):
        models = [{"model": str(p), "parameters": {"nuslerp_flatten": False}} for p in family_fp32_single["experts"]]
        plan_of(tmp_path, "nuslerp", family_fp32_single, models[:2], base=None)
