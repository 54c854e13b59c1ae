"""One merge from start to finish: plan, prepare the output, run the units, write the small files and the index.

This is the public API behind `distmerge merge`:

    from distmerge.config import load_config
    from distmerge.merge import merge
    merge(load_config("config.yaml"), "merged/")
"""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from pathlib import Path

from .checkpoint import CODE_TO_NAME, Checkpoint
from .config import MergeConfig, format_bytes
from .errors import ConfigError
from .estimates import bytes_read, bytes_written, over_limit, unit_read_bytes
from .hub import HubAccess
from .methods import get_method
from .params import check_parameter_names
from .plan import MergePlan, build_plan, check_config, fingerprint, with_mergekit_draws, with_worker_memory
from .progress import Progress
from .report import REPORT_NAME, report_bytes, report_rows
from .runtime import Runtime, make_runtime
from .stages import Stage
from .writer import OutputDir, ShardRecord, atomic_write_text


def merge(config: MergeConfig, out: str | Path, *, force: bool = False, quiet: bool = False,
          address: str | None = None, log=print, offline: bool = False, runtime: Runtime | None = None) -> MergePlan:
    """Merge per `config` into `out`; the runtime, device, seed, threads and workers come from config.engine.
    Hub ids not in the local Hugging Face cache are downloaded first, unless `offline` (or HF_HUB_OFFLINE).
    `runtime`: a connected runtime to run on, left open for the caller's next merge (by default one is made from
    config.engine and closed at the end)."""
    # every check that needs no tensor data, before anything starts; under Ray too, only this process downloads
    plan = build_plan(config, hub=HubAccess(offline=offline, quiet=quiet))
    check_memory_limit(plan)
    if config.engine.rng == "mergekit" and plan.spec.mergekit_draws is not None:
        plan = with_mergekit_draws(plan)
    engine = config.engine
    out_dir = OutputDir(out)
    with out_dir.lock(log):  # one merge per output, held to the end; a second one fails here
        runner = runtime or connect(engine, address, quiet)
        try:
            placement = runner.placement
            if placement.memory is not None:  # the workers' own memory, known once connected
                plan = with_worker_memory(plan, placement.memory)
                check_memory_limit(plan)
            finished = out_dir.prepare(fingerprint(plan, placement.device, placement.threads), force,
                                       [directory for ckpt in plan.inputs() for directory in ckpt.directories])
            pending = [unit for unit in plan.units if unit.shard not in finished]
            out_dir.check_free_space(sum(unit.out_bytes for unit in pending))
            if finished and not quiet:
                log(f"resuming: {len(finished)} of {len(plan.units)} shards are already done")
            first_pass = None
            if plan.first_pass is not None:
                first_pass = out_dir.remember("first_pass", lambda: run_first_pass(plan, runner, out_dir, quiet))
            progress = Progress("merging", len(plan.tensors), bytes_read(plan), quiet=quiet)
            for unit in plan.units:
                if unit.shard in finished:
                    progress.skip(len(unit.tensors), unit_read_bytes(plan, unit))
            records = list(finished.values()) + runner.merge(plan, pending, out_dir, first_pass, progress)
            progress.close()
        finally:
            if runtime is None:
                runner.close()
        finalize(plan, out_dir, records)
    return plan


def check_memory_limit(plan: MergePlan) -> None:
    """Refuse, before anything starts, a merge with a tensor one worker cannot hold."""
    over = over_limit(plan)
    if not over:
        return
    job, peak = max(over, key=lambda item: item[1])
    how = "one row at a time" if job.block_rows else f"whole (as {plan.spec.name} does with these parameters)"
    given = plan.config.engine.memory_budget
    worker = "a Ray worker's" if plan.config.engine.runtime == "ray" else "this machine's"
    limit = f"the memory budget of {format_bytes(given)} (--memory-budget)" if given else \
        f"{worker} {format_bytes(plan.memory_limit)}"
    raise ConfigError(
        f"tensor {job.name} {list(job.shape)} needs {format_bytes(peak)} per worker to merge {how}, more than "
        f"{limit} ({len(over)} tensor(s) over it); raise --memory-budget (distmerge.memory_budget) if the workers "
        "have the memory, or run on workers that do")


def connect(engine, address: str | None, quiet: bool) -> Runtime:
    """The runtime `engine` asks for, connected."""
    sigterm = signal.getsignal(signal.SIGTERM)
    runner = make_runtime(engine.runtime, engine.device, engine.workers, address, engine.threads, quiet=quiet)
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ray.init installs sys.exit(15); the caller's handler stays
    return runner


def run_first_pass(plan: MergePlan, runner: Runtime, out_dir: OutputDir, quiet: bool):
    """The method's first pass over every unit: the units' statistics summed, then finished by the method."""
    progress = Progress(f"{plan.first_pass.label} (pass 1 of 2)", len(plan.tensors), bytes_read(plan), quiet=quiet)
    statistics = [s for s in runner.first_pass(plan, list(plan.units), out_dir, progress) if s is not None]
    progress.close()
    return plan.first_pass.finish(sum(statistics[1:], statistics[0]), plan.first_pass_params())


def finalize(plan: MergePlan, out_dir: OutputDir, records: list[ShardRecord]) -> None:
    weight_map = {name: record.shard for record in records for name in record.tensors}
    files: dict[str, bytes | Path] = {}
    config_json = output_config(plan)
    if config_json is not None:
        files["config.json"] = (json.dumps(config_json, indent=2) + "\n").encode()
    files.update(plan.copied_files)  # generation config and tokenizer, located and checked when planned
    if plan.config.engine.write_model_card:
        files["README.md"] = model_card(plan).encode()
    files[REPORT_NAME] = report_bytes(report_rows(plan, records), [ckpt.ref for ckpt in plan.models])
    out_dir.finalize(weight_map, bytes_written(plan), files)


