"""The one per-slide runner: locks, skips, partial outputs, errors and status lines.

A small stage of its own (one text file per slide) exercises what every wsimil stage gets
from :func:`wsimil.runner.run_slides`; the real stages are run through it in their own tests.
"""

import json

import pandas as pd
import pytest

from wsimil.layout import RunLayout, StageFolder, check_slide_id, encoder_dir_name
from wsimil.locks import slide_lock
from wsimil.runner import SlideOutcome, SlideStage, run_slides


class TextStage(SlideStage):
    """Writes ``<slide_id>.txt`` with the settings; windows of ``window`` slides."""

    name = "text"
    columns = {"n_chars": 0}

    def __init__(self, folder, *, setting="a", window=1, break_after=None):
        super().__init__(StageFolder(folder))
        self.setting, self.window, self.break_after = setting, window, break_after

    def outputs(self, row):
        return [self.folder.path / f"{row['slide_id']}.txt"]

    def state(self, row):
        out = self.outputs(row)[0]
        if not out.exists():
            return "missing", {}
        text = out.read_text()
        return ("complete" if text == self.setting else "changed"), {"n_chars": len(text)}

    def plan(self, row):
        if row["path"] == "bad":
            raise ValueError(f"{row['path']}: not a slide; fix the manifest")
        return row

    def window_full(self, jobs):
        return len(jobs) >= self.window

    def run(self, jobs):
        for i, row in enumerate(jobs):
            if self.break_after is not None and i == self.break_after:
                raise RuntimeError("device lost")
            self.outputs(row)[0].write_text(self.setting)
            yield i, SlideOutcome("ok", "", {"n_chars": len(self.setting)})


def _manifest(*rows):
    return pd.DataFrame([{"slide_id": s, "path": p} for s, p in rows])


def _lines(folder):
    return [json.loads(x) for x in (folder / "status.jsonl").read_text().splitlines()]


def test_each_slide_ends_with_one_line_and_complete_slides_are_skipped(tmp_path):
    df = _manifest(("a", "a.svs"), ("b", "bad"), ("c", "c.svs"))
    res = run_slides(TextStage(tmp_path), df)
    assert res.status.tolist() == ["ok", "error", "ok"]
    assert res.message[1] == "bad: not a slide; fix the manifest"
    res = run_slides(TextStage(tmp_path), df)
    assert res.status.tolist() == ["skipped", "error", "skipped"] and res.n_chars[0] == 1
    changed = run_slides(TextStage(tmp_path, setting="bb"), df)
    assert changed.status[0] == "error" and "--overwrite" in changed.message[0]
    redone = run_slides(TextStage(tmp_path, setting="bb"), df, overwrite=True)
    assert redone.status.tolist() == ["ok", "error", "ok"]
    assert [d["status"] for d in _lines(tmp_path)] == [
        "ok", "error", "ok", "skipped", "error", "skipped", "error", "error", "error",
        "ok", "error", "ok",
    ]  # fmt: skip


def test_a_stage_that_breaks_mid_window_fails_the_rest_of_its_window_only(tmp_path):
    df = _manifest(*[(f"s{i}", f"s{i}.svs") for i in range(5)])
    res = run_slides(TextStage(tmp_path, window=3, break_after=1), df)
    # window 1: s0 done, s1 and s2 fail with the cause; window 2: s3 done, s4 fails
    assert res.status.tolist() == ["ok", "error", "error", "ok", "error"]
    assert "device lost" in res.message[1] and "RuntimeError" in res.message[1]
    for i in range(5):  # every lock was released
        with slide_lock(tmp_path, f"s{i}") as mine:
            assert mine
    assert len(_lines(tmp_path)) == 5


def test_a_locked_slide_is_skipped_and_a_dead_attempt_is_cleaned_and_logged(tmp_path):
    df = _manifest(("a", "a.svs"), ("b", "b.svs"))
    (tmp_path / ".b.txt.partial").write_text("half")
    with slide_lock(tmp_path, "a") as mine:
        assert mine
        res = run_slides(TextStage(tmp_path), df)
    assert res.status.tolist() == ["skipped", "ok"]
    assert res.message[0] == "in progress elsewhere"
    assert not (tmp_path / ".b.txt.partial").exists()
    assert [(d["slide_id"], d["status"]) for d in _lines(tmp_path)] == [
        ("a", "skipped"), ("b", "interrupted"), ("b", "ok"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "sid", ["../../escape", "a/b", "*", "**", ".", "..", ".hidden", "-rf", "a\x00b", "x" * 300, ""]
)
def test_unsafe_slide_ids_are_refused_per_slide_and_nothing_leaves_the_run(tmp_path, sid):
    run = tmp_path / "run"
    df = _manifest((sid, "x.svs"), ("good", "g.svs"))
    res = run_slides(TextStage(run / "stage"), df)
    assert res.status.tolist() == ["error", "ok"]
    assert "slide_id" in res.message[0] and "\n" not in res.message[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(ValueError):
        check_slide_id(sid)
    with pytest.raises(ValueError):
        RunLayout(run).tile_store(sid)


def test_layout_names_stay_inside_the_run():
    layout = RunLayout("/runs/r")
    assert encoder_dir_name("hf-hub:MahmoodLab/UNI") == "hf-hub_MahmoodLab_UNI"
    assert layout.feature_store("hf-hub:org/m", "s1").as_posix() == (
        "/runs/r/features/hf-hub_org_m/s1.zarr"
    )
    assert layout.heatmap_slide("gated", "s1").table.as_posix() == (
        "/runs/r/heatmaps/gated/slides/s1/s1.csv"
    )
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ValueError, match="model name"):
            layout.model_dir(bad)
