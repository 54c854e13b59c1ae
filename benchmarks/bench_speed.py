"""Speed and memory: distmerge against mergekit 0.1.5 and FusionBench 0.2.33 on the same checkpoints.

    python benchmarks/bench_speed.py                                  # ~0.5B Llama-shaped bf16 models, 3 runs
    python benchmarks/bench_speed.py --layers 8 --runs 3              # same tensor shapes, fewer layers
    python benchmarks/bench_speed.py --tsvm-layers 2                  # the tsvm runs on 2-layer checkpoints
    python benchmarks/bench_speed.py --tiny --skip-peers --results /tmp/speed   # offline smoke test (seconds)

1. Generates (once, cached under --cache keyed by their settings) a Llama-shaped base and three experts with
   `distmerge.synthetic.make_family`: bfloat16, sharded with an index. `--size 0.5b` (default) is hidden 1024,
   intermediate 2816, 16 heads, 8 kv heads, vocab 32000, 36 layers (0.49B parameters per model); `--layers`
   changes only the depth.
2. Writes one mergekit YAML per method (linear, ties, dare_ties, della, and tsvm) with `dtype: bfloat16`; both
   tools read the same file. distmerge computes in float32 whatever `dtype` says and saves bfloat16; mergekit
   computes in bfloat16.
3. Each measured run is a fresh process under a small wrapper (this script's `_measure` mode) that times it and
   records its peak RSS (getrusage(RUSAGE_CHILDREN).ru_maxrss, one fresh wrapper per run, plus the peak of the
   summed RSS of its process tree polled every 50 ms). The tools alternate run by run:
   - distmerge: `distmerge merge CFG -o OUT --force --quiet --runtime local --shard-size S` (default threads);
   - mergekit: `mergekit-yaml CFG OUT --out-shard-size S/2 --quiet` (S/2 parameters: bfloat16) in its scratch venv (benchmarks/peers.py);
   - FusionBench TSV-M: a driver in its scratch venv that loads base and experts as whole float32 state dicts,
     builds the task vectors, calls `compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")`, adds
     alpha times the result to the base and saves bfloat16 safetensors;
   - distmerge tsvm twice: `svd: exact` (FusionBench's computation) and the default `svd: auto`;
   - the physical limit: read every input tensor of every model with safetensors (safe_open + get_tensor, one
     at a time) and write one model's worth of output bytes with safetensors (this script's `_readwrite` mode).
   The inputs are read once before timing, so every run reads from the page cache.
4. Checks the outputs of the last run (linear against an exact float64 reference for both tools; ties,
   dare_ties, della distmerge against mergekit; tsvm against FusionBench), then writes --results/speed.md and
   speed.json: every run, medians, ratios against the peer measured in the same invocation, and the targets.

`--skip-peers` runs distmerge and the physical limit only (no peer venvs, no network).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from provenance import cpu_model, git_revision  # noqa: E402
DEFAULT_CACHE = Path.home() / ".cache" / "distmerge" / "bench-speed"

SIZES = {  # name -> llama_config arguments, input shard size in bytes
    "0.5b": ({"hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 8, "vocab": 32000, "layers": 36},
             200_000_000),
    "tiny": ({"hidden": 64, "intermediate": 176, "heads": 4, "kv_heads": 2, "vocab": 256, "layers": 2}, 40_000),
}
N_EXPERTS = 3
WEIGHTS = (1.0, 0.7, 0.4)
ALPHA = 1.0

# method -> (per-model parameters, top-level parameters). Keys where the two tools' defaults differ are set
# explicitly (as in compare_mergekit.py), so both compute the same thing up to their random draws.
ELEMENTWISE = {
    "linear": ([{"weight": w} for w in WEIGHTS], {"normalize": True}),
    "ties": ([{"weight": w, "density": 0.5} for w in WEIGHTS], {"normalize": True}),
    "dare_ties": ([{"weight": w, "density": 0.5} for w in WEIGHTS], {"rescale": True, "normalize": False}),
    "della": ([{"weight": w, "density": 0.5, "epsilon": 0.1} for w in WEIGHTS],
              {"normalize": True, "lambda": 1.0, "rescale": True}),
}
TSVM_VARIANTS = {"tsvm_exact": "exact", "tsvm_auto": "auto"}
TSVM_EXCLUDED = ("model.embed_tokens.weight", "lm_head.weight")  # --tsvm-average-embeddings
LIMITS = {"elementwise": "limit:read_write", "tsvm": "limit:read_write_tsvm"}  # only when the families differ


def group(label: str) -> str:
    return "tsvm" if "tsvm" in label else "elementwise"

# (ours, peer, the largest time ratio ours/peer allowed or None, whether memory must be at most the peer's
# divided by this); checked on the medians.
TARGETS = [
    ("distmerge:ties", "mergekit:ties", 1 / 5, 1.0),
    ("distmerge:linear", "mergekit:linear", 1 / 2, 1.0),
    ("distmerge:dare_ties", "mergekit:dare_ties", None, 1.0),
    ("distmerge:della", "mergekit:della", None, 1.0),
    ("distmerge:tsvm_exact", "fusionbench:tsvm", 1 / 3, N_EXPERTS + 1.0),
    ("distmerge:tsvm_auto", "fusionbench:tsvm", 1 / 3, N_EXPERTS + 1.0),
]


def log(message: str) -> None:
    print(f"[bench_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the wrapper and the physical limit (run as subprocesses of this script) -------------------------------------


def measure_main(argv: list[str]) -> int:
    """`_measure RESULT.json LOG -- CMD...`: run CMD, wait, write wall time and peak RSS to RESULT.json."""
    import resource

    result_file, log_file, command = argv[0], argv[1], argv[3:]
    try:
        import psutil
    except ImportError:
        psutil = None
    tree_peak = 0
    with open(log_file, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid) if psutil else None
        while process.poll() is None:
            if root is not None:
                try:
                    total = 0
                    for proc in [root, *root.children(recursive=True)]:
                        try:
                            total += proc.memory_info().rss
                        except psutil.Error:
                            pass
                    tree_peak = max(tree_peak, total)
                except psutil.Error:
                    pass
            time.sleep(0.05)
        wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(result_file).write_text(json.dumps({
        "wall_s": wall, "returncode": process.returncode, "maxrss_bytes": usage.ru_maxrss * 1024,
        "tree_peak_bytes": tree_peak or None, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}))
    return 0


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({name: file for name in handle.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def readwrite_main(argv: list[str]) -> int:
    """`_readwrite OUT BASE MODEL...`: read every tensor of every model once, one at a time, with safetensors,
    and write the base's tensors (one model's worth of output bytes) as the base's shards."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, models = Path(argv[0]), [Path(p) for p in argv[1:]]
    out.mkdir(parents=True, exist_ok=True)
    files = [checkpoint_files(m) for m in models]
    handles = {}

    def handle(path: Path):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path]

    shards: dict[Path, list[str]] = {}
    for name, file in files[0].items():
        shards.setdefault(file, []).append(name)
    for shard, names in shards.items():
        kept = {}
        for name in names:
            for i, model_files in enumerate(files):
                tensor = handle(model_files[name]).get_tensor(name)
                if i == 0:
                    kept[name] = tensor
                del tensor
        save_file(kept, str(out / shard.name), metadata={"format": "pt"})
    return 0


