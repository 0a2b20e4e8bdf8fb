"""The ``tunix`` row of the ``llama`` preset: the JAX-native peer (google-tunix 0.1.7's
``DistillationTrainer`` with ``LogitStrategy`` on its own NNX ``Qwen2``), run in tunix's own
virtual environment as a subprocess (``benchmarks/tunix_peer.py``). Both sides load the same
weights: the preset's ``transformers`` models, saved once as Hugging Face folders. The row's first
two losses must equal ``kdjax_step``'s (relative 1e-4) or it is reported failed, not timed.

Where the environment is missing (CI; any machine without ``bash benchmarks/tunix_venv.sh`` run
once) the row is reported skipped with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


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


def bench_tunix(s, inp, want_losses, *, temperature: float, alpha: float, repeats: int, lr: float = 1e-3,
                on_progress=lambda msg: None) -> dict:
    """The row's result: ``{"skipped": why}``, ``{"error": why}``, or its timings (``ms_per_step``,
    ``first_losses``, ``compile_s``, ``peak_rss_bytes``, ``versions``)."""
    py, why = tunix_python()
    if py is None:
        return {"skipped": why}
    on_progress("llama: tunix row (its own venv, a subprocess)")
    cfg = inp.t_teacher.config
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 1e4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inp.t_teacher.save_pretrained(tmp / "teacher", safe_serialization=True)
        inp.t_student.save_pretrained(tmp / "student", safe_serialization=True)
        tokens = np.concatenate([inp.x, inp.y[:, -1:]], axis=1).astype(np.int32)  # [windows, length + 1]
        np.save(tmp / "tokens.npy", tokens)
        spec = {"teacher_dir": str(tmp / "teacher"), "student_dir": str(tmp / "student"), "teacher": list(s.teacher),
                "student": list(s.student), "vocab": s.vocab, "rope_theta": float(rope), "norm_eps": cfg.rms_norm_eps,
                "tokens": str(tmp / "tokens.npy"), "schedule": inp.schedule.tolist(), "temperature": temperature,
                "alpha": alpha, "lr": lr, "repeats": repeats}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run([py, str(HERE / "tunix_peer.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"error": "tunix subprocess failed: " + " | ".join(done.stderr.strip().splitlines()[-3:])[:400]}
        got = json.loads((tmp / "out.json").read_text())
    if not np.allclose(got["first_losses"], want_losses, rtol=1e-4, atol=0):
        return {"error": f"tunix's first two losses {got['first_losses']} differ from kdjax_step's {want_losses}"}
    sec = got["seconds_per_step"]
    return {"ms_per_step": {"median": 1e3 * got["median_s"], "min": 1e3 * min(sec), "max": 1e3 * max(sec)},
            "repeats": len(sec), "first_losses": got["first_losses"], "compile_s": got["compile_s"],
            "temp_bytes": _temp_bytes(got["memory"]), "memory": got["memory"], "peak_rss_bytes": got["peak_rss_bytes"],
            "versions": got["versions"]}


def _temp_bytes(memory: dict) -> int | None:
    """The step's compiled temporary memory, comparable to kdjax's one program: the train step's
    temporaries plus the teacher's logits it holds as an input (the teacher's forward runs first,
    its own temporaries freed before the step)."""
    if "step_temp_bytes" not in memory:
        return None
    return memory["step_temp_bytes"] + memory["teacher_logits_bytes"]
