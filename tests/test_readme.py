"""The README's library example runs as written, and CI runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(marker: str, lang: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README, re.S)
    assert m, f"README has no ```{lang} block after <!-- {marker} -->"
    return m.group(1)


def test_library_example_runs():
    namespace: dict = {}
    exec(compile(block_after("example", "python"), "README.md:example", "exec"), namespace)
    assert namespace["metrics"]["loss"].shape == (100,)
    assert float(namespace["m"]["loss"]) > 0


def test_commands_present():
    assert "kdjax demo" in block_after("main-command", "bash")
    test_cmd = block_after("test-command", "bash")
    assert "torch==2.13.0" in test_cmd and "pytest" in test_cmd
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
