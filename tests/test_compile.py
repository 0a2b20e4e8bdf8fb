"""What gets compiled, and when: no stray programs, and the library's compile options."""

import ast
import contextlib
import pathlib
import threading

import jax
import numpy as np
import pytest

import kdjax
from kdjax import sweep
from kdjax.experiments import RunConfig, fit_members, paired_students

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
    assert [name for _, name in seen] == ["jit(run_steps)"]


def test_member_keys_make_no_device_program():
    with compiles() as seen:
        keys = sweep.member_keys([1, 2, 3])
        kdjax.make_hyper([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    assert seen == [] and keys["dropout"].shape == (3, 2)


LIBRARY = ("losses", "fused", "models", "train", "sweep", "parallel", "convert", "data", "checkpoint", "errors")
APPLICATION = ("experiments", "cli", "demo", "plots", "reporting")


def _kdjax_imports(path: pathlib.Path) -> set[str]:
    """The kdjax modules a file imports (``import kdjax.x``, ``from kdjax import x``,
    ``from kdjax.x import y``), anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kdjax.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdjax":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
    return found


def test_library_modules_import_no_application_module():
    """DESIGN.md's line: library modules never import experiments, cli, demo or plots."""
    root = pathlib.Path(kdjax.__file__).parent
    files = [p for p in root.rglob("*.py") if p.relative_to(root).parts[0].removesuffix(".py") in LIBRARY]
    assert len(files) >= 10, files  # the scan sees the package (models/ included)
    bad = {str(p.relative_to(root)): sorted(_kdjax_imports(p) & set(APPLICATION)) for p in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_import_scan_catches_an_application_import(tmp_path):
    """The scan above is not vacuous: every import form is seen."""
    f = tmp_path / "m.py"
    f.write_text("import kdjax.cli\nfrom kdjax import demo\nfrom kdjax.plots import x\n"
                 "def f():\n    from kdjax.experiments import fit\n")
    assert _kdjax_imports(f) == {"cli", "demo", "plots", "experiments"}


def test_library_sets_no_compiler_options_or_process_state():
    """No compile-time options, gc or global caches keyed on models in library modules."""
    root = pathlib.Path(kdjax.__file__).parent
    for p in root.rglob("*.py"):
        if p.relative_to(root).parts[0].removesuffix(".py") not in LIBRARY:
            continue
        text = p.read_text()
        for banned in ("compiler_options", "xla_backend_optimization_level", "gc.", "lru_cache",
                       "functools.cache", "jax.config.update"):
            assert banned not in text, f"{p.name} uses {banned}"
