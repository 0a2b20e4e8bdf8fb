"""How the command line shows results: rich tables and progress bars, intervals as text,
results as JSON."""

from __future__ import annotations

import contextlib
import math
import sys
import time

import numpy as np

__all__ = ["Reporter", "fmt_ci", "verdict", "conclusion", "plural", "jsonable", "version", "duration"]


def version() -> str:
    """The installed kdjax's version (``importlib.metadata``), or ``"unknown"`` when kdjax runs
    from a folder it was not installed from."""
    from importlib import metadata

    try:
        return metadata.version("kdjax")
    except metadata.PackageNotFoundError:
        return "unknown"


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Reporter:
    """Rich tables and progress bars; on stderr when ``--json`` owns stdout.

    Progress: a rich bar when the console is a terminal; otherwise (a job, ``| tee``, CI) a
    plain line on stderr when a phase passes another tenth of its steps or 30 s after the last
    line, and when it ends (phase, step/total, loss, elapsed, remaining); ``quiet``: neither.
    The wall time of every phase is kept for ``results.json`` (``timing``)."""

    LINE_EVERY_S = 30.0

    def __init__(self, json_mode: bool, quiet: bool, clock=time.perf_counter, stream=None):
        from rich.console import Console

        self.console = Console(stderr=json_mode, width=None if sys.stdout.isatty() else 110)
        self.quiet = quiet
        self.plain = not quiet and not self.console.is_terminal
        self._clock, self._stream = clock, stream
        self.t0 = clock()
        self.phase_seconds: dict[str, float] = {}
        self._mark = self._ended = None  # when the last phase ended; when the last progress block ended
        self._state: dict[str, dict] = {}  # per phase of the current progress block
        self._first: dict[str, int] = {}
        self._loss: dict[str, float] = {}

    def watch(self, on_losses=None):
        """An ``on_losses(phase, first step, losses)`` callback that notes the step a phase
        starts from (a resumed run's) and, for the plain progress lines, the latest mean loss;
        then calls ``on_losses`` (e.g. the metrics log)."""
        def hook(phase, first, losses):
            self._first.setdefault(phase, int(first))
            if self.plain:
                from kdjax import parallel

                values = np.asarray(parallel.to_host(losses), np.float64)
                self._loss[phase] = float(values.reshape(-1, values.shape[-1])[:, -1].mean())
            if on_losses is not None:
                on_losses(phase, first, losses)
        return hook

    def _track(self, phase: str, done: int, total: int) -> dict:
        """Wall time of ``phase``: from the end of the previous one (or the start of the
        progress block) to its latest chunk."""
        now = self._clock()
        st = self._state.get(phase)
        if st is None:
            st = self._state[phase] = {"start": self._mark, "seconds": 0.0, "tenth": -1, "printed": None,
                                       "first": self._first.get(phase, 0)}
        spent = now - st["start"]
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + spent - st["seconds"]
        st["seconds"], st["now"] = spent, now
        if done >= total:
            self._mark = now
        return st

    def _line(self, phase: str, done: int, total: int, st: dict) -> None:
        now, tenth = st["now"], 10 * done // max(total, 1)
        if done < total and tenth <= st["tenth"] and (st["printed"] is None
                                                      or now - st["printed"] < self.LINE_EVERY_S):
            return
        st["tenth"], st["printed"] = tenth, now
        text = f"kdjax: {phase} step {done}/{total} ({done / max(total, 1):.0%})"
        if phase in self._loss:
            text += f", loss {self._loss[phase]:.4g}"
        text += f", {duration(now - self.t0)} elapsed"
        ran = done - st["first"]
        if done < total and ran > 0 and st["seconds"] > 0:
            text += f", ~{duration(st['seconds'] / ran * (total - done))} left in {phase}"
        print(text, file=self._stream or sys.stderr, flush=True)

    def timing(self) -> dict:
        """``{"run": seconds since the command started, "phases": {"setup": ..., <phase>: ...,
        "finish": ...}}``: wall time of the checks before training, of each training phase and
        of what came after (evaluation, tables, files)."""
        now = self._clock()
        phases = dict(self.phase_seconds)
        if self._ended is not None:
            phases["finish"] = now - self._ended
        return {"run": now - self.t0, "phases": phases}

    def conclude(self, lines) -> list[str]:
        """Print a command's conclusion (one sentence a line) and return it for results.json."""
        self.section("CONCLUSION")
        for line in lines:
            self.line(line)
        return list(lines)

    def section(self, title: str):
        self.console.rule(f"[bold]{title}")

    def line(self, text: str):
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str):
        """One line on stderr (also with --quiet and --json): something the user should act on."""
        print(text, file=sys.stderr, flush=True)

    def table(self, title: str, columns, rows):
        from rich.table import Table

        t = Table()  # the title on its own line: rich would wrap it to the table's width
        self.console.print(title, style="italic", highlight=False)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*map(str, r))
        self.console.print(t)

    @contextlib.contextmanager
    def progress(self):
        """Yields ``on_chunk(phase, done, total, states)``: one bar per phase on a terminal,
        else plain lines (``_line``), moved between compiled chunks only; each phase timed."""
        now = self._clock()
        self.phase_seconds.setdefault("setup", now - self.t0)
        self._mark, self._state, self._first, self._loss = now, {}, {}, {}
        try:
            if self.quiet or self.plain:
                def update(phase, done, total, states=None):
                    st = self._track(phase, done, total)
                    if self.plain:
                        self._line(phase, done, total, st)

                yield update
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("steps"), TimeElapsedColumn(), console=self.console,
                          transient=True) as bar:
                tasks = {}

                def update(phase, done, total, states=None):
                    self._track(phase, done, total)
                    if phase not in tasks:
                        tasks[phase] = bar.add_task(phase, total=total)
                    bar.update(tasks[phase], completed=done)

                yield update
        finally:
            self._ended = self._clock()


