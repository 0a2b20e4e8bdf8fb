import os
import shutil
import tempfile

import jax
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
