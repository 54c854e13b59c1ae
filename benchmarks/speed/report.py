"""bench_speed.py's numbers: medians per run label, the targets against the peers, and speed.md."""

from __future__ import annotations

import statistics

from .cases import ALPHA, CHECKED_AGAINST_FLOAT32, COMMON_FRACTION, LIMITS, N_EXPERTS, TARGETS, group, peer


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict]) -> dict[str, dict]:
    """label -> medians over its runs that did not fail of wall time, peak RSS and tree peak."""
    out = {}
    for label in dict.fromkeys(r["label"] for r in runs if "error" not in r):
        mine = [r for r in runs if r["label"] == label and "error" not in r]
        out[label] = {"runs": len(mine), "wall_s": median([r["wall_s"] for r in mine]),
                      "maxrss_bytes": median([r["maxrss_bytes"] for r in mine]),
                      "tree_peak_bytes": median([r["tree_peak_bytes"] or 0 for r in mine]) or None}
    return out


def limit_for(label: str, medians: dict[str, dict]) -> str:
    """The physical limit of the family a run reads (the elementwise one's where the families are the same)."""
    limit = LIMITS[group(label)]
    return limit if limit in medians else LIMITS["elementwise"]


def comparisons(medians: dict[str, dict]) -> list[tuple]:
    """TARGETS' rows for every distmerge run measured; a run with none (or none whose peer ran) gets one row without
    targets against its peer, or against its family's physical limit where it has no peer or the peer did not run."""
    rows = []
    for ours in [label for label in medians if label.startswith("distmerge:")]:
        targeted = [t for t in TARGETS if t[0] == ours and t[1] in medians]
        theirs = peer(ours.split(":", 1)[1])
        rows += targeted or [(ours, theirs if theirs in medians else limit_for(ours, medians), None, None)]
    return rows


def evaluate_targets(medians: dict[str, dict]) -> list[dict]:
    """Time and memory ratios against the peer measured in the same invocation, and whether they meet TARGETS."""
    rows = []
    for ours, theirs, time_target, memory_divisor in comparisons(medians):
        time_ratio = medians[ours]["wall_s"] / medians[theirs]["wall_s"]
        memory_ratio = medians[ours]["maxrss_bytes"] / medians[theirs]["maxrss_bytes"]
        rows.append({"ours": ours, "peer": theirs, "time_ratio": time_ratio, "speedup": 1 / time_ratio,
                     "time_target": time_target, "time_ok": None if time_target is None else time_ratio <= time_target,
                     "memory_ratio": memory_ratio, "memory_target": memory_divisor and 1 / memory_divisor,
                     "memory_ok": None if memory_divisor is None else memory_ratio <= 1 / memory_divisor})
    return rows


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def two_families(context: dict) -> bool:
    fams = context["families"]
    return fams["spectral"]["root"] != fams["elementwise"]["root"]


def method_lines(context: dict) -> list[str]:
    """Which methods ran on which family, and against which peer."""
    names = {"mergekit": "mergekit", "fusionbench": "FusionBench"}

    def against(method: str) -> str:
        tool = (peer(method) or ":").split(":")[0]
        if not tool:
            return "distmerge only: against the physical limit"
        if tool not in context["peers"]:
            return f"{names[tool]} not run: against the physical limit"
        if peer(method) in context["failed"]:
            return f"{names[tool]} failed, see below: against the physical limit"
        return f"with {names[tool]}"

    lines = []
    for name, methods in context["methods"].items():
        groups = {}
        for method in methods:
            groups.setdefault(against(method), []).append(method)
        if groups:
            lines.append(f"- {len(methods)} method(s) on the {name} family: "
                         + "; ".join(f"{', '.join(ms)} ({how})" for how, ms in groups.items()) + ".")
    return lines