# ---- inputs and configs -------------------------------------------------------------------------------------------


def family(cache: Path, size: str, layers: int | None) -> dict:
    """The base and experts for these settings, generated on first use under cache/inputs/<key>."""
    import torch

    from distmerge.architecture import llama_config
    from distmerge.synthetic import make_family

    arguments, shard_size = SIZES[size]
    arguments = {**arguments, **({"layers": layers} if layers else {})}
    settings = {"llama_config": arguments, "experts": N_EXPERTS, "dtype": "bfloat16", "shard_size": shard_size,
                "seed": 0, "generator": "distmerge.synthetic.make_family"}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / "inputs" / f"{size}-l{arguments['layers']}-{key}"
    stamp = root / "settings.json"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        log(f"generating the base and {N_EXPERTS} experts under {root}")
        make_family(root, n_experts=N_EXPERTS, config=llama_config(**arguments), dtype=torch.bfloat16,
                    shard_size=shard_size, seed=0)
        stamp.write_text(json.dumps(settings, indent=1))
    base = root / "base"
    experts = [root / f"expert{i + 1}" for i in range(N_EXPERTS)]
    config = json.loads((base / "config.json").read_text())
    numel = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    return {"root": root, "base": base, "experts": experts, "settings": settings, "config": config,
            "params": numel, "model_bytes": numel * 2, "shard_size": shard_size}


