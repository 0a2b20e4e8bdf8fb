"""The entry points' XLA options: added only where safe, never over the user's, never in the
library (tests/test_compile.py guards that)."""

import json
import os
import subprocess
import sys

import pytest

from kdjax.app import xla

CURRENT = xla.KNOWN_JAXLIB[0]


def test_added_for_a_known_jaxlib_on_cpu_and_kept_with_the_users():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla.apply(env) == [xla.EIGEN_CONVOLUTIONS] or xla._jaxlib_version() not in xla.KNOWN_JAXLIB
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla.cpu_flags(env, CURRENT) == [xla.EIGEN_CONVOLUTIONS]
    env["XLA_FLAGS"] += " " + xla.EIGEN_CONVOLUTIONS
    assert xla.cpu_flags(env, CURRENT) == []  # never twice


@pytest.mark.parametrize("env,version", [
    ({}, (0, 9)),  # an older jaxlib may not know the flag: XLA would abort on it
    ({}, (0, 11)),  # nor may a newer one
    ({}, None),  # no jaxlib metadata
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=all"}, CURRENT),  # the user's choice stands
    ({"KDJAX_XLA_DEFAULTS": "off"}, CURRENT),
    ({"JAX_PLATFORMS": "cuda"}, CURRENT),
])
def test_nothing_added_where_it_is_unsafe_or_unwanted(env, version):
    before = dict(env)
    assert xla.cpu_flags(env, version) == []
    assert env == before


def test_the_command_keeps_the_users_flags_and_runs(tmp_path):
    """A user's XLA_FLAGS (two forced devices) survive the command's own; the run completes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               KDJAX_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "kdjax", "distill", "--steps", "2", "--seeds", "2", "--teacher-hidden",
                        "8", "--student-hidden", "4", "--batch-size", "16", "--quiet", "--json"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "over 2 cpu device(s)" in p.stderr, p.stderr[-2000:]  # --json: the report goes to stderr
    flags = json.loads(p.stdout.strip().splitlines()[-1])["environment"]["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=2")  # the user's first, kept
    assert flags.endswith(xla.EIGEN_CONVOLUTIONS) == (xla._jaxlib_version() in xla.KNOWN_JAXLIB)
