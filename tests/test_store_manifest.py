"""Atomic stores, status lines, config hashes and manifest validation."""

import json
import os

import numpy as np
import pytest

from wsimil.manifest import ManifestError, read_manifest, shard
from wsimil.store import (
    StatusLog,
    atomic_output,
    atomic_store,
    config_hash,
    open_store,
    remove_partial,
    store_status,
    write_array,
)


def test_store_appears_only_when_complete(tmp_path):
    final = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        with atomic_store(final) as g:
            write_array(g, "coords", np.zeros((5, 2), np.int32))
            raise RuntimeError("killed half way")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_store(final) as g:
        write_array(g, "coords", np.arange(10, dtype=np.int32).reshape(5, 2))
        g.attrs["config_hash"] = "abc"
    np.testing.assert_array_equal(open_store(final)["coords"][...], np.arange(10).reshape(5, 2))
    assert store_status(final, "abc") == "complete"
    assert store_status(final, "other") == "changed"
    assert store_status(tmp_path / "none.zarr", "abc") == "missing"


def test_config_hash_is_stable_and_sensitive():
    a = config_hash({"tile_px": 256, "target_mpp": 0.5})
    assert a == config_hash({"target_mpp": 0.5, "tile_px": 256})
    assert a != config_hash({"tile_px": 224, "target_mpp": 0.5})


def test_status_log_appends_json_lines(tmp_path):
    log = StatusLog(tmp_path / "status.jsonl")
    log.write("a", "ok", seconds=1.23456)
    log.write("b", "error", "b.svs: cannot open")
    lines = [json.loads(x) for x in (tmp_path / "status.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "error"]
    assert lines[0]["seconds"] == 1.235 and lines[1]["message"] == "b.svs: cannot open"


def _write(tmp_path, text):
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_manifest_resolves_relative_paths_and_reads_mpp(tmp_path):
    df = read_manifest(
        _write(tmp_path, "slide_id,path,label,mpp\n007,slides/a.svs,1,0.25\nb,/abs/b.svs,0,\n"),
        require_label=True,
    )
    assert df.slide_id.tolist() == ["007", "b"]  # ids stay strings
    assert df.path[0] == str(tmp_path.resolve() / "slides" / "a.svs") and df.path[1] == "/abs/b.svs"
    assert df.mpp[0] == 0.25 and df.mpp[1] is None
    assert df.label.tolist() == ["1", "0"]  # class names ("1.0" is class 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,label\na,1\n", "lacks column\\(s\\) path"),
        ("slide_id,path\na,a.svs\n", "lacks column\\(s\\) label"),
        ("slide_id,path,label\na,a.svs,1\na,b.svs,0\n", "line 3: slide_id 'a' repeats line 2"),
        ("slide_id,path,label\na,a.svs,\n", "1 bad 'label' value\\(s\\): line 2 \\(a\\): ''"),
    ],
)
def test_bad_manifests_get_one_clear_message(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(tmp_path, text), require_label=True)


def test_shards_partition_the_manifest(tmp_path):
    df = read_manifest(
        _write(tmp_path, "slide_id,path\n" + "".join(f"s{i},x{i}.svs\n" for i in range(10)))
    )
    parts = [shard(df, f"{i}/3").slide_id.tolist() for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(df.slide_id.tolist())
    assert all(len(p) in (3, 4) for p in parts)
    with pytest.raises(ManifestError):
        shard(df, "3/3")


def test_partial_outputs_of_a_dead_attempt_are_removed_by_name_only(tmp_path):
    final = tmp_path / "a.zarr"
    (tmp_path / ".a.zarr.partial").mkdir()  # a killed writer of a (a folder) ...
    (tmp_path / ".a.zarr.old").write_text("x")  # ... that was replacing an older store
    (tmp_path / ".b.zarr.partial").mkdir()  # another slide's, maybe being written right now
    (tmp_path / "a.zarr.partial.zarr").mkdir()  # an odd but complete output name
    assert remove_partial(final) is True
    assert remove_partial(final) is False
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".b.zarr.partial", "a.zarr.partial.zarr"]


def test_atomic_output_replaces_a_file_or_folder_only_when_complete(tmp_path):
    target = tmp_path / "page.html"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["page.html"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["page.html"]
    with atomic_output(tmp_path / "slide", folder=True) as tmp:
        (tmp / "x.csv").write_text("1")
    assert (tmp_path / "slide" / "x.csv").read_text() == "1"