def input_lines(context: dict) -> list[str]:
    """One line per family of inputs (two when the spectral runs read shallower checkpoints)."""
    two = two_families(context)
    return [(f"- inputs{f' of the {g} family' if two else ' (one family for every method)'}: "
             f"`distmerge.synthetic.make_family`, Llama-shaped, base + {N_EXPERTS} experts, bfloat16, "
             f"input shards of {fam['shard_size'] / 1e6:.0f} MB with an index: "
             + ", ".join(f"{k} {v}" for k, v in fam["settings"]["llama_config"].items())
             + f"; **{fam['params'] / 1e9:.3f}B parameters per model** ({fam['model_bytes'] / 1e9:.2f} GB), "
             f"{(N_EXPERTS + 1) * fam['model_bytes'] / 1e9:.2f} GB read per merge; cached at `{fam['root']}`.")
            for g, fam in context["families"].items() if g == "elementwise" or two]


def float32_sentence(context: dict) -> str:
    rerun = [m for m in CHECKED_AGAINST_FLOAT32 if m in context["methods"]["elementwise"]]
    if not rerun or "mergekit" not in context["peers"]:
        return ""
    return (f" After the rounds, mergekit runs {', '.join(rerun)} once more with `dtype: float32, out_dtype: "
            "bfloat16`, untimed, for the checks (its bfloat16 compute is too coarse there to check distmerge against).")


def header(context: dict) -> list[str]:
    m = context["machine"]
    return [
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
        + "".join(f"; {tool} venv: " + ", ".join(f"{k} {v}" for k, v in versions.items())
                  for tool, versions in context["peer_versions"].items()),
        *method_lines(context),
        *input_lines(context),
        (f"- the elementwise methods: the same YAML for distmerge and mergekit (`{context['work']}/configs/`), each "
         "method's case of compare_mergekit.py (`mergekit_parity/cases.py`) with density 0.5 where it has one (its "
         "parameters are in speed/cases.py), `dtype: bfloat16`: distmerge computes in float32 and writes bfloat16; "
         "mergekit computes and writes bfloat16 (arcee_fusion and ramplus_tl also set `out_dtype: bfloat16`, which "
         f"mergekit 0.1.5 would otherwise write in float32). Output shards of {context['out_shard_size'] / 1e6:.0f} "
         "MB on both sides." + float32_sentence(context)),
        ("- distmerge: `distmerge merge CFG -o OUT --force --quiet --runtime local --shard-size S`; mergekit: "
         "`mergekit-yaml CFG OUT --out-shard-size S/2 --quiet` (S/2 parameters: bfloat16) (its defaults otherwise: no "
         "lazy unpickle, tokenizer copied, model card written, as distmerge writes its card)."),
        ("- the spectral methods: FusionBench through a driver (`peers/fusionbench_tsvm.py`) that loads base and "
         "experts as whole float32 state dicts, builds the task vectors and calls "
         "`compute_and_sum_svd_mem_reduction` (tsvm), `iso_c` or "
         f"`iso_cts(common_space_fraction={COMMON_FRACTION})` with `accelerator=\"cpu\"`, then saves base + alpha * "
         f"merged (alpha {ALPHA}) in bfloat16. distmerge: tsvm with `svd: exact` (FusionBench's computation) and with "
         "the default `svd: auto`"
         + (f" ({context['auto_runs']} round(s) only)" if context["auto_runs"] < context["runs"] else "")
         + "; iso_cts with `svd: exact` (FusionBench's computation); iso_c (no per-task SVDs, so no `svd` "
         f"parameter) and rtsvm with their defaults; alpha {ALPHA}, and the default `polar: gram` throughout "
         "(FusionBench orthogonalises with SVDs: the same result to float32 round-off, see compare_fusionbench.py)"
         + (". **The spectral methods on both sides average `model.embed_tokens.weight` and `lm_head.weight`** "
            "(distmerge `exclude`, FusionBench `exclude_keys`); every other 2-D tensor goes through the SVDs."
            if context["spectral_exclude"] else "; every 2-D tensor, embeddings included, goes through the SVDs.")),
        ("- physical limit (`limit:read_write`, and `limit:read_write_spectral` on the spectral family when it is "
         "another): read every input tensor of all models with safetensors (`safe_open` + `get_tensor`, one at a "
         "time) and write one model's worth of bytes with `save_file`."),
        ("- every run is a fresh process timed by a wrapper: wall time from start to exit (Python and torch import "
         "included, for every tool), peak RSS = `getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh wrapper (the "
         "largest process of the tree); `tree peak` is the summed RSS of the process tree polled every 50 ms. "
         f"Runs interleave the tools (round by round, every tool once per round); {context['runs']} rounds; "
         "inputs in the page cache (read once before timing)."),
    ]


