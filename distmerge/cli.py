"""The `distmerge` command line.

User errors print one line, `error: ...`, and exit 2; an interrupted merge (Ctrl-C: 130, SIGTERM: 143) stops
cleanly and resumes when rerun.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import click

from . import __version__
from .config import load_config, parse_device, parse_mergekit_size, parse_seed, parse_size
from .errors import ConfigError, UserError


def _load(config_path: str, **overrides):
    return _with_overrides(load_config(config_path), **overrides)


def _with_overrides(config, seed=None, shard_size=None, device=None, runtime=None, workers=None, threads=None,
                    memory_budget=None, **flags):
    """The config with the command line's settings in place of its `distmerge:` block's."""
    engine = config.engine
    if memory_budget is not None:
        engine = replace(engine, memory_budget=parse_size(memory_budget, "--memory-budget"))
    if seed is not None:
        engine = replace(engine, seed=parse_seed(seed, "--seed"))
    if shard_size is not None:
        engine = replace(engine, shard_size=parse_size(shard_size, "--shard-size"))
    if device is not None:
        engine = replace(engine, device=parse_device(device, "--device"))
    if runtime is not None:
        engine = replace(engine, runtime=runtime)
    if workers is not None:
        engine = replace(engine, workers=workers)
    if threads is not None:
        engine = replace(engine, threads=threads)
    engine = replace(engine, **{name: value for name, value in flags.items() if value is not None})
    return replace(config, engine=engine)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distmerge")
def cli():
    """Merge fine-tuned checkpoints of one base model, training-free (R-TSVM, TSV-M, TIES, DARE, ...)."""


# mergekit-yaml flags that have no meaning here, accepted so that a mergekit command line runs unchanged
# (each says why in the README's "Coming from mergekit").
MERGEKIT_NO_OPS = ("--lazy-unpickle/--no-lazy-unpickle", "--low-cpu-memory/--no-low-cpu-memory",
                   "--read-to-gpu/--no-read-to-gpu", "--clone-tensors/--no-clone-tensors",
                   "--async-write/--no-async-write", "--safe-serialization", "--lora-merge-cache")
# mergekit-yaml flags refused, with what to do instead.
MERGEKIT_REFUSED = {
    "--no-safe-serialization": "distmerge only writes safetensors (pickled weights can run code when loaded)",
    "--trust-remote-code": "distmerge never runs code from a model repository; it needs none to merge",
    "--unsafe-truncate-embeddings": "models whose vocabularies differ are merged with `tokenizer_source` (union, "
                                    "base or a model), which lays their rows out by token instead of cutting them",
    "--lora-merge-dtype": "a LoRA adapter is applied in its model's stored dtype, as PEFT's merge_and_unload "
                          "does on the model as saved; convert the model to that dtype first",
    "--transformers-cache": "hub ids are read from (and downloaded into) the Hugging Face cache: set "
                            "HF_HUB_CACHE=DIR instead",
}

offline_option = click.option(
    "--offline", is_flag=True,
    help="Never download: hub ids must already be in the Hugging Face cache (as with HF_HUB_OFFLINE=1).")


def _mergekit_no_op(f):
    for flag in MERGEKIT_NO_OPS:
        f = click.option(flag, hidden=True, default=None, expose_value=False)(f)
    f = click.option("--write-threads", hidden=True, type=int, expose_value=False)(f)
    return click.option("-v", "verbosity", count=True, hidden=True, expose_value=False)(f)


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output directory (or give it as OUT).")
@click.option("--runtime", type=click.Choice(["local", "ray"]), help="local: this process. ray: one actor per GPU.")
@click.option("--device", help="cpu or cuda (default: the config's distmerge.device, else cpu).")
@click.option("--cuda", is_flag=True, help="Same as --device cuda.")
@click.option("--multi-gpu", is_flag=True, help="Same as --runtime ray: one worker per GPU of this machine.")
@click.option("--gpu-rich", is_flag=True, help="Same as --cuda --multi-gpu.")
@click.option("--seed", "--random-seed", "seed", type=int, help="Seed for random methods (DARE, DELLA).")
@click.option("--shard-size", help="Output shard size, e.g. 2GB (default 5GB).")
@click.option("--out-shard-size", help="Output shard size as mergekit writes it: 5B is 5e9 bytes, also K and M.")
@click.option("--memory-budget", help="Memory one worker may hold for a tensor, e.g. 8GB (default: a quarter of "
              "this machine's; under Ray, of the smallest worker's share of its node, or of the smallest GPU); larger "
              "tensors of elementwise methods are merged in row blocks.")
@click.option("--workers", type=click.IntRange(min=1), help="Ray runtime: number of actors (default: one per GPU).")
@click.option("--address", help="Ray runtime: cluster address (default: RAY_ADDRESS, else a local Ray).")
@click.option("--threads", "-j", "--num-threads", "threads", type=click.IntRange(min=1),
              help="CPU threads per worker (default: all cores locally, 1 per Ray CPU worker).")
@click.option("--allow-crimes", is_flag=True, default=None,
              help="Merge models whose config.json architectures differ (their tensors must still match).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=None, help="Write the tokenizer files (default yes).")
@click.option("--write-model-card/--no-write-model-card", default=None, help="Write README.md (default yes).")
@click.option("-I", "--intermediate-dir", type=click.Path(file_okay=False),
              help="Multi-stage configs: where the named stages are written (default: OUT.stages).")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Multi-stage configs: reuse a stage whose config and inputs are unchanged.")
@click.option("--force", is_flag=True,
              help="Replace an existing output directory (an unfinished run of this same merge is resumed).")
@click.option("--quiet", is_flag=True, help="No progress output (download progress bars included).")
@offline_option
@_mergekit_no_op
def merge(config_path, out_path, out, runtime, device, cuda, multi_gpu, gpu_rich, seed, shard_size, out_shard_size,
          memory_budget, workers, address, threads, allow_crimes, copy_tokenizer, write_model_card, intermediate_dir,
          lazy, force, quiet, offline):
    """Merge the models of CONFIG into OUT (mergekit-yaml's command line works too). A CONFIG of several YAML
    documents is a multi-stage merge, as mergekit-multi runs it: the named ones go to the intermediate
    directory, the unnamed one to OUT."""
    from .merge import merge as run_merge
    from .merge import merge_stages
    from .stages import is_multi_stage, load_stages

    out = _one_value("the output directory", ("OUT", out_path), ("-o/--out", out))
    if out is None:
        raise click.UsageError("Missing the output directory: give it as OUT or with -o.")
    device = _one_value("the device", ("--device", device), ("--cuda", "cuda" if cuda or gpu_rich else None))
    runtime = _one_value("the runtime", ("--runtime", runtime),
                         ("--multi-gpu", "ray" if multi_gpu or gpu_rich else None))
    if out_shard_size is not None:
        shard_size = _one_value("the shard size", ("--shard-size", shard_size),
                                ("--out-shard-size", parse_mergekit_size(out_shard_size, "--out-shard-size")))
    settings = dict(seed=seed, shard_size=shard_size, device=device, runtime=runtime, workers=workers,
                    threads=threads, memory_budget=memory_budget, allow_crimes=allow_crimes,
                    copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if is_multi_stage(_read_text(config_path), config_path):
        intermediate_dir = Path(intermediate_dir or f"{Path(out)}.stages")
        stages = [replace(stage, config=_with_overrides(stage.config, **settings))
                  for stage in load_stages(Path(config_path), intermediate_dir)]
        plan = merge_stages(stages, out, intermediate_dir, force=force, redo=not lazy, quiet=quiet,
                            address=address, log=log, offline=offline)
    else:
        plan = run_merge(_with_overrides(load_config(config_path), **settings), out, force=force, quiet=quiet,
                         address=address, log=log, offline=offline)
    if not quiet:
        click.echo(f"merged {len(plan.tensors)} tensors into {out}", err=True)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None


def _one_value(what: str, *given: tuple[str, object]):
    """The value given by one or more spellings of the same setting; they must agree."""
    values = {name: value for name, value in given if value is not None}
    if len(set(map(str, values.values()))) > 1:
        raise click.UsageError(f"{' and '.join(values)} give different values for {what}; give one.")
    return next(iter(values.values()), None)


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--deep", is_flag=True, help="Also read every input tensor and check it for NaN and Inf.")
@offline_option
def validate(config_path, deep, offline):
    """Check CONFIG and its checkpoints without merging (hub ids not in the cache are downloaded first)."""
    from .estimates import describe
    from .hub import HubAccess
    from .plan import build_plan

    hub = HubAccess(offline=offline)
    for label, config in _each_stage(config_path, hub):
        plan = build_plan(config, hub=hub)
        if deep:
            from .validate import scan_inputs

            scan_inputs(plan)
        click.echo(label + describe(plan, config.engine.device or "cpu"))
    click.echo("ok")


def _each_stage(config_path: str, hub, config_only: bool = False, **overrides):
    """(heading, config) of each merge in CONFIG that can be planned now: the config itself, or each stage of a
    multi-stage config whose inputs exist (one that reads another stage's output is checked as far as it can be,
    and said so)."""
    from .merge import check_stages
    from .stages import is_multi_stage, load_stages

    if not is_multi_stage(_read_text(config_path), config_path):
        yield "", _load(config_path, **overrides)
        return
    intermediate_dir = Path(config_path).parent / "stages"  # not created: only names the stages' outputs
    stages = load_stages(Path(config_path), intermediate_dir)
    check_stages(stages, intermediate_dir, hub, config_only)
    for stage in stages:
        label = "final merge" if stage.name is None else f"stage {stage.name}"
        if stage.needs:
            click.echo(f"{label}: {stage.config.merge_method} of stage(s) {', '.join(stage.needs)}: its method, "
                       "parameters and other models are checked; the rest is planned when they have run\n")
            continue
        yield f"{label}:\n", _with_overrides(stage.config, **overrides)


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--gpus", type=click.IntRange(min=1), help="Estimate for this many GPU workers.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes sharing the work.")
@click.option("--read-gbps", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Storage read bandwidth per node, GB/s.")
@click.option("--write-gbps", type=click.FloatRange(min=0, min_open=True), help="Write bandwidth per node, GB/s "
              "(default: the read bandwidth).")
@click.option("--workers", type=click.IntRange(min=1), help="Estimate for this many CPU workers (without --gpus).")
@click.option("--shard-size", help="Output shard size, as for merge (each shard is one unit of work).")
@click.option("--memory-budget", help="Memory one worker may hold for a tensor, as for merge.")
@offline_option
def plan(config_path, gpus, nodes, read_gbps, write_gbps, workers, shard_size, memory_budget, offline):
    """What a merge of CONFIG will do: tensors, bytes, SVDs, memory per worker, and a lower-bound time.

    Models that have only a config.json (not downloaded yet) are planned from their architecture; of hub ids
    not in the cache, only config.json and the tokenizer files are downloaded."""
    from .estimates import Cluster, describe
    from .hub import HubAccess
    from .plan import build_plan

    hub = HubAccess(offline=offline)

    cluster = Cluster(workers=gpus or workers or 1, nodes=nodes, read_gbps=read_gbps,
                      write_gbps=write_gbps or read_gbps, device="cuda" if gpus else "cpu")
    for label, config in _each_stage(config_path, hub, config_only=True, device="cuda" if gpus else None,
                                     shard_size=shard_size, memory_budget=memory_budget):
        merge_plan = build_plan(config, config_only=True, hub=hub)
        click.echo(label + describe(merge_plan, config.engine.device or "cpu", cluster))


@cli.command()
@click.argument("name", required=False)
def methods(name):
    """List the merge methods and their parameters (or one method's)."""
    from .methods import all_methods, get_method

    specs = [get_method(name)] if name else all_methods()
    for spec in specs:
        base = ("base model required" if spec.needs_base
                else "base model optional (the origin when given)" if spec.optional_base
                else "no base model needed (a base_model is merged as one more model)" if spec.base_is_model
                else "no base model needed")
        count = (f"{spec.min_models}" if spec.min_models == spec.max_models
                 else f"{spec.min_models}+" if spec.max_models is None else f"{spec.min_models}-{spec.max_models}")
        click.echo(f"{spec.name}: {spec.summary}")
        click.echo(f"    {base}; models: {count}" + (f"; {spec.reference}" if spec.reference else ""))
        for param in spec.params:
            scope = "per model" if param.per_model else "global"
            alias = f" (mergekit: {param.alias})" if param.alias else ""
            click.echo(f"    {param.name}{alias} [{scope}, {param.describe_range()}, default {param.default!r}]: "
                       f"{param.doc}")
        if spec.details:
            for line in spec.details.strip().splitlines():
                click.echo(f"    {line}")
        click.echo("")
    click.echo("Formulas, defaults, provenance and the differences from mergekit: docs/methods.md in the distmerge "
               "repository" + (f" (section `{name}`)" if name else ""))


@cli.command()
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--plots/--no-plots", default=True, help="Write rank_kept.png and outlier_share.png into OUT.")
def report(out_dir, plots):
    """Summarise the per-tensor statistics of the finished merge in OUT."""
    from .report import plot, read_report, summarize

    rows, models = read_report(out_dir)
    click.echo(summarize(rows, models))
    if plots:
        try:
            written = plot(rows, models, out_dir)
        except ImportError:
            click.echo("plots need matplotlib: pip install 'distmerge[plots]'", err=True)
            return
        for path in written:
            click.echo(f"wrote {path}")


def _usage_error(exc: click.ClickException) -> None:
    """A usage error (unknown option or command, missing argument, bad value) as one `error:` line and exit 2,
    like every other user error, instead of click's usage block; `distmerge` alone still shows the help."""
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # click >= 8.2
        exc.show()
        sys.exit(exc.exit_code)
    message = " ".join(exc.format_message().split())
    if isinstance(exc, click.NoSuchOption) and exc.option_name in MERGEKIT_REFUSED:
        message = f"{exc.option_name} is a mergekit option distmerge refuses: {MERGEKIT_REFUSED[exc.option_name]}."
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "distmerge"
    click.echo(f"error: {message} See `{command} --help`.", err=True)
    sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a merge stops as on Ctrl-C (partial shard removed, finished shards kept,
    the output's lock released), and the process exits 143."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _catch_sigterm():
    """Install the SIGTERM handler (signals are delivered to the main thread only); returns the previous one."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _interrupted(exc: BaseException, prefix: str = "") -> None:
    if isinstance(exc, Terminated):
        click.echo(f"{prefix}terminated (SIGTERM); rerun the same command to resume", err=True)
        sys.exit(143)
    click.echo(f"{prefix}interrupted; rerun the same command to resume", err=True)
    sys.exit(130)


def main(argv=None) -> None:
    previous_sigterm = _catch_sigterm()
    try:
        cli.main(args=argv, prog_name="distmerge", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C (and SIGTERM) into Abort
            _interrupted(exc.__cause__)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        _usage_error(exc)
    except KeyboardInterrupt as exc:
        _interrupted(exc, prefix="\n")
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    main()
