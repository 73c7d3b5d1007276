"""One per-slide runner for ``tile``, ``embed`` and ``heatmap``.

:func:`run_slides` does, for every slide of a manifest, what every per-slide stage needs:

- take the slide's lock (non-blocking; a slide locked by another process is ``skipped``), so
  any number of processes, on any hosts sharing the run folder, do each slide exactly once;
- remove what a dead attempt left (logged as ``interrupted``);
- skip a complete output made with the same settings, refuse one made with other settings
  unless ``overwrite`` (config hash);
- run the stage's own work; one bad slide gets one error line and the others go on;
- append the slide's ``status.jsonl`` line as soon as it ends (``ok``, ``empty``, ``error`` or
  ``skipped``), draw progress, and return one row per slide for the summary and exit code;
- stop cleanly at a fault of the run folder's disk (full, read-only, not writable): the slide
  that hit it is an error, every finished slide is kept, the slides not started are
  ``not_run``, and the summary says what to do.

Cheap checks that need no lock (a complete output, a missing input) come first, so a cohort of
finished or broken rows costs no lock file per row.

A stage supplies only what is its own, as a :class:`SlideStage`: its folder, the outputs and
state of a slide, how to plan one and how to do one (or a window of several, as ``embed``
does to keep batches full across slides).
"""

from __future__ import annotations

import errno
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
    #: the run folder's disk failed (full, read-only, not writable): no slide after this can end well
    stop: bool = False


class RunFolderError(RuntimeError):
    """The stage cannot write its folder at all; the message names it and what to do."""


#: errors of the disk being written, whatever the file: they stop the stage
DISK_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
#: errors that stop the stage when they concern the stage's own folder (an unreadable slide does not)
OUTPUT_FAULTS = {errno.EACCES, errno.EPERM}


def disk_fault(exc: BaseException, folder: Path) -> OSError | None:
    """The OSError in ``exc``'s chain that means ``folder``'s disk cannot take writes, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FAULTS:
            return exc
        if isinstance(exc, OSError) and exc.errno in OUTPUT_FAULTS and exc.filename:
            if Path(str(exc.filename)).absolute().is_relative_to(Path(folder).absolute()):
                return exc
        exc = exc.__cause__ or exc.__context__
    return None


def error_outcome(exc: BaseException, where: str, folder: Path) -> SlideOutcome:
    """A slide's ``error`` outcome for ``exc``; it stops the stage when the disk failed."""
    fault = disk_fault(exc, folder)
    if fault is not None:
        return SlideOutcome("error", error_line(fault, where), stop=True)
    return SlideOutcome("error", error_line(exc, where))


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

    def check(self, row: dict) -> None:
        """Cheap checks of the slide's inputs, before its lock is taken (raise on bad input)."""

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
                outcome = error_outcome(exc, self.where(job), self.folder.path)
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
    """State of one :func:`run_slides` call: the log, the results, progress, a stop."""

    def __init__(self, stage: SlideStage, *, overwrite: bool, console, advance):
        self.stage = stage
        self.overwrite = overwrite
        self.console = console
        self.advance = advance
        self.log = StatusLog(stage.folder.status_file)
        self.rows: list[dict] = []
        self.stopped: str | None = None  # why the stage stopped early

    def say(self, text: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            # One line, as written: no markup from the message, no wrapping at the console width.
            self.console.print(escape(text), highlight=False, soft_wrap=True)

    def write_status(self, sid: str, status: str, message: str = "", seconds=0.0, **values):
        """Append a status line; a disk that cannot take it stops the stage."""
        try:
            self.log.write(sid, status, message, seconds, **values)
        except OSError as exc:
            self.say(f"error {error_line(exc, str(self.log.path))}")
            if self.stopped is None:
                self.stopped = error_line(exc, str(self.log.path))

    def finish(self, row: dict, outcome: SlideOutcome, t0: float) -> None:
        sid = str(row["slide_id"])
        values = {**self.stage.columns, **outcome.values}
        seconds = values.pop("seconds", None)
        seconds = round(time.perf_counter() - t0 if seconds is None else seconds, 3)
        if outcome.status == "error":
            self.say(f"error {outcome.message}")
        if outcome.stop and self.stopped is None:
            self.stopped = outcome.message
        self.write_status(sid, outcome.status, outcome.message, seconds, **values)
        self.rows.append(
            {"slide_id": sid, "status": outcome.status, "message": outcome.message,
             "seconds": seconds, **values}
        )  # fmt: skip
        self.advance()

    def not_run(self, row: dict) -> None:
        """A slide not started because the stage stopped (no status line: nothing happened)."""
        self.rows.append(
            {"slide_id": str(row["slide_id"]), "status": "not_run", "seconds": 0.0,
             "message": f"not started: the stage stopped ({self.stopped})", **self.stage.columns}
        )  # fmt: skip

    def precheck(self, row: dict) -> SlideOutcome | None:
        """Lock-free: a complete output is skipped, bad input is an error; else None."""
        stage = self.stage
        try:
            if not self.overwrite:
                state, values = stage.state(row)
                if state == "complete":
                    return SlideOutcome("skipped", "complete output exists", values)
            stage.check(row)
        except Exception as exc:
            return error_outcome(exc, stage.where(row), stage.folder.path)
        return None

    def claim(self, row: dict) -> _Claim | SlideOutcome:
        """Lock the slide and plan it, or say why not."""
        stage, sid = self.stage, str(row["slide_id"])
        early = self.precheck(row)
        if early is not None:
            return early
        try:
            lock = SlideLock(stage.folder.lock_file(sid))
            if not lock.acquire():
                return SlideOutcome("skipped", "in progress elsewhere")
        except Exception as exc:
            return error_outcome(exc, sid, stage.folder.path)
        try:
            if any([remove_partial(p) for p in stage.outputs(row)]):
                self.write_status(
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
            return error_outcome(exc, stage.where(row), stage.folder.path)

    def run_window(self, claims: list[_Claim]) -> None:
        """Run claimed slides; every one of them ends with a status line and an unlocked slide."""
        done: set[int] = set()
        try:
            for i, outcome in self.stage.run([c.job for c in claims]):
                claims[i].lock.release()
                self.finish(claims[i].row, outcome, claims[i].t0)
                done.add(i)
                if self.stopped is not None:  # the others are not started (not_run)
                    break
        except Exception as exc:  # the stage broke for the whole window
            where = f"{self.stage.name} window of {len(claims)} slide(s)"
            outcome = error_outcome(exc, where, self.stage.folder.path)
            for i, c in enumerate(claims):
                if i not in done and self.stopped is None:
                    c.lock.release()
                    self.finish(c.row, outcome, c.t0)
        finally:
            for c in claims:
                c.lock.release()


def _start(folder: StageFolder, settings) -> None:
    """Make the stage's folder and write its ``config.yaml``, or say in one line why not."""
    import yaml

    from .store import write_text_atomic

    try:
        folder.path.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            text = yaml.safe_dump(settings.model_dump(), sort_keys=False)
            write_text_atomic(folder.config_file, text)
    except OSError as exc:
        raise RunFolderError(
            f"{folder.path}: cannot write the stage's folder ({exc.strerror}); "
            "make the run folder writable (or free space) and run the command again"
        ) from exc


def run_slides(
    stage: SlideStage,
    manifest: pd.DataFrame,
    *,
    overwrite: bool = False,
    console=None,
    label: str | None = None,
    settings=None,
) -> pd.DataFrame:
    """Run ``stage`` over every slide of ``manifest``.

    ``settings`` (the stage's config section) is written to the stage's ``config.yaml`` first.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds and the stage's columns.

    Raises
    ------
    RunFolderError
        The stage's folder cannot be written at all (nothing was done).
    """
    from .manifest import check_columns
    from .progress import progress_bar

    check_columns(manifest)
    _start(stage.folder, settings)
    claims: list[_Claim] = []
    with progress_bar(console, label or stage.name, len(manifest)) as advance:
        run = _Run(stage, overwrite=overwrite, console=console, advance=advance)
        try:
            for row in _rows(manifest):
                if run.stopped is not None:
                    break
                t0 = time.perf_counter()
                got = run.claim(row)
                if isinstance(got, SlideOutcome):
                    run.finish(row, got, t0)
                    continue
                claims.append(got)
                if stage.window_full([c.job for c in claims]):
                    window, claims = claims, []
                    run.run_window(window)
            if claims and run.stopped is None:
                window, claims = claims, []
                run.run_window(window)
        finally:
            for c in claims:  # interrupted before the window ran
                c.lock.release()
        if run.stopped is not None:
            ended = {r["slide_id"] for r in run.rows}
            for row in _rows(manifest):
                if row["slide_id"] not in ended:
                    run.not_run(row)
    columns = ["slide_id", "status", "message", "seconds", *stage.columns]
    result = pd.DataFrame(run.rows, columns=columns)
    result.attrs["stopped"] = run.stopped
    return result


def _rows(manifest: pd.DataFrame) -> Iterable[dict]:
    """The manifest's rows as dicts, one at a time (any column name works as a key)."""
    columns = list(manifest.columns)
    for values in zip(*(manifest[c] for c in columns), strict=True):
        row = dict(zip(columns, values, strict=True))
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
    """Slides that failed or were not started because the stage stopped."""
    return int(results["status"].isin(["error", "not_run"]).sum())
