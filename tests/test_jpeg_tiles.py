"""Compressed JPEG tiles decoded in batches (``--decode cpu|gpu``): same pixels as OpenSlide.

The device path (``torchvision.io.decode_jpeg`` + one gather) is the one a GPU runs; here it
runs on the CPU. Tolerances: decoded tiles vs OpenSlide at most 2 grey levels per channel and
a mean difference below 0.5 (both use libjpeg-turbo here, and the tiles measured identical);
features of ``--decode cpu`` vs the pixel path within 2e-2 (torch vs Pillow antialiased resize,
rounded to uint8, then float16 features).
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from wsimil.config import EmbedConfig, TileConfig
from wsimil.embed import run_embed
from wsimil.jpeg_tiles import (
    JpegTileReader,
    assemble,
    decode_packet,
    gather,
    jpeg_levels,
    pick_decode,
    splice_stream,
)
from wsimil.manifest import read_manifest
from wsimil.slide import OpenSlideReader, SlideError, TiffReader
from wsimil.store import open_store
from wsimil.synth import write_synthetic_slide
from wsimil.synth.aperio_jpeg import write_aperio_jpeg_tiff
from wsimil.tile import run_tile

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu_small_region.svs"
TILE = TileConfig(target_mpp=1.0, tile_px=128)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("jpeg") / "s.tiff"
    write_synthetic_slide(path, width_px=1500, height_px=1300, mpp=0.5, seed=5)
    return path


def _coords(w, h, n, seed=0):
    """Random corners, some partly outside the slide, plus the bottom-right corner."""
    rng = np.random.default_rng(seed)
    c = np.stack([rng.integers(-60, w - 40, n), rng.integers(-60, h - 40, n)], 1)
    return np.concatenate([c, [[w - 100, h - 100]]])


def _agree(tiles, ref):
    d = np.abs(tiles.astype(int) - ref.astype(int))
    assert d.max() <= 2 and d.mean() < 0.5, (d.max(), d.mean())


@pytest.mark.parametrize("level", [0, 1])
def test_decoded_tiles_match_openslide_at_every_level(slide, level):
    levels = jpeg_levels(slide)
    assert levels is not None and len(levels) == 2 and levels[0].transform == 1  # YCbCr, JFIF
    reader = JpegTileReader(slide, levels)
    with OpenSlideReader(slide) as osr:
        ds = int(osr.level_downsamples[level])
        coords = _coords(*osr.dimensions, 24) // ds * ds  # OpenSlide paints other corners blended
        ref = np.stack([osr.read_region(tuple(map(int, c)), level, (200, 200)) for c in coords])
    packet = reader.packet(coords, level, 200)
    assert len(packet["lengths"]) < 4 * len(coords)  # each stored tile once per batch
    _agree(decode_packet(packet, "cpu", size=200).numpy(), ref)
    reader.close()


def test_gather_gives_the_same_tiles_as_block_copies(slide):
    """The GPU's single-gather assembly equals the CPU's block copies (run here on the CPU)."""
    levels = jpeg_levels(slide)
    reader = JpegTileReader(slide, levels)
    packet = reader.packet(_coords(1500, 1300, 30, seed=1), 0, 300)  # tiles span 2-3 stored
    r, th, tw, lh, lw = (int(v) for v in packet["meta"])
    stored = np.stack(
        [np.random.default_rng(i).integers(0, 255, (th, tw, 3), np.uint8) for i in range(3)]
        * (len(packet["lengths"]) // 3 + 1)
    )[: len(packet["lengths"])]
    stored = np.concatenate([stored, np.full((1, th, tw, 3), 255, np.uint8)])
    t = {k: torch.from_numpy(packet[k]) for k in ("grid", "origin", "box")}
    np.testing.assert_array_equal(
        gather(torch.from_numpy(stored), t, r, lh, lw).numpy(), assemble(stored, packet)
    )
    reader.close()


def test_aperio_layout_tables_and_rgb_coded_jpeg_match_openslide(slide, tmp_path):
    """Photometric RGB, RGB samples without colour markers, tables in JPEGTables (as SVS)."""
    from torchvision.io import decode_jpeg

    with TiffReader(slide) as t:
        image = t.read_region((0, 0), 0, (1000, 700))
    path = write_aperio_jpeg_tiff(tmp_path / "aperio.tiff", image, tile_px=240)
    levels = jpeg_levels(path)
    assert levels is not None and levels[0].tables and levels[0].transform == 0
    reader = JpegTileReader(path, levels)
    coords = _coords(1000, 700, 16, seed=2)
    with OpenSlideReader(path) as osr:
        ref = np.stack([osr.read_region(tuple(map(int, c)), 0, (224, 224)) for c in coords])
    _agree(decode_packet(reader.packet(coords, 0, 224), "cpu", size=224).numpy(), ref)
    reader.close()

    # Read naively (tables + tile, no Adobe marker), the RGB samples are taken for YCbCr.
    lv = levels[0]
    with open(path, "rb") as fh:
        fh.seek(int(lv.offsets[0]))
        raw = fh.read(int(lv.counts[0]))
    good = decode_jpeg(_u8(splice_stream(raw, lv.tables, 0, "x")))
    bad = decode_jpeg(_u8(lv.tables[:-2] + raw[2:]))
    assert (good.int() - bad.int()).abs().float().mean() > 10


def _u8(data: bytes):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@pytest.mark.skipif(not CMU.exists(), reason=f"real H&E slide not present at {CMU}")
def test_real_svs_matches_openslide():
    levels = jpeg_levels(CMU)
    assert levels is not None and levels[0].tables and levels[0].transform == 0  # Aperio: RGB
    reader = JpegTileReader(CMU, levels)
    with OpenSlideReader(CMU) as osr:
        coords = _coords(*osr.dimensions, 16, seed=2)
        ref = np.stack([osr.read_region(tuple(map(int, c)), 0, (224, 224)) for c in coords])
    _agree(decode_packet(reader.packet(coords, 0, 224), "cpu", size=224).numpy(), ref)
    reader.close()


def test_non_jpeg_tiff_keeps_the_pixel_path(tmp_path):
    path = tmp_path / "lzw.tiff"
    img = np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), compression="lzw", photometric="rgb")
    assert jpeg_levels(path) is None
    assert pick_decode(str(path), "cpu", "cpu", same_pyramid=True) == "pixels"
    (tmp_path / "bad.tiff").write_bytes(b"II*\0garbage")
    assert jpeg_levels(tmp_path / "bad.tiff") is None
    with pytest.raises(ValueError, match="needs the encoder on CUDA"):
        pick_decode(str(path), "gpu", "cpu", same_pyramid=True)


def test_corrupt_streams_give_one_line_naming_the_file(slide, tmp_path):
    levels = jpeg_levels(slide)
    lv = levels[0]
    with open(slide, "rb") as fh:
        fh.seek(int(lv.offsets[0]))
        raw = fh.read(int(lv.counts[0]))
    with pytest.raises(SlideError, match=r"s\.tiff.*corrupt JPEG tile"):
        splice_stream(b"\0" * 100, b"", 1, str(slide))
    sof = raw.index(b"\xff\xc0")
    bad = bytearray(raw)
    bad[sof + 5 : sof + 9] = b"\0\0\0\0"  # zero width and height: the decoder refuses it
    packet = {
        "data": np.frombuffer(bytes(bad), np.uint8).copy(),
        "lengths": np.array([len(bad)]),
        "grid": np.zeros((1, 2, 2), np.int32),
        "origin": np.zeros((1, 2), np.int32),
        "box": np.zeros((1, 2), np.int32),
        "meta": np.array([64, lv.tile_h, lv.tile_w, lv.height, lv.width]),
    }
    with pytest.raises(SlideError) as err:
        decode_packet(packet, "cpu", size=64, where=str(slide))
    assert str(slide) in str(err.value) and "\n" not in str(err.value)
    assert "corrupt JPEG tile" in str(err.value) and ".cpp" not in str(err.value)


def _cohort(run: Path, n: int) -> pd.DataFrame:
    (run / "slides").mkdir(parents=True)
    for i in range(n):
        write_synthetic_slide(
            run / "slides" / f"s{i}.tiff", width_px=1536, height_px=1536, mpp=0.5, seed=40 + i
        )
    pd.DataFrame(
        {"slide_id": [f"s{i}" for i in range(n)], "path": [f"slides/s{i}.tiff" for i in range(n)]}
    ).assign(label=0).to_csv(run / "manifest.csv", index=False)
    df = read_manifest(run / "manifest.csv")
    run_tile(df, run, TILE)
    return df


def _features(run, sid):
    return open_store(run / "features" / "efficientnet_lite0" / f"{sid}.zarr")["features"][...]


def test_decode_cpu_features_agree_with_the_pixel_path(tmp_path):
    df = _cohort(tmp_path / "a", 1)
    sid = df.slide_id[0]
    other = tmp_path / "b"
    (other / "tiles").mkdir(parents=True)
    os.symlink(tmp_path / "a" / "tiles" / f"{sid}.zarr", other / "tiles" / f"{sid}.zarr")
    for run, decode in ((tmp_path / "a", "auto"), (other, "cpu")):
        cfg = EmbedConfig(encoder="efficientnet_lite0", num_workers=0, decode=decode)
        assert run_embed(df, run, cfg).status.tolist() == ["ok"]
    a = _features(tmp_path / "a", sid).astype(np.float32)
    b = _features(other, sid).astype(np.float32)
    assert a.shape[0] > 10
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def test_decode_cpu_corrupt_tile_fails_that_slide_only(tmp_path):
    df = _cohort(tmp_path, 2)
    coords = open_store(tmp_path / "tiles" / "s0.zarr")["coords"][...]
    with tifffile.TiffFile(tmp_path / "slides" / "s0.tiff") as t:
        page = t.pages[0]
        x, y = coords[len(coords) // 2]
        idx = (y // page.tilelength) * (-(-page.imagewidth // page.tilewidth)) + x // page.tilewidth
        offset = page.dataoffsets[idx]
    with open(tmp_path / "slides" / "s0.tiff", "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * 64)
    cfg = EmbedConfig(encoder="efficientnet_lite0", num_workers=1, batch_size=16, decode="cpu")
    res = run_embed(df, tmp_path, cfg).set_index("slide_id")
    assert res.status["s0"] == "error" and res.status["s1"] == "ok"
    msg = res.message["s0"]
    assert "s0.tiff" in msg and "corrupt JPEG tile" in msg and "\n" not in msg
    assert not (tmp_path / "features" / "efficientnet_lite0" / "s0.zarr").exists()

    # s1 shared batches with the failing s0: its features are routed back whole and in order.
    alone = tmp_path / "alone"
    (alone / "tiles").mkdir(parents=True)
    os.symlink(tmp_path / "tiles" / "s1.zarr", alone / "tiles" / "s1.zarr")
    cfg = EmbedConfig(encoder="efficientnet_lite0", num_workers=0, batch_size=7, decode="cpu")
    assert run_embed(df.iloc[1:], alone, cfg).status.tolist() == ["ok"]
    np.testing.assert_allclose(
        _features(tmp_path, "s1").astype(np.float32),
        _features(alone, "s1").astype(np.float32),
        rtol=1e-2,
        atol=1e-3,
    )


def test_gpu_mode_batches_carry_packets_the_main_process_decodes(slide, tmp_path):
    """``decode="gpu"`` workers send compressed batches; decoded (here on the CPU) they equal
    the tiles ``decode="cpu"`` workers decode themselves."""
    from torch.utils.data import DataLoader

    from wsimil.tile_reader import SlideJob, TileBatches

    coords = _coords(1500, 1300, 40, seed=3).astype(np.int32)
    out = {}
    for decode in ("gpu", "cpu"):
        job = SlideJob("s", str(slide), None, coords, 0, 256, {}, decode=decode)
        data = TileBatches([job], batch_size=16, input_px=224)
        loader = DataLoader(data, batch_size=None, num_workers=1 if decode == "gpu" else 0)
        items = [part for item in loader for part in item["parts"]]
        assert [i["error"] for i in items] == ["", "", ""]
        if decode == "gpu":
            assert all(i["tiles"].numel() == 0 and "packet" in i for i in items)
            items = [{"tiles": decode_packet(i["packet"], "cpu", size=224)} for i in items]
        out[decode] = torch.cat([i["tiles"] for i in items]).numpy()
    assert out["gpu"].shape == (41, 224, 224, 3)
    np.testing.assert_array_equal(out["gpu"], out["cpu"])


def test_loader_workers_follow_the_usable_cpus(monkeypatch):
    from wsimil.devices import loader_workers, usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert loader_workers(3, "cuda") == 3 and loader_workers(0, "cpu") == 0
    assert loader_workers(None, "cpu") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a big node
    assert loader_workers(None, "cuda") == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # a 4-CPU Slurm job
    assert loader_workers(None, "cuda") == 3


def test_batches_span_slides_in_order():
    from wsimil.tile_reader import batch_parts

    assert batch_parts([5, 0, 3, 10], 4) == [
        [(0, 0, 4)], [(0, 4, 1), (2, 0, 3)], [(3, 0, 4)], [(3, 4, 4)], [(3, 8, 2)]
    ]  # fmt: skip
    assert batch_parts([5, 3], 4, cross_slide=False) == [[(0, 0, 4)], [(0, 4, 1)], [(1, 0, 3)]]
    parts = [p for b in batch_parts([7, 1, 9, 2], 5) for p in b]
    assert all(sum(n for *_, n in b) == 5 for b in batch_parts([7, 1, 9, 2], 5)[:-1])
    for j, size in enumerate([7, 1, 9, 2]):  # every tile once, in order
        mine = [(s, n) for k, s, n in parts if k == j]
        assert [s for s, _ in mine] == list(np.cumsum([0] + [n for _, n in mine])[:-1])
        assert sum(n for _, n in mine) == size