def configs(fams: dict[str, dict], directory: Path, exclude: list[str]) -> dict[str, Path]:
    """method -> YAML path (the same file for both tools); fams: {"elementwise": family, "tsvm": family}."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    docs = {}
    fam = fams["elementwise"]
    for method, (models, top) in ELEMENTWISE.items():
        doc: dict = {"merge_method": method}
        if method != "linear":
            doc["base_model"] = str(fam["base"])
        doc["models"] = [{"model": str(p), "parameters": m} for p, m in zip(fam["experts"], models)]
        doc["parameters"] = top
        doc["dtype"] = "bfloat16"
        docs[method] = doc
    fam = fams["tsvm"]
    for variant, svd in TSVM_VARIANTS.items():
        docs[variant] = {"merge_method": "tsvm", "base_model": str(fam["base"]),
                         "models": [{"model": str(p)} for p in fam["experts"]],
                         "parameters": {"alpha": ALPHA, "svd": svd, **({"exclude": exclude} if exclude else {})},
                         "dtype": "bfloat16"}
    paths = {}
    for name, doc in docs.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


# ---- FusionBench's side ------------------------------------------------------------------------------------------

FUSIONBENCH_DRIVER = '''
"""TSV-M through FusionBench, for distmerge's benchmarks/bench_speed.py (generated; safe to delete)."""
import contextlib, io, json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction


def load(directory):
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return {name: t.float() for name, t in tensors.items()}  # whole float32 state dicts, as FusionBench holds


job = json.load(open(sys.argv[1]))
base = load(job["base"])
task_vectors = []
for path in job["experts"]:
    expert = load(path)
    task_vectors.append({name: expert[name] - base[name] for name in base})
    del expert
with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per tensor
    merged = compute_and_sum_svd_mem_reduction(task_vectors, exclude_keys=job["exclude"] or None, accelerator="cpu")
