"""kdjax.offline's caches on disk are signed and checked: a manifest carries its own checksum,
everything it names is checked (keys, types, shard paths inside the cache), and whatever does
not fit is refused in one InputError line, never a traceback, never a number read from a file
the cache does not own."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import offline
from kdjax.errors import InputError

ROWS, LENGTH, VOCAB, K = 5, 5, 11, 4
META = {"teacher_config": {"vocab_size": VOCAB, "hidden_size": 8}, "tokenizer_sha256": "ab" * 32,
        "validation": {"accuracy": 0.25, "loss": 2.0}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished top-k cache and a generations cache, written once; tests edit copies."""
    root = tmp_path_factory.mktemp("caches")
    teacher = kdjax.TransformerLM(VOCAB, 1, 8, 2, LENGTH)
    tokens = np.asarray(np.random.default_rng(0).integers(0, VOCAB, (ROWS, LENGTH)), np.int32)
    variables = teacher.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))
    offline.write_topk_cache(root / "topk", teacher, variables, tokens, K, batch_size=2, shard_rows=2, metadata=META)
    offline.write_generations(root / "gen", teacher, variables, tokens[:4, :2], 2, batch_size=2, shard_rows=2)
    return root, teacher, variables, tokens


@pytest.fixture
def cache(built, tmp_path):
    shutil.copytree(built[0] / "topk", tmp_path / "topk")
    return tmp_path / "topk"


@pytest.fixture
def gen_cache(built, tmp_path):
    shutil.copytree(built[0] / "gen", tmp_path / "gen")
    return tmp_path / "gen"


def manifest_of(directory):
    return json.loads((directory / "manifest.json").read_text())


def edit(directory, change, *, sign=False):
    """Apply ``change`` to the manifest as a user editing it by hand would (``sign=False``:
    the checksum left as it was) or as a forger would (``sign=True``: a fresh checksum)."""
    m = manifest_of(directory)
    m = change(m) or m
    if sign:
        offline._write_manifest(directory, m)
    else:
        (directory / "manifest.json").write_text(json.dumps(m, indent=1))


def refused(read, words):
    with pytest.raises(InputError, match=words) as e:
        read()
    assert len(str(e.value).splitlines()) == 1, str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------- 1. the manifest is signed

def test_a_valid_cache_reads_back_with_a_verified_manifest(cache):
    values, indices, m = offline.read_topk_cache(cache)
    assert values.shape == indices.shape == (ROWS, LENGTH, K) and m["format"] == offline.FORMAT
    assert m[offline._CHECKSUM] == offline._sha(offline._canonical(m))
    # layout is not content: the same manifest reformatted still verifies
    (cache / "manifest.json").write_text(json.dumps(manifest_of(cache), indent=4, sort_keys=True))
    np.testing.assert_array_equal(offline.read_topk_cache(cache)[0], values)


@pytest.mark.parametrize("what,change", [
    ("k", lambda m: m.update(k=3)),
    ("rows", lambda m: m.update(rows=4)),
    ("teacher's validation accuracy", lambda m: m["metadata"]["validation"].update(accuracy=0.99)),
    ("teacher config", lambda m: m["metadata"]["teacher_config"].update(hidden_size=16)),
    ("tokenizer hash", lambda m: m["metadata"].update(tokenizer_sha256="cd" * 32)),
    ("shards", lambda m: m.update(shards=m["shards"][:2])),
    ("the checksum itself", lambda m: m.update(manifest_sha256="0" * 64)),
])
def test_a_hand_edited_topk_manifest_is_refused(cache, what, change):
    edit(cache, change)
    line = refused(lambda: offline.read_topk_cache(cache), "its checksum does not match its contents")
    assert "manifest.json" in line and "kdjax teacher-logits --overwrite" in line


def test_a_hand_edited_generations_manifest_is_refused(gen_cache):
    edit(gen_cache, lambda m: m["sampling"].update(temperature=0.5))
    refused(lambda: offline.read_generations(gen_cache), "its checksum does not match its contents")


def test_resuming_into_an_edited_manifest_is_refused(cache, built):
    _, teacher, variables, tokens = built
    edit(cache, lambda m: m["metadata"]["validation"].update(accuracy=0.99))
    refused(lambda: offline.write_topk_cache(cache, teacher, variables, tokens, K, batch_size=2, shard_rows=2,
                                             metadata=META), "its checksum does not match")


def test_an_unsigned_cache_of_an_older_kdjax_is_refused(cache):
    def older(m):
        m.pop(offline._CHECKSUM)
        m["format"] = "kdjax-topk/1"

    edit(cache, older)
    refused(lambda: offline.read_topk_cache(cache), "kdjax-topk/1 cache .*older kdjax.*rebuild")


def test_a_manifest_without_its_checksum_is_refused(cache):
    edit(cache, lambda m: m.pop(offline._CHECKSUM) and None)
    refused(lambda: offline.read_topk_cache(cache), "expected its checksum")
