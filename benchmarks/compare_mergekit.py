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
   tool runs all its configs in one Python process, through the same click entry point its console script
   calls (start-up costs ~10 s per process here); `--one-process-per-merge` runs the console scripts themselves.
4. Compares every tensor (max abs and relative difference, differing elements, identical bytes) and writes
   benchmarks/results/mergekit_parity.md. Exits 1 when a deterministic method differs beyond float32 round-off
   on float32 inputs, or when either tool fails on a config.

DARE and DELLA are random below density 1 (the two tools draw different numbers), so they run at density 1,
where both must give task arithmetic / TIES exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import MERGEKIT, ensure_peer_venv, package_versions
from provenance import git_revision, machine_summary

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mergekit_parity.md"
DEFAULT_VENV = MERGEKIT.default_venv

# float32 round-off: differences up to this many float32 epsilons of the tensor's largest magnitude pass.
ROUNDOFF_EPS = 16
FLOAT32_EPS = torch.finfo(torch.float32).eps


# ---- inputs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A base and three experts on disk, in one dtype and layout."""

    label: str
    dtype: str  # float32 | bfloat16
    sharded: bool
    base: str
    experts: tuple[str, ...]


def make_families(work: Path, hidden: int, layers: int) -> dict[str, Family]:
    from distmerge.architecture import llama_config
    from distmerge.synthetic import make_family

    config = llama_config(hidden=hidden, intermediate=hidden * 11 // 4, layers=layers, heads=4, kv_heads=2)
    families = {}
    for dtype in ("float32", "bfloat16"):
        for sharded in (False, True):
            label = f"{'f32' if dtype == 'float32' else 'bf16'}-{'sharded' if sharded else 'single'}"
            directory = work / "inputs" / f"hidden{hidden}-layers{layers}" / label
            # shards of about four hidden x hidden matrices: a dozen or more files
            shard_size = 4 * hidden * hidden * (2 if dtype == "bfloat16" else 4) if sharded else None
            if not (directory / "base" / "config.json").exists():
                make_family(directory, n_experts=3, config=config, dtype=getattr(torch, dtype),
                            shard_size=shard_size, seed=0)
            families[label] = Family(label, dtype, sharded, str(directory / "base"),
                                     tuple(str(directory / f"expert{i}") for i in (1, 2, 3)))
    families["f32-small"] = make_small_family(families["f32-single"], directory.parent)
    return families


SMALL_SCALE = 0.002  # task vectors of ~1e-4 (norms) in the vectors and ~1e-3 in the matrices: gentle fine-tunes


def make_small_family(family: Family, directory: Path) -> Family:
    """The float32 family with every task vector scaled by SMALL_SCALE, so that per-tensor statistics come near
    the epsilons that guard them (model_stock clamps the product of two task-vector norms at 1e-6)."""
    from distmerge.synthetic import save_checkpoint

    directory = directory / "f32-small"
    experts = tuple(str(directory / Path(path).name) for path in family.experts)
    if not (directory / "base" / "config.json").exists():
        config = json.loads((Path(family.base) / "config.json").read_text())
        base = load_checkpoint(Path(family.base))
        save_checkpoint(directory / "base", base, config, dtype=torch.float32)
        for source, target in zip(family.experts, experts):
            expert = load_checkpoint(Path(source))
            small = {name: base[name] + SMALL_SCALE * (expert[name] - base[name]) for name in base}
            save_checkpoint(target, small, config, dtype=torch.float32)
    return Family("f32-small", "float32", False, str(directory / "base"), experts)


# ---- the configs -----------------------------------------------------------------------------------------------

WEIGHTS = (1.0, 0.7, 0.4)  # 0.7 and 0.4 are not binary fractions: rounding shows

# method -> models: per-model parameters (None: slerp's base + one model); top: top-level parameters;
#           differing_defaults: keys set only because the two tools' defaults differ; base: needs base_model
BREADCRUMBS_MODELS = [{"weight": w, "density": d, "gamma": g}
                      for w, d, g in zip(WEIGHTS, (0.6, 0.5, 0.8), (0.05, 0.02, 0.1))]
DENSITY_1 = [{"weight": w, "density": 1.0} for w in WEIGHTS]  # DARE/DELLA: their random parts are off

METHODS: dict[str, dict] = {
    "linear": {"models": [{"weight": w} for w in WEIGHTS], "top": {"normalize": True}, "base": False},
    "task_arithmetic": {"models": [{"weight": w} for w in WEIGHTS], "top": {"lambda": 0.9}},
    "ties": {"models": [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": [0.2, 0.5]},
                        {"weight": 0.4, "density": 0.7}],
             "top": {"normalize": True, "int8_mask": True, "lambda": 1.1}},
    "breadcrumbs": {"models": BREADCRUMBS_MODELS, "top": {"lambda": 0.9}},
    "breadcrumbs_ties": {"models": BREADCRUMBS_MODELS, "top": {"int8_mask": True},
                         "differing_defaults": {"normalize": False}},
    "dare_linear": {"models": DENSITY_1, "top": {"int8_mask": True}, "differing_defaults": {"rescale": True}},
    "dare_ties": {"models": DENSITY_1, "top": {"int8_mask": True},
                  "differing_defaults": {"rescale": True, "normalize": False}},
    "della": {"models": [{**m, "epsilon": 0.1} for m in DENSITY_1], "top": {"normalize": True, "lambda": 1.0},
              "differing_defaults": {"rescale": True}},
    "della_linear": {"models": [{**m, "epsilon": 0.1} for m in DENSITY_1], "top": {"lambda": 0.9},
                     "differing_defaults": {"rescale": True}},
    # the classic mergekit SLERP recipe: per-module gradients over the layers, 0.5 elsewhere
    "slerp": {"models": None, "top": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                            {"value": 0.5}]}},
    "model_stock": {"models": [{} for _ in WEIGHTS], "top": {}},
}


