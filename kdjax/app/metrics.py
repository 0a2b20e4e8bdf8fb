"""Per-step training losses and evaluation metrics of a command's run, where users look:
``metrics.jsonl`` in ``--out`` (one JSON object per line) and, with ``--tensorboard DIR``,
TensorBoard scalars through ``tensorboardX``.

Fed by the workflows' ``on_losses`` callback after every compiled chunk: the chunk's losses
come to the host once per chunk (never per step, never inside the scan). Lines::

    {"phase": "students", "step": 20, "loss": {"standard/seed0": 1.52, "distilled/seed0": 2.07, ...}}
    {"phase": "evaluation", "split": "test", "step": 100, "accuracy": {...}, "loss": {...}}

``step`` counts optimizer steps done. A resumed run appends; a step written just before a
kill is written again after it, with the same value (resumes are bit for bit).
"""

from __future__ import annotations

import json

import numpy as np

from kdjax import parallel
from kdjax.app import UsageError

__all__ = ["MetricsLog", "check_tensorboard"]


def check_tensorboard(directory: str | None) -> None:
    """Refuse ``--tensorboard`` before anything runs when its writer is not installed."""
    if directory is None:
        return
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard: needs tensorboardX; pip install 'kdjax[tensorboard]'") from None


class MetricsLog:
    """``members`` maps a phase to its members' names (``{"students": ["standard/seed0", ...]}``);
    a phase not listed names its members ``member0``, ``member1``, ..."""

    def __init__(self, path: str | None, tensorboard: str | None, members: dict[str, list[str]]):
        self.members = members
        self._file = None if path is None else open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(tensorboard)

    def _names(self, phase: str, count: int) -> list[str]:
        names = self.members.get(phase)
        return names if names is not None and len(names) == count else [f"member{i}" for i in range(count)]

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def losses(self, phase: str, first: int, losses) -> None:
        """The ``on_losses`` callback: one line per step of the chunk."""
        values = np.asarray(parallel.to_host(losses), np.float64)
        values = values.reshape(-1, values.shape[-1])  # [members, steps]
        names = self._names(phase, len(values))
        for j in range(values.shape[1]):
            step = first + j + 1
            row = {name: float(v) for name, v in zip(names, values[:, j])}
            self._write({"phase": phase, "step": step, "loss": row})
            if self._tb is not None:
                for name, v in row.items():
                    self._tb.add_scalar(f"{phase}/loss/{name}", v, step)
        if self._file is not None:
            self._file.flush()

    def evaluation(self, split: str, step: int, metrics: dict[str, dict[str, list[float]]],
                   names: dict[str, list[str]]) -> None:
        """``metrics[metric][model]`` values over members, named by ``names[model]``."""
        record = {"phase": "evaluation", "split": split, "step": int(step)}
        for metric, by_model in metrics.items():
            record[metric] = {name: float(v) for model, values in by_model.items()
                              for name, v in zip(names[model], np.ravel(values))}
            if self._tb is not None:
                for name, v in record[metric].items():
                    self._tb.add_scalar(f"evaluation/{split}/{metric}/{name}", v, int(step))
        self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
