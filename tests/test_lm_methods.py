"""``kdjax lm-methods`` (kdjax/app/lm_methods.py) end to end on tiny sizes: every method runs,
dense KD equals the whole-vocabulary top-k cache (two code paths, one loss), a study killed with
SIGKILL resumes to the same numbers, and wrong options are refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_cli import kdjax_here
from test_cli_trust import refused

TINY = ["--text-bytes", "20000", "--context", "16", "--vocab-size", "300", "--uld-vocab-size", "400",
        "--teacher-layers", "1", "--teacher-dim", "32", "--student-layers", "1", "--student-dim", "16",
        "--teacher-steps", "20", "--budgets", "2", "4", "--seeds", "2", "--batch-size", "8", "--quiet", "--no-plots"]
SUBSET = ["ce", "kd", "gkd0.5", "uld"]


def _cmd(out, *more):
    return [sys.executable, "-m", "kdjax", "lm-methods", *TINY, "--out", str(out), *more]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Every method, uninterrupted."""
    out = tmp_path_factory.mktemp("lm") / "whole"
    p = subprocess.run(_cmd(out), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_every_method_runs_and_is_read_at_every_budget(whole):
    from kdjax.app.lm_methods import METHODS

    assert whole["methods"] == list(METHODS)
    for b in ("2", "4"):
        rows = whole["summary"][b]
        assert list(rows) == list(METHODS)
        assert rows["ce"]["paired_vs_ce"][0] == 0 and rows["ce"]["teacher_tokens"] == 0
        for m, r in rows.items():
            assert np.isfinite(r["mean_ci"][0]) and 3 < r["mean_ci"][0] < 12, (m, r)
            assert np.isfinite(r["second_half_mean_ci"][0]), (m, r)
    # the costs say what each method read: once per window (kd, top-k, seqkd) or per update (on-policy, uld)
    rows4, rows2 = whole["summary"]["4"], whole["summary"]["2"]
    assert rows4["kd"]["teacher_tokens"] == rows2["kd"]["teacher_tokens"] > 0
    assert rows4["gkd0.5"]["teacher_tokens"] == 2 * rows2["gkd0.5"]["teacher_tokens"] == 4 * 8 * 16
    assert rows4["topk8"]["bytes_per_token"] == 64 and rows4["kd"]["bytes_per_token"] == 4 * 300


def test_dense_kd_equals_the_whole_vocabulary_cache(whole):
    """``kd`` (the teacher's dense logits) and ``topk_all`` (FusedLM on a top-300 cache of a
    300-token vocabulary) are one loss by two paths: the same students to float rounding; a
    smaller k is another loss."""
    per = whole["per_method"]
    for b in ("2", "4"):
        np.testing.assert_allclose(per["topk_all"]["bits_per_byte"][b], per["kd"]["bits_per_byte"][b], rtol=2e-5)
        assert per["topk8"]["bits_per_byte"][b] != per["kd"]["bits_per_byte"][b]


def test_killed_with_sigkill_resumes_to_the_same_numbers(whole, tmp_path):
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(cut, "--methods", *SUBSET), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    done = cut / "checkpoints" / "method_kd.json"
    deadline = time.monotonic() + 600
    while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the study ended before it could be killed"
    assert not (cut / "results.json").exists() and not (cut / "checkpoints" / "method_uld.json").exists()
    p = subprocess.run(_cmd(cut, "--methods", *SUBSET, "--resume"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "kd: finished in an earlier run, read back" in p.stderr + p.stdout
    r = json.loads((cut / "results.json").read_text())
    for m in SUBSET:  # the same teachers, students and figures as the uninterrupted study's
        assert r["per_method"][m]["bits_per_byte"] == whole["per_method"][m]["bits_per_byte"], m
    assert r["teachers"]["main"]["bits_per_byte"] == whole["teachers"]["main"]["bits_per_byte"]
    # a resumed study with other settings reads nothing of this one's back
    (cut / "results.json").unlink()
    p = subprocess.run(_cmd(cut, "--methods", *SUBSET, "--resume", "--teacher-steps", "30"), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "belongs to a study with other settings" in p.stderr, p.stderr[-2000:]


def test_lm_methods_refusals(capsys, tmp_path):
    lm = lambda *more: kdjax_here(capsys, "lm-methods", *TINY, *more)
    refused(lm("--methods", "kd", "ce"), "--methods", "ce first")
    refused(lm("--methods", "ce", "kd", "kd"), "--methods", "each method once")
    refused(lm("--budgets", "2", "2"), "--budgets", "distinct")
    refused(lm("--resume"), "--resume", "--out DIR")
    refused(lm("--alpha", "2"), "alpha")
    refused(lm("--temperature", "0"), "--temperature")
    refused(lm("--lr", "-1"), "--lr")
    refused(lm("--context", "3"), "--context", "at least 4")
    refused(lm("--methods", "ce", "bogus"), "--methods")
