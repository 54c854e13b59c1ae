"""Parity with mergekit 0.1.5: the same mergekit YAML through both tools, every output tensor compared.

    python benchmarks/compare_mergekit.py [--venv ~/.cache/distmerge/peers/mergekit-0.1.5] [--work DIR]
                                          [--methods ties,slerp] [--one-process-per-merge]

1. Creates (if missing) a scratch virtual environment outside the repository and installs `torch==2.13.0
   mergekit==0.1.5` into it (torch pinned exactly: the CPU wheel on disk, not a multi-GB CUDA build).
2. Writes a small Llama-shaped family (a base and three experts) four times: float32 and bfloat16, each as
   one model.safetensors and as shards with an index; and once more in float32 with the task vectors scaled
   down 500 times (gentle fine-tunes, where guards on tiny norms start to matter).
3. For every method both tools have, writes one mergekit YAML per input variant and merges it with
   `mergekit-yaml CFG OUT` (scratch venv) and `distmerge merge CFG -o OUT --quiet` (this venv). By default each
   tool runs all its configs in one Python process (peers/mergekit_batch.py, distmerge_batch.py), through the
   same click entry point its console script calls (start-up costs ~10 s per process here);
   `--one-process-per-merge` runs the console scripts themselves.
4. Compares every tensor (max abs and relative difference, differing elements, identical bytes) and writes
   benchmarks/results/mergekit_parity/mergekit_parity.md. Where a case of TIES, Breadcrumbs, SCE or model_stock
   differs beyond round-off, merges its config again in this process with distmerge's top-k tie-break (or
   model_stock's cosine) swapped for mergekit's (mergekit_parity/explain.py): agreement to round-off then proves
   the difference is only that documented one. Exits 1 when a deterministic method differs beyond float32
   round-off on float32 inputs, unless so proven (or in a case that mergekit_parity/cases.py exempts, with its
   reason, which the report shows), or when either tool fails on a config.

DARE and DELLA are random below density 1: their input variants run at density 1, where both tools must give
the same bytes; below density 1 they run with distmerge's own draws (checked within sampling error) and with
`distmerge: {rng: mergekit}` (the same bytes as `mergekit-yaml --random-seed`). Every method also runs with
mergekit's defaults (mergekit_parity/cases.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import common
from mergekit_parity.cases import METHODS, cases_for, make_families, write_configs
from mergekit_parity.compare import CaseResult, compare_case, tie_probes
from mergekit_parity.explain import explain
from mergekit_parity.report import cell, explanation_text, render, sampling_text, verdict
from peers.venvs import MERGEKIT, driver, ensure_peer_venv, package_versions

RESULTS = common.RESULTS / "mergekit_parity" / "mergekit_parity.md"
DEFAULT_VENV = MERGEKIT.default_venv
TOOLS = ("mergekit", "distmerge")

log = common.logger("compare_mergekit")


def console_command(tool: str, peer_python: Path, cfg: Path, out: Path, *extra: str) -> list[str]:
    if tool == "mergekit":
        return [str(peer_python.parent / "mergekit-yaml"), str(cfg), str(out), "--no-lazy-unpickle", "--quiet",
                "--no-write-model-card", *extra]
    return [str(Path(sys.executable).parent / "distmerge"), "merge", str(cfg), "-o", str(out), "--quiet", "--force"]


def run_tool(tool: str, jobs: list[tuple], work: Path, one_process_each: bool, peer_python: Path) -> dict[str, str]:
    """Run every (config, output, *mergekit arguments) job with one tool; returns {output directory: error text}
    for those that failed."""
    start = time.perf_counter()
    if one_process_each:
        failures = common.run_each({out: console_command(tool, peer_python, cfg, out, *extra)
                                    for cfg, out, *extra in jobs})
    else:
        python, script = ((peer_python, driver("mergekit_batch.py")) if tool == "mergekit"
                          else (Path(sys.executable), common.HERE / "distmerge_batch.py"))
        failures = common.finish_batch(*common.start_batch(python, script, jobs, work, tool))
    log(f"{tool}: {len(jobs)} merges in {time.perf_counter() - start:.0f} s, {len(failures)} failed")
    return failures


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"scratch venv (default {DEFAULT_VENV})")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "distmerge" / "mergekit-parity",
                        help="inputs, configs and outputs go here (default ~/.cache/distmerge/mergekit-parity)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: %(default)s")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the synthetic models")
    parser.add_argument("--layers", type=int, default=3, help="layers of the synthetic models (>= 3 exercises "
                                                               "gradient interpolation)")
    parser.add_argument("--one-process-per-merge", action="store_true",
                        help="run the console scripts once per merge instead of one process per tool")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    return parser.parse_args(argv)


def compare_all(cases, outputs: dict, failures: dict, families: dict, configs: dict, work: Path) -> list[CaseResult]:
    """One result per case: the tools' errors, or the tensor differences of their outputs; where those exceed
    round-off in a method with a documented difference, distmerge's merge with mergekit's choice made there
    (mergekit_parity/explain.py) against mergekit's."""
    results = []
    for case in cases:
        errors = [f"{tool}: {common.last_error_line(failures[tool][str(outputs[tool][case])])}"
                  for tool in TOOLS if str(outputs[tool][case]) in failures[tool]]
        result = (CaseResult(case, error="; ".join(errors)) if errors
                  else compare_case(case, outputs["distmerge"][case], outputs["mergekit"][case],
                                    Path(families[case.variant.family].base)))
        if not result.error and not result.within_roundoff and result.sampling is None:
            result.explanation = explain(result, configs[case], outputs["mergekit"][case], work)
        results.append(result)
        log(f"{case.method:17s} {case.variant.label:40s} {verdict(result):9s} {cell(result)}"
            + (f"  {result.error}" if result.error else ""))
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    peer_python, _ = ensure_peer_venv(MERGEKIT, args.venv, log=log)
    families = make_families(work, args.hidden, args.layers)
    cases = cases_for(methods)
    configs = write_configs(cases, families, work)
    outputs = {tool: {case: work / "out" / tool / case.slug for case in cases} for tool in TOOLS}
    failures = {}
    for tool in TOOLS:
        for out in outputs[tool].values():
            shutil.rmtree(out, ignore_errors=True)
        jobs = [(configs[case], outputs[tool][case], *(case.mergekit_arguments if tool == "mergekit" else []))
                for case in cases]
        failures[tool] = run_tool(tool, jobs, work, args.one_process_per_merge, peer_python)
    results = compare_all(cases, outputs, failures, families, configs, work)

    import torch

    import distmerge

    context = {
        "date": common.utc_now(), "command": common.command_line("compare_mergekit.py", argv),
        "machine": common.machine_summary(), "distmerge": distmerge.__version__, "git": common.git_revision(),
        "torch": torch.__version__, "venv": str(args.venv),
        "peer_versions": package_versions(peer_python, ("mergekit", "torch", "transformers", "safetensors")),
        "hidden": args.hidden, "layers": args.layers, "work": work,
        "numel": sum(t.numel() for t in common.load_checkpoint(Path(families["f32-single"].base)).values()),
        "mode": "one process per merge" if args.one_process_per_merge
        else "each tool runs all its configs in one process through its click entry point",
    }
    context["seconds"] = time.perf_counter() - started
    common.write_markdown(args.out, render(results, tie_probes(families), context))
    log(f"wrote {args.out}")

    bad = [r for r in results if r.error or (r.case.gated and not r.passes)]
    for r in bad:
        why = r.error or (sampling_text(r) if r.sampling else f"max abs diff {r.max_abs:.3g} in {r.worst}"
                          + (f"; {explanation_text(r.explanation)}" if r.explanation else ""))
        log(f"FAIL {r.case.method} [{r.case.variant.label}]: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
