"""The ``wsimil`` command: thin wrappers over the stage functions.

Heavy imports (torch, timm, openslide, zarr) happen inside the commands so ``--help`` is instant.
Every stage command takes the run folder, ``--manifest`` (default ``RUN/manifest.csv``),
``--config FILE`` (YAML with a section per stage) and one option per setting of its section
(:mod:`wsimil.cli_options`), which override the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .cli_cache import cache
from .cli_check import check
from .cli_common import (
    CONFIG,
    MANIFEST,
    OVERWRITE,
    RUN_DIR,
    SHARD,
    SLIDES,
    _console,
    _finish,
    _forward_args,
    _load,
    _select,
)
from .cli_features import encoders, export_features, import_features
from .cli_options import section_options
from .cli_review import review
from .config import EmbedConfig, HeatmapConfig, TileConfig, TrainConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsimil")
def main():
    """Weakly supervised whole-slide image classification with attention-based deep MIL.

    \b
    Stages, each reading the previous stage's folder in RUN_DIR:
      wsimil check RUN_DIR     pre-flight: manifest, ids, labels, files, mpp (writes nothing)
      wsimil tile RUN_DIR      tissue mask + tile grid      -> RUN_DIR/tiles/
      wsimil embed RUN_DIR     frozen CNN features          -> RUN_DIR/features/<encoder>/
      wsimil cache RUN_DIR     uint8 tile pixels (end to end) -> RUN_DIR/tile_cache/<px>px/
      wsimil train RUN_DIR     attention MIL head           -> RUN_DIR/models/<name>/
      wsimil predict RUN_DIR   scores (+ metrics with labels) -> RUN_DIR/predictions/<name>/
      wsimil heatmap RUN_DIR   predictions + overlays       -> RUN_DIR/heatmaps/<name>/
      wsimil report RUN_DIR    cohort predictions + review page from the heatmaps
      wsimil review RUN_DIR    zoomable slide viewer with the overlays, in a browser
    `wsimil demo` generates sample cohorts and runs them all: CV training on one, predict
    and heatmap with the trained model on an unlabelled one.
    """


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-slides", default=24, show_default=True, help="Number of slides.")
@click.option("--positive-fraction", default=0.5, show_default=True)
@click.option("--size-px", default=10_000, show_default=True, help="Slide width and height (px).")
@click.option("--mpp", default=0.5, show_default=True, help="Microns per level-0 pixel.")
@click.option("--n-lesions", default=3, show_default=True, help="Lesions per positive slide.")
@click.option("--seed", default=0, show_default=True)
def synth(out_dir, n_slides, positive_fraction, size_px, mpp, n_lesions, seed):
    """Generate a sample cohort of synthetic pyramidal TIFF slides in OUT_DIR (with manifest.csv)."""
    from .progress import progress_bar
    from .synth import make_cohort

    with progress_bar(_console(), "synth", n_slides) as advance:
        manifest = make_cohort(
            out_dir, n_slides=n_slides, positive_fraction=positive_fraction, width_px=size_px,
            height_px=size_px, mpp=mpp, n_lesions=n_lesions, seed=seed,
            progress=lambda i, n, sid: advance(),
        )  # fmt: skip
    click.echo(f"wrote {manifest}")


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--mask",
    "mask_source",
    default=None,
    metavar="DIR|TEMPLATE",
    help="User masks instead of the computed one: a folder with <slide_id>.geojson/.png/.tif, or a path with {slide_id}.",
)
@OVERWRITE
@SHARD
@SLIDES
@section_options(TileConfig, "tile")
def tile(run_dir, manifest, config_file, mask_source, overwrite, shard, slides, overrides):
    """Tissue-mask each slide and grid it into tiles -> RUN_DIR/tiles/<slide_id>.zarr."""
    from .runner import RunFolderError
    from .tile import run_tile

    cfg, df = _load(run_dir, manifest, config_file, overrides=overrides)
    console = _console()
    try:
        result = run_tile(
            _select(df, shard, slides), run_dir, cfg.tile, overwrite=overwrite, console=console,
            mask=mask_source,
        )  # fmt: skip
    except RunFolderError as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(console, result, "tile", ["n_tiles", "tissue_mm2"])


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--devices",
    default=None,
    metavar="0,1,...",
    help="One process per GPU (or 'cpu' entries), sharing the cohort.",
)
@OVERWRITE
@SHARD
@SLIDES
@section_options(EmbedConfig, "embed")
def embed(run_dir, manifest, config_file, devices, overwrite, shard, slides, overrides):
    """Embed every slide's tiles with a frozen encoder -> RUN_DIR/features/<encoder>/<slide_id>.zarr."""
    from .embed import embed_on_devices, run_embed
    from .encoders import MissingWeightsError

    if devices:
        if shard or overrides["embed"]["device"]:
            raise click.UsageError(
                "--devices splits the cohort itself; do not combine it with --shard or --device"
            )
        argv = _forward_args(click.get_current_context(), drop={"devices", "device", "shard"})
        sys.exit(embed_on_devices([d.strip() for d in devices.split(",") if d.strip()], argv))
    cfg, df = _load(run_dir, manifest, config_file, overrides=overrides)
    console = _console()
    try:
        result = run_embed(
            _select(df, shard, slides), run_dir, cfg.embed, overwrite=overwrite, console=console
        )
    except (MissingWeightsError, ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    _finish(console, result, f"embed ({cfg.embed.encoder})", ["n_tiles"])


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--encoder",
    default=None,
    help="Train on the features of this encoder [from the config's embed section].",
)
@click.option(
    "--bags",
    "bag_table",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Train on a MIL bag table (CSV, no header: label, bag id, features) instead of the slide features.",
)
@click.option(
    "--memory-budget-gb",
    type=float,
    default=8.0,
    show_default=True,
    help="Features held in memory for training; slides beyond it are read from their stores at each use.",
)
@section_options(TrainConfig, "train")
def train(run_dir, manifest, config_file, encoder, bag_table, memory_budget_gb, overrides):
    """Train a MIL model on the slide features (or a bag table) -> RUN_DIR/models/<name>/."""
    from .layout import RunLayout
    from .train import run_train, run_train_table

    given = overrides["train"]
    given["name"] = given["name"] or given["model"]  # a new pooling gets its own folder
    overrides["embed"] = {"encoder": encoder}
    console = _console()
    try:
        if bag_table is not None:
            from .config import load_config

            cfg = load_config(config_file, **overrides)
            model_dir = RunLayout(run_dir).model_dir(cfg.train.name)
            res = run_train_table(bag_table, model_dir, cfg.train, console=console)
        else:
            cfg, df = _load(run_dir, manifest, config_file, overrides=overrides, require_label=True)
            res = run_train(
                df, run_dir, cfg.train, encoder=cfg.embed.encoder,
                memory_budget_gb=memory_budget_gb, console=console,
            )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    shown = [
        c for c in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc") if c in res
    ]
    macro = " (F1, AUC: macro)" if len(res["classes"]) > 2 else ""
    console.print(
        f"test ({res['n_folds']} fold(s), {res['n']} predictions, classes {', '.join(res['classes'])}){macro}: "
        + "  ".join(f"{c} {res[c]:.3f} ± {res[c + '_std']:.3f}" for c in shown)
    )
    console.print(f"model written to {res['model_dir']}")


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model: a name under RUN_DIR/models, or the path of a model folder anywhere (e.g. another run's) [the config's train name].",
)
@OVERWRITE
@SHARD
@SLIDES
@section_options(HeatmapConfig, "heatmap")
def heatmap(run_dir, manifest, config_file, model_name, overwrite, shard, slides, overrides):
    """Slide predictions, attention overlays and review exports -> RUN_DIR/heatmaps/<model>/.

    Per slide, in slides/<id>/: <id>.csv (tile scores), <id>.png (overlay), <id>.geojson
    (QuPath), <id>.heatmap.tiff (pyramid), top/ (top tiles), <id>.html. A run over the whole
    manifest then writes the cohort's predictions.csv, summary.json and index.html (as
    `wsimil report` does).
    """
    from .heatmap import model_location, run_heatmap
    from .layout import RunLayout

    cfg, df = _load(run_dir, manifest, config_file, overrides=overrides)
    model_name = model_name or cfg.train.name
    console = _console()
    whole = not (shard or slides)
    try:
        result = run_heatmap(
            _select(df, shard, slides), run_dir, cfg.heatmap, model_name=model_name,
            overwrite=overwrite, console=console, report=whole,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    if whole and cfg.heatmap.review_page:
        name = model_location(RunLayout(run_dir), model_name)[1]
        console.print(f"review page: {RunLayout(run_dir).review_index(name)}")
    _finish(console, result, "heatmap", [])


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--model",
    "model_name",
    required=True,
    help="A name under RUN_DIR/models, or the path of a model folder anywhere (e.g. another run's).",
)
@click.option(
    "--bootstrap",
    default=1000,
    show_default=True,
    help="Bootstrap replicates of the 95% intervals.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the model scores the slides (auto: CUDA when visible, as train does).",
)
@click.option(
    "--threads", type=int, default=0, help="CPU threads for scoring (0: torch's default)."
)
@OVERWRITE
@SHARD
@SLIDES
def predict(run_dir, manifest, config_file, model_name, bootstrap, device, threads, overwrite,
            shard, slides):  # fmt: skip
    """Score a cohort with a trained model -> RUN_DIR/predictions/<model>/ (labels optional).

    With labels: metrics.json (AUC, balanced accuracy, F1, sensitivity, specificity with 95%
    bootstrap intervals over cases, ECE), roc.png and calibration.png. Nothing is written into
    the model folder.
    """
    from .predict import run_predict

    _, df = _load(run_dir, manifest, config_file, overrides={})
    console = _console()
    whole = not (shard or slides)
    try:
        result = run_predict(
            _select(df, shard, slides), run_dir, model_name, overwrite=overwrite,
            console=console, cohort=whole, n_boot=bootstrap, device=device, threads=threads,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    _finish(console, result, "predict", [])


@main.command()
@RUN_DIR
@MANIFEST
@click.option("--model", "model_name", required=True, help="Model folder under RUN_DIR/models.")
@click.option("--review-page/--no-review-page", default=True, help="Write index.html [on].")
@click.option("--viewer-url", default="http://localhost:8000", show_default=True,
              help="index.html links each slide to `wsimil review` here ('' for none).")  # fmt: skip
def report(run_dir, manifest, model_name, review_page, viewer_url):
    """Cohort outputs from the per-slide heatmaps -> predictions.csv, summary.json, index.html."""
    from .layout import RunLayout
    from .manifest import ManifestError, read_manifest
    from .report import write_report

    layout = RunLayout(run_dir)
    try:
        df = read_manifest(manifest or layout.manifest)
        summary = write_report(layout, model_name, df, review_page=review_page,
                               viewer_url=viewer_url)  # fmt: skip
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    counts = ", ".join(f"{v} {k}" for k, v in summary["status"].items())
    click.echo(f"{summary['n_slides']} slides ({counts}); wrote {', '.join(summary['files'])}")


@main.command("config")
def config_defaults():
    """Print every setting with its default and description, as a YAML config."""
    from .config import defaults_yaml

    click.echo(defaults_yaml(), nl=False)


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_run"),
    show_default=True,
)
@click.option("--n-slides", type=int, default=None, help="Slides in the sample cohort [24].")
@click.option("--size-px", type=int, default=None, help="Slide width and height [10000].")
@click.option(
    "--encoder", default=None, help="Encoder [efficientnet_lite0 with its real ImageNet weights]."
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out_dir, n_slides, size_px, encoder, seed):
    """Generate sample cohorts; tile, embed, 5-fold CV train on one, predict and heatmap another.

    The second cohort (6 unlabelled slides, OUT/external) is scored with the trained ensemble
    where it lives, as an external cohort would be.
    """
    from .demo import run_demo

    try:
        res = run_demo(
            out_dir, n_slides=n_slides, size_px=size_px, encoder=encoder, seed=seed,
            console=_console(),
        )  # fmt: skip
    except ValueError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    if res["failed"]:
        sys.exit(1)


main.add_command(check)
main.add_command(cache)
for _cmd in (encoders, import_features, export_features, review):
    main.add_command(_cmd)

if __name__ == "__main__":  # pragma: no cover
    main()
