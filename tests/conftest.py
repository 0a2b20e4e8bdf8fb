import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Catch accidental broadcasting between mismatched ranks (equinox does the same).
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    """One persistent compilation cache per test process (each xdist worker), used by the
    process itself and by the ``kdjax`` commands it starts, unless a test names its own
    ``KDJAX_CACHE_DIR``: a program that several tests build compiles once, and no test
    writes to the user's ``~/.cache``. Set here, before anything compiles: JAX decides
    once per process whether the cache is used."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # the xdist controller runs no tests; its workers each make their own
    path = tempfile.mkdtemp(prefix="kdjax-tests-xla-")
    config._kdjax_cache = path
    os.environ.setdefault("KDJAX_CACHE_DIR", path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_kdjax_cache", ""), ignore_errors=True)


def assert_trees_close(a, b, **tol):
    """Same tree structure first, then every leaf close."""
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert sa == sb, f"tree structures differ:\n{sa}\n{sb}"
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.fixture(scope="session")
def seed_data():
    import kdjax

    return kdjax.data.synthetic(num_samples=500, input_dim=50, num_classes=5, seed=42,
                                test_samples=100)


STEPS = 30  # the length of the ``setup`` fixture's schedule


@pytest.fixture(scope="session")
def setup(seed_data):
    """A teacher trained STEPS steps on ``seed_data``, its logits, an untrained student and the
    schedule, for tests/test_step.py, test_sweep.py and test_evaluation.py: built once per test
    process (they were one file, with this fixture per module, before they were split)."""
    import kdjax
    from kdjax import data as kdata

    ds = seed_data
    d = {"x": jnp.asarray(ds.x_train), "y": jnp.asarray(ds.y_train)}
    rng = jax.random.PRNGKey(0)
    schedule = kdata.seed_schedule(jax.random.PRNGKey(1), 500, 64, STEPS)
    teacher, student = kdjax.TeacherMLP(128, 5), kdjax.StudentMLP(32, 5)
    tstate = kdjax.create_train_state(teacher, jax.random.PRNGKey(2), 50)
    tstate, _ = kdjax.make_run(teacher, "ce")(tstate, d, schedule, rng)
    tlogits = kdjax.predict_logits(teacher, tstate.params, d["x"])
    return dict(d=d, rng=rng, schedule=schedule, teacher=teacher, student=student,
                tparams=tstate.params, tlogits=tlogits)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, for tests/test_hinton.py, test_data.py and test_workflows.py."""
    pytest.importorskip("sklearn")
    from kdjax import data

    return data.digits()
