"""Untrusted manifests and configs: refused up front with one line, or failed per slide.

A manifest's slide ids and labels are refused whole, naming the CSV lines, before any work; a
slide's own problems (its file, its mpp) fail that slide only, and the later stages name the
earlier failure. ``wsimil check`` reports all of them without writing anything.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsimil.layout import RunLayout, check_slide_id
from wsimil.manifest import ManifestError, read_manifest
from wsimil.synth import make_cohort

WSIMIL = [sys.executable, "-m", "wsimil.cli"]
TILE_ARGS = ["--target-mpp", "1.0", "--tile-px", "64"]


def _wsimil(*args):
    return subprocess.run([*WSIMIL, *map(str, args)], capture_output=True, text=True, timeout=600)


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    src = tmp_path_factory.mktemp("bad_input")
    manifest = make_cohort(src, n_slides=2, width_px=1536, height_px=1536, mpp=0.5, seed=5)
    return src, read_manifest(manifest)


BAD_IDS = ["../../escape", "*", "**", "a/b", "a\x00b", "x" * 300, "", ".", "..", "-rf", "a b"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_a_bad_slide_id_refuses_the_manifest_before_anything_is_written(tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "escape.zarr").mkdir()  # what a ../ id would have replaced
    manifest = _csv(tmp_path, f'slide_id,path,label\ngood,a.svs,1\n"{bad}",b.svs,0\n')
    r = _wsimil("tile", tmp_path / "sub" / "run", "--manifest", manifest)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.csv: 1 bad slide_id(s): line 3" in lines[0], r.stderr
    assert not (tmp_path / "sub").exists()  # nothing was written, not even the run folder
    assert sorted(p.name for p in outside.iterdir()) == ["escape.zarr"]


def test_many_bad_rows_are_listed_capped_with_a_count(tmp_path):
    rows = "".join(f"../s{i},s{i}.svs,1\n" for i in range(12))
    with pytest.raises(ManifestError, match=r"12 bad slide_id\(s\): line 2: .*and 7 more") as e:
        read_manifest(_csv(tmp_path, "slide_id,path,label\n" + rows))
    assert "\n" not in str(e.value)
    with pytest.raises(ManifestError, match=r"line 3: slide_id 'a' repeats line 2"):
        read_manifest(_csv(tmp_path, "slide_id,path\na,x.svs\na,y.svs\n"))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=140))
def test_every_path_built_from_an_accepted_id_stays_in_the_run_folder(slide_id):
    try:
        check_slide_id(slide_id)
    except ValueError:
        return  # refused: no path is ever built from it
    root = Path("/run")
    layout = RunLayout(root)
    hm = layout.heatmap_slide("model", slide_id)
    paths = [layout.tile_store(slide_id), layout.tile_qc(slide_id), hm.folder, hm.record,
             layout.feature_store("resnet18", slide_id), layout.tiles.lock_file(slide_id)]  # fmt: skip
    for p in paths:
        assert os.path.normpath(p) == str(p)  # no '..', '.' or '//' to resolve
        assert p.is_relative_to(root) and any(slide_id in part for part in p.parts[2:])


@pytest.mark.parametrize("label", ["x" * 65, "bell\x07", "tab\there"])
def test_an_invalid_label_is_refused_by_every_stage_up_front(tmp_path, label):
    manifest = _csv(tmp_path, f"slide_id,path,label\na,a.svs,1\nb,b.svs,{label}\nc,c.svs,\n")
    r = _wsimil("tile", tmp_path / "run", "--manifest", manifest)
    assert r.returncode == 1 and not (tmp_path / "run").exists()
    assert f"1 bad 'label' value(s): line 3 (b): {label!r}; a label must be a class" in r.stderr
    assert r.stderr.rstrip().endswith("or empty")
    # Train needs every label: the empty one is refused too.
    with pytest.raises(
        ManifestError, match=r"line 3 \(c\): ''; a label must be a class.*characters$"
    ):
        read_manifest(
            _csv(tmp_path, "slide_id,path,label\na,a.svs,1\nc,c.svs,\n"), require_label=True
        )


def test_labels_are_class_names_and_a_one_slide_class_is_refused_by_train(tmp_path):
    text = "slide_id,path,label\na,a.svs,1\nb,b.svs,0.0\nc,c.svs, LUAD \nd,d.svs,\n"
    df = read_manifest(_csv(tmp_path, text))
    assert df["label"].tolist() == ["1", "0", "LUAD", None]  # 0.0 is class 0, names stripped
    # A label typo makes a class of one slide: train refuses it before training, naming it.
    table = tmp_path / "bags.csv"
    rows = [
        f"{lab},bag{i},{i % 3}.0,{i % 5}.0"
        for i, lab in enumerate(["pos"] * 4 + ["neg"] * 4 + ["pso"])
    ]
    table.write_text("\n".join(rows) + "\n")
    r = _wsimil("train", tmp_path / "run", "--bags", table, "--epochs", "1")
    assert r.returncode == 1
    assert "class(es) 'pso' (1) with fewer than 2 slides among ['neg', 'pos', 'pso']" in r.stderr
    # With the classes given, a label outside them is named.
    r = _wsimil("train", tmp_path / "run", "--bags", table, "--classes", "neg,pos")
    assert r.returncode == 1 and "label(s) 'pso' not in train.classes ['neg', 'pos']" in r.stderr
    # `wsimil check` counts the slides per class and names a class of one slide.
    labels = ["pos"] * 3 + ["neg"] * 2 + ["pso"]
    _csv(
        tmp_path,
        "slide_id,path,label\n" + "".join(f"s{i},s{i}.svs,{v}\n" for i, v in enumerate(labels)),
    )
    r = _wsimil(
        "check", tmp_path / "run", "--manifest", tmp_path / "manifest.csv", "--depth", "exists"
    )
    assert "labels neg 2, pos 3, pso 1 (train refuses a class of one slide: pso)" in r.stderr, (
        r.stderr
    )


def test_any_column_name_works_as_the_label_column(tmp_path):
    text = "slide_id,path,HER2 status\na,a.svs,1\nb,b.svs,0.0\n"
    df = read_manifest(_csv(tmp_path, text), label_column="HER2 status", require_label=True)
    assert df["HER2 status"].tolist() == ["1", "0"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {label_column: HER2 status}\n")
    _csv(tmp_path, f"slide_id,path,HER2 status\na,a.svs,1\nb,b.svs,{'y' * 70}\n")
    r = _wsimil("check", tmp_path / "run", "--manifest", tmp_path / "manifest.csv", "--config", cfg)
    assert r.returncode == 1 and "bad 'HER2 status' value(s): line 3 (b): 'yyyy" in r.stderr


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("tile: {tile_size: 128}\n", "c.yaml: tile.tile_size: unknown setting; known: "),
        (
            "tile: {tile_px: 0}\n",
            "c.yaml: tile.tile_px = 0: input should be greater than or equal to 16",
        ),
        ("tile: {tile_px: big}\n", "c.yaml: tile.tile_px = 'big': input should be a valid integer"),
        (
            "train: {epochs: [1, 2]}\n",
            "c.yaml: train.epochs = [1, 2]: input should be a valid integer",
        ),
    ],
)
def test_config_errors_name_the_file_key_value_and_what_is_allowed(tmp_path, yaml_text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    r = _wsimil(
        "tile", tmp_path / "run", "--manifest", _csv(tmp_path, "slide_id,path\n"), "--config", cfg
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr


def _broken_rows(cohort, tmp_path) -> Path:
    """The good slides plus one broken row of each per-slide kind."""
    src, good = cohort
    (tmp_path / "text.svs").write_text("not a slide\n")
    (tmp_path / "zero.svs").write_bytes(b"")
    p0 = good.path[0]
    bad = [
        ("mpp_text", p0, "abc"), ("mpp_huge", p0, "1000"), ("mpp_inf", p0, "inf"),
        ("mpp_zero", p0, "0"), ("missing", str(tmp_path / "nope.svs"), ""),
        ("text", str(tmp_path / "text.svs"), ""), ("zero", str(tmp_path / "zero.svs"), ""),
    ]  # fmt: skip
    rows = [(s, p, "") for s, p in zip(good.slide_id, good.path, strict=True)] + bad
    df = pd.DataFrame(rows, columns=["slide_id", "path", "mpp"])
    df.to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def test_per_slide_problems_fail_that_slide_and_every_good_slide_completes(cohort, tmp_path):
    src, good = cohort
    manifest = _broken_rows(cohort, tmp_path)
    run = tmp_path / "run"
    r = _wsimil("check", run, "--manifest", manifest)
    assert r.returncode == 1 and not run.exists()  # check writes nothing
    assert "9 slide(s): 2 ready; 4 bad mpp, 1 missing file, 2 unreadable" in r.stderr, r.stderr

    r = _wsimil("tile", run, "--manifest", manifest, *TILE_ARGS)
    assert r.returncode == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith("error ")]
    assert len(errors) == 7, r.stderr
    status = {
        d["slide_id"]: d
        for d in map(json.loads, (run / "tiles/status.jsonl").read_text().splitlines())
    }
    assert all(status[s]["status"] == "ok" for s in good.slide_id)
    msg = {s: status[s]["message"] for s in status}
    assert "manifest mpp 'abc' is not a number" in msg["mpp_text"]
    assert "manifest mpp '1000' is outside the plausible range (0.05-20.0" in msg["mpp_huge"]
    assert "'inf'" in msg["mpp_inf"] and "'0'" in msg["mpp_zero"]
    assert "nope.svs: no such file" in msg["missing"]
    assert all("\n" not in m for m in msg.values())
    # No lock file for rows refused before their lock (missing file, bad mpp).
    locks = {p.name for p in (run / "tiles").rglob("*.lock")}
    assert not any(n.startswith(("mpp_", "missing")) for n in locks)

    # embed names the real cause of a slide without tiles, not "run wsimil tile first".
    from wsimil.config import EmbedConfig
    from wsimil.embed import run_embed
    from wsimil.encoders import create_encoder

    enc = create_encoder("resnet18", pretrained=False)
    res = run_embed(read_manifest(manifest), run, EmbedConfig(encoder="resnet18", num_workers=0,
                    pretrained=False), encoder=enc).set_index("slide_id")  # fmt: skip
    assert (res.loc[list(good.slide_id), "status"] == "ok").all()
    assert res.message["mpp_text"] == (
        "mpp_text: no tile store; `wsimil tile` failed for it: " + msg["mpp_text"]
    )
    assert "`wsimil tile` failed for it: " in res.message["text"]
