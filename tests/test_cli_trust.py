"""The command line never gives a plausible wrong answer or loses files: resume identity,
options a mode ignores, unfinished runs, --overwrite, checkpoints of another phase, model
configurations checked first, class counts, unreadable files, nothing left by a refusal.
In-process (``cli.main``) so that compiled programs are shared between cases."""

import os
import shutil

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_cli import kdjax_here

pytest.importorskip("matplotlib")

TINY = ["--steps", "3", "--seeds", "1", "--teacher-hidden", "16", "--student-hidden", "8", "--batch-size", "16",
        "--quiet"]


def refused(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdjax: error:") and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, capsys):
    """A finished tiny distill run in tmp_path / 'run'."""
    out = tmp_path / "run"
    p = kdjax_here(capsys, "distill", *TINY, "--out", out, "--no-plots")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.parametrize("args,words", [
    (["--temperatures", "1", "2"], ["--temperatures: only used with --tune"]),
    (["--alphas", "0.5"], ["--alphas: only used with --tune"]),
    (["--validation-fraction", "0.3"], ["--validation-fraction: only used with --tune"]),
    (["--tune", "--alpha", "0.5"], ["--alpha: only used with --method kd or uld (without --tune)"]),
    (["--method", "at", "--alpha", "0.5"], ["--alpha: only used with --method kd"]),
    (["--method", "fitnet", "--temperature", "2"], ["--temperature: only used with --method kd, dkd, gkd, reverse_kl or uld"]),
    (["--feature-layers", "fc1:fc1"], ["--feature-layers: only used with a feature --method"]),
    (["--method", "dkd", "--feature-weight", "2"], ["--feature-weight: only used with a feature --method"]),
    (["--kd-weight", "1"], ["--kd-weight: only used with a feature --method"]),
    (["--method", "at", "--crd-negatives", "8"], ["--crd-negatives: only used with --method crd"]),
    (["--method", "at", "--tune"], ["--tune: only used with --method kd"]),
    (["--method", "at"], ["--method at: expected ResNets", "--feature-layers"]),
    (["--method", "sp", "--arch", "transformer"], ["--method sp: expected --arch mlp or resnet"]),
    (["--method", "sp", "--feature-layers", "fc9:fc1"], ["expected taps of the model, got ['fc9']", "fc2, fc3"]),
    (["--method", "fitnet", "--feature-layers", "fc2"], ["--feature-layers: expected TEACHER:STUDENT"]),
    (["--momentum", "0.5"], ["--momentum: only used with --optimizer sgd"]),
    (["--nesterov"], ["--nesterov: only used with --optimizer sgd"]),
    (["--teacher-blocks", "2"], ["--teacher-blocks: only used with --arch resnet"]),
    (["--context", "32"], ["--context: only used with --arch transformer"]),
    (["--arch", "resnet", "--student-hidden", "8"], ["--student-hidden: only used with --arch mlp"]),
    (["--text-bytes", "1000"], ["--text-bytes: only used with --dataset text"]),
    (["--num-classes", "7"], ["--num-classes: only used with a --dataset PATH.npz"]),
    (["--checkpoint-every", "5"], ["--checkpoint-every: only used with --out DIR"]),
    (["--overwrite"], ["--overwrite: only used with --out DIR"]),
])
def test_options_the_mode_ignores_are_refused(capsys, tmp_path, args, words):
    out = tmp_path / "never"
    refused(kdjax_here(capsys, "distill", *args, *(["--out", out] if "--out" not in " ".join(words) else [])),
            *words)
    assert not out.exists()  # a refusal leaves nothing behind


def test_sweep_uses_its_grids_without_tune(capsys, tmp_path):
    refused(kdjax_here(capsys, "sweep", "--momentum", "0.5"), "--momentum: only used with --optimizer sgd")


def test_resume_identity_covers_tuning(finished, capsys):
    """An untuned run's checkpoints never serve a --tune resume (it reported the tuned T and
    alpha beside the untuned run's numbers)."""
    os.remove(finished / "results.json")
    line = refused(kdjax_here(capsys, "distill", *TINY, "--out", finished, "--resume", "--tune"), "--tune: False in "
                   "the checkpoint, True now")
    assert "--temperatures" not in line or "[1.0, 2.0, 4.0, 8.0] now" in line


def test_unfinished_out_is_refused_and_overwrite_clears_the_old_run(finished, capsys):
    os.remove(finished / "results.json")  # an interrupted run: checkpoints, no results
    (finished / "checkpoints" / "stale").write_bytes(b"left by the old run")
    (finished / "notes.txt").write_text("the user's own file")
    before = snapshot(finished)
    refused(kdjax_here(capsys, "distill", *TINY, "--out", finished), "unfinished run", "--resume", "--overwrite")
    assert snapshot(finished) == before  # nothing lost
    p = kdjax_here(capsys, "distill", *TINY, "--out", finished, "--overwrite", "--no-plots")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (finished / "checkpoints" / "stale").exists()  # kdjax's old outputs went first
    assert (finished / "notes.txt").read_text() == "the user's own file"  # nothing else of the user's
    assert (finished / "results.json").exists()


def test_a_checkpoint_of_another_phase_is_one_line(finished, capsys):
    ckpts = finished / "checkpoints"
    os.remove(finished / "results.json")
    shutil.rmtree(ckpts / "students.ckpt")
    shutil.copytree(ckpts / "teachers.ckpt", ckpts / "students.ckpt")
    shutil.rmtree(ckpts / "students.ckpt.prev", ignore_errors=True)
    refused(kdjax_here(capsys, "distill", *TINY, "--out", finished, "--resume"),
            "holds the 'teachers' phase of TeacherMLP(hidden_dim=16", "expected the 'students' phase of StudentMLP")


def test_a_model_that_cannot_work_is_refused_before_anything_trains(finished, capsys):
    """A student whose d_model the heads do not divide: refused before the teacher trains,
    and --overwrite has not cleared the old run yet."""
    before = snapshot(finished)
    refused(kdjax_here(capsys, "distill", "--dataset", "text", "--arch", "transformer", "--student-dim", "30",
                       "--heads", "4", "--steps", "2", "--out", finished, "--overwrite", "--quiet"),
            "d_model divisible by num_heads", "30")
    assert snapshot(finished) == before


def test_class_count_from_training_labels(capsys, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.normal(size=(60, 4)), y_train=np.arange(60) % 10, x_test=rng.normal(size=(10, 4)),
             y_test=np.r_[np.arange(9), 12])
    refused(kdjax_here(capsys, "distill", "--dataset", path, "--out", tmp_path / "o"),
            "test (10 classes): expected labels < 10, got maximum label 12")
    assert not (tmp_path / "o").exists()
    p = kdjax_here(capsys, "distill", "--dataset", path, "--num-classes", "13", *TINY)
    assert p.returncode == 0 and "13 classes" in p.stdout, p.stderr[-2000:]


def test_unreadable_teacher_files_are_one_line(capsys, tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "bad.pt").write_bytes(b"not a pickle at all")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    refused(kdjax_here(capsys, "distill", "--teacher", tmp_path / "bad.pt"), "--teacher", "bad.pt",
            "could not read it")
    refused(kdjax_here(capsys, "distill", "--teacher", tmp_path / "bad.ckpt"), "bad.ckpt", "kdjax checkpoint")


def test_a_refusal_after_the_out_is_made_removes_it(capsys, tmp_path):
    """A batch size larger than the data set is found while building the run, after --out
    was created: the refused run leaves nothing behind."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=rng.normal(size=(10, 4)), y_train=np.arange(10) % 3, x_test=rng.normal(size=(4, 4)),
             y_test=np.arange(4) % 3)
    refused(kdjax_here(capsys, "distill", "--dataset", path, "--out", tmp_path / "o", "--quiet"), "batch_size")
    assert not (tmp_path / "o").exists()


def test_one_seed_prints_no_interval(capsys):
    p = kdjax_here(capsys, "distill", *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "n = 1, no interval" in p.stdout and "± 0.0000" not in p.stdout and "n = 1 seed" in p.stdout


# ----------------------------------------------------------------------------- property

FLAGS = {  # a pool of options, each with a valid and an invalid value for some mode
    "--tune": [[]], "--optimizer": [["sgd"], ["adam"], ["rmsprop"]], "--momentum": [["0.5"], ["1.5"]],
    "--temperature": [["2"], ["0"], ["-1"]], "--alpha": [["0.5"], ["2"]], "--temperatures": [["1", "2"], ["0"]],
    "--alphas": [["0.5"], ["1.5"]], "--lr-schedule": [["cosine"]], "--checkpoint-every": [["1"], ["0"]],
    "--resume": [[]], "--overwrite": [[]], "--epochs": [["1"]], "--batch-size": [["0"], ["8"], ["5000"]],
    "--seeds": [["2"], ["0"]], "--student-widths": [["2"]], "--context": [["8"]], "--mesh": [["data=1"], ["x=2"]],
    "--teacher": [["missing.pt"]], "--dataset": [["digits"], ["nope.npz"]],
    "--method": [["fitnet"], ["crd"], ["at"]], "--feature-layers": [["fc2:fc1"], ["layer1:layer1"]],
}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(command=st.sampled_from(["distill", "sweep"]), arch=st.sampled_from(["mlp", "resnet"]),
       extra=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.integers(0, 2), max_size=3),
       with_out=st.booleans(), pre_existing=st.sampled_from(["none", "finished", "unfinished"]))
def test_any_flag_combination_exits_0_or_2_and_never_half_writes(tmp_path_factory, command, arch, extra, with_out,
                                                                  pre_existing):
    """Drawn combinations of options, valid and not: exit 0 or 2, never a traceback, never a
    half-written --out (a refusal leaves it as it was; a success leaves results.json)."""
    from kdjax.app import cli

    base = tmp_path_factory.mktemp("prop")
    out = base / "out"
    if pre_existing != "none":
        out.mkdir()
        (out / "checkpoints").mkdir()
        if pre_existing == "finished":
            (out / "results.json").write_text("{}")
    before = snapshot(out) if out.exists() else None
    sizes = (["--teacher-hidden", "8", "--student-hidden", "4"] if arch == "mlp" else
             ["--teacher-blocks", "1", "--teacher-widths", "4", "--student-blocks", "1", "--student-widths", "2"])
    args = [command, "--arch", arch, "--steps", "2", *sizes, "--quiet", "--no-plots" if with_out else "--quiet"]
    args += ["--seeds", "1"] if command == "distill" else ["--seeds", "1", "--temperatures", "2", "--alphas", "0.5"]
    for flag, choice in extra.items():
        values = FLAGS[flag]
        args += [flag, *values[choice % len(values)]]
    if with_out:
        args += ["--out", str(out)]
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse: usage errors exit 2
        code = e.code
    assert code in (0, 2), (code, args)
    event(f"exit {code}")
    if code == 2 or not with_out:
        assert (snapshot(out) if out.exists() else None) == before, args  # untouched (or never made)
    else:
        assert (out / "results.json").exists(), args
        assert not [p for p in out.rglob(".tmp-*")], args


def test_help_lists_datasets_defaults_and_teacher_files(capsys):
    from kdjax.app.parser import build_parser

    text = " ".join(build_parser()._subparsers._group_actions[0].choices["distill"].format_help().split())
    for words in ("synthetic", "digits", "text (byte-level", "PATH.npz", "PATH.txt", "softening temperature T > 0 "
                  "(default: 3, 08_distillation.py's; 4 with --method dkd", "(default: 0.7)", "learning rate (default: 0.001)", "examples per step (default: "
                  "64)", "teacher.ckpt", ".pt/.pth", "torchvision-layout ResNet"):
        assert words in text, words


@pytest.mark.parametrize("args,words", [
    (["on-policy", "--length", "5000"], "the teacher's training step (batch 64 x 10002 tokens) would need"),
    (["distill", "--dataset", "text", "--context", "5000", "--vocab-size", "300"],
     "the teacher's training step (batch 64 x 5000 tokens) would need"),
])
def test_sizes_beyond_memory_are_refused_before_anything_runs(capsys, tmp_path, args, words):
    refused(kdjax_here(capsys, *args, "--out", tmp_path / "o"), words, "lower --")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,words", [
    (["distill", "--steps", "99999999999999999999"], "the index schedules alone would take"),
    (["distill", "--seeds", "100000000000"], "the index schedules alone would take"),
    (["sweep", "--steps", "9999999999999"], "the index schedules alone would take"),
    (["distill", "--dataset", "text", "--student-dim", "1000000000", "--vocab-size", "300", "--text-bytes", "20000",
      "--context", "16"], "the student's parameters, gradients and optimizer state would need"),
])
def test_sizes_that_would_hang_or_abort_are_refused_first(capsys, tmp_path, args, words):
    refused(kdjax_here(capsys, *args, "--quiet", "--out", tmp_path / "o"), words)
    assert not (tmp_path / "o").exists()
