"""Stage settings: one pydantic model per stage, one YAML file with a section per stage.

A YAML config looks like::

    tile:    {target_mpp: 0.5, tile_px: 256}
    embed:   {encoder: efficientnet_lite0, batch_size: 64}
    train:   {model: gated_attention, epochs: 40}
    heatmap: {cmap: turbo, alpha: 0.5}

Command-line flags override the file; each stage writes its resolved settings next to its
outputs (``<stage folder>/config.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TileConfig(_Section):
    target_mpp: float = Field(0.5, gt=0, description="µm per pixel of the tiles (0.5 is 20x)")
    tile_px: int = Field(256, ge=16, description="tile size in pixels at target_mpp")
    overlap_px: int = Field(0, ge=0, description="overlap between neighbouring tiles at target_mpp")
    tissue_threshold: float = Field(
        0.5, ge=0, le=1, description="minimum tissue fraction of a kept tile"
    )
    mask_mpp: float = Field(8.0, gt=0, description="µm per pixel of the tissue mask")
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
    encoder: str = "efficientnet_lite0"
    pretrained: bool = True
    checkpoint: str | None = None
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    group_reads: bool = Field(True, description="read horizontal neighbour tiles as one region")
    reader: Literal["auto", "openslide", "tifffile"] = Field(
        "auto",
        description="tile reader of the workers (auto: tifffile for TIFF pyramids it reads like OpenSlide)",
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="autocast dtype (auto: the encoder's on CUDA, float32 on CPU)"
    )
    compile: bool = Field(False, description="torch.compile the encoder")


class TrainConfig(_Section):
    name: str = "gated_attention"
    model: str = "gated_attention"
    label_column: str = "label"
    hidden_dim: int = Field(256, ge=1)
    attention_dim: int = Field(128, ge=1)
    dropout: float = Field(0.25, ge=0, lt=1)
    epochs: int = Field(40, ge=1)
    patience: int = Field(10, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    val_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of training cases held out for early stopping (0: none; train all epochs, keep the last)",
    )
    max_instances: int | None = Field(
        None, ge=1, description="instances sampled per bag per training step (never at evaluation)"
    )
    seed: int = 0
    mlp_dims: list[int] | None = Field(
        None, description="widths of the instance MLP f (None: [hidden_dim])"
    )
    instance_encoder: Literal["mlp", "lenet"] = Field(
        "mlp", description="f: MLP on features, or the paper's LeNet on 28x28 images"
    )
    protocol: Literal["holdout", "cv", "split_column"] = Field(
        "holdout",
        description="holdout split, repeated stratified k-fold CV, or a fixed split column",
    )
    n_folds: int = Field(10, ge=2)
    n_repeats: int = Field(1, ge=1)
    split_column: str = Field(
        "split", description="manifest column with train/val/test (protocol split_column)"
    )
    standardise: bool = Field(True, description="standardise features with training-fold mean/std")
    balance: Literal["class_weight", "sampling", "none"] = Field(
        "class_weight",
        description="class imbalance: positive-class loss weight, balanced sampling, or nothing",
    )


class HeatmapConfig(_Section):
    cmap: str = "turbo"
    alpha: float = Field(0.5, ge=0, le=1)
    thumbnail_px: int = Field(2048, ge=64)
    smooth_tiles: float = Field(0.0, ge=0)  # Gaussian sigma of the overlay, in tiles (0 = none)
    tissue_outline: bool = True
    top_k: int = Field(8, ge=0)  # highest-attention tiles saved as crops
    crop_px: int = Field(256, ge=16)
    geojson: bool = True  # QuPath tile objects with measurements
    pyramid_tiff: bool = True  # pyramidal heatmap TIFF with the slide's geometry
    review_page: bool = True  # static index.html + one page per slide


class Config(_Section):
    tile: TileConfig = TileConfig()
    embed: EmbedConfig = EmbedConfig()
    train: TrainConfig = TrainConfig()
    heatmap: HeatmapConfig = HeatmapConfig()


def load_config(path: str | Path | None = None, **overrides: dict) -> Config:
    """Read a YAML config (or the defaults) and apply per-section overrides.

    ``overrides`` maps a section name to a dict of values; ``None`` values are ignored, so
    unset command-line flags leave the file's values alone.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: config must be a mapping with sections tile/embed/train/heatmap"
            )
    for section, values in overrides.items():
        clean = {k: v for k, v in (values or {}).items() if v is not None}
        data.setdefault(section, {}).update(clean)
    return Config.model_validate(data)


def save_config(section: BaseModel, path: str | Path) -> None:
    """Write one resolved section as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(section.model_dump(), sort_keys=False))
