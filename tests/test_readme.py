"""Every example in the README and docs/ runs as written (each python block, by its marker),
every documented `kdjax` command parses, and CI runs the README's test command."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {"README.md": README} | {f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
TESTED = ("example", "example-cnn", "example-lm", "example-torch", "example-token", "example-mesh", "example-features",
          "example-generate", "example-fsdp")


def block_after(marker: str, lang: str) -> str:
    for text in PAGES.values():
        m = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", text, re.S)
        if m:
            return m.group(1)
    raise AssertionError(f"no ```{lang} block after <!-- {marker} --> in README.md or docs/")


def run_example(marker: str) -> dict:
    namespace: dict = {}
    exec(compile(block_after(marker, "python"), f"README.md:{marker}", "exec"), namespace)
    return namespace


def test_library_example_runs():
    ns = run_example("example")
    assert ns["metrics"]["loss"].shape == (100,)
    assert float(ns["m"]["loss"]) > 0


def test_cnn_example_runs():
    ns = run_example("example-cnn")
    assert float(ns["test"]["accuracy"]) > 0.6  # 3 epochs learned something (chance: 0.1)
    assert ns["accuracy"].shape == (4,) and ns["losses"]["loss"].shape[0] == 4
    assert set(ns["states"].model_state) == {"batch_stats"}


def test_torch_example_runs():
    pytest.importorskip("torch")
    ns = run_example("example-torch")
    assert abs(ns["logits"] - ns["want"]).max() < 1e-4
    assert "layer2.0.downsample.1.running_var" in ns["back"]
    ns["torch_model"].load_state_dict({k: __import__("torch").from_numpy(v) for k, v in ns["back"].items()})


def test_token_example_runs():
    import jax.numpy as jnp
    import numpy as np

    ns = run_example("example-token")
    np.testing.assert_allclose(float(ns["value"]), float(ns["naive"]), rtol=1e-5)
    assert ns["per_token"].shape == (2, 6) and ns["d_hidden"].shape == (2, 6, 16)
    assert np.isfinite(float(ns["loss_jsd"])) and np.isfinite(float(ns["dkd"]))
    assert float(ns["loss"]) != float(ns["losses"].distillation_loss(
        ns["student"], ns["teacher"], ns["labels"], 2.0, 0.5, where=jnp.ones((2, 6), bool)))


def test_lm_example_runs():
    ns = run_example("example-lm")
    loss = ns["m"]["loss"]
    assert loss.shape == (40,) and float(loss[-10:].mean()) < float(loss[:10].mean())
    assert 0 < ns["bits_per_byte"] < 8  # below the 8 bits of a uniform guess over 256 bytes


def test_mesh_example_runs():
    ns = run_example("example-mesh")
    assert str(ns["state"].params["fc"]["kernel"].sharding.spec) == "P()"
    assert ns["losses"]["loss"].shape == (10,)


def test_fsdp_example_runs_on_four_devices():
    """In a subprocess with 4 forced CPU devices: every parameter split four ways."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", KDJAX_CACHE_DIR="off")
    p = subprocess.run([sys.executable, "-c", block_after("example-fsdp", "python")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("12 of 12 arrays split") and p.stdout.strip().endswith("per device (25%)"), p.stdout


def test_features_example_runs():
    import numpy as np

    ns = run_example("example-features")
    assert set(ns["metrics"]["terms"]) == {"ce", "hint:layer2", "at:layer1"}
    terms = ns["metrics"]["terms"]
    np.testing.assert_allclose(ns["metrics"]["loss"], sum(terms.values()), rtol=1e-5)
    assert float(terms["hint:layer2"][-1]) < float(terms["hint:layer2"][0])  # the connector and student learn
    assert "connectors" in ns["state"].params and "connectors" not in ns["own_params"]


def test_generate_example_runs():
    import numpy as np

    ns = run_example("example-generate")
    out = ns["out"]
    assert ns["tokens"].shape == (2, 12) and out.mask[0, :2].tolist() == [False, False]
    np.testing.assert_array_equal(ns["tokens"], out.tokens)  # generate is rollout's tokens
    assert bool((out.completion_mask.sum(axis=1) >= 1).all())


def test_commands_present():
    assert "kdjax demo" in block_after("main-command", "bash")
    test_cmd = block_after("test-command", "bash")
    assert "torch==2.13.0" in test_cmd and "pytest" in test_cmd
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_every_python_block_is_a_tested_example():
    """No python block escapes the tests: each sits under a marker that a test above runs."""
    for name, text in PAGES.items():
        for m in re.finditer(r"(<!-- ([\w-]+) -->\s*)?```python\n", text):
            assert m.group(2) in TESTED, f"{name}: a python block without a tested marker near {text[m.start():][:80]!r}"
    assert sum(len(re.findall(r"```python\n", t)) for t in PAGES.values()) == len(TESTED)


def test_documented_commands_parse():
    """Every `kdjax ...` line of a bash block in README and docs parses, and no option in it
    is one its mode would ignore (running them all would take an hour)."""
    import shlex

    from kdjax.app.parser import build_parser, check_modes, given_options, resolve_defaults

    seen = 0
    for name, text in PAGES.items():
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if not line.startswith("kdjax "):
                    continue
                argv = shlex.split(line)[1:]
                args = build_parser().parse_args(argv)
                resolve_defaults(args)
                check_modes(args, given_options(argv))
                seen += 1
    assert seen >= 5  # not vacuous


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 300
    for page in ("library", "cli", "results", "parity", "benchmarks", "guarantees", "design"):
        assert f"docs/{page}.md" in README and (ROOT / "docs" / f"{page}.md").exists()


def test_no_example_needs_the_clone():
    """Examples run where the wheel is installed: none imports parity/ or benchmarks/ (they
    live in the clone only)."""
    for text in PAGES.values():
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            assert not re.search(r"^\s*(from|import) (parity|benchmarks)\b", block, re.M), block[:300]
