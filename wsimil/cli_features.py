"""``wsimil encoders``, ``import-features`` and ``export-features`` (library code in
:mod:`wsimil.encoders.catalog`, :mod:`wsimil.interop`, :mod:`wsimil.interop_export`)."""

from __future__ import annotations

import sys

import click

from .cli_common import MANIFEST, OVERWRITE, RUN_DIR, SLIDES, _console, _finish, _load, _select


@click.command("encoders")
def encoders():
    """List the named encoders: width, input size, licence, and whether the weights are found
    offline (in $HF_HOME/hub, or the efficientnet-lite0 package)."""
    from .encoders.catalog import describe_encoders

    rows = describe_encoders()
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'name':<{width}}  {'dim':>5}  {'input':>5}  {'weights':<8}  source; licence")
    for r in rows:
        found = r["weights"].split(" ", 1)[0]
        click.echo(
            f"{r['name']:<{width}}  {r['feature_dim']:>5}  {r['input_px']:>5}  {found:<8}  "
            f"{r['source']}; {r['licence']}"
        )


@click.command("import-features")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@RUN_DIR
@MANIFEST
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["clam", "trident"]),
    required=True,
    help="clam: h5_files/<slide>.h5; trident: features_<encoder>/<slide>.h5.",
)
@click.option(
    "--encoder",
    default=None,
    help="Name of the features in RUN_DIR/features/ [TRIDENT's encoder as wsimil names it; CLAM: resnet50_trunc].",
)
@click.option(
    "--target-mpp",
    type=float,
    default=None,
    help="µm/px of the tiles (CLAM: required; TRIDENT: 10 / target_magnification).",
)
@click.option(
    "--tile-px",
    type=int,
    default=None,
    help="Tile side in px at --target-mpp (CLAM: required; TRIDENT: patch_size).",
)
@click.option(
    "--tile-px-level0",
    type=int,
    default=None,
    help="Tile side in level-0 px [TRIDENT: patch_size_level0; CLAM: tile-px x target-mpp / slide mpp].",
)
@OVERWRITE
@SLIDES
def import_features(src, run_dir, manifest, fmt, encoder, target_mpp, tile_px, tile_px_level0,
                    overwrite, slides):  # fmt: skip
    """Turn CLAM or TRIDENT feature files (SRC) into feature stores of RUN_DIR's slides."""
    from .interop import Geometry, run_import

    _, df = _load(run_dir, manifest, None, overrides={})
    console = _console()
    try:
        result = run_import(
            _select(df, None, slides), run_dir, src, fmt, encoder=encoder,
            flags=Geometry(target_mpp, tile_px, tile_px_level0), overwrite=overwrite,
            console=console,
        )  # fmt: skip
    except ValueError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    _finish(console, result, f"import-features ({fmt})", ["n_tiles"])


@click.command("export-features")
@RUN_DIR
@MANIFEST
@click.option(
    "--format", "fmt", type=click.Choice(["trident"]), default="trident", show_default=True
)
@click.option("--encoder", required=True, help="Which features of RUN_DIR/features/ to export.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder to write features_<encoder>/ into [RUN_DIR/exports/trident].",
)
@SLIDES
def export_features(run_dir, manifest, fmt, encoder, out_dir, slides):
    """Write RUN_DIR's feature stores as TRIDENT .h5 files (features, coords and their attrs)."""
    from .interop_export import export_trident

    _, df = _load(run_dir, manifest, None, overrides={})
    try:
        result = export_trident(_select(df, None, slides), run_dir, encoder, out_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    for r in result.itertuples():
        if r.status != "ok":
            click.echo(f"{r.status} {r.message}", err=True)
    ok = int((result.status == "ok").sum())
    click.echo(f"wrote {ok} of {len(result)} slides")
    if ok < len(result):
        sys.exit(1)