def medians_table(medians: dict) -> list[str]:
    lines = ["## Medians and ratios", "",
             "| run | median wall (s) | x physical limit | median peak RSS (GB) | tree peak (GB) | runs |",
             "|---|---|---|---|---|---|"]
    for label, s in medians.items():
        limit = medians.get(limit_for(label, medians))
        over = f"{s['wall_s'] / limit['wall_s']:.1f}" if limit else "-"
        lines.append(f"| {label} | {s['wall_s']:.1f} | {over} | {gb(s['maxrss_bytes'])} | "
                     f"{gb(s['tree_peak_bytes'])} | {s['runs']} |")
    return lines


def targets_table(targets: list[dict]) -> list[str]:
    lines = [("## Targets (medians; each distmerge run against its peer measured in the same invocation, or against "
              "the physical limit where it has none; `-`: no target)"), "",
             ("| distmerge | peer | time ratio (ours/peer) | speedup | time target | memory ratio | memory target | "
              "verdict |"), "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        time_target = "-" if t["time_target"] is None else f"<= {t['time_target']:.3f}"
        verdict = []
        if t["time_ok"] is not None:
            verdict.append("time met" if t["time_ok"] else "**time MISSED**")
        if t["memory_ok"] is not None:
            verdict.append("memory met" if t["memory_ok"] else "**memory MISSED**")
        memory_target = "-" if t["memory_target"] is None else f"<= {t['memory_target']:.3f}"
        lines.append(f"| {t['ours']} | {t['peer']} | {t['time_ratio']:.3f} | {t['speedup']:.2f}x | {time_target} | "
                     f"{t['memory_ratio']:.3f} | {memory_target} | {', '.join(verdict) or '-'} |")
    return lines


def checks_table(checks: list[dict]) -> list[str]:
    lines = ["## Checks on the outputs (last round)", "", "| check | result | ok |", "|---|---|---|"]
    for c in checks:
        detail = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("check", "ok") and v != "")
        lines.append(f"| {c['check']} | {detail} | {'yes' if c['ok'] else '**NO**'} |")
    return lines


def failures_table(runs: list[dict]) -> list[str]:
    """The peer runs that failed (each is not run again); empty where none did."""
    failed = [r for r in runs if "error" in r]
    if not failed:
        return []
    return ["## Peer runs that failed (not run again; their methods are compared with the physical limit)", "",
            "| round | run | after (s) | error |", "|---|---|---|---|",
            *[f"| {r['round']} | {r['label']} | {r['wall_s']:.1f} | {r['error']} |" for r in failed]]


def runs_table(runs: list[dict]) -> list[str]:
    lines = ["## Every run", "",
             ("| round | run | wall (s) | peak RSS (GB) | tree peak (GB) | user+sys CPU (s) | load 1 min before -> "
              "after |"), "|---|---|---|---|---|---|---|"]
    for r in runs:
        label = f"{r['label']} (failed)" if "error" in r else r["label"]
        lines.append(f"| {r['round']} | {label} | {r['wall_s']:.2f} | {gb(r['maxrss_bytes'])} | "
                     f"{gb(r['tree_peak_bytes'])} | {r['user_s'] + r['sys_s']:.1f} | "
                     f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} |")
    return lines


def render(context: dict, runs: list[dict], medians: dict, targets: list[dict], checks: list[dict]) -> str:
    sections = [header(context), medians_table(medians), targets_table(targets), checks_table(checks),
                failures_table(runs), runs_table(runs)]
    if context.get("notes"):
        sections.append(["## Notes", "", *[f"- {n}" for n in context["notes"]]])
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"
