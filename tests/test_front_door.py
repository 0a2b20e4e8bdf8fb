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
