"""The ``wsimil`` command: thin wrappers over the stage functions.

Heavy imports (torch, timm, openslide, zarr) happen inside the commands so ``--help`` is instant.
Every stage command takes the run folder, ``--manifest`` (default ``RUN/manifest.csv``),
``--config FILE`` (YAML with a section per stage) and flags for the common options, which
override the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__

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
    help="YAML config with tile/embed/train/heatmap sections.",
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


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _load(
    run_dir: Path,
    manifest: Path | None,
    config_file: Path | None,
    *,
    require_label=False,
    label_column="label",
    **overrides,
):
    from .config import load_config
    from .manifest import ManifestError, read_manifest

    try:
        cfg = load_config(config_file, **overrides)
        df = read_manifest(
            manifest or run_dir / "manifest.csv",
            require_label=require_label,
            label_column=label_column,
        )
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    return cfg, df


def _forward_args(ctx: click.Context, *, drop: set[str]) -> list[str]:
    """Rebuild a command's arguments from its parsed parameters (to start copies of it)."""
    argv: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None or value is False:
            continue
        if isinstance(param, click.Argument):
            argv.insert(0, str(value))
        elif param.is_flag:
            argv.append(param.opts[0])
        else:
            argv += [param.opts[0], str(value)]
    return argv


def _summarise(console, df, title: str, columns: list[str]) -> None:
    from rich.table import Table

    counts = df["status"].value_counts().to_dict()
    table = Table(title=title)
    table.add_column("slides")
    for c in counts:
        table.add_column(c)
    for c in columns:
        table.add_column(c)
    extra = [f"{df[c].sum():,.6g}" for c in columns]
    table.add_row(str(len(df)), *[str(v) for v in counts.values()], *extra)
    console.print(table)


def _exit_for(df) -> None:
    failed = int((df["status"] == "error").sum())
    if failed:
        click.echo(f"{failed} slide(s) failed; see the status.jsonl of this stage", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsimil")
def main():
    """Weakly supervised whole-slide image classification with attention-based deep MIL.

    \b
    Stages, each reading the previous stage's folder in RUN_DIR:
      wsimil tile RUN_DIR      tissue mask + tile grid      -> RUN_DIR/tiles/
      wsimil embed RUN_DIR     frozen CNN features          -> RUN_DIR/features/<encoder>/
      wsimil train RUN_DIR     attention MIL head           -> RUN_DIR/models/<name>/
      wsimil heatmap RUN_DIR   predictions + overlays       -> RUN_DIR/heatmaps/<name>/
    `wsimil demo` generates a sample cohort and runs all four.
    """


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-slides", default=24, show_default=True, help="Number of slides.")
@click.option("--positive-fraction", default=0.5, show_default=True)
@click.option(
    "--size-px",
    default=10_000,
    show_default=True,
    help="Width and height of each slide in level-0 pixels.",
)
@click.option("--mpp", default=0.5, show_default=True, help="Microns per level-0 pixel.")
@click.option("--n-lesions", default=3, show_default=True, help="Lesions per positive slide.")
@click.option("--seed", default=0, show_default=True)
def synth(out_dir, n_slides, positive_fraction, size_px, mpp, n_lesions, seed):
    """Generate a sample cohort of synthetic pyramidal TIFF slides in OUT_DIR (with manifest.csv)."""
    from .progress import progress_bar
    from .synth import make_cohort

    console = _console()
    with progress_bar(console, "synth", n_slides) as advance:
        manifest = make_cohort(
            out_dir,
            n_slides=n_slides,
            positive_fraction=positive_fraction,
            width_px=size_px,
            height_px=size_px,
            mpp=mpp,
            n_lesions=n_lesions,
            seed=seed,
            progress=lambda i, n, sid: advance(),
        )
    click.echo(f"wrote {manifest}")


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--target-mpp", type=float, default=None, help="µm per pixel of the tiles [0.5 = 20x]."
)
@click.option(
    "--tile-px", type=int, default=None, help="Tile size in pixels at the target mpp [256]."
)
@click.option(
    "--overlap-px", type=int, default=None, help="Overlap between tiles at the target mpp [0]."
)
@click.option(
    "--tissue-threshold",
    type=float,
    default=None,
    help="Minimum tissue fraction of a kept tile [0.5].",
)
@click.option(
    "--remove-pen",
    is_flag=True,
    default=None,
    help="Drop blue, green and black pen marks from the tissue mask.",
)
@click.option(
    "--mask",
    "mask_source",
    default=None,
    metavar="DIR|TEMPLATE",
    help="User masks instead of the computed one: a folder with <slide_id>.geojson/.png/.tif, or a path with {slide_id}.",
)
@OVERWRITE
@SHARD
def tile(
    run_dir,
    manifest,
    config_file,
    target_mpp,
    tile_px,
    overlap_px,
    tissue_threshold,
    remove_pen,
    mask_source,
    overwrite,
    shard,
):
    """Tissue-mask each slide and grid it into tiles -> RUN_DIR/tiles/<slide_id>.zarr."""
    from .manifest import shard as take_shard
    from .tile import run_tile

    cfg, df = _load(
        run_dir,
        manifest,
        config_file,
        tile=dict(
            target_mpp=target_mpp,
            tile_px=tile_px,
            overlap_px=overlap_px,
            tissue_threshold=tissue_threshold,
            remove_pen=remove_pen,
        ),
    )
    console = _console()
    result = run_tile(
        take_shard(df, shard),
        run_dir,
        cfg.tile,
        overwrite=overwrite,
        console=console,
        mask=mask_source,
    )
    _summarise(console, result, "tile", ["n_tiles", "tissue_mm2"])
    _exit_for(result)


