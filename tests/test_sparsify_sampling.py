"""Building blocks of the elementwise family: exact selection (sparsify.py) against NumPy sorts, and the
counter-based uniforms (sampling.py) against a pure-Python SplitMix64 written from its docstring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref

from distmerge.methods import TensorContext, sampling
from distmerge.methods.sparsify import (
    breadcrumbs_mask,
    della_keep_probability,
    kth_largest,
    magnitude_histogram,
    magnitude_keep_count,
    rescale_kept,
    threshold_from_histogram,
    top_k_mask,
)

CPU = torch.device("cpu")


# ---- magnitude inputs --------------------------------------------------------------------------------------------


def magnitudes(kind: str, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Non-negative float32 test vectors of several shapes of distribution."""
    gen = np.random.default_rng(seed)
    if kind == "uniform":
        x = gen.random(n)
    elif kind == "heavy":  # Cauchy magnitudes: a few entries 1e3 - 1e5 times the median
        x = np.abs(gen.standard_cauchy(n))
    elif kind == "lognormal":  # spans many binades, with tiny and huge values
        x = gen.lognormal(0.0, 6.0, n)
    elif kind == "ties":  # rounded to bfloat16: many entries share a value, and share the top 16 bits
        x = torch.tensor(np.abs(gen.standard_normal(n)), dtype=torch.bfloat16).float().numpy()
    elif kind == "few_values":  # only four distinct values, zero among them
        x = gen.choice([0.0, 0.5, 1.0, 2.0], size=n)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "subnormal":  # float32 subnormals and normals mixed, with exact zeros
        x = np.concatenate([gen.random(n // 2) * 1e-40, gen.random(n - n // 2)])
        x[::7] = 0.0
        gen.shuffle(x)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


KINDS = ["uniform", "heavy", "lognormal", "ties", "few_values", "zeros", "subnormal"]


def ks_for(n):
    return sorted({1, 2, n // 3, n // 2, n - 1, n})


# ---- kth_largest -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kth_largest_is_numpys_sorted_value(kind):
    x = magnitudes(kind, 1000, seed=len(kind))
    descending = np.sort(x)[::-1]
    t = torch.from_numpy(x)
    for k in ks_for(x.size):
        got = kth_largest(t, k)
        assert got == float(descending[k - 1]), (k, got, descending[k - 1])


def test_kth_largest_on_a_2d_tensor_and_a_single_entry():
    x = magnitudes("heavy", 60, seed=3).reshape(6, 10)
    descending = np.sort(x.ravel())[::-1]
    for k in (1, 17, 60):
        assert kth_largest(torch.from_numpy(x), k) == float(descending[k - 1])
    assert kth_largest(torch.tensor([0.375]), 1) == 0.375


# ---- top_k_mask --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "heavy", "ties", "few_values", "zeros"])
@pytest.mark.parametrize("prefer_low_index", [True, False])
def test_top_k_mask_is_a_stable_sort_prefix(kind, prefer_low_index):
    """Exactly k entries; the same ones as a stable NumPy sort (equal values: lowest index first, or highest)."""
    x = magnitudes(kind, 500, seed=7)
    t = torch.from_numpy(x)
    for k in ks_for(x.size) + [0]:
        mask = top_k_mask(t, k, prefer_low_index=prefer_low_index)
        assert mask.dtype == torch.bool and mask.shape == t.shape
        assert int(mask.sum()) == k, k
        np.testing.assert_array_equal(mask.numpy(), ref.top_k_mask(x, k, prefer_low_index), err_msg=f"k={k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_mask_of_a_bfloat16_fine_tunes_task_vector(dtype):
    """A task vector of a bfloat16 fine-tune is a few ulps of its weights: at k = n / 2 a fifth of it shares the
    k-th largest's top 16 bits, and all of those its exact value (at k = 9000, 2620 of them). In every compute dtype, exactly the entries a stable
    NumPy sort of those values puts first."""
    gen = np.random.default_rng(11)
    base = torch.tensor(gen.standard_normal(40_000), dtype=torch.bfloat16).float()
    tuned = (base + 0.01 * torch.tensor(gen.standard_normal(40_000), dtype=torch.float32)).bfloat16().float()
    delta = (tuned - base).to(dtype)
    x = delta.double().numpy()
    for k in (1, 9_000, 20_000, 39_999):
        mask = top_k_mask(delta, k)
        assert int(mask.sum()) == k
        np.testing.assert_array_equal(mask.numpy(), ref.top_k_mask(np.abs(x), k, True), err_msg=f"k={k}")


def test_top_k_mask_ties_by_index_hand_worked():
    x = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0, 1.0])
    # top 3: 3 and 2, then one of the four 1.0s: index 0 (low first) or index 5 (high first)
    assert top_k_mask(x, 3).tolist() == [True, True, False, True, False, False]
    assert top_k_mask(x, 3, prefer_low_index=False).tolist() == [False, True, False, True, False, True]
    assert top_k_mask(x, 4).tolist() == [True, True, True, True, False, False]
    assert top_k_mask(x, 4, prefer_low_index=False).tolist() == [False, True, False, True, True, True]


def test_top_k_mask_keeps_shape_and_reads_views_in_logical_order():
    x = magnitudes("ties", 48, seed=2).reshape(6, 8)
    view = torch.from_numpy(x).t()  # non-contiguous
    for k in (1, 13, 24, 47):
        for low in (True, False):
            mask = top_k_mask(view, k, prefer_low_index=low)
            assert mask.shape == view.shape
            np.testing.assert_array_equal(mask.numpy(), ref.top_k_mask(x.T, k, low))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_mask_ranks_signed_values_by_magnitude(dtype):
    """Magnitudes that float32 cannot tell apart (float64 neighbours) and signed ties are still ranked exactly."""
    gen = np.random.default_rng(5)
    x = gen.standard_normal(400).astype(dtype)
    x[:40] = np.where(np.arange(40) % 2, 1.0, -1.0) * (1 + np.arange(40) * 1e-12)  # distinct only in float64
    x[40:80] = np.where(np.arange(40) % 3, 0.5, -0.5)  # exact ties of both signs
    for k in (1, 20, 41, 60, 200, 399):
        for low in (True, False):
            mask = top_k_mask(torch.from_numpy(x), k, prefer_low_index=low)
            np.testing.assert_array_equal(mask.numpy(), ref.top_k_mask(np.abs(x), k, low), err_msg=f"k={k}")


def test_top_k_mask_float64_keeps_exactly_k():
    gen = np.random.default_rng(0)
    for _ in range(10):
        x = np.abs(gen.standard_normal(300))
        for k in (1, 50, 150, 299):
            mask = top_k_mask(torch.from_numpy(x), k)
            np.testing.assert_array_equal(mask.numpy(), ref.top_k_mask(x, k), err_msg=f"k={k}")


def test_magnitude_keep_count_floors_and_keeps_at_least_one():
    assert magnitude_keep_count(0.5, 7) == 3
    assert magnitude_keep_count(0.001, 100) == 1
    assert magnitude_keep_count(1.0, 10) == 10
    assert magnitude_keep_count(0.25, 8) == 2


# ---- breadcrumbs_mask --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "ties", "few_values"])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (0.6, 0.0), (1.0, 0.05),
                                           (0.05, 0.5)])
def test_breadcrumbs_mask_keeps_ranks_n_bot_to_n_bot_plus_keep(kind, density, gamma):
    """Stable ascending ranks (equal values: index order); kept ranks are [n_bot, n_bot + keep)."""
    x = magnitudes(kind, 301, seed=5).reshape(7, 43)
    mask = breadcrumbs_mask(torch.from_numpy(x), density, gamma)
    assert mask.shape == x.shape
    want = ref.breadcrumbs_mask(x, density, gamma)
    np.testing.assert_array_equal(mask.numpy(), want)
    assert int(mask.sum()) == int(density * x.size)


def test_breadcrumbs_mask_hand_worked_ties():
    x = torch.tensor([2.0, 1.0, 2.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    # ascending stable ranks: 1.0@1 1.0@3 1.0@6 | 2.0@0 2.0@2 2.0@5 3.0@4 3.0@7
    # density 0.5 -> keep 4; gamma 0.125 -> drop 1 top; n_bot = 8 - 4 - 1 = 3 -> ranks 3..6:
    # 2.0@0 2.0@2 2.0@5 3.0@4 ; dropped: the three 1.0s and 3.0@7
    assert breadcrumbs_mask(x, 0.5, 0.125).tolist() == [True, False, True, False, True, True, False, False]
    # gamma 0.25 -> drop 2 top; n_bot = 2 -> ranks 2..5: 1.0@6 2.0@0 2.0@2 2.0@5
    assert breadcrumbs_mask(x, 0.5, 0.25).tolist() == [True, False, True, False, False, True, True, False]


# ---- della_keep_probability --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 9), (13,), (3, 4, 5), (4, 1), (1, 6)])
@pytest.mark.parametrize("kind", ["uniform", "ties", "few_values"])
def test_della_keep_probability_follows_row_ranks(shape, kind):
    n = int(np.prod(shape))
    x = magnitudes(kind, n, seed=n).reshape(shape)
    for density, epsilon in [(0.5, 0.15), (0.3, 0.25), (0.8, 0.2), (0.5, 0.0)]:
        got = della_keep_probability(torch.from_numpy(x), density, epsilon)
        assert got.shape == x.shape
        want = ref.della_probability(x, density, epsilon)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-6)
        if x.ndim >= 2 and x.reshape(shape[0], -1).shape[1] > 1:
            rows = got.reshape(shape[0], -1)
            assert torch.allclose(rows.min(1).values, torch.tensor(density - epsilon), atol=1e-6)
            assert torch.allclose(rows.max(1).values, torch.tensor(density + epsilon), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["ties", "subnormal", "few_values", "lognormal"])
def test_della_keep_probability_ranks_blocks_of_rows_in_float32_and_float64(kind, dtype):
    """A tensor of several rank blocks (ranked on several threads), in both compute dtypes: every rank is the
    entry's place in a stable sort of its row (one rank apart is 2 epsilon / 999 = 3e-4)."""
    x = magnitudes(kind, 700 * 1000, seed=3).reshape(700, 1000)
    got = della_keep_probability(torch.from_numpy(x).to(dtype), 0.5, 0.15)
    assert got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), ref.della_probability(x, 0.5, 0.15), rtol=0, atol=1e-6)


# ---- histogram thresholds ----------------------------------------------------------------------------------------


def bits16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).view(np.int32) >> 16