@dataclass(frozen=True)
class Variant:
    """How a method is run: which inputs, the YAML's dtype/out_dtype, and whether the gate applies."""

    label: str
    family: str
    dtype: str
    out_dtype: str | None = None
    defaults: bool = False  # leave out the keys whose defaults differ (shows the default differences)

    @property
    def gated(self) -> bool:
        return self.family.startswith("f32") and not self.defaults


VARIANTS = (
    Variant("f32", "f32-single", "float32"),
    Variant("f32 sharded", "f32-sharded", "float32"),
    Variant(f"f32, task vectors x{SMALL_SCALE}", "f32-small", "float32"),
    Variant("bf16 in, f32 compute", "bf16-single", "float32"),
    Variant("bf16 sharded in, f32 compute, bf16 out", "bf16-sharded", "float32", out_dtype="bfloat16"),
    Variant("bf16 in, dtype bf16", "bf16-single", "bfloat16"),
    Variant("f32, mergekit defaults", "f32-single", "float32", defaults=True),
)


@dataclass(frozen=True)
class Case:
    method: str
    variant: Variant

    @property
    def slug(self) -> str:
        return f"{self.method}__{self.variant.label.replace(',', '').replace(' ', '_')}"


def cases_for(methods: list[str]) -> list[Case]:
    out = []
    for method in methods:
        for variant in VARIANTS:
            if variant.defaults and not METHODS[method].get("differing_defaults"):
                continue
            out.append(Case(method, variant))
    return out


def mergekit_config(case: Case, family: Family) -> dict:
    """The YAML document a mergekit user would write for this case."""
    spec = METHODS[case.method]
    doc: dict = {"merge_method": case.method}
    if spec.get("base", True):
        doc["base_model"] = family.base
    if spec["models"] is None:  # slerp: the base and one other model
        doc["models"] = [{"model": family.base}, {"model": family.experts[0]}]
    else:
        doc["models"] = [{"model": path, **({"parameters": params} if params else {})}
                         for path, params in zip(family.experts, spec["models"])]
    parameters = dict(spec["top"])
    if not case.variant.defaults:
        parameters.update(spec.get("differing_defaults", {}))
    if parameters:
        doc["parameters"] = parameters
    doc["dtype"] = case.variant.dtype
    if case.variant.out_dtype:
        doc["out_dtype"] = case.variant.out_dtype
    return doc


def write_configs(cases: list[Case], families: dict[str, Family], work: Path) -> dict[Case, Path]:
    directory = work / "configs"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        path = directory / f"{case.slug}.yaml"
        path.write_text(yaml.safe_dump(mergekit_config(case, families[case.variant.family]), sort_keys=False))
        paths[case] = path
    return paths


