"""``wsimil review``: open a run's slides with their attention overlays in a local web app
(:mod:`wsimil.viewer`). Flask, OpenSlide and the viewer are imported when the command runs."""

from __future__ import annotations

import click

from .cli_common import MANIFEST, RUN_DIR


@click.command()
@RUN_DIR
@MANIFEST
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model whose heatmaps to show: a name under RUN_DIR/models or a model folder's path "
    "[the run's only heatmap folder].",
)
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The default is this machine only; 0.0.0.0 serves every network "
    "the machine is on, with no login and no encryption: prefer an SSH tunnel (see README).",
)
def review(run_dir, manifest, model_name, port, host):
    """Review the cohort in a browser: a zoomable viewer of each slide with its overlay.

    Lists the manifest's slides (probability, label, split) and opens each in a deep-zoom
    viewer: slide tiles read on demand, the attention overlay with opacity and scaling, the
    top tiles outlined and clickable, a scale bar. Then open http://HOST:PORT/.
    """
    from .viewer.serve import ReviewError, open_review

    try:
        app, name = open_review(run_dir, manifest=manifest, model=model_name, host=host)
    except ReviewError as exc:
        raise click.ClickException(str(exc)) from exc
    shown = "localhost" if host in ("127.0.0.1", "localhost") else host
    click.echo(f"wsimil review: {run_dir} ({name}) at http://{shown}:{port}/  (Ctrl+C stops)")
    from .viewer.app import serve

    serve(app, host=host, port=port)
