"""Stage settings: one pydantic model per stage, one YAML file with a section per stage.

A YAML config looks like::

    tile:    {target_mpp: 0.5, tile_px: 256}
    embed:   {encoder: efficientnet_lite0, batch_size: 64}
    cache:   {px: 64}
    train:   {model: gated_attention, epochs: 40}
    heatmap: {cmap: turbo, alpha: 0.5}

Command-line flags override the file; each stage writes its resolved settings next to its
outputs (``<stage folder>/config.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: instance encoders trained end to end on tile pixels (``wsimil.pixel_models``); light to import
#: for the workflow, which checks its ``instance_encoder`` setting at parse time
PIXEL_ENCODERS = ("cnn", "resnet", "finetune")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TileConfig(_Section):
    target_mpp: float = Field(0.5, gt=0, description="µm per pixel of the tiles (0.5 is 20x)")
    tile_px: int = Field(256, ge=16, description="tile size in pixels at target_mpp")
    overlap_px: int = Field(0, ge=0, description="overlap between neighbouring tiles at target_mpp")
    tissue_threshold: float = Field(
        0.25, ge=0, le=1, description="minimum tissue fraction of a kept tile"
    )
    edge_tiles: bool = Field(
        True,
        description="also tiles running over the slide's right and bottom edges (padded with white), so tissue there is not lost",
    )
    gap_tiles: bool = Field(
        True,
        description="add off-grid tiles over tissue the kept grid tiles miss (each holds tissue_threshold tissue and adds 10% of a tile of new tissue)",
    )
    mask_mpp: float = Field(
        8.0, gt=0, description="µm per pixel of the tissue mask (its edges are drawn at this)"
    )
    mask_coarse_mpp: float | None = Field(
        None,
        gt=0,
        description="µm per pixel of the coarse segmentation whose edges are redrawn at mask_mpp (default: from tile and region sizes, at most 32; = mask_mpp: one level)",
    )
    min_tissue_um2: float = Field(
        20_000.0, ge=0, description="tissue regions smaller than this are dropped"
    )
    max_hole_um2: float = Field(20_000.0, ge=0, description="holes smaller than this are filled")
    remove_pen: bool = Field(
        False, description="drop blue, green and black pen marks from the mask"
    )
    white_level: int = Field(
        235,
        ge=0,
        le=255,
        description="pixels with every channel above this are glass, not tissue (255: off)",
    )
    black_level: int = Field(
        40, ge=0, le=255, description="pixels with every channel below this are not tissue (0: off)"
    )
    qc_px: int = Field(1024, ge=64, description="long side of the QC thumbnail")


class EmbedConfig(_Section):
    encoder: str = Field(
        "efficientnet_lite0",
        description="encoder name: efficientnet_lite0, resnet50_trunc, any timm name, hf-hub:ORG/NAME",
    )
    pretrained: bool = Field(True, description="pretrained weights (off: random, for tests only)")
    checkpoint: str | None = Field(None, description="local weights file for the encoder")
    batch_size: int = Field(64, ge=1, description="tiles per forward pass")
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes reading tiles (unset: usable CPUs - 1, at most 16, on CUDA; 2 on the CPU)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the encoder runs")
    group_reads: bool = Field(True, description="read horizontal neighbour tiles as one region")
    reader: Literal["auto", "openslide", "tifffile"] = Field(
        "auto",
        description="tile reader of the workers (auto: tifffile for TIFF pyramids it reads like OpenSlide)",
    )
    decode: Literal["auto", "pixels", "cpu", "gpu"] = Field(
        "auto",
        description="JPEG TIFF pyramids: workers read compressed tiles, decoded in the workers (cpu) or in batches on the GPU (gpu); pixels: the reader's pixels; auto: gpu on CUDA, else pixels",
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="autocast dtype (auto: the encoder's on CUDA, float32 on CPU)"
    )
    compile: bool = Field(False, description="torch.compile the encoder")


class CacheConfig(_Section):
    px: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="side in pixels of the cached tiles (required): each tile of the tile stage is resized to px x px",
    )
    batch_size: int = Field(64, ge=1, description="tiles read, resized and written per batch")
    workers: int = Field(
        0,
        ge=0,
        description="worker processes reading tiles (0: auto, usable CPUs - 1, at most 16)",
    )
    reader: Literal["auto", "openslide", "tifffile"] = Field(
        "auto",
        description="tile reader of the workers (auto: tifffile for TIFF pyramids it reads like OpenSlide)",
    )


class TrainConfig(_Section):
    name: str = Field(
        "gated_attention", description="model folder under RUN_DIR/models [the model name]"
    )
    model: str = Field(
        "gated_attention",
        description="MIL pooling: gated_attention, attention, embedding_mean, embedding_max, instance_mean, instance_max",
    )
    label_column: str = Field("label", description="manifest column with the slide labels")
    classes: list[str] | None = Field(
        None,
        description="class names in order (None: the training labels' distinct values, 0/1 for binary; 3+ classes train a softmax head)",
    )
    per_class_attention: bool = Field(
        False,
        description="attention poolings with 3+ classes: one attention branch per class (a heatmap per class)",
    )
    refit: bool = Field(
        False,
        description="after CV, train one model on every labelled slide for the median best epoch of the folds and deploy it instead of the fold ensemble",
    )
    threshold: float | Literal["youden"] = Field(
        0.5,
        description="binary decision threshold: a number, or youden (chosen on each model's training slides; the card states it)",
    )
    hidden_dim: int = Field(256, ge=1, description="width of the instance MLP f")
    attention_dim: int = Field(128, ge=1, description="width of the attention network")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout in f")
    epochs: int = Field(40, ge=1, description="maximum training epochs")
    patience: int = Field(
        10, ge=1, description="epochs without a better validation loss before stopping"
    )
    lr: float = Field(2e-4, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay")
    test_fraction: float = Field(
        0.3, gt=0, lt=1, description="share of cases held out for testing (holdout)"
    )
    val_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of training cases held out for early stopping (0: none; train all epochs, keep the last)",
    )
    max_instances: int | None = Field(
        None,
        ge=1,
        description="instances sampled per bag per training step, never at evaluation (None: all; end to end: 256)",
    )
    seed: int = Field(0, description="seed of splits, initialisation and sampling")
    mlp_dims: list[int] | None = Field(
        None, description="widths of the instance MLP f (None: [hidden_dim])"
    )
    instance_encoder: Literal["mlp", "lenet", "cnn", "resnet", "finetune"] = Field(
        "mlp",
        description="f: mlp on frozen features; lenet on 28x28 bag-table images; end to end on tile pixels (tile cache): cnn (the paper's LeNet-style), resnet (small, from scratch), finetune (the --encoder's last --train-blocks blocks)",
    )
    cache_px: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="end to end: side of the cached tiles in pixels, each tile of the tile grid resized to it (None: the tile grid's tile_px; finetune: the encoder's input size)",
    )
    train_blocks: int = Field(
        1,
        ge=0,
        description="finetune: last blocks of the encoder trained (0: only the layer on top)",
    )
    augment: bool = Field(
        True,
        description="end to end: flips, 90-degree turns and mild colour jitter of the tiles in training (never at evaluation)",
    )
    protocol: Literal["holdout", "cv", "split_column"] = Field(
        "holdout",
        description="holdout split, repeated stratified k-fold CV, or a fixed split column",
    )
    n_folds: int = Field(10, ge=2, description="CV folds", json_schema_extra={"cli": "--folds"})
    n_repeats: int = Field(
        1, ge=1, description="CV repeats", json_schema_extra={"cli": "--repeats"}
    )
    split_column: str = Field(
        "split", description="manifest column with train/val/test (protocol split_column)"
    )
    standardise: bool = Field(True, description="standardise features with training-fold mean/std")
    balance: Literal["class_weight", "sampling", "none"] = Field(
        "class_weight",
        description="class imbalance: positive-class loss weight, balanced sampling, or nothing",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to train: auto (CUDA when visible), cpu or cuda"
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads for training (0: auto, 1 for bags of at most 1M feature values, else every CPU this process may use)",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, v):
        if v != "youden" and not 0 < float(v) < 1:
            raise ValueError(f"threshold must be between 0 and 1 or 'youden', got {v!r}")
        return v


class HeatmapConfig(_Section):
    cmap: str = Field(
        "autumn_r",
        description="Matplotlib colormap of the overlay (autumn_r: yellow to red, no blue/purple to mistake for haematoxylin)",
    )
    alpha: float = Field(
        0.7, ge=0, le=1, description="overlay opacity at the top of the scale (alpha * v**0.6)"
    )
    scale: Literal["rank", "minmax"] = Field(
        "minmax",
        description="overlay scaling per slide: minmax ((a - min) / (max - min), DESIGN.md) or rank (percentile, colours spread evenly)",
    )
    thumbnail_px: int = Field(2048, ge=64, description="long side of the overlay")
    smooth_tiles: float = Field(
        0.0, ge=0, description="Gaussian smoothing of the overlay, sigma in tiles (0: none)"
    )
    tissue_outline: bool = Field(True, description="draw the tissue outline on the overlay")
    top_k: int = Field(8, ge=0, description="highest-attention tiles saved as crops")
    crop_px: int = Field(256, ge=16, description="side of the saved crops")
    geojson: bool = Field(True, description="QuPath GeoJSON of tile objects with measurements")
    pyramid_tiff: bool = Field(
        True,
        description="pyramidal heatmap TIFF with the slide's geometry",
        json_schema_extra={"cli": "--tiff"},
    )
    review_page: bool = Field(
        True, description="the cohort's index.html (written with predictions.csv by the report)"
    )
    viewer_url: str = Field(
        "http://localhost:8000",
        description="index.html links each slide to `wsimil review` at this address ('' for none)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu",
        description="where the model scores the slides: cpu, cuda or auto (CUDA when visible)",
    )


class Config(_Section):
    tile: TileConfig = TileConfig()
    embed: EmbedConfig = EmbedConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    heatmap: HeatmapConfig = HeatmapConfig()


def load_config(path: str | Path | None = None, **overrides: dict) -> Config:
    """Read a YAML config (or the defaults) and apply per-section overrides.

    ``overrides`` maps a section name to a dict of values; ``None`` values are ignored, so
    unset command-line flags leave the file's values alone.

    Raises
    ------
    ValueError
        One line per bad value naming where it came from (the file or the command line), the
        key, the value and what is allowed.
    """
    from pydantic import ValidationError

    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: config must be a mapping with sections tile/embed/cache/train/heatmap"
            )
    flags: set[tuple[str, str]] = set()
    for section, values in overrides.items():
        clean = {k: v for k, v in (values or {}).items() if v is not None}
        flags |= {(section, k) for k in clean}
        section_data = data.setdefault(section, {})
        if not isinstance(section_data, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping of settings")
        section_data.update(clean)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ValueError("; ".join(_describe(e, path, flags) for e in exc.errors())) from None


def cli_flag(section: type[BaseModel], name: str) -> str:
    """The command-line flag of a section's setting (``tile_px`` -> ``--tile-px``)."""
    extra = section.model_fields[name].json_schema_extra or {}
    return extra.get("cli") or f"--{name.replace('_', '-')}"


