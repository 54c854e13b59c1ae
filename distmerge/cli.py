"""The `distmerge` command line.

User errors print one line, `error: ...`, and exit 2; an interrupted merge (Ctrl-C: 130, SIGTERM: 143) stops
cleanly and resumes when rerun.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace

import click

from . import __version__
from .config import load_config, parse_device, parse_seed, parse_size
from .errors import UserError


def _load(config_path: str, seed=None, shard_size=None, device=None, runtime=None, workers=None, threads=None):
    config = load_config(config_path)
    engine = config.engine
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
    return replace(config, engine=engine)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distmerge")
def cli():
    """Merge fine-tuned checkpoints of one base model, training-free (R-TSVM, TSV-M, TIES, DARE, ...)."""


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--runtime", type=click.Choice(["local", "ray"]), help="local: this process. ray: one actor per GPU.")
@click.option("--device", help="cpu or cuda (default: the config's distmerge.device, else cpu).")
@click.option("--seed", type=int, help="Seed for random methods (DARE, DELLA).")
@click.option("--shard-size", help="Output shard size, e.g. 2GB (default 5GB).")
@click.option("--workers", type=click.IntRange(min=1), help="Ray runtime: number of actors (default: one per GPU).")
@click.option("--address", help="Ray runtime: cluster address (default: RAY_ADDRESS, else a local Ray).")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads per worker (default: all cores locally, 1 per Ray CPU worker).")
@click.option("--force", is_flag=True,
              help="Replace an existing output directory (an unfinished run of this same merge is resumed).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def merge(config_path, out, runtime, device, seed, shard_size, workers, address, threads, force, quiet):
    """Merge the models of CONFIG into OUT."""
    from .merge import merge as run_merge

    config = _load(config_path, seed, shard_size, device, runtime, workers, threads)
    plan = run_merge(config, out, force=force, quiet=quiet, address=address,
                     log=lambda msg: click.echo(msg, err=True))
    if not quiet:
        click.echo(f"merged {len(plan.tensors)} tensors into {out}", err=True)


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--deep", is_flag=True, help="Also read every input tensor and check it for NaN and Inf.")
def validate(config_path, deep):
    """Check CONFIG and its checkpoints without merging."""
    from .estimates import describe
    from .plan import build_plan

    config = _load(config_path)
    plan = build_plan(config)
    if deep:
        from .validate import scan_inputs

        scan_inputs(plan)
    click.echo(describe(plan, config.engine.device or "cpu"))
    click.echo("ok")


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--gpus", type=click.IntRange(min=1), help="Estimate for this many GPU workers.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes sharing the work.")
@click.option("--read-gbps", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Storage read bandwidth per node, GB/s.")
@click.option("--write-gbps", type=click.FloatRange(min=0, min_open=True), help="Write bandwidth per node, GB/s "
              "(default: the read bandwidth).")
@click.option("--workers", type=click.IntRange(min=1), help="Estimate for this many CPU workers (without --gpus).")
def plan(config_path, gpus, nodes, read_gbps, write_gbps, workers):
    """What a merge of CONFIG will do: tensors, bytes, SVDs, memory per worker, and a lower-bound time.

    Models that have only a config.json (not downloaded yet) are planned from their architecture."""
    from .estimates import Cluster, describe
    from .plan import build_plan

    config = _load(config_path, device="cuda" if gpus else None)
    merge_plan = build_plan(config, config_only=True)
    cluster = Cluster(workers=gpus or workers or 1, nodes=nodes, read_gbps=read_gbps,
                      write_gbps=write_gbps or read_gbps, device="cuda" if gpus else "cpu")
    click.echo(describe(merge_plan, config.engine.device or "cpu", cluster))


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
