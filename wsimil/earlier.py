"""Why a slide has no input for this stage: what the earlier stages logged about it.

A slide that failed at ``tile`` has no tile store; ``embed``, ``heatmap``, the report and the
review page then give the real cause ("`wsimil tile` failed for it: <its error>") instead of
"run wsimil tile first". Each earlier stage's ``status.jsonl`` is read once, when first needed.
"""

from __future__ import annotations

from .layout import RunLayout, StageFolder
from .store import StatusLog, tile_store_coords

ENDED = ("ok", "empty", "error")


class EarlierStages:
    """The last ended status of each slide in earlier stages, in pipeline order.

    Parameters
    ----------
    stages : sequence of (command, StageFolder)
        Earliest first, e.g. ``[("tile", layout.tiles), ("embed", layout.features(encoder))]``:
        the cause given is the earliest stage that failed for the slide (the root cause).
    """

    def __init__(self, stages):
        self.stages = list(stages)
        self._last: dict[str, dict[str, dict]] = {}

    def _latest(self, command: str, folder: StageFolder) -> dict[str, dict]:
        if command not in self._last:
            last: dict[str, dict] = {}
            for line in StatusLog(folder.status_file).read():
                if line.get("status") in ENDED:
                    last[str(line.get("slide_id"))] = line
            self._last[command] = last
        return self._last[command]

    def cause(self, slide_id: str) -> str | None:
        """``"`wsimil tile` failed for it: <message>"`` for the earliest stage that failed, else None."""
        for command, folder in self.stages:
            line = self._latest(command, folder).get(slide_id)
            if line is not None and line.get("status") == "error":
                return f"`wsimil {command}` failed for it: {line.get('message', '')}"
        return None

    def missing(self, slide_id: str, what: str, command: str) -> str:
        """One line for a slide without ``what``: the earlier failure, or which command to run."""
        cause = self.cause(slide_id)
        if cause is not None:
            return f"{slide_id}: no {what}; {cause}"
        return f"{slide_id}: no {what}; run `{command}` first"


def before_embed(layout: RunLayout) -> EarlierStages:
    return EarlierStages([("tile", layout.tiles)])


def before_heatmap(
    layout: RunLayout, encoder: str, *, pixel_px: int | None = None
) -> EarlierStages:
    if pixel_px:  # an end-to-end model reads the tile cache
        return EarlierStages([("tile", layout.tiles), ("cache", layout.tile_cache(pixel_px))])
    return EarlierStages([("tile", layout.tiles), ("embed", layout.features(encoder))])


class FromTileStore:
    """What a stage whose input is the slide's tile store (``embed``, ``cache``) shares.

    The stage has ``layout`` and ``earlier`` (:func:`before_embed`).
    """

    def check(self, row) -> None:
        from .manifest import mpp_override
        from .slide import SlideError

        sid = row["slide_id"]
        if not self.layout.tile_store(sid).is_dir():
            raise SlideError(self.earlier.missing(sid, "tile store", "wsimil tile"))
        mpp_override(row)

    def tile_input(self, sid: str):
        """The slide's tile store attrs and coords; a slide without one is a SlideError line."""
        from .slide import SlideError

        tiles = tile_store_coords(self.layout, sid)
        if tiles is None:
            raise SlideError(self.earlier.missing(sid, "tile store", "wsimil tile"))
        return tiles
