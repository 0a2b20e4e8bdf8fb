"""What gets compiled, and when: no stray programs, and the library's compile options."""

import ast
import contextlib
import pathlib
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import kdjax
from kdjax import sweep
from kdjax import workflows
from kdjax.fitting import Programs, RunConfig, _chunks, fit, fit_members, paired_students

_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")


@contextlib.contextmanager
def compiles():
    """Record ``(thread name, program)`` for every program compiled (or loaded from a
    persistent cache) inside the block."""
    seen = []

    def listener(event, duration, **kw):
        if event in _EVENTS:
            seen.append((threading.current_thread().name, kw.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def traces():
    """The name of every function traced for jit inside the block (a program built again
    is traced again, even when its compiled form then comes from a persistent cache)."""
    seen = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            seen.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("members", [False, True])
def test_host_built_adam_state_equals_optax_init(members):
    """state_from_params builds kdjax's adam state on the host (nothing compiled); it must
    equal the state optax's own init builds, leaf for leaf."""
    model = kdjax.TeacherMLP(24, 3)
    params = kdjax.models.init_params(model, 5, 7)
    if members:
        params = jax.tree_util.tree_map(lambda a: np.stack([a, 2 * a, -a]), params)
    with compiles() as seen:
        state = kdjax.state_from_params(params, learning_rate=3e-3, members=members)
    assert seen == []
    init = kdjax.adam(3e-3).init
    want = jax.jit(jax.vmap(init) if members else init)(params)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lr = np.asarray(state.opt_state.hyperparams["learning_rate"])
    assert lr.shape == ((3,) if members else ()) and np.all(lr == np.float32(3e-3))
    assert state.model_state == {} and np.shape(state.step) == ((3,) if members else ())


def test_a_run_compiles_only_its_training_program(seed_data):
    """Moving data, keys, hyperparameters and initial states to the device compiles
    nothing (no per-shape helper programs): a fit is one program per chunk length."""
    cfg = RunConfig(steps=6, batch_size=16)
    logits = np.zeros((2, len(seed_data.y_train), 5), np.float32)
    with compiles() as seen:
        fit_members(kdjax.StudentMLP(11, 5), "kd", seed_data, cfg, chunk=3,
                    **paired_students([0, 1], logits, 2.0, 0.5))
    assert [name for _, name in seen] == ["jit(_vmapped_run)"]  # the members' vmapped run_steps


def test_a_programs_object_compiles_each_program_once(seed_data):
    """The ``Programs()`` a caller passes is the one that keeps the runs, also while it is
    still empty (an empty one is falsy: ``programs or Programs()`` would drop it and
    compile again on every call): a second call on the same model and shapes compiles
    nothing, whatever its seeds, hyperparameters or teacher."""
    cfg = RunConfig(steps=6, batch_size=16)
    model, programs = kdjax.StudentMLP(12, 5), Programs()
    logits = np.zeros((len(seed_data.y_train), 5), np.float32)
    fit_members(model, "kd", seed_data, cfg, **paired_students([0], logits, 2.0, 0.5), programs=programs)
    fit(model, "ce", seed_data, cfg, 0, programs=programs)
    assert len(programs) == 2
    with compiles() as seen:
        fit_members(model, "kd", seed_data, cfg, **paired_students([3], logits + 1, 4.0, 0.9), programs=programs)
        fit(model, "ce", seed_data, cfg, 1, programs=programs)
    assert seen == [] and len(programs) == 2
    # a workflow fills the caller's Programs too: the teachers' run and the students' run
    programs = Programs()
    workflows.distill(kdjax.TeacherMLP(16, 5), model, seed_data, cfg, [0], programs=programs)
    assert len(programs) == 2


def test_the_default_chunks_are_one_program(seed_data):
    """Without a chunk size a run is cut into about 20 equal chunks where a divisor of its
    length allows (a shorter last chunk would be a second program to compile)."""
    assert [b - a for a, b in _chunks(450, None)] == [25] * 18
    assert [b - a for a, b in _chunks(2003, None)] == [101] * 19 + [84]  # a prime: ~20 chunks, one shorter
    assert [b - a for a, b in _chunks(10, 4)] == [4, 4, 2]  # a size given is kept
    with compiles() as seen:
        fit_members(kdjax.StudentMLP(13, 5), "ce", seed_data, RunConfig(steps=21, batch_size=16), [0])
    assert [name for _, name in seen if name] == ["jit(_vmapped_run)"]


def test_member_keys_make_no_device_program():
    with compiles() as seen:
        keys = sweep.member_keys([1, 2, 3])
        kdjax.make_hyper([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    assert seen == [] and keys["dropout"].shape == (3, 2)


# The application layer: kdjax/app/ and the `python -m kdjax` entry point. Everything else
# under kdjax/ is the library, __init__.py included.
APPLICATION = ("app", "__main__")
# Process-wide state and compiler options a library module must not touch (DESIGN.md).
BANNED_CALLS = {("jax", "config", "update"), ("gc", "freeze"), ("gc", "collect"), ("gc", "disable"),
                ("functools", "lru_cache"), ("functools", "cache"), ("os", "environ", "setdefault")}
BANNED_NAMES = {"compiler_options", "xla_backend_optimization_level", "lru_cache"}


def _dotted(node) -> tuple:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def violations(package: pathlib.Path) -> dict[str, list[str]]:
    """Per library file under ``package``: imports of the application layer, and uses of
    process-wide state or compiler options (parsed, not grepped: every import form, in
    functions too)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0].removesuffix(".py") in APPLICATION:
            continue
        bad = []
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad += [f"imports {m}" for m in modules
                    if m.split(".")[0] == "kdjax" and len(m.split(".")) > 1 and m.split(".")[1] in APPLICATION]
            if isinstance(node, ast.ImportFrom) and node.module == "kdjax":
                bad += [f"imports kdjax.{a.name}" for a in node.names if a.name in APPLICATION]
            if isinstance(node, (ast.Attribute, ast.Name)):
                name = _dotted(node)
                if name in BANNED_CALLS or (name and name[-1] in BANNED_NAMES):
                    bad.append("uses " + ".".join(name))
            if isinstance(node, ast.Subscript) and _dotted(node.value) == ("os", "environ") and \
                    isinstance(node.ctx, ast.Store):
                bad.append("sets os.environ")
            if isinstance(node, ast.keyword) and node.arg in BANNED_NAMES:
                bad.append(f"passes {node.arg}=")
        if bad:
            found[str(rel)] = sorted(set(bad))
    return found


def test_library_modules_stay_on_their_side_of_the_line():
    """DESIGN.md's line: no library file (``__init__.py`` included) imports the application
    layer, sets compiler options or touches process-wide state."""
    root = pathlib.Path(kdjax.__file__).parent
    assert len(list(root.rglob("*.py"))) >= 20  # the scan sees the package (models/, train/, app/)
    assert violations(root) == {}


def test_the_scan_catches_a_planted_violation(tmp_path):
    """The guard is not vacuous: a library file that breaks the line is reported, each way."""
    pkg = tmp_path / "kdjax"
    (pkg / "app").mkdir(parents=True)
    (pkg / "app" / "cli.py").write_text("import gc\ngc.freeze()\n")  # the application may
    (pkg / "__init__.py").write_text("from kdjax import app\n")
    (pkg / "losses.py").write_text("import functools, jax, os\nfrom kdjax.app.cli import main\n"
                                   "def f():\n    import kdjax.app.demo\n    jax.config.update('x', 1)\n"
                                   "    os.environ['XLA_FLAGS'] = '--y'\n"
                                   "@functools.lru_cache\ndef g(m):\n    return jax.jit(m, compiler_options={})\n")
    got = violations(pkg)
    assert got["__init__.py"] == ["imports kdjax.app"]
    assert set(got["losses.py"]) >= {"imports kdjax.app.cli", "imports kdjax.app.demo", "uses jax.config.update",
                                     "sets os.environ", "uses functools.lru_cache", "passes compiler_options="}
    assert "app/cli.py" not in got


def test_import_kdjax_loads_no_application_module():
    code = "import sys, kdjax; print(sorted(m for m in sys.modules if m.startswith('kdjax.app')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
