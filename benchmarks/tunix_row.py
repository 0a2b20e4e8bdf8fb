"""The ``tunix`` row of the ``llama`` preset: the JAX-native peer (google-tunix 0.1.7's
``DistillationTrainer`` with ``LogitStrategy`` on its own NNX ``Qwen2``), run in tunix's own
virtual environment as a worker process (``benchmarks/tunix_peer.py``) that the preset drives
over a pipe, one repetition at a time, so that its repetitions interleave with the other rows'
(``time_checked_rows(..., peers=[TunixRow(...)])``). Both sides load the same weights: the preset's
``transformers`` models, saved once as Hugging Face folders. The row's first two losses must equal
``kdjax_step``'s (relative 1e-4) or it is reported failed, not timed.

Where the environment is missing (CI; any machine without ``bash benchmarks/tunix_venv.sh`` run
once) the row is reported skipped with its reason."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MARK = "KDJAX-TUNIX "


def tunix_python() -> tuple[str | None, str]:
    """``(python of tunix's venv, "")`` or ``(None, why not)``."""
    venv = Path(os.environ.get("KDJAX_TUNIX_VENV", Path.home() / ".cache" / "kdjax-tunix-venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        return None, f"tunix not installed: no {py} (create it once: bash benchmarks/tunix_venv.sh)"
    done = subprocess.run([str(py), "-c", "import tunix.distillation"], capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"tunix does not import in {venv}: {done.stderr.strip().splitlines()[-1:]}"
    return str(py), ""


class TunixRow:
    """A peer row of ``time_checked_rows``: ``setup()`` starts the worker and returns its first
    result (``{"skipped"|"error": why}`` or ``{"first_losses", "compile_s"}``), ``run()`` times one
    repetition in it (seconds, steps), ``finish()`` its memory and versions; ``close()`` stops it."""

    name = "tunix"

    def __init__(self, s, inp, *, temperature: float, alpha: float, lr: float = 1e-3):
        self.s, self.inp, self.temperature, self.alpha, self.lr = s, inp, temperature, alpha, lr
        self.proc = self.tmp = None

    def setup(self) -> dict:
        py, why = tunix_python()
        if py is None:
            return {"skipped": why}
        s, inp = self.s, self.inp
        cfg = inp.t_teacher.config
        rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 1e4)
        self.tmp = tmp = Path(tempfile.mkdtemp(prefix="kdjax-tunix-"))
        inp.t_teacher.save_pretrained(tmp / "teacher", safe_serialization=True)
        inp.t_student.save_pretrained(tmp / "student", safe_serialization=True)
        tokens = np.concatenate([inp.x, inp.y[:, -1:]], axis=1).astype(np.int32)  # [windows, length + 1]
        np.save(tmp / "tokens.npy", tokens)
        spec = {"teacher_dir": str(tmp / "teacher"), "student_dir": str(tmp / "student"), "teacher": list(s.teacher),
                "student": list(s.student), "vocab": s.vocab, "rope_theta": float(rope), "norm_eps": cfg.rms_norm_eps,
                "tokens": str(tmp / "tokens.npy"), "schedule": inp.schedule.tolist(),
                "temperature": self.temperature, "alpha": self.alpha, "lr": self.lr}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.stderr = open(tmp / "stderr.txt", "w+")
        self.proc = subprocess.Popen([py, str(HERE / "tunix_peer.py"), str(tmp / "spec.json")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        got = self._answer()
        if "error" in got:
            self.close()
        return got

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        self.stderr.seek(0)
        tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])[:400]
        return {"error": f"tunix subprocess failed (exit {self.proc.returncode}): {tail}"}

    def _ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        got = self._answer()
        if "error" in got:
            raise RuntimeError(f"tunix row: {got['error']}")
        return got

    def run(self) -> tuple[float, int]:
        got = self._ask("run")
        return got["seconds"], got["steps"]

    def finish(self) -> dict:
        """``memory`` (XLA's sizes of tunix's two programs), ``temp_bytes`` (comparable to kdjax's one
        program: the train step's temporaries plus the teacher logits it holds as an input; the
        teacher's forward runs first, its own temporaries freed before the step), ``peak_bytes``
        (the larger of the two programs' peaks, each with what stays live beside it),
        ``peak_rss_bytes`` and ``versions``."""
        got = self._ask("finish")
        self.close()
        mem = got["memory"]
        got["temp_bytes"] = mem["step_temp_bytes"] + mem["teacher_logits_bytes"] if "step_temp_bytes" in mem else None
        got["peak_bytes"] = mem.get("peak_bytes")
        return got

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.stderr.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def bench_tunix(s, inp, want_losses, *, temperature: float, alpha: float, repeats: int, lr: float = 1e-3,
                on_progress=lambda msg: None) -> dict:
    """The row on its own (not interleaved with other rows): ``{"skipped": why}``, ``{"error": why}``,
    or its timings (``ms_per_step``, ``first_losses``, ``compile_s``, ``temp_bytes``, ``peak_bytes``,
    ``peak_rss_bytes``, ``versions``)."""
    row = TunixRow(s, inp, temperature=temperature, alpha=alpha, lr=lr)
    try:
        on_progress("llama: tunix row (its own venv, a subprocess)")
        got = row.setup()
        if "first_losses" not in got:
            return got
        if not np.allclose(got["first_losses"], want_losses, rtol=1e-4, atol=0):
            return {"error": f"tunix's first two losses {got['first_losses']} differ from kdjax_step's {want_losses}"}
        sec = []
        for _ in range(repeats):
            seconds, steps = row.run()
            sec.append(seconds / steps)
        got.update(row.finish())
        got.update(ms_per_step={"median": 1e3 * statistics.median(sec), "min": 1e3 * min(sec),
                                "max": 1e3 * max(sec)}, repeats=len(sec))
        return got
    finally:
        row.close()
