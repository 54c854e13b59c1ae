"""What compare_fusionbench.py compares: the Llama shapes, the cases (method x T experts x shape), and the job
lists of both tools (FusionBench's driver in float32 and float64; distmerge's YAMLs with each polar route)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import common

METHODS = ("tsvm", "iso_c", "iso_cts")
POLARS = ("gram", "svd")
DEFAULT_SIZES = "64x176x4x2x256,132x344x4x2x200,192x512x6x2x320"


@dataclass(frozen=True)
class Size:
    """A Llama shape: hidden x intermediate x heads x kv_heads x vocab (2 layers)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def parse(cls, text: str) -> Size:
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) != 5:
            raise SystemExit(f"--sizes entry {text!r}: want HIDDENxINTERMEDIATExHEADSxKV_HEADSxVOCAB")
        return cls(*parts)

    @property
    def label(self) -> str:
        return f"h{self.hidden}"

    def llama_config(self, layers: int) -> dict:
        """distmerge.architecture.llama_config's arguments for this shape."""
        return {"hidden": self.hidden, "intermediate": self.intermediate, "layers": layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "vocab": self.vocab}


@dataclass(frozen=True)
class Case:
    """One merge: a method on the first `tasks` experts of a size's family."""

    size: Size
    method: str
    tasks: int

    @property
    def slug(self) -> str:
        return f"{self.size.label}-{self.method}-T{self.tasks}"


def make_families(work: Path, sizes: list[Size], n_experts: int, layers: int) -> dict[Size, dict]:
    """One float32 family per size under work/inputs (reused when its settings are the same)."""
    return {size: common.llama_family(work / "inputs" / size.label,
                                      {"llama_config": size.llama_config(layers), "experts": n_experts,
                                       "dtype": "float32", "shard_size": None, "seed": 0})
            for size in sizes}


def fusionbench_jobs(cases: list[Case], families: dict, outputs: dict, alpha: float, common_fraction: float):
    """peers/fusionbench_batch.py's jobs: each case in float32 (the reference) and float64 (the yardstick)."""
    jobs = []
    for case in cases:
        family = families[case.size]
        for precision in ("float32", "float64"):
            jobs.append({"method": case.method, "base": str(family["base"]),
                         "experts": [str(p) for p in family["experts"][:case.tasks]], "alpha": alpha,
                         "common_fraction": common_fraction, "dtype": precision,
                         "out": str(outputs[f"fusionbench-{precision}"][case])})
    return jobs


def distmerge_config(case: Case, family: dict, polar: str, alpha: float, common_fraction: float) -> dict:
    """The YAML for distmerge: FusionBench's computation (exact SVDs, one alpha) with the given polar route."""
    parameters = {"alpha": alpha, "polar": polar}
    if case.method != "iso_c":  # iso_c has no per-task SVDs (and so no `svd` parameter)
        parameters["svd"] = "exact"
    if case.method == "iso_cts":
        parameters["common_fraction"] = common_fraction
    return {"merge_method": case.method, "base_model": str(family["base"]),
            "models": [{"model": str(p)} for p in family["experts"][:case.tasks]],
            "parameters": parameters, "dtype": "float32"}


def distmerge_jobs(cases, families, outputs, work: Path, alpha: float, common_fraction: float):
    """(config, output) per case and polar route, the configs written under work/configs."""
    import yaml

    jobs = []
    for polar in POLARS:
        for case in cases:
            cfg = work / "configs" / f"{case.slug}-polar-{polar}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(yaml.safe_dump(distmerge_config(case, families[case.size], polar, alpha, common_fraction),
                                          sort_keys=False))
            jobs.append((cfg, outputs[f"distmerge-{polar}"][case]))
    return jobs
