"""The kdjax command end to end (subprocesses, tiny configs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, KDJAX_CACHE_DIR=str(tmp_path_factory.mktemp("xla-cache")))
    return e


def kdjax(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kdjax", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def kdjax_here(capsys, *args):
    """``cli.main`` in this process, for error paths: the same parsing, checks and one-line
    messages as the executable without an interpreter start-up per case (a few of the cases
    below still go through ``python -m kdjax`` to cover that path end to end)."""
    from kdjax.app import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_png(path):
    assert path.exists(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000  # a real figure, not an empty canvas


def test_demo_all_sections(env, tmp_path):
    out = tmp_path / "demo"
    p = kdjax(env, "demo", "--out", out, "--seeds", 2, "--quick", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    for title in ("DEMO 1", "DEMO 2", "DEMO 3", "DEMO 4", "DEMO 5", "HELD-OUT", "OMITTED CLASS", "TUNED", "CONCLUSION"):
        assert title in p.stdout
    assert "TRAINING accuracy on random labels" in p.stdout  # section 5 says what it ranks
    assert "112,389" in p.stdout and "3,589" in p.stdout and "31.31x" in p.stdout
    r = json.loads((out / "results.json").read_text())
    assert [line[:2] for line in r["conclusion"]] == ["1-", "3-", "5.", "6.", "7.", "8."]
    assert r["conclusion"][3].endswith(r["digits"]["verdict"] + ".")
    for png in r["plots"].values():
        assert_png(out / png)
    assert set(r["plots"]) == {"softmax_temperature", "learning_curves", "hyperparameters", "digits_comparison",
                               "omitted_class", "tuned_comparison"}
    # demo 1 equals the seed's formula
    z = np.array([2.0, 1.0, 0.5, 0.2])
    for T, probs, h in zip(r["temperature_effect"]["temperatures"], r["temperature_effect"]["probs"],
                           r["temperature_effect"]["entropy"]):
        p_ref = np.exp(z / T) / np.exp(z / T).sum()
        np.testing.assert_allclose(probs, p_ref, atol=1e-6)
        np.testing.assert_allclose(h, -(p_ref * np.log(p_ref + 1e-10)).sum(), atol=1e-6)
    assert r["seed_comparison"]["param_counts"]["teacher"] == 112389
    assert len(r["seed_comparison"]["accuracy"]["distilled"]["train"]) == 2
    assert 0.5 < r["digits"]["mean_ci"]["teacher"][0] <= 1.0  # real held-out learning
    omit = r["omitted_class"]
    assert omit["accuracy"]["before"]["standard"]["omitted"] == [0.0, 0.0]  # never saw a 3
    assert omit["paper"]["before"]["errors"] == 206 and omit["counts"]["omitted"] == 46
    tuned = r["tuned"]
    assert tuned["best"]["temperature"] in tuned["config"]["temperatures"]
    assert np.array(tuned["validation_accuracy"]).shape == (4, 4, 2)
    # the tuned run's standard students are section 6's (same seeds, data and config)
    assert tuned["test_accuracy"]["standard"] == r["digits"]["test_accuracy"]["standard"]


def test_demo_json_stdout(env):
    p = kdjax(env, "demo", "--sections", "1,2", "--json", "--seeds", 2)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)  # stdout holds only the JSON
    # demo 2 equals softmax(row / 3) in float64, for both of the seed's teacher rows
    for row, soft in zip(r["soft_vs_hard"]["teacher_logits"], r["soft_vs_hard"]["soft_T3"]):
        e = np.exp(np.asarray(row, np.float64) / 3.0)
        np.testing.assert_allclose(soft, e / e.sum(), atol=1e-6)
    assert r["soft_vs_hard"]["teacher_logits"] == [[3.0, 1.5, 0.8, 0.5], [2.0, 1.8, 1.5, 1.0]]


def test_distill_writes_results_plots_and_checkpoints(env, tmp_path):
    out = tmp_path / "d"
    p = kdjax(env, "distill", "--dataset", "digits", "--epochs", 6, "--lr", 0.003, "--seeds", 2,
              "--teacher-hidden", 64, "--student-hidden", 16, "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert len(r["test_accuracy"]["distilled"]) == 2 and r["teacher_test_accuracy"] > 0.5
    assert_png(out / "learning_curves.png")
    assert_png(out / "comparison.png")
    for ck in ("teacher.ckpt", "student_distilled.ckpt", "student_standard.ckpt"):
        assert (out / ck).exists()
    # the saved teacher can be loaded back
    out2 = tmp_path / "d2"
    p = kdjax(env, "distill", "--dataset", "digits", "--epochs", 1, "--seeds", 2, "--teacher-hidden", 64,
              "--student-hidden", 16, "--teacher", out / "teacher.ckpt", "--out", out2, "--no-plots")
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["teacher_test_accuracy"] == pytest.approx(r["teacher_test_accuracy"])
    assert not (out2 / "comparison.png").exists()


def test_distill_npz_and_torch_teacher(env, tmp_path):
    torch = pytest.importorskip("torch")
    from parity.reference import TeacherMLP

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    torch.manual_seed(0)
    torch.save(TeacherMLP(6, 32, 2).state_dict(), tmp_path / "t.pt")
    p = kdjax(env, "distill", "--dataset", tmp_path / "d.npz", "--teacher", tmp_path / "t.pt",
              "--teacher-hidden", 32, "--student-hidden", 8, "--steps", 10, "--batch-size", 16,
              "--seeds", 2, "--json", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["dataset"] == "d.npz"
    # wrong architecture for that state_dict: one clear line
    p = kdjax(env, "distill", "--dataset", tmp_path / "d.npz", "--teacher", tmp_path / "t.pt",
              "--teacher-hidden", 16, "--steps", 5, "--batch-size", 16)
    assert p.returncode == 2 and "expected shape" in p.stderr


def test_omit_class_and_tuned_distill_commands(env, tmp_path):
    out = tmp_path / "o"
    p = kdjax(env, "omit-class", "--omit", 7, "--epochs", 2, "--seeds", 2, "--teacher-hidden", 32,
              "--student-hidden", 16, "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "never sees a 7" in p.stdout and "paper, distilled raw" in p.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["omit"] == 7 and r["accuracy"]["before"]["standard"]["omitted"] == [0.0, 0.0]
    assert_png(out / "omitted_class.png")
    p = kdjax(env, "distill", "--dataset", "digits", "--tune", "--temperatures", 1, 4, "--alphas", 0.5,
              "--epochs", 1, "--seeds", 2, "--teacher-hidden", 32, "--student-hidden", 8, "--json", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert np.array(r["tuning"]["validation_accuracy"]).shape == (2, 1, 2)
    assert r["tuning"]["best"]["alpha"] == 0.5 and r["tuning"]["best"]["temperature"] in (1, 4)


def test_distill_language_models_on_text(env, tmp_path, capsys):
    p = kdjax(env, "distill", "--dataset", "text", "--arch", "transformer", "--steps", 4, "--seeds", 2,
              "--batch-size", 8, "--text-bytes", 4000, "--context", 16, "--teacher-dim", 16, "--student-dim", 8,
              "--heads", 2, "--teacher-steps", 6, "--json", "--quiet", "--out", tmp_path / "lm")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "teachers: 6 steps" in p.stderr  # --json sends the human report to stderr
    r = json.loads(p.stdout)
    assert r["dataset"].startswith("text (Python") and len(r["bits_per_byte"]["distilled"]) == 2
    for k in ("teacher", "standard", "distilled"):  # bits per byte = cross-entropy / ln 2, near 8 untrained
        np.testing.assert_allclose(r["bits_per_byte"][k], np.asarray(r["test_loss"][k]) / np.log(2), rtol=1e-6)
        assert 4 < r["bits_per_byte_mean_ci"][k][0] < 9
    assert (tmp_path / "lm" / "student_distilled.ckpt").exists()
    p = kdjax_here(capsys, "distill", "--arch", "transformer", "--dataset", "digits", "--steps", 2)
    assert p.returncode == 2 and "--dataset text" in p.stderr
    p = kdjax_here(capsys, "distill", "--steps", 2, "--teacher-steps", 4, "--tune")
    assert p.returncode == 2 and "--teacher-steps" in p.stderr


def test_sweep_heatmap(env, tmp_path, capsys):
    out = tmp_path / "s"
    p = kdjax(env, "sweep", "--dataset", "synthetic", "--temperatures", 1, 4, "--alphas", 0.3, 0.9,
              "--seeds", 2, "--steps", 20, "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert np.array(r["test_accuracy"]).shape == (2, 2, 2)
    assert_png(out / "sweep_heatmap.png")
    # an existing results.json is not overwritten without --overwrite
    p = kdjax_here(capsys, "sweep", "--steps", 5, "--seeds", 1, "--out", out)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    p = kdjax(env, "sweep", "--steps", 5, "--seeds", 1, "--temperatures", 2, "--alphas", 0.5,
              "--out", out, "--overwrite", "--no-plots", "--members-per-group", "auto")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "results.json").read_text())  # one student: the only candidate is one vmap
    assert r["members_per_group"] is None and list(r["members_per_group_seconds"]) == ["None"]
    assert "members run as one vmap (timed on the first chunk" in p.stdout
    p = kdjax_here(capsys, "sweep", "--members-per-group", "0", "--out", out)
    assert p.returncode == 2 and "expected 'all', 'auto' or a positive integer" in p.stderr


def _npz(tmp_path, **over):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.standard_normal((20, 3)), "y_train": rng.integers(0, 2, 20),
              "x_test": rng.standard_normal((5, 3)), "y_test": rng.integers(0, 2, 5)}
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def _empty_txt(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    return path


def _not_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    return path


@pytest.mark.parametrize("case,words", [
    ("unknown dataset", ["--dataset", "mnist"]),
    ("missing key", ["missing", "y_test"]),
    ("mismatched lengths", ["as many labels as examples", "20"]),
    ("nan features", ["finite", "NaN"]),
    ("negative labels", ["labels >= 0", "-1"]),
    ("temperature <= 0", ["temperature", "> 0", "0.0"]),
    ("alpha > 1", ["alpha", "[0, 1]", "1.5"]),
    ("not an npz", ["readable .npz"]),
    ("bad steps", ["--steps", "positive integer"]),
    ("omitted class out of range", ["omitted class", "0..9", "got 10"]),
    ("validation fraction", ["validation fraction", "(0, 1)", "1.5"]),
    ("text without transformer", ["--dataset text", "--arch transformer"]),
    ("empty corpus", ["non-empty text corpus"]),
])
def test_bad_input_one_line_exit_2(env, tmp_path, capsys, case, words):
    base = ["distill", "--steps", 5, "--batch-size", 4, "--seeds", 1]
    args = {
        "unknown dataset": lambda: base + ["--dataset", "mnist"],
        "missing key": lambda: base + ["--dataset", _npz(tmp_path, y_test=None)],
        "mismatched lengths": lambda: base + ["--dataset", _npz(tmp_path, y_train=np.zeros(19, int))],
        "nan features": lambda: base + ["--dataset", _npz(tmp_path, x_train=np.full((20, 3), np.nan))],
        "negative labels": lambda: base + ["--dataset", _npz(tmp_path, y_train=-np.ones(20, int))],
        "temperature <= 0": lambda: base + ["--temperature", 0],
        "alpha > 1": lambda: base + ["--alpha", 1.5],
        "not an npz": lambda: base + ["--dataset", _not_npz(tmp_path)],
        "bad steps": lambda: ["distill", "--steps", 0],
        "omitted class out of range": lambda: ["omit-class", "--omit", 10, "--epochs", 1, "--seeds", 2],
        "validation fraction": lambda: base + ["--tune", "--validation-fraction", 1.5],
        "text without transformer": lambda: base + ["--dataset", "text", "--arch", "mlp"],
        "empty corpus": lambda: base + ["--arch", "transformer", "--dataset", _empty_txt(tmp_path)],
    }[case]()
    p = kdjax(env, *args, timeout=120) if case in ("bad steps", "nan features") else kdjax_here(capsys, *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdjax: error:"), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_internal_errors_keep_their_traceback(monkeypatch):
    """Only user mistakes become one-line exit-2 errors; a plain ValueError from inside
    kdjax or a dependency is a bug and must not be disguised as bad input."""
    from kdjax.app import cli, commands

    def bug(args, rep):
        raise ValueError("an internal failure")

    monkeypatch.setenv("KDJAX_CACHE_DIR", "off")
    monkeypatch.setattr(commands, "cmd_demo", bug)  # build_parser binds commands.cmd_demo when main runs
    with pytest.raises(ValueError, match="internal failure"):
        cli.main(["demo", "--quiet"])


def test_unwritable_out_one_line_exit_1(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = kdjax(env, "demo", "--sections", 1, "--out", blocker / "sub", timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdjax: error:") and "Traceback" not in p.stderr
    assert "sub" in lines[0]


RESNET = ["--arch", "resnet", "--teacher-blocks", "1", "1", "--teacher-widths", "8", "16", "--student-blocks", "1",
          "--student-widths", "4"]


def test_distill_resnet_on_digit_images_and_torchvision_teacher(env, tmp_path):
    """--arch resnet trains on digits images; a torchvision-layout state_dict loads as the
    teacher and gives the same teacher accuracy as kdjax computes from the converted weights."""
    torch = pytest.importorskip("torch")
    from parity.reference import ResNet

    out = tmp_path / "r"
    p = kdjax(env, "distill", "--dataset", "digits", *RESNET, "--epochs", 2, "--seeds", 2, "--optimizer", "sgd",
              "--lr", 0.05, "--lr-schedule", "cosine", "--out", out, "--quiet", "--no-plots")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ResNet(blocks (1, 1), widths (8, 16), cifar stem)" in p.stdout and "SGD lr 0.05" in p.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["dataset"] == "digits images" and len(r["test_accuracy"]["teacher"]) == 2
    assert r["mean_ci"]["teacher"][0] > 0.3  # learned something in 2 epochs
    ckpt = __import__("kdjax").checkpoint.load(out / "teacher.ckpt")[0]
    assert "batch_stats" in ckpt["model_state"]

    torch.manual_seed(0)
    sd = ResNet((1, 1), (8, 16), 10, "cifar", in_channels=1).state_dict()
    torch.save(sd, tmp_path / "t.pt")
    p = kdjax(env, "distill", "--dataset", "digits", *RESNET, "--teacher", tmp_path / "t.pt", "--epochs", 1,
              "--seeds", 2, "--json", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["test_accuracy"]["teacher"] == [pytest.approx(0.1, abs=0.1)]  # untrained
    # (a state_dict of another architecture: tests/test_convert.py and the MLP case above)


@pytest.mark.parametrize("case,words", [
    ("unknown arch", ["--arch", "invalid choice", "vit"]),
    ("nchw images", ["NHWC", "NCHW", "transpose(0, 2, 3, 1)"]),
    ("flat data for resnet", ["--arch resnet", "images", "(20, 3)"]),
    ("blocks vs widths", ["--teacher-blocks", "one width per stage"]),
])
def test_resnet_cli_errors(env, tmp_path, capsys, case, words):
    args = {
        "unknown arch": lambda: ["distill", "--arch", "vit"],
        "nchw images": lambda: ["distill", "--arch", "resnet", "--steps", 2, "--batch-size", 4, "--dataset",
                                _npz(tmp_path, x_train=np.zeros((20, 1, 8, 8)), x_test=np.zeros((5, 1, 8, 8)))],
        "flat data for resnet": lambda: ["distill", "--arch", "resnet", "--dataset", _npz(tmp_path)],
        "blocks vs widths": lambda: ["distill", "--arch", "resnet", "--teacher-blocks", 1, 1],
    }[case]()
    p = kdjax_here(capsys, *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdjax: error:") and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
