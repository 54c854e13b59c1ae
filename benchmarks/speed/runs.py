"""How bench_speed.py runs the tools: one command per (tool, method), each timed in a fresh wrapper process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peers.venvs import driver

from .cases import ALPHA, CHECKED_AGAINST_FLOAT32, COMMON_FRACTION, ELEMENTWISE, LIMITS, SPECTRAL_METHODS, peer, runs_of

HERE = Path(__file__).resolve().parent
MEASURE = HERE / "measure.py"
READ_WRITE = HERE / "read_write.py"


def measure(command: list[str], work: Path, label: str) -> dict:
    """Run `command` under a fresh wrapper (measure.py); wall time, peak RSS, load averages before and after, and
    for a run that failed, `error`: its exit status and its log from the last line that names an error."""
    result_file, log_file = work / "measure.json", work / "logs" / f"{label.replace(':', '-')}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    load_before = os.getloadavg()
    subprocess.run([sys.executable, str(MEASURE), str(result_file), str(log_file), "--", *command], check=True)
    load_after = os.getloadavg()
    result = json.loads(result_file.read_text())
    result.update({"load_before": list(load_before), "load_after": list(load_after)})
    if result["returncode"] != 0:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        named = [i for i, line in enumerate(lines) if "Error" in line or "error:" in line]
        message = " ".join(lines[named[-1] if named else -1:])[:400] or "no output"
        result["error"] = f"exit {result['returncode']}: {message} (log: {log_file})"
    return result


def distmerge_job(name: str, config: Path, out: Path, shard_size: int) -> tuple[str, list[str], Path]:
    command = [str(Path(sys.executable).parent / "distmerge"), "merge", str(config), "-o",
               str(out / f"distmerge-{name}"), "--force", "--quiet", "--runtime", "local", "--shard-size",
               f"{shard_size}B"]
    return f"distmerge:{name}", command, out / f"distmerge-{name}"


def mergekit_job(method: str, mergekit_python: Path, config: Path, out: Path,
                 shard_size: int) -> tuple[str, list[str], Path]:
    # --out-shard-size counts parameters: half the bytes of the bfloat16 output
    command = [str(mergekit_python.parent / "mergekit-yaml"), str(config), str(out / f"mergekit-{method}"),
               "--out-shard-size", str(shard_size // 2), "--quiet"]
    return f"mergekit:{method}", command, out / f"mergekit-{method}"


def limit_job(group: str, fam: dict, out: Path) -> tuple[str, list[str], Path]:
    label = LIMITS[group]
    target = out / label.replace(":", "-")
    return label, [sys.executable, str(READ_WRITE), str(target), str(fam["base"]), *map(str, fam["experts"])], target


def fusionbench_job(method: str, fam: dict, fusionbench_python: Path, work: Path,
                    exclude: list[str]) -> tuple[str, list[str], Path]:
    target = work / "out" / f"fusionbench-{method}"
    job_file = work / f"fusionbench_{method}_job.json"
    job_file.write_text(json.dumps({"method": method, "base": str(fam["base"]),
                                    "experts": [str(p) for p in fam["experts"]], "alpha": ALPHA,
                                    "common_fraction": COMMON_FRACTION, "out": str(target), "exclude": exclude}))
    command = [str(fusionbench_python), str(driver("fusionbench_tsvm.py")), str(job_file)]
    return f"fusionbench:{method}", command, target


def jobs_for(fams: dict[str, dict], cfgs: dict[str, Path], work: Path, peers: dict, shard_size: int,
             exclude: list[str]) -> list[tuple[str, list[str], Path]]:
    """(label, command, output directory) for one round: each method's distmerge run(s), then its peer's."""
    out = work / "out"
    jobs = [limit_job("elementwise", fams["elementwise"], out)]
    for method in ELEMENTWISE:
        jobs.append(distmerge_job(method, cfgs[method], out, shard_size))
        if "mergekit" in peers and peer(method):
            jobs.append(mergekit_job(method, peers["mergekit"], cfgs[method], out, shard_size))
    if fams["spectral"]["root"] != fams["elementwise"]["root"]:
        jobs.append(limit_job("spectral", fams["spectral"], out))
    for method in SPECTRAL_METHODS:
        jobs += [distmerge_job(run, cfgs[run], out, shard_size) for run in runs_of(method)]
        if "fusionbench" in peers and peer(method):
            jobs.append(fusionbench_job(method, fams["spectral"], peers["fusionbench"], work, exclude))
    return jobs


def float32_jobs(cfgs: dict[str, Path], work: Path, peers: dict, shard_size: int) -> list[tuple[str, list[str], Path]]:
    """mergekit's untimed float32 runs that the checks compare some methods with (CHECKED_AGAINST_FLOAT32)."""
    if "mergekit" not in peers:
        return []
    return [mergekit_job(f"{method}_float32", peers["mergekit"], cfgs[f"{method}_float32"], work / "out", shard_size)
            for method in CHECKED_AGAINST_FLOAT32]


def warm_page_cache(fams: list[dict]) -> None:
    """Read every input file once, so that every timed run reads from the page cache."""
    for directory in [d for fam in fams for d in (fam["base"], *fam["experts"])]:
        for file in directory.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass
