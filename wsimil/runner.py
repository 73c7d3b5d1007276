"""One per-slide runner for ``tile``, ``embed`` and ``heatmap``.

:func:`run_slides` does, for every slide of a manifest, what every per-slide stage needs:

- take the slide's lock (non-blocking; a slide locked by another process is ``skipped``), so
  any number of processes, on any hosts sharing the run folder, do each slide exactly once;
- remove what a dead attempt left (logged as ``interrupted``);
- skip a complete output made with the same settings, refuse one made with other settings
  unless ``overwrite`` (config hash);
- run the stage's own work; one bad slide gets one error line and the others go on;
- append the slide's ``status.jsonl`` line as soon as it ends (``ok``, ``empty``, ``error`` or
  ``skipped``), draw progress, and return one row per slide for the summary and exit code.

A stage supplies only what is its own, as a :class:`SlideStage`: its folder, the outputs and
state of a slide, how to plan one and how to do one (or a window of several, as ``embed``
does to keep batches full across slides).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .layout import StageFolder
from .locks import SlideLock
from .store import StatusLog, remove_partial


@dataclass
class SlideOutcome:
    """How one slide ended: ``status`` (ok, empty, error, skipped), a one-line message, values."""

    status: str
    message: str = ""
    values: dict = field(default_factory=dict)


def error_line(exc: BaseException, where: str) -> str:
    """One line naming the slide/file and the cause.

    Errors wsimil raises for bad input (:class:`wsimil.slide.SlideError`, ``ValueError``) already
    name the file and what to do; anything else is prefixed with ``where`` and its type.
    """
    from .slide import SlideError

    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, SlideError | ValueError) and text:
        return text
    if isinstance(exc, OSError) and exc.strerror:
        target = f" ({exc.filename})" if exc.filename else ""
        return f"{where}: {exc.strerror}{target}"
    return f"{where}: {type(exc).__name__}: {text}" if text else f"{where}: {type(exc).__name__}"


class SlideStage:
    """What a per-slide stage supplies to :func:`run_slides`. Override the methods marked so.

    Rows are manifest rows as dicts (``row["slide_id"]``, ``row["path"]``, ...).
    """

    name = "stage"
    #: result columns of this stage beyond slide_id/status/message/seconds, with defaults
    columns: dict = {}
    #: what differs when a slide's output exists with another settings hash
    changed = "other settings"

    def __init__(self, folder: StageFolder):
        self.folder = folder

    def outputs(self, row: dict) -> list[Path]:
        """Final paths of the slide's outputs (override)."""
        raise NotImplementedError

    def state(self, row: dict) -> tuple[str, dict]:
        """``("missing" | "complete" | "changed", values)`` of the slide's outputs (override)."""
        raise NotImplementedError

    def changed_message(self, row: dict) -> str:
        return (
            f"{self.outputs(row)[0]}: made with {self.changed}; "
            "pass --overwrite to redo it or use another run folder"
        )

    def plan(self, row: dict):
        """Check the slide's inputs and return a job for :meth:`run_one` (raise on bad input)."""
        return row

    def run_one(self, job) -> SlideOutcome:
        """Do one slide (override, or override :meth:`run`)."""
        raise NotImplementedError

    def window_full(self, jobs: list) -> bool:
        """Whether the claimed jobs are enough to start :meth:`run` (default: one at a time)."""
        return len(jobs) >= 1

    def run(self, jobs: list) -> Iterator[tuple[int, SlideOutcome]]:
        """Do a window of slides; yield ``(index in jobs, outcome)`` as each one ends."""
        for i, job in enumerate(jobs):
            try:
                outcome = self.run_one(job)
            except Exception as exc:  # one bad slide must not stop the cohort
                outcome = SlideOutcome("error", error_line(exc, self.where(job)))
            yield i, outcome

    def where(self, job) -> str:
        """How an error message names a job's slide (its path, else its id)."""
        row = job if isinstance(job, dict) else getattr(job, "row", {})
        return str(row.get("path") or row.get("slide_id") or "slide")


@dataclass
class _Claim:
    row: dict
    job: object
    lock: SlideLock
    t0: float