def test_magnitude_histogram_counts_top_16_bits():
    x = np.concatenate([magnitudes("lognormal", 500, 1), magnitudes("ties", 500, 2), magnitudes("zeros", 10)])
    counts = magnitude_histogram(torch.from_numpy(x))
    assert counts.shape == (1 << 15,)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(bits16(x), minlength=1 << 15))


@pytest.mark.parametrize("kind", ["uniform", "heavy", "lognormal", "ties"])
def test_threshold_from_histogram_keeps_at_least_k_and_at_most_a_bucket_more(kind):
    """Summed over several tensors (as the global TIES pass does): |d| >= threshold keeps >= k entries and at most
    k + (count of the threshold's bucket); the threshold is the lower edge of the k-th largest's bucket."""
    parts = [magnitudes(kind, n, seed=s) for s, n in enumerate([300, 1000, 77])]
    everything = np.concatenate(parts)
    counts = sum(magnitude_histogram(torch.from_numpy(p)) for p in parts)
    descending = np.sort(everything)[::-1]
    total = everything.size
    for k in ks_for(total) + [10, 500]:
        threshold = threshold_from_histogram(counts, k)
        kept = int((everything >= threshold).sum())
        bucket = int(bits16(np.array([threshold]))[0])
        assert k <= kept <= k + int(counts[bucket]), (k, kept)
        edge = (descending[k - 1:k].view(np.int32) & np.int32(-65536)).view(np.float32)[0]
        assert threshold == float(edge)