out = {name: (base[name] + job["alpha"] * merged[name]).to(torch.bfloat16).contiguous() for name in base}
Path(job["out"]).mkdir(parents=True, exist_ok=True)
save_file(out, str(Path(job["out"]) / "model.safetensors"), metadata={"format": "pt"})
'''


# ---- running -----------------------------------------------------------------------------------------------------


def machine() -> dict:
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_bytes": memory,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}





def measure(command: list[str], work: Path, label: str) -> dict:
    """Run `command` under a fresh wrapper; wall time, peak RSS, load averages."""
    result_file, log_file = work / "measure.json", work / "logs" / f"{label.replace(':', '-')}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    load_before = os.getloadavg()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_measure", str(result_file), str(log_file),
                    "--", *command], check=True)
    load_after = os.getloadavg()
    result = json.loads(result_file.read_text())
    result.update({"load_before": list(load_before), "load_after": list(load_after)})
    if result["returncode"] != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{label} failed (exit {result['returncode']}): {shlex_join(command)}\n{tail}")
    return result


def shlex_join(command: list[str]) -> str:
    import shlex

    return shlex.join(command)


def jobs_for(fams: dict[str, dict], cfgs: dict[str, Path], work: Path, peers: dict, shard_size: int,
             exclude: list[str]) -> list[tuple[str, list[str], Path]]:
    """(label, command, output directory) for one round, tools interleaved method by method."""
    distmerge = str(Path(sys.executable).parent / "distmerge")
    out = work / "out"

    def dm(name: str) -> tuple[str, list[str], Path]:
        return (f"distmerge:{name}", [distmerge, "merge", str(cfgs[name]), "-o", str(out / f"distmerge-{name}"),
                                      "--force", "--quiet", "--runtime", "local", "--shard-size", f"{shard_size}B"],
                out / f"distmerge-{name}")

    def limit(group: str) -> tuple[str, list[str], Path]:
        label = LIMITS[group]
        target = out / label.replace(":", "-")
        fam = fams[group]
        return (label, [sys.executable, str(Path(__file__).resolve()), "_readwrite", str(target), str(fam["base"]),
                        *map(str, fam["experts"])], target)

    jobs = [limit("elementwise")]
    for method in ELEMENTWISE:
        jobs.append(dm(method))
        if "mergekit" in peers:
            jobs.append((f"mergekit:{method}", [str(peers["mergekit"].parent / "mergekit-yaml"), str(cfgs[method]),
                                                str(out / f"mergekit-{method}"), "--out-shard-size", str(shard_size // 2),
                                                "--quiet"],
                         out / f"mergekit-{method}"))
    if fams["tsvm"]["root"] != fams["elementwise"]["root"]:
        jobs.append(limit("tsvm"))
    for variant in TSVM_VARIANTS:
        jobs.append(dm(variant))
    if "fusionbench" in peers:
        fam = fams["tsvm"]
        job_file = work / "fusionbench_job.json"
        job_file.write_text(json.dumps({"base": str(fam["base"]), "experts": [str(p) for p in fam["experts"]],
                                        "alpha": ALPHA, "out": str(out / "fusionbench-tsvm"),
                                        "exclude": exclude}))
        driver = work / "fusionbench_tsvm.py"
        driver.write_text(FUSIONBENCH_DRIVER)
        jobs.append(("fusionbench:tsvm", [str(peers["fusionbench"]), str(driver), str(job_file)],
                     out / "fusionbench-tsvm"))
    return jobs


def warm_page_cache(fams: list[dict]) -> None:
    for directory in [d for fam in fams for d in (fam["base"], *fam["experts"])]:
        for file in directory.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


# ---- checks on the outputs ---------------------------------------------------------------------------------------


class Reader:
    """Tensors of a checkpoint directory by name, one at a time."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.files = checkpoint_files(directory)
        self.handles = {f: safe_open(str(f), "pt") for f in set(self.files.values())}

    def __call__(self, name: str):
        return self.handles[self.files[name]].get_tensor(name)


def check_outputs(fams: dict[str, dict], work: Path, labels: set[str]) -> list[dict]:
    """Cheap correctness checks on the last round's outputs, so that a fast but wrong result cannot hide."""
    import torch

    out = work / "out"
    checks = []
    fam = fams["elementwise"]
    base = Reader(fam["base"])
    experts = [Reader(p) for p in fam["experts"]]
    names = list(base.files)

    def bf16_ulp(magnitude: torch.Tensor) -> torch.Tensor:
        # one bfloat16 ulp at |x|: 2^(floor(log2|x|) - 7)
        return torch.exp2(torch.floor(torch.log2(magnitude.clamp_min(torch.finfo(torch.bfloat16).tiny))) - 7)

    # linear: each tool against the exact float64 weighted mean. The bound per entry is the output rounding
    # (half a bfloat16 ulp) plus the compute precision's round-off on the sum of |terms| (4 eps: float32 eps for
    # distmerge, bfloat16 eps for mergekit, which computes in bfloat16); a ratio above 1 is a wrong result.
    total = sum(WEIGHTS)
    for tool, eps in (("distmerge", torch.finfo(torch.float32).eps), ("mergekit", torch.finfo(torch.bfloat16).eps)):
        if f"{tool}:linear" not in labels:
            continue
        merged = Reader(out / f"{tool}-linear")
        worst, beyond_half, count = 0.0, 0, 0
        for name in names:
            values = [e(name).double() for e in experts]
            exact = sum(w * v for w, v in zip(WEIGHTS, values)) / total
            terms = sum(w * v.abs() for w, v in zip(WEIGHTS, values)) / total
            ours = merged(name).double()
            ulp = bf16_ulp(torch.maximum(ours.abs(), exact.abs()))
            error = (ours - exact).abs()
            worst = max(worst, float((error / (0.5 * ulp + 4 * eps * terms)).max()))
            beyond_half += int((error > 0.5 * ulp + eps * terms).sum())
            count += error.numel()
        checks.append({"check": f"{tool} linear vs exact float64 weighted mean",
                       "max_error_over_bound": worst, "share_not_correctly_rounded": beyond_half / count,
                       "ok": worst <= 1.0})

    # merged task vectors of ours against the peer's: relative difference and norm ratio
    pairs = [(m, f"distmerge-{m}", f"mergekit-{m}", "mergekit") for m in ("ties", "dare_ties", "della")]
    pairs += [(v, f"distmerge-{v}", "fusionbench-tsvm", "FusionBench") for v in TSVM_VARIANTS]
    for method, ours_dir, theirs_dir, peer in pairs:
        if not {ours_dir.replace("-", ":", 1), theirs_dir.replace("-", ":", 1)} <= labels:
            continue
        base = Reader(fams["tsvm" if method in TSVM_VARIANTS else "elementwise"]["base"])
        names = list(base.files)
        ours, theirs = Reader(out / ours_dir), Reader(out / theirs_dir)
        diff2 = ref2 = ours2 = 0.0
        worst_rel, worst_name = 0.0, ""
        for name in names:
            b = base(name).float()
            d_ours, d_theirs = ours(name).float() - b, theirs(name).float() - b
            tensor_diff2 = float((d_ours - d_theirs).pow(2).sum())
            tensor_ref2 = float(d_theirs.pow(2).sum())
            diff2, ref2, ours2 = diff2 + tensor_diff2, ref2 + tensor_ref2, ours2 + float(d_ours.pow(2).sum())
            rel = (tensor_diff2 / tensor_ref2) ** 0.5 if tensor_ref2 else 0.0
            if rel > worst_rel:
                worst_rel, worst_name = rel, name
        rel_all = (diff2 / ref2) ** 0.5 if ref2 else float("nan")
        norm_ratio = (ours2 / ref2) ** 0.5 if ref2 else float("nan")
        random = method in ("dare_ties", "della")
        # deterministic methods must agree closely; random ones (different draws) only in size
        if method == "ties":
            ok = rel_all < 0.1  # mergekit computes in bfloat16: ties among bfloat16 magnitudes at the top-k cut
        elif random:
            ok = 0.8 < norm_ratio < 1.25
        elif method == "tsvm_exact":
            ok = worst_rel < 0.02  # bfloat16 output of both: ~4e-3 of each entry
        else:
            ok = rel_all < 0.05
        checks.append({"check": f"{ours_dir} vs {theirs_dir} merged task vector", "rel_diff_all": rel_all,
                       "worst_tensor_rel_diff": worst_rel, "worst_tensor": worst_name,
                       "norm_ratio_ours_over_peer": norm_ratio, "ok": ok,
                       "note": f"different random draws from {peer}: only the size must match" if random else ""})
    return checks


# ---- the report --------------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict]) -> dict[str, dict]:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    out = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        out[label] = {"runs": len(mine), "wall_s": median([r["wall_s"] for r in mine]),
                      "maxrss_bytes": median([r["maxrss_bytes"] for r in mine]),
                      "tree_peak_bytes": median([r["tree_peak_bytes"] or 0 for r in mine]) or None}
    return out


def evaluate_targets(medians: dict[str, dict]) -> list[dict]:
    rows = []
    for ours, peer, time_target, memory_divisor in TARGETS:
        if ours not in medians or peer not in medians:
            continue
        time_ratio = medians[ours]["wall_s"] / medians[peer]["wall_s"]
        memory_ratio = medians[ours]["maxrss_bytes"] / medians[peer]["maxrss_bytes"]
        rows.append({"ours": ours, "peer": peer, "time_ratio": time_ratio, "speedup": 1 / time_ratio,
                     "time_target": time_target, "time_ok": None if time_target is None else time_ratio <= time_target,
                     "memory_ratio": memory_ratio, "memory_target": 1 / memory_divisor,
                     "memory_ok": memory_ratio <= 1 / memory_divisor})
    return rows


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def render(context: dict, runs: list[dict], medians: dict, targets: list[dict], checks: list[dict]) -> str:
    m = context["machine"]
    two = context["families"]["tsvm"]["root"] != context["families"]["elementwise"]["root"]
    lines = [
        "# Speed and memory: distmerge vs mergekit 0.1.5 and FusionBench 0.2.33",
        "",
        f"Generated by `benchmarks/bench_speed.py` on {context['date']} ({context['seconds']:.0f} s)."
        + (" **PARTIAL: written after a round; the run was still going.**" if context["partial"] else ""),
        "",
        f"- command: `{context['command']}`",
        (f"- machine: {m['cpu']}, {m['cores']} cores, {gb(m['memory_bytes'])} GB RAM, {m['system']}, "
        f"Python {m['python']}. **Shared**: {context['shared_note']} Load averages (1 min) before/after "
        "each run are in the table of every run."),
        f"- distmerge {context['versions']['distmerge']} (git {context['git']}), torch "
        f"{context['versions']['torch']}, default threads (torch: {context['torch_threads']})"
        + "".join(f"; {peer} venv: " + ", ".join(f"{k} {v}" for k, v in versions.items())
                  for peer, versions in context["peer_versions"].items()),
        *[(f"- inputs{' for ' + ('tsvm' if g == 'tsvm' else 'linear, ties, dare_ties, della') if two else ''}: "
           f"`distmerge.synthetic.make_family`, Llama-shaped, base + {N_EXPERTS} experts, bfloat16, "
           f"input shards of {fam['shard_size'] / 1e6:.0f} MB with an index: "
           + ", ".join(f"{k} {v}" for k, v in fam["settings"]["llama_config"].items())
           + f"; **{fam['params'] / 1e9:.3f}B parameters per model** ({fam['model_bytes'] / 1e9:.2f} GB), "
           f"{(N_EXPERTS + 1) * fam['model_bytes'] / 1e9:.2f} GB read per merge; cached at `{fam['root']}`.")
          for g, fam in context["families"].items()
          if g == "elementwise" or fam["root"] != context["families"]["elementwise"]["root"]],
        (f"- the same YAML for both tools (`{context['work']}/configs/`), `dtype: bfloat16`: distmerge computes in "
        "float32 and writes bfloat16; mergekit computes and writes bfloat16. Output shards of "
        f"{context['out_shard_size'] / 1e6:.0f} MB on both sides."),
        ("- distmerge: `distmerge merge CFG -o OUT --force --quiet --runtime local --shard-size S`; mergekit: "
        "`mergekit-yaml CFG OUT --out-shard-size S/2 --quiet` (S/2 parameters: bfloat16) (its defaults otherwise: no lazy unpickle, tokenizer copied, "
        "model card written, as distmerge writes its card); FusionBench: a driver that loads base and experts as "
        "whole float32 state dicts, builds task vectors and calls "
        "`compute_and_sum_svd_mem_reduction(task_vectors, accelerator=\"cpu\")`, then saves base + alpha * merged "
        f"(alpha {ALPHA}) in bfloat16; distmerge tsvm with `svd: exact` and with the default `svd: auto`"
        + (f" ({context['auto_runs']} round(s) only)" if context["auto_runs"] < context["runs"] else "")
        + (". **tsvm on both sides averages `model.embed_tokens.weight` and `lm_head.weight`** (distmerge "
           "`exclude`, FusionBench `exclude_keys`); every other 2-D tensor goes through the SVDs."
           if context["tsvm_exclude"] else "; every 2-D tensor, embeddings included, goes through the SVDs.")),
        ("- physical limit (`limit:read_write`): read every input tensor of all models with safetensors "
        "(`safe_open` + `get_tensor`, one at a time) and write one model's worth of bytes with `save_file`."),
        ("- every run is a fresh process timed by a wrapper: wall time from start to exit (Python and torch import "
        "included, for every tool), peak RSS = `getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh wrapper (the "
        "largest process of the tree); `tree peak` is the summed RSS of the process tree polled every 50 ms. "
        f"Runs interleave the tools (round by round, every tool once per round); {context['runs']} rounds; "
        "inputs in the page cache (read once before timing)."),
        "",
        "## Medians and ratios",
        "",
        "| run | median wall (s) | x physical limit | median peak RSS (GB) | tree peak (GB) | runs |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in medians.items():
        limit = medians.get(LIMITS[group(label)]) or medians.get(LIMITS["elementwise"])
        over = f"{s['wall_s'] / limit['wall_s']:.1f}" if limit else "-"
        lines.append(f"| {label} | {s['wall_s']:.1f} | {over} | {gb(s['maxrss_bytes'])} | "
                     f"{gb(s['tree_peak_bytes'])} | {s['runs']} |")
    lines += ["", "## Targets (medians; ratios against the peer measured in the same invocation)", "",
              ("| distmerge | peer | time ratio (ours/peer) | speedup | time target | memory ratio | memory target | "
              "verdict |"), "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        time_target = "-" if t["time_target"] is None else f"<= {t['time_target']:.3f}"
        verdict = []
        if t["time_ok"] is not None:
            verdict.append("time met" if t["time_ok"] else "**time MISSED**")
        verdict.append("memory met" if t["memory_ok"] else "**memory MISSED**")
        lines.append(f"| {t['ours']} | {t['peer']} | {t['time_ratio']:.3f} | {t['speedup']:.2f}x | {time_target} | "
                     f"{t['memory_ratio']:.3f} | <= {t['memory_target']:.3f} | {', '.join(verdict)} |")
    if not targets:
        lines.append("| (no peers in this run: `--skip-peers`) | | | | | | | |")
    lines += ["", "## Checks on the outputs (last round)", "",
              "| check | result | ok |", "|---|---|---|"]
    for c in checks:
        detail = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("check", "ok") and v != "")
        lines.append(f"| {c['check']} | {detail} | {'yes' if c['ok'] else '**NO**'} |")
    lines += ["", "## Every run", "",
              ("| round | run | wall (s) | peak RSS (GB) | tree peak (GB) | user+sys CPU (s) | load 1 min before -> "
              "after |"), "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['round']} | {r['label']} | {r['wall_s']:.2f} | {gb(r['maxrss_bytes'])} | "
                     f"{gb(r['tree_peak_bytes'])} | {r['user_s'] + r['sys_s']:.1f} | "
                     f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} |")
    if context.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in context["notes"]]]
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="directory for speed.md and speed.json (default benchmarks/results)")
    parser.add_argument("--runs", type=int, default=None, help="rounds of runs (default 3; 1 with --tiny)")
    parser.add_argument("--size", choices=tuple(SIZES), default="0.5b", help="model shapes (default 0.5b)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the size's; fewer keeps every tensor shape)")
    parser.add_argument("--tsvm-layers", type=int, default=None,
                        help="decoder layers of the tsvm checkpoints (default: --layers); the same tensor shapes")
    parser.add_argument("--tsvm-average-embeddings", action="store_true",
                        help="tsvm: average embed_tokens and lm_head instead of SVD-merging them, on both sides "
                             "(distmerge `exclude`, FusionBench `exclude_keys`)")
    parser.add_argument("--auto-runs", type=int, default=None,
                        help="rounds that include distmerge tsvm with svd: auto (default: all)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: --size tiny, 1 round unless --runs")
    parser.add_argument("--skip-peers", action="store_true",
                        help="distmerge and the physical limit only: no peer venvs, no network")
    parser.add_argument("--methods", default=",".join([*ELEMENTWISE, "tsvm"]),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"inputs, configs, outputs, peer drivers (default {DEFAULT_CACHE})")
    parser.add_argument("--mergekit-venv", type=Path, default=None, help="default ~/.cache/distmerge/peers/...")
    parser.add_argument("--fusionbench-venv", type=Path, default=None, help="default ~/.cache/distmerge/peers/...")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    if args.runs is None:
        args.runs = 1 if args.tiny else 3
    if args.auto_runs is None:
        args.auto_runs = args.runs
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        return measure_main(argv[1:])
    if argv and argv[0] == "_readwrite":
        return readwrite_main(argv[1:])
    args = parse_args(argv)
    started = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in [*ELEMENTWISE, "tsvm"]]:
        raise SystemExit(f"unknown method {unknown[0]}")
    cache = args.cache.expanduser().resolve()
    if cache.is_relative_to(REPO):
        raise SystemExit(f"--cache {cache} is inside the repository; give a path outside it")



    peers, peer_versions = {}, {}
    if not args.skip_peers:
        sys.path.insert(0, str(HERE))
        from peers import FUSIONBENCH, MERGEKIT, ensure_peer_venv, package_versions

        if any(m in ELEMENTWISE for m in methods):
            peers["mergekit"], _ = ensure_peer_venv(MERGEKIT, args.mergekit_venv, log=log)
            peer_versions["mergekit"] = package_versions(peers["mergekit"], ("mergekit", "torch", "safetensors"))
        if "tsvm" in methods:
            peers["fusionbench"], route = ensure_peer_venv(FUSIONBENCH, args.fusionbench_venv, log=log)
            peer_versions["fusionbench"] = {**package_versions(peers["fusionbench"],
                                                               ("fusion-bench", "torch", "safetensors")),
                                            "installed by": route}

    fams = {"elementwise": family(cache, args.size, args.layers)}
    fams["tsvm"] = family(cache, args.size, args.tsvm_layers) if args.tsvm_layers else fams["elementwise"]
    if fams["tsvm"]["root"] == fams["elementwise"]["root"]:
        fams["tsvm"] = fams["elementwise"]
    work = cache / "runs" / "-".join(dict.fromkeys(f["root"].name for f in fams.values()))
    work.mkdir(parents=True, exist_ok=True)
    exclude = list(TSVM_EXCLUDED) if args.tsvm_average_embeddings else []
    cfgs = configs(fams, work / "configs", exclude)
    out_shard = fams["elementwise"]["shard_size"]
    wanted = {*LIMITS.values(), *(f"{t}:{m}" for m in methods if m in ELEMENTWISE for t in ("distmerge", "mergekit")),
              *(f"distmerge:{v}" for v in TSVM_VARIANTS if "tsvm" in methods),
              *(["fusionbench:tsvm"] if "tsvm" in methods else [])}
    jobs = [job for job in jobs_for(fams, cfgs, work, peers, out_shard, exclude) if job[0] in wanted]

    log(", ".join(f"{g}: {f['params'] / 1e9:.3f}B parameters per model" for g, f in fams.items())
        + "; warming the page cache")
    warm_page_cache(list({id(f): f for f in fams.values()}.values()))
    runs = []
    for round_ in range(1, args.runs + 1):
        for label, command, target in jobs:
            if label == "distmerge:tsvm_auto" and round_ > args.auto_runs:
                continue
            shutil.rmtree(target, ignore_errors=True)
            result = measure(command, work, label)
            result.update({"round": round_, "label": label, "command": shlex_join(command)})
            runs.append(result)
            log(f"round {round_}/{args.runs} {label:22s} {result['wall_s']:7.1f} s  peak RSS "
                f"{result['maxrss_bytes'] / 1e9:.2f} GB  load {result['load_before'][0]:.1f}")
        if round_ < args.runs:  # partial results after every round, so an interrupted run leaves numbers
            write_results(args, argv, started, fams, work, peer_versions, runs, [], partial=True)
    checks = check_outputs(fams, work, {label for label, _, _ in jobs})
    for c in checks:
        log(f"check {c['check']}: {'ok' if c['ok'] else 'FAILED'}")
    targets = write_results(args, argv, started, fams, work, peer_versions, runs, checks, partial=False)
    for t in targets:
        log(f"{t['ours']} vs {t['peer']}: time x{t['time_ratio']:.3f} (target {t['time_target']}), memory "
            f"x{t['memory_ratio']:.3f} (target {t['memory_target']:.3f})")
    return 0 if all(c["ok"] for c in checks) else 1


def write_results(args, argv, started, fams, work, peer_versions, runs, checks, partial: bool) -> list[dict]:
    import torch

    import distmerge

    medians = summarise(runs)
    targets = evaluate_targets(medians)

    out_shard = fams["elementwise"]["shard_size"]
    context = {
        "partial": partial,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex_join(["python", "benchmarks/bench_speed.py", *argv]),
        "machine": machine(), "git": git_revision(), "torch_threads": torch.get_num_threads(),
        "versions": {"distmerge": distmerge.__version__, "torch": torch.__version__},
        "peer_versions": peer_versions, "runs": args.runs, "auto_runs": args.auto_runs,
        "tsvm_exclude": list(TSVM_EXCLUDED) if args.tsvm_average_embeddings else [], "work": str(work), "out_shard_size": out_shard,
        "families": {g: {k: (str(v) if isinstance(v, Path) else v) for k, v in f.items()
                         if k not in ("experts", "config")} for g, f in fams.items()},
        "shared_note": "another CPU-heavy job may run on this machine at the same time; load averages show it.",
        "notes": args.note,
    }
    context["seconds"] = time.perf_counter() - started
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "speed.md").write_text(render(context, runs, medians, targets, checks))
    (args.results / "speed.json").write_text(json.dumps(
        {"context": context, "medians": medians, "targets": targets, "checks": checks, "runs": runs},
        indent=1, default=str))
    log(f"wrote {args.results / 'speed.md'} and speed.json" + (" (partial)" if partial else ""))
    return targets


if __name__ == "__main__":
    sys.exit(main())
