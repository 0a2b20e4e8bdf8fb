"""How the command line shows results: rich tables and progress bars, intervals as text,
results as JSON."""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np

__all__ = ["Reporter", "fmt_ci", "verdict", "jsonable", "version"]


def version() -> str:
    """The installed kdjax's version (``importlib.metadata``), or ``"unknown"`` when kdjax runs
    from a folder it was not installed from."""
    from importlib import metadata

    try:
        return metadata.version("kdjax")
    except metadata.PackageNotFoundError:
        return "unknown"


class Reporter:
    """Rich tables and progress bars; on stderr when ``--json`` owns stdout."""

    def __init__(self, json_mode: bool, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=json_mode, width=None if sys.stdout.isatty() else 110)
        self.quiet = quiet

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
        """Yields ``on_chunk(phase, done, total, states)``: one bar per phase, moved
        between compiled chunks only."""
        if self.quiet or not self.console.is_terminal:
            yield lambda *args: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=self.console,
                      transient=True) as bar:
            tasks = {}

            def update(phase, done, total, states=None):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done)

            yield update


def fmt_ci(mean_half, *, signed: bool = False, digits: int = 4) -> str:
    """``"0.9512 ± 0.0113"``; a single value (``mean_ci`` gives no half-width) says so
    instead of printing a ``± 0`` that looks like certainty."""
    m, h = mean_half
    text = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    if h is None or not math.isfinite(h):
        return f"{text} (n = 1, no interval)"
    return f"{text} ± {h:.{digits}f}"


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