def test_threshold_from_histogram_edges():
    x = magnitudes("uniform", 100)
    counts = magnitude_histogram(torch.from_numpy(x))
    assert threshold_from_histogram(counts, 0) == float("inf")
    assert threshold_from_histogram(counts, -3) == float("inf")
    # k beyond the count: keep everything
    assert int((x >= threshold_from_histogram(counts, 1000)).sum()) == 100
    assert threshold_from_histogram(magnitude_histogram(torch.zeros(5)), 3) == 0.0


# ---- rescale_kept ------------------------------------------------------------------------------------------------


def test_rescale_kept_l1_restores_the_l1_norm():
    gen = np.random.default_rng(4)
    d = gen.standard_normal((6, 7)).astype(np.float32)
    kept = gen.random((6, 7)) < 0.4
    out = rescale_kept(torch.from_numpy(d.copy()), torch.from_numpy(kept), "l1")
    assert out.abs().sum().item() == pytest.approx(float(np.abs(d).sum()), rel=1e-6)
    np.testing.assert_allclose(out.numpy(), ref.rescale(d, kept, "l1"), rtol=1e-6)
    assert np.all(out.numpy()[~kept] == 0)


def test_rescale_kept_inverse_none_and_nothing_kept():
    d = torch.tensor([[1.0, -2.0, 4.0], [0.5, 3.0, -1.0]])
    kept = torch.tensor([[True, False, True], [True, True, False]])
    out = rescale_kept(d.clone(), kept, "inverse", keep_probability=0.25)
    assert out.tolist() == [[4.0, 0.0, 16.0], [2.0, 12.0, 0.0]]
    probability = torch.tensor([[0.5, 0.5, 0.8], [0.25, 0.6, 0.1]])
    out = rescale_kept(d.clone(), kept, "inverse", keep_probability=probability)
    np.testing.assert_allclose(out.numpy(), [[2.0, 0.0, 5.0], [2.0, 5.0, 0.0]], rtol=1e-6)
    assert rescale_kept(d.clone(), kept, "none").tolist() == [[1.0, 0.0, 4.0], [0.5, 3.0, 0.0]]
    # in place
    target = d.clone()
    assert rescale_kept(target, kept, "none") is target
    # nothing kept: zeros, not NaN
    out = rescale_kept(d.clone(), torch.zeros_like(kept), "l1")
    assert torch.equal(out, torch.zeros_like(d))