# ---- running the two tools ---------------------------------------------------------------------------------------

# Each driver runs a list of (config, out) jobs through the tool's own click command, in one process.
MERGEKIT_DRIVER = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
failures = {}
for cfg, out in json.load(open(sys.argv[1])):
    try:
        main([cfg, out, "--no-lazy-unpickle", "--quiet", "--no-write-model-card"], standalone_mode=False)
    except BaseException:
        failures[cfg] = traceback.format_exc(limit=3)
json.dump(failures, open(sys.argv[2], "w"))
"""

DISTMERGE_DRIVER = """
import json, sys, traceback
from distmerge.cli import cli
failures = {}
for cfg, out in json.load(open(sys.argv[1])):
    try:
        cli.main(["merge", cfg, "-o", out, "--quiet", "--force"], standalone_mode=False)
    except BaseException:
        failures[cfg] = traceback.format_exc(limit=3)
json.dump(failures, open(sys.argv[2], "w"))
"""


def console_command(tool: str, peer_python: Path, cfg: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return [str(peer_python.parent / "mergekit-yaml"), str(cfg), str(out), "--no-lazy-unpickle", "--quiet",
                "--no-write-model-card"]
    return [str(Path(sys.executable).parent / "distmerge"), "merge", str(cfg), "-o", str(out), "--quiet", "--force"]


def run_tool(tool: str, python: Path, jobs: list[tuple[Path, Path]], work: Path, one_process_each: bool,
             peer_python: Path) -> dict[str, str]:
    """Run every job with one tool; returns {config path: error text} for the jobs that failed."""
    start = time.perf_counter()
    if one_process_each:
        failures = {}
        for cfg, out in jobs:
            command = console_command(tool, peer_python, cfg, out)
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                failures[str(cfg)] = result.stderr[-2000:]
    else:
        job_file, failure_file = work / f"{tool}_jobs.json", work / f"{tool}_failures.json"
        job_file.write_text(json.dumps([[str(cfg), str(out)] for cfg, out in jobs]))
        driver = MERGEKIT_DRIVER if tool == "mergekit" else DISTMERGE_DRIVER
        result = subprocess.run([str(python), "-c", driver, str(job_file), str(failure_file)],
                                capture_output=True, text=True, cwd=work, check=False)
        if result.returncode != 0 or not failure_file.exists():
            raise SystemExit(f"{tool} driver crashed:\n{result.stderr[-4000:]}")
        failures = json.loads(failure_file.read_text())
    log(f"{tool}: {len(jobs)} merges in {time.perf_counter() - start:.0f} s, {len(failures)} failed")
    return failures


# ---- comparing outputs -----------------------------------------------------------------------------------------


def load_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@dataclass
class TensorDiff:
    name: str
    max_abs: float
    max_rel: float
    differing: int
    numel: int
    identical: bool
    within_roundoff: bool


def compare_tensor(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> TensorDiff:
    """distmerge's tensor against mergekit's; a relative difference is |a - b| / max(|a|, |b|)."""
    if ours.shape != theirs.shape:
        return TensorDiff(name, float("inf"), float("inf"), theirs.numel(), theirs.numel(), False, False)
    a, b = ours.double(), theirs.double()
    diff = (a - b).abs()
    differing = int((a != b).sum())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    larger = torch.maximum(a.abs(), b.abs())
    max_rel = float((diff / larger)[diff > 0].max()) if differing else 0.0
    identical = ours.dtype == theirs.dtype and torch.equal(ours.contiguous().view(torch.uint8),
                                                           theirs.contiguous().view(torch.uint8))
    scale = float(b.abs().max()) if b.numel() else 0.0
    return TensorDiff(name, max_abs, max_rel, differing, theirs.numel(), identical,
                      max_abs <= ROUNDOFF_EPS * FLOAT32_EPS * scale)


@dataclass
class CaseResult:
    case: Case
    error: str | None = None
    tensors: list[TensorDiff] = field(default_factory=list)
    dtypes: str = ""

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.tensors), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((t.max_rel for t in self.tensors), default=0.0)

    @property
    def differing(self) -> int:
        return sum(t.differing for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def identical(self) -> bool:
        return self.error is None and all(t.identical for t in self.tensors)

    @property
    def within_roundoff(self) -> bool:
        return self.error is None and all(t.within_roundoff for t in self.tensors)

    @property
    def worst(self) -> str:
        worst = max(self.tensors, key=lambda t: t.max_abs, default=None)
        return worst.name if worst and worst.max_abs > 0 else ""


def compare_case(case: Case, ours_dir: Path, theirs_dir: Path) -> CaseResult:
    ours, theirs = load_checkpoint(ours_dir), load_checkpoint(theirs_dir)
    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))
        return CaseResult(case, error=f"tensor names differ, e.g. {only[0]}")
    result = CaseResult(case, tensors=[compare_tensor(name, ours[name], theirs[name]) for name in sorted(theirs)])
    dtypes = {(str(ours[n].dtype), str(theirs[n].dtype)) for n in theirs}
    result.dtypes = ", ".join(f"{o.removeprefix('torch.')}/{t.removeprefix('torch.')}" for o, t in sorted(dtypes))
    if any(o != t for o, t in dtypes):
        result.error = f"output dtypes differ (distmerge/mergekit): {result.dtypes}"
    return result


# ---- how exact ties at a top-k boundary are broken ---------------------------------------------------------------


@dataclass
class TieProbe:
    label: str
    boundaries: int = 0  # (tensor, expert, density, direction) boundaries looked at
    ambiguous: int = 0  # of which the k-th magnitude is shared by more entries than the cut keeps
    lowest_first: int = 0  # ... and torch's default (unstable) sort kept the lowest-index tied entries
    highest_first: int = 0  # ... or the highest-index ones (anything else: neither)


def index_order_choice(tied: torch.Tensor, need: int, lowest: bool) -> torch.Tensor:
    return tied[:need] if lowest else tied[tied.numel() - need:]


def probe_boundary(probe: TieProbe, magnitudes: torch.Tensor, k: int, descending: bool) -> None:
    """Where an exact tie straddles the cut after the first k entries of torch.sort(magnitudes, descending), which
    tied entries does the default sort (stable=False, what mergekit calls) put before the cut?"""
    ordered = torch.sort(magnitudes, descending=descending, stable=True)
    boundary = ordered.values[k - 1]
    tied = (magnitudes == boundary).nonzero().flatten()
    before = int((magnitudes > boundary).sum() if descending else (magnitudes < boundary).sum())
    need = k - before
    probe.boundaries += 1
    if tied.numel() <= need:
        return
    probe.ambiguous += 1
    chosen = torch.sort(magnitudes, descending=descending).indices[:k]
    chosen_tied = chosen[magnitudes[chosen] == boundary].sort().values
    if torch.equal(chosen_tied, index_order_choice(tied, need, lowest=True)):
        probe.lowest_first += 1
    elif torch.equal(chosen_tied, index_order_choice(tied, need, lowest=False)):
        probe.highest_first += 1


def tie_probes(families: dict[str, Family], densities=tuple(i / 20 for i in range(1, 20))) -> list[TieProbe]:
    """For float32 task vectors from the float32, small float32 and bfloat16 inputs, on CPU (and CUDA if any)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    probes = []
    names = {"f32-single": "float32 inputs", "f32-small": f"float32 inputs, task vectors x{SMALL_SCALE}",
             "bf16-single": "bfloat16 inputs"}
    for label, name in names.items():
        family = families[label]
        base = load_checkpoint(Path(family.base))
        experts = [load_checkpoint(Path(path)) for path in family.experts]
        for device in devices:
            probe = TieProbe(f"{name}, {device}")
            for name, b in base.items():
                for expert in experts:
                    magnitudes = (expert[name].float() - b.float()).abs().reshape(-1).to(device)
                    for density in densities:
                        k = max(1, int(density * magnitudes.numel()))
                        probe_boundary(probe, magnitudes, k, descending=True)  # TIES: keep the k largest
                        probe_boundary(probe, magnitudes, magnitudes.numel() - k, descending=False)  # drop smallest
            probes.append(probe)
    return probes