def output_config(plan: MergePlan) -> dict | None:
    """The reference model's config.json with the saved dtype recorded, and the output's vocab_size where the
    merge laid the vocabulary out anew (in `text_config` where the model keeps it there)."""
    if not plan.reference.config:
        return None
    config = dict(plan.reference.config)
    if plan.vocabulary is not None:
        if "vocab_size" in config.get("text_config", {}):
            config["text_config"] = {**config["text_config"], "vocab_size": plan.vocabulary.size}
        else:
            config["vocab_size"] = plan.vocabulary.size
    dtype = CODE_TO_NAME.get(Counter(t.out_dtype for t in plan.tensors if t.merge).most_common(1)[0][0])
    if dtype:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = dtype
    return config


def model_card(plan: MergePlan) -> str:
    config = plan.config
    front = ["---", "library_name: transformers", "tags:", "- merge", "- distmerge"]
    if config.base_model:
        front += [f"base_model: {config.base_model}"]
    front += ["---", ""]
    models = "\n".join(f"- {ref}" for ref in config.model_refs() if ref != config.base_model)
    reference = f" ({plan.spec.reference})" if plan.spec.reference else ""
    base = f"\nBase model: {config.base_model}\n" if config.base_model else ""
    return "\n".join(front) + (
        f"# Merged model\n\nThis model was merged with distmerge using "
        f"**{plan.spec.name}**{reference}: {plan.spec.summary}.\n{base}\n## Models merged\n\n{models}\n\n"
        f"## Configuration\n\n```yaml\n{config.to_yaml()}```\n\n"
        f"Per-tensor statistics are in `{REPORT_NAME}` (`distmerge report` summarises them).\n"
    )


STAGE_RECORD = "stages.json"  # in the intermediate directory: stage name -> what its finished merge was made from


def merge_stages(stages: list[Stage], out: str | Path, intermediate_dir: str | Path, *, force: bool = False,
                 redo: bool = False, quiet: bool = False, address: str | None = None, log=print,
                 offline: bool = False) -> MergePlan:
    """Run a multi-stage merge (see `stages`): each stage into its directory, the final one into `out`.

    Every stage is checked as far as it can be before the first one starts. A named stage is skipped when its
    directory holds the finished merge of the same config and inputs (unless `redo`); an interrupted stage
    resumes like any merge. Returns the final stage's plan."""
    intermediate_dir = Path(intermediate_dir)
    hub = HubAccess(offline=offline, quiet=quiet)
    check_stages(stages, intermediate_dir, hub)
    record_file = intermediate_dir / STAGE_RECORD
    runtimes: dict[tuple, Runtime] = {}  # one per way of running, reused by every stage that runs that way
    try:
        for number, stage in enumerate(stages, start=1):
            final = number == len(stages)
            target = Path(out) if final else intermediate_dir / stage.name
            label = f"{'final merge' if stage.name is None else f'stage {stage.name}'} ({number} of {len(stages)})"
            records = _read_json_object(record_file)
            if (not final and not redo and OutputDir(target).holds_finished_merge
                    and records.get(stage.name) == stage_fingerprint(build_plan(stage.config, hub=hub))):
                log(f"{label}: up to date in {target}")
                continue
            if not quiet:
                log(f"{label}: {stage.config.merge_method} into {target}")
            engine = stage.config.engine
            way = (engine.runtime, engine.device, engine.workers, engine.threads)
            if way not in runtimes:
                runtimes[way] = connect(engine, address, quiet)
            # a stage's directory is distmerge's own: replacing what an earlier run left there needs no --force
            plan = merge(stage.config, target, force=force or not final, quiet=quiet, address=address, log=log,
                         offline=offline, runtime=runtimes[way])
            if not final:
                records[stage.name] = stage_fingerprint(plan)
                atomic_write_text(record_file, json.dumps(records, indent=2, sort_keys=True) + "\n")
    finally:
        for runner in runtimes.values():
            runner.close()
    return plan


def check_stages(stages: list[Stage], intermediate_dir: Path, hub: HubAccess, config_only: bool = False) -> None:
    """Every stage's settings before any model is opened or downloaded, then each stage as far as it can be."""
    for stage in stages:
        check_config(stage.config)
    for stage in stages:
        check_stage(stage, intermediate_dir, hub, config_only)


def check_stage(stage: Stage, intermediate_dir: Path, hub: HubAccess = HubAccess(), config_only: bool = False
                ) -> None:
    """Before any stage runs: a stage whose inputs all exist gets every check of a single merge; one that reads
    an earlier stage's output gets its method, its parameter names and its other models checked. `config_only`:
    as for `build_plan` (planning: models may have only their config.json, and hub ids get only that downloaded)."""
    if not stage.needs:
        build_plan(stage.config, config_only, hub)
        return
    check_parameter_names(stage.config, get_method(stage.config.merge_method), list(stage.config.models))
    from_stages = {str(intermediate_dir / name) for name in stage.needs}
    for ref in stage.config.model_refs():
        if ref.partition("+")[0] not in from_stages:
            Checkpoint.open(ref, stage.config.base_dir, config_only, hub)


def stage_fingerprint(plan: MergePlan) -> str:
    """What a stage's output was made from: its config, its input files as they are now (an earlier stage that
    was redone has new files) and the device asked for."""
    return fingerprint(plan, plan.config.engine.device or "cpu", plan.config.engine.threads)


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
