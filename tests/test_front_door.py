"""The front door (issue 39): the README's install runs the language-model path, --help in
groups with every default, `kdjax --version`, progress a log can read, wall times in
results.json, a conclusion sentence built from the run's own numbers, and the teacher trained
here written as a Hugging Face folder for `kdjax teacher-logits`."""

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from test_cli import kdjax_here
from test_cli_trust import refused

ROOT = pathlib.Path(__file__).resolve().parents[1]
LM = ["--dataset", "text", "--arch", "llama", "--text-bytes", "20000", "--context", "16", "--teacher-layers", "1",
      "--teacher-dim", "16", "--student-dim", "16", "--vocab-size", "300", "--steps", "2", "--seeds", "1", "--quiet",
      "--no-plots"]


def _help(command: str) -> str:
    from kdjax.app.parser import build_parser

    return build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_cli_extra_installs_the_language_model_path():
    """`pip install '.[cli]'` (the README's main command) brings tokenizers and safetensors."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {d.split(">")[0].split("=")[0].strip() for d in extras["cli"]}
    assert {"tokenizers", "safetensors", "rich", "matplotlib", "scikit-learn"} <= names
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Command line")]
    for extra in extras:  # the README's Install section names every extra
        assert f"`{extra}`" in install, extra


def test_version_prints_the_installed_version(capsys):
    from importlib import metadata

    p = kdjax_here(capsys, "--version")
    assert p.returncode == 0 and p.stdout.strip() == f"kdjax {metadata.version('kdjax')}"


def test_distill_help_is_in_groups_with_every_default():
    text = _help("distill")
    for group in ("data:", "models:", "language models (--arch transformer or llama):", "training:",
                  "distillation method:", "output and resume:", "performance:"):
        assert f"\n{group}\n" in text, group
    options = text[text.index("\noptions:\n"):text.index("\ndata:\n")]
    assert "--dataset" not in options and "--out" not in options  # only -h stays ungrouped
    flat = " ".join(text.split())
    assert "first seed (the seeds are --seed, --seed + 1, ...) (default: 0)" in flat  # a default of 0 is shown
    assert "without it nothing is saved" in flat
    assert "transformer, llama: tokens per window" in flat and "transformer: teacher" not in flat
    for command in ("demo", "distill", "sweep", "omit-class", "teacher-logits", "on-policy"):
        assert "the seed's" not in " ".join(_help(command).split()), command  # it collides with --seed


def test_no_plots_without_out_is_accepted_harmless():
    from kdjax.app.parser import build_parser, check_modes, given_options, resolve_defaults

    argv = ["distill", "--no-plots", "--steps", "2"]
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    check_modes(args, given_options(argv))  # no UsageError


def test_teacher_trained_here_then_its_top_k_cache_then_students_from_it(tmp_path, capsys):
    """The acceptance chain on kdjax alone: distill --save-hf-teacher T, teacher-logits
    --teacher T (its top-k coverage measured, stored and warned about), distill --teacher-logits."""
    from kdjax import convert

    teacher_dir, cache = tmp_path / "T", tmp_path / "cache"
    p = kdjax_here(capsys, "distill", *LM, "--save-hf-teacher", teacher_dir, "--out", tmp_path / "o1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"teacher (seed 0) written to {teacher_dir}" in p.stdout
    model, _ = convert.load_hf(teacher_dir)
    assert model.num_layers == 1 and model.hidden_size == 16 and model.max_position_embeddings >= 16
    assert (teacher_dir / "tokenizer.json").read_bytes() == (tmp_path / "o1" / "tokenizer.json").read_bytes()
    results = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert results["save_hf_teacher"] == str(teacher_dir)
    record = json.loads((tmp_path / "o1" / ".kdjax-outputs.json").read_text())
    assert record["save_hf_teacher"] == os.path.realpath(teacher_dir)

    build = ["teacher-logits", "--teacher", teacher_dir, "--text-bytes", "20000", "--context", "16", "--k", "8",
             "--quiet", "--json", "--out", cache]
    p = kdjax_here(capsys, *build)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    coverage = summary["topk_coverage"]
    assert 8 / 300 * 0.5 < coverage < 0.5  # a 2-step teacher is near uniform over 300 tokens: top 8 keep little
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["metadata"]["validation"]["topk_coverage"] == coverage  # signed with the manifest
    warnings = [x for x in p.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "--k" in warnings[0] and "--min-coverage 0.5" in warnings[0], p.stderr

    p = kdjax_here(capsys, "distill", "--dataset", "text", "--arch", "llama", "--text-bytes", "20000", "--context",
                   "16", "--student-dim", "16", "--steps", "2", "--seeds", "1", "--quiet", "--no-plots",
                   "--teacher-logits", cache, "--out", tmp_path / "o2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "teacher (cached, top-8)" in p.stdout and f"{coverage:.1%} of the teacher's probability mass" in p.stdout
    assert json.loads((tmp_path / "o2" / "results.json").read_text())["teacher_logits"]["topk_coverage"] == coverage


def test_top_k_coverage_is_the_kept_probability_mass():
    """topk_coverage against NumPy on a model whose logits are known; all k: 1."""
    import jax.numpy as jnp
    import numpy as np

    from kdjax.app.commands import topk_coverage

    table = np.random.default_rng(0).normal(size=(7, 7)).astype(np.float32) * 3

    class Lookup:  # logits of each position: a row of the table, chosen by its token
        def apply(self, variables, x):
            return jnp.asarray(table)[x]

    tokens = np.array([[0, 1, 2], [3, 4, 5], [6, 0, 1]])
    p = np.exp(table - table.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.mean([np.sort(p[t])[-2:].sum() for t in tokens.ravel()])
    assert abs(topk_coverage(Lookup(), {}, tokens, 2, batch_size=2) - want) < 1e-6  # a padded last batch
    assert abs(topk_coverage(Lookup(), {}, tokens, 7, batch_size=3) - 1) < 1e-6


def test_save_hf_teacher_is_checked_like_save_hf_before_anything_runs(tmp_path, capsys):
    out, hf = tmp_path / "out", tmp_path / "hf"
    refused(kdjax_here(capsys, "distill", *LM, "--save-hf", hf, "--save-hf-teacher", hf),
            "--save-hf-teacher", "apart from --save-hf")
    refused(kdjax_here(capsys, "distill", *LM, "--save-hf", hf, "--save-hf-teacher", hf / "teacher"),
            "apart from --save-hf")
    refused(kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf-teacher", out), "--save-hf-teacher",
            "other than --out")
    refused(kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf-teacher", out / "checkpoints" / "t"),
            "--save-hf-teacher", "outside the run's own outputs")
    assert not out.exists() and not hf.exists()
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # the user's: never replaced without --overwrite
    refused(kdjax_here(capsys, "distill", *LM, "--save-hf-teacher", hf), "--save-hf-teacher", "--overwrite")
    assert (hf / "config.json").read_text() == "{}"
    refused(kdjax_here(capsys, "distill", "--dataset", "digits", "--save-hf-teacher", tmp_path / "t"),
            "--save-hf-teacher: only used with --arch llama")
    refused(kdjax_here(capsys, "distill", *LM, "--teacher-logits", tmp_path / "c", "--save-hf-teacher",
                       tmp_path / "t"), "--save-hf-teacher: only used with", "not with --teacher-logits")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, KDJAX_CACHE_DIR=str(tmp_path_factory.mktemp("xla-cache")))


def _run_to_files(env, tmp_path, *args):
    """``python -m kdjax ARGS`` with stdout and stderr to files (not a terminal: a job's log)."""
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        code = subprocess.run([sys.executable, "-m", "kdjax", *map(str, args)], stdout=out, stderr=err, env=env,
                              timeout=600).returncode
    return code, (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def test_progress_in_a_log_and_wall_times_in_results(env, tmp_path):
    """stdout to a file: plain progress lines on stderr (phase, step/total, loss, elapsed,
    remaining), about one per tenth; results.json has the wall time of each phase and the run."""
    args = ["distill", "--dataset", "digits", "--steps", "40", "--seeds", "2", "--teacher-hidden", "32",
            "--student-hidden", "8", "--no-plots"]
    code, out, err = _run_to_files(env, tmp_path, *args, "--out", tmp_path / "run")
    assert code == 0, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("kdjax: ")]
    for phase in ("teachers", "students"):
        mine = [x for x in lines if x.startswith(f"kdjax: {phase} step ")]
        assert 2 <= len(mine) <= 12, mine  # every ~10%, not every chunk
        assert mine[-1].startswith(f"kdjax: {phase} step 40/40 (100%), loss ") and " elapsed" in mine[-1]
        assert " left in " in mine[0] and ", loss " in mine[0]
    assert "kdjax: teachers step" not in out  # the log lines are stderr's; stdout keeps the tables
    sentence = [x for x in out.splitlines() if x.startswith("Distilled - standard test accuracy on digits")]
    assert len(sentence) == 1 and "(95% CI, n = 2 seeds)" in sentence[0] and "too wide to conclude" in sentence[0]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["conclusion"] == sentence
    m, h = r["paired_gain"]
    assert f"{m:+.4f} ± {h:.4f}" in sentence[0]  # the interval as computed, from the run's own numbers
    wall = r["wall_seconds"]
    assert set(wall["phases"]) == {"setup", "teachers", "students", "finish"}
    assert all(v >= 0 for v in wall["phases"].values())
    assert sum(wall["phases"].values()) <= wall["run"] + 1e-6
    from importlib import metadata

    assert r["kdjax_version"] == metadata.version("kdjax")
    code, out, err = _run_to_files(env, tmp_path, *args, "--quiet")
    assert code == 0 and "kdjax: teachers step" not in err, err[-3000:]  # --quiet silences them


def test_conclusion_sentence_says_what_the_interval_shows():
    from kdjax.app.reporting import conclusion

    what = "Distilled - standard test accuracy (paired by seed)"
    assert conclusion(what, (0.0213, 0.0101), 8) == (
        "Distilled - standard test accuracy (paired by seed): +0.0213 ± 0.0101 (95% CI, n = 8 seeds): the interval "
        "excludes 0, distillation helped.")
    assert conclusion(what, (-0.0213, 0.0101), 8).endswith("the interval excludes 0, distillation hurt.")
    assert conclusion(what, (0.0100, 0.0250), 8).endswith("the interval includes 0, no significant difference.")
    # lower is better (bits per token): a significant rise is a loss
    assert conclusion("bits", (0.5, 0.1), 4, lower_is_better=True).endswith("distillation hurt.")
    # too few seeds: the interval is printed as computed, and said to be too wide to conclude
    few = conclusion(what, (0.7489, 0.6212), 2)
    assert "+0.7489 ± 0.6212 (95% CI, n = 2 seeds)" in few and "excludes 0, but with n = 2 it is too wide" in few
    assert "includes 0, but with n = 3" in conclusion(what, (0.1, 0.3), 3)
    one = conclusion(what, (0.05, None), 1)
    assert "(n = 1, no interval)" in one and "±" not in one and "--seeds 4" in one
    assert "0.7140000462532043" not in conclusion(what, (0.7140000462532043, 0.1), 4)  # no raw float32 digits