# ---- the report --------------------------------------------------------------------------------------------------





def cell(result: CaseResult) -> str:
    if result.error:
        return "FAILED"
    if result.identical:
        return "identical"
    return f"{result.max_abs:.1e} ({result.differing}/{result.numel})"


def verdict(result: CaseResult) -> str:
    if result.error:
        return "error"
    if result.identical:
        return "identical"
    if result.within_roundoff:
        return "round-off"
    return "DIFFERS" if result.case.variant.gated else "differs"


def header(context: dict, n_cases: int) -> list[str]:
    peers = ", ".join(f"{k} {v}" for k, v in context["peer_versions"].items())
    return [
        "# distmerge vs mergekit 0.1.5: same YAML, same tensors?",
        "",
        (f"Generated by `benchmarks/compare_mergekit.py` on {context['date']} ({context['seconds']:.0f} s for "
         f"{n_cases} cases)."),
        "",
        f"- command: `{context['command']}`",
        f"- machine: {context['machine']}",
        (f"- distmerge {context['distmerge']} (git {context['git']}), torch {context['torch']}; "
         f"peer venv `{context['venv']}`: {peers}"),
        (f"- inputs: synthetic Llama family (`distmerge.synthetic.make_family`, base + 3 experts, hidden "
         f"{context['hidden']}, {context['layers']} layers, {context['numel']} parameters), written in float32 and "
         f"bfloat16, as one file and as shards; `task vectors x{SMALL_SCALE}` is the float32 family with every "
         "expert moved "
         f"to base + {SMALL_SCALE} (expert - base)."),
        (f"- mergekit ran as `mergekit-yaml CFG OUT --no-lazy-unpickle --quiet --no-write-model-card`; distmerge "
         f"as `distmerge merge CFG -o OUT --quiet --force` ({context['mode']}). The YAMLs are under "
         f"`{context['work']}/configs/`."),
        (f"- a cell is `identical` (same bytes in every tensor) or `max abs diff (differing elements / total)`. "
         f"Round-off: every tensor within {ROUNDOFF_EPS} float32 eps of its largest magnitude. The run fails when "
         "a float32-input column (not the defaults column) is neither identical nor round-off."),
        "",
    ]


