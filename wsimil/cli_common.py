"""What every ``wsimil`` command shares: the common options, loading settings and manifest, the end.

Kept apart from :mod:`wsimil.cli` so that commands defined in other modules
(:mod:`wsimil.cli_check`) use the same options and messages. Nothing heavy is imported here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

RUN_DIR = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
MANIFEST = click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Cohort manifest CSV (slide_id, path, label[, case_id, mpp]). Default: RUN_DIR/manifest.csv.",
)
CONFIG = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="YAML config with tile/embed/cache/train/heatmap sections.",
)
OVERWRITE = click.option(
    "--overwrite",
    is_flag=True,
    help="Redo slides whose outputs exist (also when made with other settings).",
)
SHARD = click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Process only every N-th slide starting at I (0-based), for array jobs.",
)
SLIDES = click.option(
    "--slides",
    default=None,
    metavar="ID,ID,...",
    help="Process only these slides of the manifest (the workflow's per-slide jobs).",
)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _load(run_dir, manifest, config_file, *, overrides, require_label=False):
    """The resolved settings and the manifest; bad input ends the command with one line.

    Labels are checked in the config's ``train.label_column`` (any column name works).
    """
    from .config import load_config
    from .layout import RunLayout
    from .manifest import ManifestError, read_manifest

    try:
        cfg = load_config(config_file, **overrides)
        df = read_manifest(
            manifest or RunLayout(run_dir).manifest,
            require_label=require_label,
            label_column=cfg.train.label_column,
        )
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    return cfg, df


def _select(df, shard, slides):
    from .manifest import ManifestError, select

    try:
        return select(df, shard_spec=shard, slides=slides)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from exc


def _finish(console, result, title: str, columns: list[str]) -> None:
    """Summary table, then exit non-zero when a slide failed."""
    from .runner import n_failed, summarise

    summarise(console, result, title, columns)
    failed = n_failed(result)
    stopped = result.attrs.get("stopped")
    if stopped:
        not_run = int((result["status"] == "not_run").sum())
        click.echo(
            f"stopped: {stopped}; {not_run} slide(s) not started, finished slides are kept; "
            "free space or make the run folder writable, then run the same command again",
            err=True,
        )
        sys.exit(1)
    if failed:
        click.echo(f"{failed} slide(s) failed; see the status.jsonl of this stage", err=True)
        sys.exit(1)


def _forward_args(ctx: click.Context, *, drop: set[str]) -> list[str]:
    """Rebuild a command's arguments from its parsed parameters (to start copies of it)."""
    argv: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None:
            continue
        if isinstance(param, click.Argument):
            argv.insert(0, str(value))
        elif param.is_flag and param.secondary_opts:
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            argv += [param.opts[0]] if value else []
        elif isinstance(value, list):
            argv += [param.opts[0], ",".join(str(v) for v in value)]
        else:
            argv += [param.opts[0], str(value)]
    return argv
