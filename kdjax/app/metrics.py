"""Per-step training losses and evaluation metrics of a command's run, where users look:
``metrics.jsonl`` in ``--out`` (one JSON object per line) and, with ``--tensorboard DIR``,
TensorBoard scalars through ``tensorboardX``.

Fed by the workflows' ``on_losses`` callback after every compiled chunk: the chunk's losses
come to the host once per chunk (never per step, never inside the scan). Lines::

    {"phase": "students", "step": 20, "loss": {"standard/seed0": 1.52, "distilled/seed0": 2.07, ...}}
    {"phase": "evaluation", "split": "test", "step": 100, "accuracy": {...}, "loss": {...}}

``step`` counts optimizer steps done. A resumed run (``resume=True``) cuts the file back
to what it restores before it writes: a step logged after the last checkpoint and before a
kill is replayed and appears once, and a line a kill cut short is dropped. TensorBoard
scalars go to one event folder per phase (``DIR/<phase>``); a resumed phase's writer purges
the steps it replays (``purge_step``), which TensorBoard then hides.
"""

from __future__ import annotations

import json
import os

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
    a phase not listed names its members ``member0``, ``member1``, ...; ``resume`` keeps the
    lines of the run being resumed (else the file starts empty)."""

    def __init__(self, path: str | None, tensorboard: str | None, members: dict[str, list[str]], *,
                 resume: bool = False):
        self.members = members
        self._file, self._at = None, {}  # the byte offset of each record's key in the file
        if path is not None:
            self._file = open(path, "r+b" if resume and os.path.exists(path) else "w+b")
            self._index()
        self._tensorboard, self._resume, self._tb = tensorboard, resume, {}

    def _index(self) -> None:
        """Offsets of the lines already there; a line a kill cut short is dropped."""
        offset = 0
        for line in self._file.read().splitlines(keepends=True):
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
                if not isinstance(record, dict):
                    raise ValueError
                self._at.setdefault(_key(record), offset)
            except ValueError:
                break
            offset += len(line)
        self._file.truncate(offset)
        self._file.seek(offset)

    def _names(self, phase: str, count: int) -> list[str]:
        names = self.members.get(phase)
        return names if names is not None and len(names) == count else [f"member{i}" for i in range(count)]

    def _write(self, record: dict) -> None:
        if self._file is None:
            return
        at = self._at.get(_key(record))
        if at is not None:  # replayed after a resume: this line and every later one are written again
            self._file.truncate(at)
            self._file.seek(at)
            self._at = {k: v for k, v in self._at.items() if v < at}
        self._at[_key(record)] = self._file.tell()
        self._file.write((json.dumps(record) + "\n").encode())

    def _writer(self, folder: str, first_step: int):
        """The phase's TensorBoard writer; on a resume it purges the steps from ``first_step`` on."""
        if self._tensorboard is None:
            return None
        if folder not in self._tb:
            from tensorboardX import SummaryWriter

            self._tb[folder] = SummaryWriter(os.path.join(self._tensorboard, folder),
                                             purge_step=first_step if self._resume else None)
        return self._tb[folder]

    def losses(self, phase: str, first: int, losses) -> None:
        """The ``on_losses`` callback: one line per step of the chunk."""
        values = np.asarray(parallel.to_host(losses), np.float64)
        values = values.reshape(-1, values.shape[-1])  # [members, steps]
        names = self._names(phase, len(values))
        tb = self._writer(phase.replace(" ", "_"), first + 1)
        for j in range(values.shape[1]):
            step = first + j + 1
            row = {name: float(v) for name, v in zip(names, values[:, j])}
            self._write({"phase": phase, "step": step, "loss": row})
            if tb is not None:
                for name, v in row.items():
                    tb.add_scalar(f"{phase}/loss/{name}", v, step)
        if self._file is not None:
            self._file.flush()

    def evaluation(self, split: str, step: int, metrics: dict[str, dict[str, list[float]]],
                   names: dict[str, list[str]]) -> None:
        """``metrics[metric][model]`` values over members, named by ``names[model]``."""
        record = {"phase": "evaluation", "split": split, "step": int(step)}
        tb = self._writer(f"evaluation_{split}", int(step))
        for metric, by_model in metrics.items():
            record[metric] = {name: float(v) for model, values in by_model.items()
                              for name, v in zip(names[model], np.ravel(values))}
            if tb is not None:
                for name, v in record[metric].items():
                    tb.add_scalar(f"evaluation/{split}/{metric}/{name}", v, int(step))
        self._write(record)
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for tb in self._tb.values():
            tb.close()


def _key(record: dict) -> tuple:
    """What a line is about: a phase's step, or an evaluation's split and step."""
    return record.get("phase"), record.get("split"), record.get("step")