def _describe(error: dict, path: Path | None, flags: set[tuple[str, str]]) -> str:
    """One readable line for one pydantic error: where, key, value, what is allowed."""
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    if len(loc) >= 2 and (loc[0], loc[1]) in flags:
        where = cli_flag(Config.model_fields[loc[0]].annotation, loc[1])
    else:
        where = f"{path}: {key}" if path is not None else key
    if error["type"] == "extra_forbidden":
        section = Config.model_fields.get(loc[0])
        known = (
            sorted(section.annotation.model_fields)
            if section and len(loc) > 1
            else sorted(Config.model_fields)
        )
        return f"{where}: unknown setting; known: {', '.join(known)}"
    return f"{where} = {error.get('input')!r}: {error['msg'].lower()}"


def defaults_yaml() -> str:
    """Every setting with its default and description, as a YAML config (``configs/default.yaml``)."""
    lines = [
        "# wsimil settings: one section per stage; every key is optional (these are the defaults).",
        "# Use with any stage: wsimil tile RUN_DIR --config configs/default.yaml",
        "# Written by `wsimil config` from the fields of wsimil/config.py (one declaration per setting).",
    ]
    for key, section in Config.model_fields.items():
        lines.append(f"{key}:")
        for name, field in section.annotation.model_fields.items():
            value = yaml.safe_dump(field.default, default_flow_style=True).split("\n")[0]
            text = f"  {name}: {value}"
            if field.description:
                text = f"{text:<32} # {field.description}"
            lines.append(text)
    return "\n".join(lines) + "\n"


def save_config(section: BaseModel, path: str | Path) -> None:
    """Write one resolved section as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(section.model_dump(), sort_keys=False))
