"""The same code on a GPU: results agree with the CPU's, random draws are identical, memory stays in budget.
Skipped where no CUDA device is visible (CI); run on a GPU machine with `python -m pytest -q tests/test_cuda.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_spectral as ref
from conftest import run_cli, write_config

from distmerge.methods import TensorContext, get_method
from distmerge.methods.sampling import uniform
from distmerge.methods.sparsify import kth_largest, top_k_mask

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(autouse=True)
def cuda_as_the_engine_sets_it_up():
    from distmerge.engine import resolve_device

    print(f"TF32 before: matmul {torch.backends.cuda.matmul.allow_tf32}, "
          f"precision {torch.get_float32_matmul_precision()}")
    resolve_device("cuda")


def test_random_draws_are_the_same_on_cpu_and_cuda():
    cpu = uniform(3, "model.layers.7.mlp.up_proj.weight", 2, (1000, 3000), "cpu")
    gpu = uniform(3, "model.layers.7.mlp.up_proj.weight", 2, (1000, 3000), "cuda")
    assert torch.equal(cpu, gpu.cpu())


def test_selection_is_the_same_on_cpu_and_cuda():
    values = torch.randn(3_000_000).abs().to(torch.bfloat16).float()  # many exact ties
    for k in (1, 12345, 1_500_000, 3_000_000):
        assert kth_largest(values, k) == kth_largest(values.cuda(), k)
        assert torch.equal(top_k_mask(values, k), top_k_mask(values.cuda(), k).cpu())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "model_stock", "slerp"])
def test_elementwise_methods_agree_with_cpu(method):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 512, generator=gen) * 0.02
    n = 1 if method == "slerp" else 3
    models = base + 0.01 * torch.randn(n, 256, 512, generator=gen)
    spec = get_method(method)
    p = spec.defaults(n, **({"density": [0.4] * n} if "density" in {x.name for x in spec.params} else {}))

    def run(device):
        ctx = TensorContext("w", seed=1, model_ids=tuple(range(n)))
        return spec.fn(base.to(device), models.clone().to(device), p, ctx).cpu()

    cpu, gpu = run("cpu"), run("cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-7)


def well_posed_task_vector(rng, rows, cols, decay=0.95):
    """Distinct, decaying singular values: top-k subspaces are well defined."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    return 0.01 * (u * decay ** np.arange(cols)) @ v.T


@pytest.mark.parametrize("svd", ["exact", "gram", "auto"])
@pytest.mark.parametrize("method", ["tsvm", "rtsvm", "iso_c", "iso_cts"])
def test_spectral_methods_on_cuda_match_the_reference(method, svd):
    rng = np.random.default_rng(0)
    base = 0.02 * rng.standard_normal((300, 200))
    deltas = [well_posed_task_vector(rng, 300, 200) for _ in range(3)]
    spec = get_method(method)
    p = spec.defaults(3, **({"svd": svd} if method != "iso_c" else {}),
                      **({"outlier_weighting": False, "adaptive_rank": False} if method == "rtsvm" else {}))
    models = torch.tensor(np.stack([base + d for d in deltas]), dtype=torch.float32, device="cuda")
    out = spec.fn(torch.tensor(base, dtype=torch.float32, device="cuda"), models, p,
                  TensorContext("w", model_ids=(0, 1, 2))).cpu().double().numpy()
    expected = {"tsvm": ref.tsvm, "rtsvm": ref.tsvm, "iso_c": ref.iso_c, "iso_cts": ref.iso_cts}[method](base, deltas)
    # TSV-M stacks T*k = r singular vectors, so here V is 200 x 198 with condition number ~600: two correct float32
    # implementations (numpy's float64 reference against distmerge on the CPU included) differ by ~1e-4 relative,
    # iso_cts's projected residuals by ~7e-4. A wrong computation is off by far more.
    tolerance = 2e-3 if method == "iso_cts" else 5e-4
    assert np.linalg.norm(out - expected) <= tolerance * np.linalg.norm(expected - base)


@pytest.mark.parametrize("svd", ["exact", "gram", "auto"])
def test_rtsvm_candidates_on_cuda_match_the_cpu(svd):
    """Every rtsvm candidate on (heavy-tail task weights, spectral outliers, the model rank budget of a one-matrix
    model from its first pass): the GPU's merge is the CPU's, up to float32 round-off, with the same rank caps."""
    rng = np.random.default_rng(1)
    base = 0.02 * rng.standard_normal((300, 200))
    deltas = [well_posed_task_vector(rng, 300, 200) for _ in range(3)]
    spec = get_method("rtsvm")
    p = spec.defaults(3, svd=svd, task_weighting="kurtosis", spectrum_outliers=True, rank_allocation="model",
                      rank_budget=0.5)

    def merged(device, first_pass=None):
        models = torch.tensor(np.stack([base + d for d in deltas]), dtype=torch.float32, device=device)
        b = torch.tensor(base, dtype=torch.float32, device=device)
        ctx = TensorContext("w", model_ids=(0, 1, 2), first_pass=first_pass)
        if first_pass is None:
            return spec.first_pass.finish(spec.first_pass.statistic(b, models, p, ctx), p), None
        return spec.fn(b, models, p, ctx).cpu().double().numpy(), ctx.stats

    budget, _ = merged("cpu")
    assert merged("cuda")[0] == budget
    cpu, cpu_stats = merged("cpu", budget)
    cuda, cuda_stats = merged("cuda", budget)
    assert cuda_stats["rank_cap"] == cpu_stats["rank_cap"] and cuda_stats["rank_kept"] == cpu_stats["rank_kept"]
    np.testing.assert_allclose(cuda_stats["tail_weights"], cpu_stats["tail_weights"], rtol=1e-6)
    assert np.linalg.norm(cuda - cpu) <= 5e-4 * np.linalg.norm(cpu - base)