class _Run:
    """State of one :func:`run_slides` call: the log, the results, progress."""

    def __init__(self, stage: SlideStage, *, overwrite: bool, console, advance):
        self.stage = stage
        self.overwrite = overwrite
        self.console = console
        self.advance = advance
        self.log = StatusLog(stage.folder.status_file)
        self.rows: list[dict] = []

    def finish(self, row: dict, outcome: SlideOutcome, t0: float) -> None:
        sid = str(row["slide_id"])
        values = {**self.stage.columns, **outcome.values}
        seconds = values.pop("seconds", None)
        seconds = round(time.perf_counter() - t0 if seconds is None else seconds, 3)
        self.log.write(sid, outcome.status, outcome.message, seconds, **values)
        self.rows.append(
            {"slide_id": sid, "status": outcome.status, "message": outcome.message,
             "seconds": seconds, **values}
        )  # fmt: skip
        if outcome.status == "error" and self.console is not None:
            from rich.markup import escape

            # One line, as written: no markup from the message, no wrapping at the console width.
            self.console.print(
                f"[red]error[/red] {escape(outcome.message)}", highlight=False, soft_wrap=True
            )
        self.advance()

    def claim(self, row: dict) -> _Claim | SlideOutcome:
        """Lock the slide and plan it, or say why not."""
        stage, sid = self.stage, str(row["slide_id"])
        try:
            lock = SlideLock(stage.folder.lock_file(sid))
            if not lock.acquire():
                return SlideOutcome("skipped", "in progress elsewhere")
        except Exception as exc:
            return SlideOutcome("error", error_line(exc, sid))
        try:
            if any([remove_partial(p) for p in stage.outputs(row)]):
                self.log.write(
                    sid, "interrupted", "an earlier attempt stopped before it finished; "
                    "its partial output was removed",
                )  # fmt: skip
            state, values = stage.state(row)
            if state == "complete" and not self.overwrite:
                lock.release()
                return SlideOutcome("skipped", "complete output exists", values)
            if state == "changed" and not self.overwrite:
                lock.release()
                return SlideOutcome("error", stage.changed_message(row))
            return _Claim(row, stage.plan(row), lock, time.perf_counter())
        except Exception as exc:
            lock.release()
            return SlideOutcome("error", error_line(exc, stage.where(row)))

    def run_window(self, claims: list[_Claim]) -> None:
        """Run claimed slides; every one of them ends with a status line and an unlocked slide."""
        done: set[int] = set()
        try:
            for i, outcome in self.stage.run([c.job for c in claims]):
                claims[i].lock.release()
                self.finish(claims[i].row, outcome, claims[i].t0)
                done.add(i)
        except Exception as exc:  # the stage broke for the whole window
            msg = error_line(exc, f"{self.stage.name} window of {len(claims)} slide(s)")
            for i, c in enumerate(claims):
                if i not in done:
                    c.lock.release()
                    self.finish(c.row, SlideOutcome("error", msg), c.t0)
        finally:
            for c in claims:
                c.lock.release()


def run_slides(
    stage: SlideStage,
    manifest: pd.DataFrame,
    *,
    overwrite: bool = False,
    console=None,
    label: str | None = None,
) -> pd.DataFrame:
    """Run ``stage`` over every slide of ``manifest``.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds and the stage's columns.
    """
    from .manifest import check_columns
    from .progress import progress_bar

    check_columns(manifest)
    stage.folder.path.mkdir(parents=True, exist_ok=True)
    claims: list[_Claim] = []
    with progress_bar(console, label or stage.name, len(manifest)) as advance:
        run = _Run(stage, overwrite=overwrite, console=console, advance=advance)
        try:
            for row in _rows(manifest):
                t0 = time.perf_counter()
                got = run.claim(row)
                if isinstance(got, SlideOutcome):
                    run.finish(row, got, t0)
                    continue
                claims.append(got)
                if stage.window_full([c.job for c in claims]):
                    window, claims = claims, []
                    run.run_window(window)
            if claims:
                window, claims = claims, []
                run.run_window(window)
        finally:
            for c in claims:  # interrupted before the window ran
                c.lock.release()
    columns = ["slide_id", "status", "message", "seconds", *stage.columns]
    return pd.DataFrame(run.rows, columns=columns)


def _rows(manifest: pd.DataFrame) -> Iterable[dict]:
    for row in manifest.to_dict("records"):
        row["slide_id"] = str(row["slide_id"])
        yield row


def summarise(console, results: pd.DataFrame, title: str, columns: list[str]) -> None:
    """Print the summary table of a stage run: slides per status and column totals."""
    if console is None:
        return
    from rich.table import Table

    counts = results["status"].value_counts().to_dict()
    table = Table(title=title)
    table.add_column("slides")
    for c in counts:
        table.add_column(c)
    for c in columns:
        table.add_column(c)
    extra = [f"{results[c].sum():,.6g}" for c in columns]
    table.add_row(str(len(results)), *[str(v) for v in counts.values()], *extra)
    console.print(table)


def n_failed(results: pd.DataFrame) -> int:
    return int((results["status"] == "error").sum())
