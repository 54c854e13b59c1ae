"""What `distmerge plan` says a merge runs is what the merge runs: every decomposition the methods declare
(`MethodSpec.work`) is counted against the calls a real merge makes into the linear-algebra routines, per tensor,
for every spectral method and SVD backend; the SVD count and flops printed follow from the same list."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import pytest

from conftest import write_config

from distmerge import engine
from distmerge.config import load_config
from distmerge.estimates import describe, flops_by_route, svd_count
from distmerge.merge import merge
from distmerge.methods import linalg, spectral
from distmerge.methods.linalg import Decomposition
from distmerge.plan import build_plan


class DecompositionRecorder:
    """Wraps the routines that decompose a matrix and records, per tensor being merged, the outermost calls
    (a randomized SVD's inner SVD of its small projection is part of the randomized one)."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, list[Decomposition]] = defaultdict(list)
        self.tensor = None
        self.depth = 0
        routes = {
            "exact_svd": lambda m, *a, **k: Decomposition("exact", *m.shape),
            "gram_svd": lambda m, *a, **k: Decomposition("gram", *m.shape),
            "randomized_svd": lambda m, columns, power_iters, *a, **k: Decomposition(
                "randomized", *m.shape, min(columns, *m.shape), power_iters),
            "polar_via_gram": lambda m, *a, **k: Decomposition("polar", *m.shape),
            "singular_values_via_gram": lambda m, *a, **k: Decomposition("spectrum", *m.shape),
        }
        for name, describe_call in routes.items():
            wrapped = self._wrap(getattr(linalg, name), describe_call)
            monkeypatch.setattr(linalg, name, wrapped)
            if hasattr(spectral, name):
                monkeypatch.setattr(spectral, name, wrapped)
        real_merge_tensor = engine.merge_tensor

        def merge_tensor(plan, job, *args, **kwargs):
            self.tensor = job.name
            return real_merge_tensor(plan, job, *args, **kwargs)

        monkeypatch.setattr(engine, "merge_tensor", merge_tensor)

    def _wrap(self, fn, describe_call):
        def recorded(*args, **kwargs):
            if self.depth == 0:
                self.calls[self.tensor].append(describe_call(*args, **kwargs))
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return recorded


CASES = {
    "tsvm exact / polar svd": ("tsvm", {"svd": "exact", "polar": "svd"}),
    "tsvm gram / polar gram": ("tsvm", {"svd": "gram"}),
    "tsvm randomized": ("tsvm", {"svd": "randomized", "oversample": 4, "power_iters": 2}),
    "tsvm auto": ("tsvm", {}),
    "rtsvm fixed rank": ("rtsvm", {"adaptive_rank": False}),
    "rtsvm adaptive, gram": ("rtsvm", {"svd": "gram", "eta": 0.5}),
    "rtsvm adaptive, randomized": ("rtsvm", {"svd": "randomized", "eta": 0.5, "oversample": 2}),
    "rtsvm model ranks, adaptive, auto": ("rtsvm", {"rank_allocation": "model", "rank_budget": 0.7}),
    "rtsvm model ranks, fixed, randomized": ("rtsvm", {"rank_allocation": "model", "adaptive_rank": False,
                                                       "svd": "randomized", "oversample": 2}),
    "rtsvm every candidate": ("rtsvm", {"task_weighting": "kurtosis", "spectrum_outliers": True,
                                        "rank_allocation": "model", "rank_budget": 0.5}),
    "iso_c polar gram": ("iso_c", {}),
    "iso_c polar svd": ("iso_c", {"polar": "svd"}),
    "iso_cts auto (randomized task SVDs)": ("iso_cts", {"oversample": 0, "exclude": ["*embed*"]}),
    "iso_cts exact": ("iso_cts", {"svd": "exact", "common_fraction": 0.5}),
    "ties": ("ties", {"density": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_plan_declares_every_decomposition_the_merge_runs(case, tmp_path, family_fp32_single, monkeypatch):
    assert_the_plan_declares_what_the_merge_runs(case, family_fp32_single, tmp_path, monkeypatch)


def assert_the_plan_declares_what_the_merge_runs(case: str, family: dict, tmp_path, monkeypatch) -> None:
    """CASES[case] on `family`: per tensor, the decompositions the merge runs are those its plan declares."""
    method, parameters = CASES[case]
    cfg = load_config(write_config(tmp_path / "cfg.yaml", method, family, parameters=parameters))
    cfg = replace(cfg, engine=replace(cfg.engine, threads=1))
    plan = build_plan(cfg)
    recorder = DecompositionRecorder(monkeypatch)
    merge(cfg, tmp_path / "out", quiet=True)

    declared_svds = 0
    for job in plan.tensors:
        declared = Counter(job.work.decompositions)
        ran = Counter(recorder.calls.get(job.name, []))
        if job.work.upper_bound:  # ranks found from the data: what ran is within what was declared (the polar
            # factors of fewer stacked triplets are narrower)
            routes = lambda decompositions: Counter(d.route for d in decompositions)  # noqa: E731
            assert routes(ran.elements()) <= routes(declared.elements()), (job.name, ran, declared)
        else:
            assert ran == declared, (job.name, ran, declared)
        declared_svds += sum(1 for d in job.work.decompositions if d.is_svd)
        ran_flops = sum(d.flops() for d in ran.elements())
        declared_flops = sum(flops_by_route(job).values())
        assert ran_flops <= declared_flops if job.work.upper_bound else ran_flops == declared_flops

    ran_svds = sum(1 for calls in recorder.calls.values() for d in calls if d.is_svd)
    assert svd_count(plan) == declared_svds
    bound = any(job.work.upper_bound for job in plan.tensors)
    assert (ran_svds <= declared_svds) if bound else (ran_svds == declared_svds)
    summary = describe(plan, "cpu")
    assert f"SVDs          {'at most ' if bound else ''}{declared_svds}" in summary
    assert (ran_svds > 0) == (declared_svds > 0)  # a plan that declares SVDs sees the merge run them


def test_iso_c_with_the_gram_polar_factor_runs_no_svd(tmp_path, family_fp32_single):
    """The case that `distmerge plan` used to count as 48 SVDs on this family."""
    plan = build_plan(load_config(write_config(tmp_path / "cfg.yaml", "iso_c", family_fp32_single)))
    assert svd_count(plan) == 0
    two_d = [job for job in plan.tensors if len(job.shape) == 2]
    assert all({d.route for d in job.work.decompositions} == {"polar", "spectrum"} for job in two_d)
    assert "SVDs          0\n" in describe(plan, "cpu")