@pytest.mark.parametrize("method, svd", [(method, svd) for method in ("tsvm", "rtsvm", "iso_cts")
                                         for svd in ("exact", "gram", "auto")] + [("iso_c", None)])  # iso_c: no svd
def test_a_stack_on_cuda_is_decomposed_together_and_matches_the_cpu_loop(method, svd, monkeypatch):
    """A fused expert stack [E, rows, cols]: the GPU decomposes its matrices together (batched calls), the CPU one
    matrix at a time; each merged matrix agrees within the tolerances of the spectral tests above (CUDA against
    the reference), with the same ranks and routes. The default rtsvm: outlier weighting and the adaptive rank."""
    from distmerge.methods import linalg

    batch_dims = []
    real_gram64 = linalg.gram64

    def gram64(matrix):
        batch_dims.append(tuple(matrix.shape[:-2]))
        return real_gram64(matrix)

    monkeypatch.setattr(linalg, "gram64", gram64)
    rng = np.random.default_rng(2)
    experts, rows, cols = 6, 300, 200
    base = 0.02 * rng.standard_normal((experts, rows, cols))
    deltas = [np.stack([well_posed_task_vector(rng, rows, cols) for _ in range(experts)]) for _ in range(3)]
    spec = get_method(method)
    p = spec.defaults(3, **({"svd": svd} if svd else {}))

    def merged(device):
        models = torch.tensor(np.stack([base + d for d in deltas]), dtype=torch.float32, device=device)
        ctx = TensorContext("layers.0.mlp.experts.down_proj", model_ids=(0, 1, 2))
        out = spec.fn(torch.tensor(base, dtype=torch.float32, device=device), models, p, ctx)
        return out.cpu().double().numpy(), ctx.stats

    cpu, cpu_stats = merged("cpu")
    assert set(batch_dims) == {()}
    batch_dims.clear()
    cuda, cuda_stats = merged("cuda")
    assert batch_dims and () not in batch_dims
    tolerance = 2e-3 if method == "iso_cts" else 5e-4
    for e in range(experts):
        assert np.linalg.norm(cuda[e] - cpu[e]) <= tolerance * np.linalg.norm(cpu[e] - base[e]), e
    for key in ("rank_kept", "svd"):
        assert cuda_stats.get(key) == cpu_stats.get(key), key


def peak_beyond_inputs(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_tsvm_memory_is_the_inputs_plus_one_svds_workspace(svd):
    """On an embedding-shaped tensor (rows >> cols), beyond the T + 1 float32 input copies tsvm needs no more than
    one SVD of the tensor needs by itself, plus the stacked singular vectors ((rows + cols) x r)."""
    from distmerge.methods.linalg import full_svd

    rows, cols, n_tasks = 65536, 2048, 3
    spec = get_method("tsvm")
    base = torch.randn(rows, cols, device="cuda") * 0.02
    models = base + 0.01 * torch.randn(n_tasks, rows, cols, device="cuda")
    one_svd = peak_beyond_inputs(lambda: full_svd(models[0] - base, svd))
    merge = peak_beyond_inputs(lambda: spec.fn(base, models, spec.defaults(n_tasks, svd=svd),
                                               TensorContext("w", model_ids=(0, 1, 2))))
    stacked = (rows + cols) * cols * 4
    print(f"svd={svd}: one SVD {one_svd / 2**30:.2f} GiB, tsvm beyond inputs {merge / 2**30:.2f} GiB, "
          f"one tensor {rows * cols * 4 / 2**30:.2f} GiB")
    assert merge <= 1.1 * (one_svd + stacked)


def test_cli_merge_on_cuda_is_deterministic_and_close_to_cpu(tmp_path, family_bf16_sharded):
    cfg = write_config(tmp_path / "c.yaml", "rtsvm", family_bf16_sharded, dtype="float32", out_dtype="float32")
    for name, device in (("a", "cuda"), ("b", "cuda"), ("cpu", "cpu")):
        run_cli("merge", cfg, "-o", tmp_path / name, "--device", device, "--quiet")
    a = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.safetensors")}
    assert a == {p.name: p.read_bytes() for p in (tmp_path / "b").glob("*.safetensors")}
    from safetensors.torch import load_file

    for shard in (tmp_path / "cpu").glob("*.safetensors"):
        cpu, gpu = load_file(str(shard)), load_file(str(tmp_path / "a" / shard.name))
        for key in cpu:
            torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-4, atol=1e-5)