def summary_table(results: list[CaseResult]) -> list[str]:
    methods = list(dict.fromkeys(r.case.method for r in results))
    variants = [v for v in VARIANTS if any(r.case.variant == v for r in results)]
    by_key = {(r.case.method, r.case.variant): r for r in results}
    lines = ["| method | " + " | ".join(v.label for v in variants) + " |", "|---|" + "---|" * len(variants)]
    for method in methods:
        cells = [cell(by_key[(method, v)]) if (method, v) in by_key else "-" for v in variants]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def detail_table(results: list[CaseResult]) -> list[str]:
    lines = [
        "## Every case",
        "",
        ("| method | variant | out dtype (distmerge/mergekit) | max abs diff | max rel diff | differing | "
         "identical | verdict | worst tensor |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error and not r.tensors:
            lines.append(f"| {r.case.method} | {r.case.variant.label} | | | | | no | error | {r.error[:120]} |")
            continue
        lines.append(f"| {r.case.method} | {r.case.variant.label} | {r.dtypes} | {r.max_abs:.3g} | {r.max_rel:.3g} "
                     f"| {r.differing}/{r.numel} | {'yes' if r.identical else 'no'} | {verdict(r)} | {r.worst} |")
    return lines


def defaults_section(methods: list[str]) -> list[str]:
    lines = ["## Parameters set explicitly because the defaults differ", ""]
    explicit = [(m, spec["differing_defaults"]) for m, spec in METHODS.items()
                if m in methods and spec.get("differing_defaults")]
    for method, keys in explicit:
        text = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in keys.items())
        lines.append(f"- `{method}`: {text}: mergekit's defaults (the `f32, mergekit defaults` column leaves them "
                     "out)")
    if not explicit:
        lines.append("- none among the methods of this run")
    lines += [
        "",
        ("Known differences by design: distmerge never computes in 16 bits (`dtype: bfloat16` means float32 "
         "compute and bfloat16 output; mergekit computes in bfloat16), so the `dtype bf16` column differs by "
         "bfloat16 rounding; `rescale: true` is mergekit's L1 rescale (distmerge's own default is `inverse`); at "
         "the top-k boundary distmerge breaks exact ties by index, mergekit takes whatever order torch's default "
         "(unstable) sort gives, which matters only where magnitudes tie exactly: often with bfloat16 inputs, "
         "rarely with float32 ones unless the task vectors are a few ulps of the weights (the `task vectors` "
         "column; see the probe below)."),
    ]
    return lines


def probe_section(probes: list[TieProbe]) -> list[str]:
    lines = [
        "## Exact ties at a top-k boundary",
        "",
        ("TIES keeps each task vector's k largest magnitudes and Breadcrumbs drops the smallest; where the k-th "
         "magnitude is shared by more entries than the cut keeps, the choice among them is arbitrary. distmerge "
         "takes tied entries in index order. mergekit takes them in the order of torch's default sort "
         "(`stable=False`). This probe sorts the float32 task vectors of the inputs (every tensor and expert, "
         "densities 0.05, 0.10, ..., 0.95, largest-first and smallest-first cuts) and counts which tied entries "
         "that sort puts before the cut."),
        "",
        ("| task vectors | boundaries | with an exact tie to break | default sort kept lowest indices | "
         "kept highest indices | neither |"),
        "|---|---|---|---|---|---|",
    ]
    for p in probes:
        lines.append(f"| {p.label} | {p.boundaries} | {p.ambiguous} | {p.lowest_first} | {p.highest_first} | "
                     f"{p.ambiguous - p.lowest_first - p.highest_first} |")
    return lines


def render(results: list[CaseResult], probes: list[TieProbe], context: dict) -> str:
    methods = list(dict.fromkeys(r.case.method for r in results))
    sections = [header(context, len(results)), summary_table(results), detail_table(results),
                defaults_section(methods), probe_section(probes)]
    return "\n\n".join("\n".join(section) for section in sections).replace("\n\n\n", "\n\n") + "\n"


# ---- main --------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[compare_mergekit] {message}", file=sys.stderr, flush=True)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    work = args.work.resolve()
    peer_python, _ = ensure_peer_venv(MERGEKIT, args.venv, log=log)
    families = make_families(work, args.hidden, args.layers)
    cases = cases_for(methods)
    configs = write_configs(cases, families, work)
    outputs = {tool: {case: work / "out" / tool / case.slug for case in cases} for tool in ("mergekit", "distmerge")}
    failures = {}
    for tool, python in (("mergekit", peer_python), ("distmerge", Path(sys.executable))):
        for out in outputs[tool].values():
            shutil.rmtree(out, ignore_errors=True)
        jobs = [(configs[case], outputs[tool][case]) for case in cases]
        failures[tool] = run_tool(tool, python, jobs, work, args.one_process_per_merge, peer_python)

    results = []
    for case in cases:
        errors = [f"{tool}: {failures[tool][str(configs[case])].strip().splitlines()[-1]}"
                  for tool in failures if str(configs[case]) in failures[tool]]
        result = (CaseResult(case, error="; ".join(errors)) if errors
                  else compare_case(case, outputs["distmerge"][case], outputs["mergekit"][case]))
        results.append(result)
        log(f"{case.method:17s} {case.variant.label:40s} {verdict(result):9s} {cell(result)}"
            + (f"  {result.error}" if result.error else ""))

    import distmerge

    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/compare_mergekit.py", *(argv or sys.argv[1:])]),
        "machine": machine_summary(), "distmerge": distmerge.__version__, "git": git_revision(), "torch": torch.__version__,
        "venv": str(args.venv), "peer_versions": package_versions(peer_python, ("mergekit", "torch", "transformers",
                                                                                "safetensors")),
        "hidden": args.hidden, "layers": args.layers, "work": work,
        "numel": sum(t.numel() for t in load_checkpoint(Path(families["f32-single"].base)).values()),
        "mode": "one process per merge" if args.one_process_per_merge
        else "each tool runs all its configs in one process through its click entry point",
    }
    context["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, tie_probes(families), context))
    log(f"wrote {args.out}")

    bad = [r for r in results if r.error or (r.case.variant.gated and not r.within_roundoff)]
    for r in bad:
        log(f"FAIL {r.case.method} [{r.case.variant.label}]: {r.error or f'max abs diff {r.max_abs:.3g} in {r.worst}'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
