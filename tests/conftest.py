import jax
import numpy as np
import pytest

# Catch accidental broadcasting between mismatched ranks (equinox does the same).
jax.config.update("jax_numpy_rank_promotion", "raise")


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
