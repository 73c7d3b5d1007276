"""Atomic stores, status lines, config hashes and manifest validation."""

import json
import os

import numpy as np
import pytest

from wsimil.manifest import ManifestError, read_manifest, shard
from wsimil.store import (
    StatusLog,
    atomic_store,
    config_hash,
    open_store,
    remove_stale_temps,
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
    assert df.mpp[0] == 0.25 and np.isnan(df.mpp[1])


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,label\na,1\n", "lacks column\\(s\\) path"),
        ("slide_id,path\na,a.svs\n", "lacks column\\(s\\) label"),
        ("slide_id,path,label\na,a.svs,1\na,b.svs,0\n", "duplicate slide_id"),
        ("slide_id,path,label\na,a.svs,\n", "empty 'label'"),
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


def test_stale_temporary_stores_of_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess

    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.zarr.tmp-{host}-{dead.pid}"
    live = tmp_path / f".b.zarr.tmp-{host}-{os.getpid()}"
    other = tmp_path / f".c.zarr.tmp-otherhost-{dead.pid}"
    done = tmp_path / "d.zarr"
    for p in (stale, live, other, done):
        p.mkdir()
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists() and done.exists()