@main.command()
@RUN_DIR
@MANIFEST
@CONFIG
@click.option(
    "--encoder",
    default=None,
    help="Encoder name: efficientnet_lite0, resnet50_trunc, any timm name, hf-hub:ORG/NAME.",
)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(dir_okay=False),
    help="Local weights file for the encoder.",
)
@click.option(
    "--no-pretrained",
    is_flag=True,
    default=False,
    help="Random weights (tests and benchmarks only).",
)
@click.option("--batch-size", type=int, default=None)
@click.option(
    "--num-workers", type=int, default=None, help="DataLoader worker processes reading tiles."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option(
    "--devices",
    default=None,
    metavar="0,1,...",
    help="One process per GPU (or 'cpu' entries), sharing the cohort.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=None,
    help="Autocast dtype [auto: encoder's on CUDA, float32 on CPU].",
)
@click.option(
    "--reader",
    type=click.Choice(["auto", "openslide", "tifffile"]),
    default=None,
    help="Tile reader [auto].",
)
@click.option(
    "--compile", "compile_", is_flag=True, default=None, help="torch.compile the encoder."
)
@OVERWRITE
@SHARD
def embed(
    run_dir,
    manifest,
    config_file,
    encoder,
    checkpoint,
    no_pretrained,
    batch_size,
    num_workers,
    device,
    devices,
    precision,
    reader,
    compile_,
    overwrite,
    shard,
):
    """Embed every slide's tiles with a frozen encoder -> RUN_DIR/features/<encoder>/<slide_id>.zarr."""
    from .embed import embed_on_devices, run_embed
    from .encoders import MissingWeightsError
    from .manifest import shard as take_shard

    if devices:
        if shard or device:
            raise click.UsageError(
                "--devices splits the cohort itself; do not combine it with --shard or --device"
            )
        argv = _forward_args(click.get_current_context(), drop={"devices", "device", "shard"})
        sys.exit(embed_on_devices([d.strip() for d in devices.split(",") if d.strip()], argv))
    cfg, df = _load(
        run_dir,
        manifest,
        config_file,
        embed=dict(
            encoder=encoder,
            checkpoint=checkpoint,
            pretrained=False if no_pretrained else None,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            reader=reader,
            compile=compile_,
        ),
    )
    console = _console()
    try:
        result = run_embed(
            take_shard(df, shard), run_dir, cfg.embed, overwrite=overwrite, console=console
        )
    except (MissingWeightsError, ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    _summarise(console, result, f"embed ({cfg.embed.encoder})", ["n_tiles"])
    _exit_for(result)


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
    "--model",
    default=None,
    help="MIL pooling: gated_attention, attention, embedding_mean, embedding_max, instance_mean, instance_max.",
)
@click.option(
    "--name", default=None, help="Model folder name under RUN_DIR/models [the model name]."
)
@click.option(
    "--protocol",
    type=click.Choice(["holdout", "cv", "split_column"]),
    default=None,
    help="Holdout split, repeated stratified k-fold CV, or the manifest's split column [holdout].",
)
@click.option("--folds", "n_folds", type=int, default=None, help="CV folds [10].")
@click.option("--repeats", "n_repeats", type=int, default=None, help="CV repeats [1].")
@click.option("--epochs", type=int, default=None)
@click.option(
    "--max-instances",
    type=int,
    default=None,
    help="Instances sampled per bag per training step (never at evaluation).",
)
@click.option("--seed", type=int, default=None)
@click.option("--label-column", default=None)
@click.option(
    "--memory-budget-gb",
    type=float,
    default=8.0,
    show_default=True,
    help="Features held in memory for training; slides beyond it are read from their stores at each use.",
)
def train(
    run_dir,
    manifest,
    config_file,
    encoder,
    bag_table,
    model,
    name,
    protocol,
    n_folds,
    n_repeats,
    epochs,
    max_instances,
    seed,
    label_column,
    memory_budget_gb,
):
    """Train a MIL model on the slide features (or a bag table) -> RUN_DIR/models/<name>/."""
    from .bags import read_mil_table
    from .train import run_train, train_bags

    overrides = dict(
        model=model,
        name=name or model,
        epochs=epochs,
        seed=seed,
        label_column=label_column,
        protocol=protocol,
        n_folds=n_folds,
        n_repeats=n_repeats,
        max_instances=max_instances,
    )
    console = _console()
    try:
        if bag_table is not None:
            from .config import load_config

            cfg = load_config(config_file, train=overrides)
            res = train_bags(
                read_mil_table(bag_table),
                run_dir / "models" / cfg.train.name,
                cfg.train,
                console=console,
            )
        else:
            cfg, df = _load(
                run_dir,
                manifest,
                config_file,
                require_label=True,
                label_column=label_column or "label",
                train=overrides,
                embed=dict(encoder=encoder),
            )
            res = run_train(
                df,
                run_dir,
                cfg.train,
                encoder=cfg.embed.encoder,
                memory_budget_gb=memory_budget_gb,
                console=console,
            )
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    console.print(
        f"test ({res['n_folds']} fold(s), {res['n']} predictions): accuracy {res['accuracy']:.3f} ± {res['accuracy_std']:.3f}  "
        f"precision {res['precision']:.3f}  recall {res['recall']:.3f}  F1 {res['f1']:.3f}  AUC {res['auc']:.3f} ± {res['auc_std']:.3f}"
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
    help="Model folder under RUN_DIR/models [the config's train name].",
)
@click.option("--cmap", default=None, help="Matplotlib colormap [turbo].")
@click.option("--alpha", type=float, default=None, help="Overlay opacity [0.5].")
@click.option("--thumbnail-px", type=int, default=None, help="Long side of the overlay [2048].")
@click.option(
    "--smooth-tiles",
    type=float,
    default=None,
    help="Gaussian smoothing of the overlay, sigma in tiles [0 = none].",
)
@click.option("--top-k", type=int, default=None, help="Highest-attention tiles saved as crops [8].")
@click.option(
    "--geojson/--no-geojson",
    default=None,
    help="QuPath GeoJSON of tile objects with measurements [on].",
)
@click.option(
    "--tiff/--no-tiff",
    "pyramid_tiff",
    default=None,
    help="Pyramidal heatmap TIFF with the slide's geometry [on].",
)
@click.option(
    "--review-page/--no-review-page", default=None, help="Static index.html + per-slide pages [on]."
)
def heatmap(
    run_dir,
    manifest,
    config_file,
    model_name,
    cmap,
    alpha,
    thumbnail_px,
    smooth_tiles,
    top_k,
    geojson,
    pyramid_tiff,
    review_page,
):
    """Slide predictions, attention overlays and review exports -> RUN_DIR/heatmaps/<model>/.

    Per slide: <id>.csv (tile scores), <id>.png (overlay), <id>.geojson (QuPath),
    <id>.heatmap.tiff (pyramid), <id>_top/ (top tiles); index.html opens the review page.
    """
    from .heatmap import run_heatmap

    overrides = dict(
        cmap=cmap,
        alpha=alpha,
        thumbnail_px=thumbnail_px,
        smooth_tiles=smooth_tiles,
        top_k=top_k,
        geojson=geojson,
        pyramid_tiff=pyramid_tiff,
        review_page=review_page,
    )
    cfg, df = _load(run_dir, manifest, config_file, heatmap=overrides)
    console = _console()
    try:
        result = run_heatmap(
            df, run_dir, cfg.heatmap, model_name=model_name or cfg.train.name, console=console
        )
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    _summarise(console, result, "heatmap", [])
    if cfg.heatmap.review_page:
        console.print(
            f"review page: {Path(run_dir) / 'heatmaps' / (model_name or cfg.train.name) / 'index.html'}"
        )
    _exit_for(result)


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_run"),
    show_default=True,
)
@click.option(
    "--n-slides", type=int, default=None, help="Slides in the sample cohort [demo default]."
)
@click.option("--size-px", type=int, default=None, help="Slide width and height [demo default].")
@click.option(
    "--encoder", default=None, help="Encoder [efficientnet_lite0 with its real ImageNet weights]."
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out_dir, n_slides, size_px, encoder, seed):
    """Generate a sample cohort and run tile, embed, train and heatmap on it."""
    from .demo import run_demo

    res = run_demo(
        out_dir, n_slides=n_slides, size_px=size_px, encoder=encoder, seed=seed, console=_console()
    )
    if res["failed"]:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