# ---- sampling.uniform --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,name,index", [(0, "w", 0), (12345, "model.layers.7.mlp.down_proj.weight", 3),
                                             (2**40 + 5, "émbed", 17)])
def test_uniform_matches_pure_python_splitmix64(seed, name, index):
    key = ref.stream_key(seed, name, index)
    assert sampling.stream_key(seed, name, index) == key
    head = sampling.uniform(seed, name, index, (8,), CPU)
    assert head.dtype == torch.float32
    assert head.tolist() == [ref.uniform_draw(key, i) for i in range(8)]
    start = 1_000_003
    tail = sampling.uniform(seed, name, index, (2, 3), CPU, start=start)
    assert tail.reshape(-1).tolist() == [ref.uniform_draw(key, start + i) for i in range(6)]
    far = 2**62 + 11  # counters wrap modulo 2^64 like the Python integers reduced by the mask
    assert sampling.uniform(seed, name, index, (3,), CPU, start=far).tolist() == [
        ref.uniform_draw(key, far + i) for i in range(3)]


def test_uniform_whole_equals_pieces():
    whole = sampling.uniform(5, "t", 2, (1000,), CPU)
    pieces = torch.cat([sampling.uniform(5, "t", 2, (n,), CPU, start=s)
                        for s, n in [(0, 1), (1, 299), (300, 512), (812, 188)]])
    assert torch.equal(whole, pieces)
    assert torch.equal(sampling.uniform(5, "t", 2, (10, 100), CPU).reshape(-1), whole)
    # row chunks of a 2-D tensor: rows 4..7 start at 4 * 100
    assert torch.equal(sampling.uniform(5, "t", 2, (3, 100), CPU, start=400), whole[400:700].reshape(3, 100))


def test_uniform_across_the_internal_chunk_boundary():
    chunk = sampling._CHUNK_CPU
    n = chunk + 600
    whole = sampling.uniform(9, "big", 1, (n,), CPU, start=3)
    piece = sampling.uniform(9, "big", 1, (1000,), CPU, start=3 + chunk - 400)
    assert torch.equal(whole[chunk - 400:], piece)
    key = ref.stream_key(9, "big", 1)
    for i in (0, chunk - 1, chunk, n - 1):
        assert whole[i].item() == ref.uniform_draw(key, 3 + i)


def test_uniform_streams_differ_by_seed_name_and_model_index():
    a = sampling.uniform(0, "w", 0, (4096,), CPU)
    for other in (sampling.uniform(1, "w", 0, (4096,), CPU), sampling.uniform(0, "w2", 0, (4096,), CPU),
                  sampling.uniform(0, "w", 1, (4096,), CPU)):
        assert float((a == other).float().mean()) < 0.01
        assert abs(float(np.corrcoef(a.numpy(), other.numpy())[0, 1])) < 0.06


def test_uniform_range_resolution_and_moments():
    x = sampling.uniform(2024, "stats", 0, (1_000_000,), CPU).double().numpy()
    assert x.min() >= 0.0 and x.max() < 1.0
    assert np.all(x * 2**24 == np.floor(x * 2**24))  # 24 random bits each
    assert abs(x.mean() - 0.5) < 2e-3  # standard error 2.9e-4
    assert abs(x.var() - 1 / 12) < 2e-3
    hist = np.bincount((x * 10).astype(int), minlength=10)
    assert np.all(np.abs(hist - 100_000) < 2_000)  # each decile within ~6 standard deviations


def test_context_uniform_keys_by_model_index_and_stream():
    ctx = TensorContext(name="layer.w", seed=3, model_ids=(4, 1))
    assert torch.equal(ctx.uniform(0, torch.Size([5, 6]), CPU), sampling.uniform(3, "layer.w", 4, (5, 6), CPU))
    assert torch.equal(ctx.uniform(1, torch.Size([30]), CPU, start=60),
                       sampling.uniform(3, "layer.w", 1, (30,), CPU, start=60))
    svd = ctx.uniform(1, torch.Size([30]), CPU, stream="svd")
    assert torch.equal(svd, sampling.uniform(3, "layer.w#svd", 1, (30,), CPU))
    assert not torch.equal(svd, ctx.uniform(1, torch.Size([30]), CPU))
