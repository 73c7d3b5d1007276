"""Opening a run for review: its manifest, the model's heatmaps and the app serving them."""

from __future__ import annotations

from pathlib import Path

from ..layout import RunLayout

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class ReviewError(ValueError):
    """The run cannot be reviewed (no manifest, no heatmaps, unknown model); one line."""


def pick_model(layout: RunLayout, model: str | None) -> str:
    """The heatmap folder to show: ``--model`` (a name or a model folder's path), or the run's
    only one."""
    from ..heatmap import model_location
    from .cohort import model_names_with_heatmaps

    have = model_names_with_heatmaps(layout)
    if model is not None:
        name = model_location(layout, model)[1]
        if name not in have:
            raise ReviewError(
                f"{layout.root}: no heatmaps of model {name!r}; run `wsimil heatmap "
                f"{layout.root} --model {model}` first"
                + (f" (heatmaps here: {', '.join(have)})" if have else "")
            )
        return name
    if len(have) == 1:
        return have[0]
    if not have:
        raise ReviewError(
            f"{layout.root}: no heatmaps yet; run `wsimil heatmap {layout.root} --model NAME` first"
        )
    raise ReviewError(
        f"{layout.root}: heatmaps of several models ({', '.join(have)}); pick one with --model"
    )


def open_review(run_dir: str | Path, *, manifest: str | Path | None = None,
                model: str | None = None, host: str = "127.0.0.1", log=None):  # fmt: skip
    """The review app of a run folder and the model name it shows.

    Bound to a loopback address (``host``, the default), the app answers only requests
    addressed to ``localhost``, ``127.0.0.1`` or ``::1`` (what a browser on this machine or at
    the end of an SSH tunnel sends), refusing DNS-rebinding pages; bound to any other address
    it answers every host name.

    Raises
    ------
    ReviewError
        No manifest, a manifest that does not validate, or no heatmaps of the model.
    """
    from ..manifest import ManifestError, read_manifest
    from .app import create_app
    from .cohort import Cohort, heatmap_settings

    layout = RunLayout(run_dir)
    path = Path(manifest) if manifest else layout.manifest
    if not path.is_file():
        raise ReviewError(f"{path}: no manifest; give the run folder or --manifest")
    try:
        df = read_manifest(path)
    except (ManifestError, ValueError) as exc:
        raise ReviewError(str(exc).splitlines()[0]) from exc
    name = pick_model(layout, model)
    import openslide  # noqa: F401  (imported now, not on the first slide a reviewer opens)
    import zarr  # noqa: F401

    settings = heatmap_settings(layout, name)
    cohort = Cohort(layout, df, name, cmap=settings["cmap"], alpha=settings["alpha"])
    title = f"wsimil review: {layout.root.name} ({name})"
    trusted = LOOPBACK if host in LOOPBACK else None
    return create_app(cohort, title=title, log=log, trusted_hosts=trusted), name
