"""``wsimil check``: the pre-flight check of a run's cohort (library code in :mod:`wsimil.check`)."""

from __future__ import annotations

import sys

import click

from .cli_common import CONFIG, MANIFEST, RUN_DIR, _load


@click.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--depth",
    type=click.Choice(["exists", "identify", "open"]),
    default="identify",
    show_default=True,
    help="Per slide file: exists; identify its format from its header (fast); open it as the stages "
    "do and confirm its mpp (about 10 ms per file).",
)
@click.option("--workers", default=8, show_default=True, help="Threads opening slides.")
@click.option(
    "--max-lines", default=20, show_default=True, help="Problem lines printed (all are counted)."
)
def check(run_dir, manifest, config_file, depth, workers, max_lines):
    """Check a cohort before running it: config, manifest, slide ids, labels, files, mpp.

    Writes nothing and takes no lock. Exit status 1 when any row has a problem.
    """
    from .check import check_cohort, print_report

    cfg, df = _load(run_dir, manifest, config_file, overrides={})
    report = check_cohort(
        df, run_dir, label_column=cfg.train.label_column, depth=depth,
        workers=workers,
    )  # fmt: skip
    print_report(lambda line: click.echo(line, err=True), report, max_lines=max_lines)
    if not report.ok:
        sys.exit(1)