def fmt_ci(mean_half, *, signed: bool = False, digits: int = 4) -> str:
    """``"0.9512 ± 0.0113"``; a single value (``mean_ci`` gives no half-width) says so
    instead of printing a ``± 0`` that looks like certainty."""
    m, h = mean_half
    text = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    if h is None or not math.isfinite(h):
        return f"{text} (n = 1, no interval)"
    return f"{text} ± {h:.{digits}f}"


def plural(n: int, word: str) -> str:
    """``"1 seed"``, ``"4 seeds"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


ENOUGH_SEEDS = 4  # below this a 95% interval (t with n - 1 degrees of freedom) is too wide to conclude


def conclusion(what: str, diff, n: int, *, lower_is_better: bool = False, better: str = "distillation helped",
               worse: str = "distillation hurt", digits: int = 4) -> str:
    """One sentence from a paired difference: its mean and 95% interval as computed, with n
    beside them, whether the interval excludes 0 and what that means; with fewer than
    ``ENOUGH_SEEDS`` seeds, that the interval is too wide to conclude.

    Args:
      what: what the difference is, as the sentence starts, e.g. ``"Distilled - standard test
        accuracy (paired by seed)"``.
      diff: ``(mean, 95% CI half-width)`` (half-width None or NaN: one seed).
      n: the number of pairs (seeds).
      lower_is_better: a positive difference is worse (bits per token, errors).
      better, worse: what a significant difference in either direction says.
      digits: decimals of the mean and half-width.

    Returns:
      The sentence, e.g. ``"Distilled - standard test accuracy (paired by seed): +0.0123 ±
      0.0100 (95% CI, n = 4 seeds): the interval excludes 0, distillation helped."``.
    """
    m, h = float(diff[0]), diff[1]
    head = what + f": {m:+.{digits}f}"
    if n < 2 or h is None or not math.isfinite(h):
        return head + f" (n = {n}, no interval): one seed cannot tell; run --seeds {ENOUGH_SEEDS} or more."
    head += f" ± {float(h):.{digits}f} (95% CI, n = {plural(n, 'seed')})"
    excludes = m - h > 0 or m + h < 0
    if n < ENOUGH_SEEDS:
        return head + (f": the interval {'excludes' if excludes else 'includes'} 0, but with n = {n} it is too wide "
                       f"to conclude; run --seeds {ENOUGH_SEEDS} or more.")
    if not excludes:
        return head + ": the interval includes 0, no significant difference."
    return head + f": the interval excludes 0, {better if (m > 0) != lower_is_better else worse}."


def verdict(gain) -> str:
    """What a paired difference (mean, 95% CI half-width) of distilled - standard says."""
    m, h = gain
    if h is None or not math.isfinite(h):
        return "one seed: no verdict"
    return "distillation helped" if m - h > 0 else "distillation hurt" if m + h < 0 else "no significant difference"


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj

