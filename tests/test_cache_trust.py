"""kdjax.offline's caches on disk are signed and checked: a manifest carries its own checksum,
everything it names is checked (keys, types, shard paths inside the cache), and whatever does
not fit is refused in one InputError line, never a traceback, never a number read from a file
the cache does not own."""

import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import offline
from kdjax.errors import InputError, InputTypeError

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


# ----------------------------------------------------------------------------- 2. what a manifest names is checked

@pytest.mark.parametrize("text", ["[]", "3", '"manifest"', "null"])
def test_a_manifest_that_is_not_a_json_object_is_refused(cache, text):
    (cache / "manifest.json").write_text(text)
    refused(lambda: offline.read_topk_cache(cache), "manifest.json: expected a JSON object, got")


@pytest.mark.parametrize("key", ["k", "rows", "vocab", "values_dtype", "teacher", "shards", "metadata"])
def test_a_signed_manifest_missing_a_key_is_refused(cache, key):
    edit(cache, lambda m: m.pop(key) and None, sign=True)
    refused(lambda: offline.read_topk_cache(cache), f"expected the key '{key}', got none")


@pytest.mark.parametrize("key,value,words", [
    ("k", "4", "k: expected an int >= 1"),
    ("k", 4.0, "k: expected an int >= 1"),
    ("k", True, "k: expected an int >= 1"),
    ("rows", -5, "rows: expected an int >= 1"),
    ("shards", {}, "shards: expected a list"),
    ("values_dtype", "int8", "values_dtype: expected 'float32' or 'float16'"),
    ("teacher", "not a hash", "teacher: expected a sha256"),
    ("metadata", [1], "metadata: expected a JSON object"),
    ("k", VOCAB + 1, r"k: expected at most the vocabulary \(11\)"),
    ("bytes_per_token", 7, "bytes_per_token: expected 32"),
])
def test_a_signed_manifest_with_a_wrong_type_or_value_is_refused(cache, key, value, words):
    edit(cache, lambda m: m.update({key: value}), sign=True)
    refused(lambda: offline.read_topk_cache(cache), words)


@pytest.mark.parametrize("change,words", [
    (lambda sh: sh.pop("file"), r"shards\[1\]: expected the key 'file'"),
    (lambda sh: sh.pop("sha256"), r"shards\[1\]: expected the key 'sha256'"),
    (lambda sh: sh.update(rows="2"), r"shards\[1\]: rows: expected an int >= 1"),
    (lambda sh: sh.update(rows=1), r"shards\[1\]: rows: expected shard_rows = 2"),
    (lambda sh: sh.update(file="shard-00000.npz"), r"shards\[1\]: file: expected 'shard-00001.npz'"),
])
def test_a_signed_manifest_with_a_malformed_shard_is_refused(cache, change, words):
    edit(cache, lambda m: change(m["shards"][1]) and None, sign=True)
    refused(lambda: offline.read_topk_cache(cache), words)


def test_a_manifest_whose_shard_entry_is_not_an_object_is_refused(cache):
    edit(cache, lambda m: m["shards"].__setitem__(0, "shard-00000.npz"), sign=True)
    refused(lambda: offline.read_topk_cache(cache), r"shards\[0\]: expected a JSON object")


def test_shards_holding_more_rows_than_the_cache_are_refused(cache):
    edit(cache, lambda m: m["shards"][2].update(rows=2), sign=True)
    refused(lambda: offline.read_topk_cache(cache), "shards: expected at most rows = 5 rows in all, got 6")


def _outside_copy(cache, target):
    """A readable copy of the cache's first shard at ``target`` outside the cache, so that a
    reader that followed the path would succeed (what the checks must prevent)."""
    shutil.copy(cache / "shard-00000.npz", target)
    return target


@pytest.mark.parametrize("how", ["parent", "absolute"])
def test_a_shard_path_outside_the_cache_is_never_read(cache, tmp_path, how):
    outside = _outside_copy(cache, tmp_path / "elsewhere.npz")
    name = "../elsewhere.npz" if how == "parent" else str(outside)
    edit(cache, lambda m: m["shards"][0].update(file=name), sign=True)
    refused(lambda: offline.read_topk_cache(cache), r"shards\[0\]: file: expected a file inside the cache directory")


def test_a_shard_linked_to_a_file_outside_the_cache_is_never_read(cache, tmp_path):
    outside = _outside_copy(cache, tmp_path / "elsewhere.npz")
    (cache / "shard-00000.npz").unlink()
    (cache / "shard-00000.npz").symlink_to(outside)
    refused(lambda: offline.read_topk_cache(cache), "resolving to .*elsewhere.npz")


def test_a_manifest_linked_to_a_file_outside_the_cache_is_never_read(cache, tmp_path):
    shutil.move(cache / "manifest.json", tmp_path / "manifest.json")
    (cache / "manifest.json").symlink_to(tmp_path / "manifest.json")
    refused(lambda: offline.read_topk_cache(cache), "manifest.json: expected a file inside the cache directory")


def test_a_generations_manifest_naming_a_shard_outside_is_refused(gen_cache, tmp_path):
    shutil.copy(gen_cache / "shard-00000.npz", tmp_path / "elsewhere.npz")
    edit(gen_cache, lambda m: m["shards"][0].update(file="../elsewhere.npz"), sign=True)
    refused(lambda: offline.read_generations(gen_cache), "expected a file inside the cache directory")


def test_a_signed_generations_manifest_missing_a_key_is_refused(gen_cache):
    edit(gen_cache, lambda m: m.pop("max_new_tokens") and None, sign=True)
    refused(lambda: offline.read_generations(gen_cache), "expected the key 'max_new_tokens'")


def forge_shard(directory, i, data: bytes):
    """Replace shard ``i`` by ``data`` and re-sign everything: only the contents checks stand."""
    (directory / f"shard-{i:05d}.npz").write_bytes(data)
    edit(directory, lambda m: m["shards"][i].update(sha256=offline._sha(data)), sign=True)


def shard_arrays(directory, i):
    with np.load(directory / f"shard-{i:05d}.npz") as z:
        return dict(z)


@pytest.mark.parametrize("change,words", [
    (lambda a: a.update(indices=a["indices"] + VOCAB), r"indices: expected token ids in \[0, 11\)"),
    (lambda a: a.update(indices=a["indices"] - VOCAB), r"indices: expected token ids in \[0, 11\)"),
    (lambda a: a["values"].__setitem__((0, 0, 0), np.nan), "values: expected finite log-probabilities"),
    (lambda a: a["values"].__setitem__((0, 0, 0), -np.inf), "values: expected finite log-probabilities"),
    (lambda a: a.update(values=-a["values"]), r"values: expected log-probabilities \(<= 0\)"),
    (lambda a: a.update(values=a["values"].astype(np.float64)), r"values: expected float32\[2, 5, 4\], got float64"),
    (lambda a: a.update(indices=a["indices"][:, :, :3]), r"indices: expected int32\[2, 5, 4\], got int32\[2, 5, 3\]"),
    (lambda a: a.pop("indices"), "expected an .npz shard holding values, indices, got one that does not load"),
])
def test_a_forged_shard_with_impossible_contents_is_refused(cache, change, words):
    arrays = shard_arrays(cache, 1)
    change(arrays)
    forge_shard(cache, 1, offline._shard_bytes(arrays))
    refused(lambda: offline.read_topk_cache(cache), "shard-00001.npz: " + words)


def test_a_forged_shard_that_is_not_an_npz_is_refused(cache):
    forge_shard(cache, 0, b"not a zip file at all")
    refused(lambda: offline.read_topk_cache(cache), "shard-00000.npz: expected an .npz shard")


def test_a_forged_shard_holding_pickled_objects_is_refused(cache):
    arrays = shard_arrays(cache, 0)
    arrays["values"] = np.asarray([object()] * 40, dtype=object).reshape(2, 5, 4)
    forge_shard(cache, 0, offline._shard_bytes(arrays))
    refused(lambda: offline.read_topk_cache(cache), "shard-00000.npz: expected an .npz shard")


def test_a_forged_generations_shard_of_another_shape_is_refused(gen_cache):
    arrays = shard_arrays(gen_cache, 0)
    arrays["mask"] = arrays["mask"].astype(np.int32)
    forge_shard(gen_cache, 0, offline._shard_bytes(arrays))
    refused(lambda: offline.read_generations(gen_cache), r"mask: expected bool\[2, 4\], got int32")


# ----------------------------------------------------------------------------- 3. a cache of nothing

@pytest.mark.parametrize("shape", [(0, LENGTH), (3, 0)])
def test_a_zero_row_topk_cache_is_never_written(built, tmp_path, shape):
    _, teacher, variables, _ = built
    refused(lambda: offline.write_topk_cache(tmp_path / "c", teacher, variables, np.zeros(shape, np.int32), K),
            re.escape(f"tokens: expected at least one row of at least one token, got shape {list(shape)}"))
    assert not (tmp_path / "c").exists()


def test_a_zero_row_generations_cache_is_never_written(built, tmp_path):
    _, teacher, variables, _ = built
    refused(lambda: offline.write_generations(tmp_path / "g", teacher, variables, np.zeros((0, 2), np.int32), 2),
            "prompts: expected at least one row")
    assert not (tmp_path / "g").exists()


def test_a_zero_row_cache_on_disk_is_refused(cache):
    edit(cache, lambda m: m.update(rows=0, shards=[]), sign=True)
    refused(lambda: offline.read_topk_cache(cache), "rows: expected an int >= 1, got 0")


# ----------------------------------------------------------------------------- 4. write_topk_cache checks its inputs

class Lookup(nn.Module):
    """A teacher whose logits are a row of a table per token: a poisoned row poisons
    exactly the windows holding that token."""

    @nn.compact
    def __call__(self, x):
        return nn.Embed(VOCAB, VOCAB)(x)


def lookup_teacher(row=None, value=None):
    teacher = Lookup()
    variables = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH), jnp.int32))
    if row is not None:
        table = variables["params"]["Embed_0"]["embedding"]
        variables = {"params": {"Embed_0": {"embedding": table.at[row].set(value)}}}
    return teacher, variables


TOKENS = np.asarray(np.random.default_rng(1).integers(0, 3, (4, LENGTH)), np.int32)  # ids 0..2 only


@pytest.mark.parametrize("tokens,words", [
    (np.where(TOKENS == 0, VOCAB, TOKENS), r"tokens: expected ids in \[0, 11\) \(the teacher's vocabulary\), got ids "
                                           r"in \[1, 11\]"),
    (TOKENS - 1, r"tokens: expected ids in \[0, 11\) \(the teacher's vocabulary\), got ids in \[-1, 1\]"),
    (TOKENS.astype(np.float32), r"tokens: expected integer \[rows, length\], got float32"),
    (TOKENS.astype(bool), r"tokens: expected integer \[rows, length\], got bool"),
    (TOKENS[0], r"tokens: expected integer \[rows, length\], got int32\[5\]"),
    (TOKENS[None], r"tokens: expected integer \[rows, length\], got int32\[1, 4, 5\]"),
])
def test_write_topk_cache_refuses_bad_tokens_before_writing(tmp_path, tokens, words):
    teacher, variables = lookup_teacher()
    refused(lambda: offline.write_topk_cache(tmp_path / "c", teacher, variables, tokens, K), words)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kwargs,words", [
    ({"k": 0}, "k: expected an int >= 1, got 0"),
    ({"k": VOCAB + 1}, r"k: expected at most the teacher's vocabulary \(11\), got 12"),
    ({"batch_size": 0}, "batch_size: expected an int >= 1, got 0"),
    ({"shard_rows": 0}, "shard_rows: expected an int >= 1, got 0"),
    ({"values_dtype": np.int8}, "values_dtype: expected float32 or float16"),
    ({"metadata": {"when": object()}}, "metadata: expected JSON values"),
    ({"metadata": ["a"]}, "metadata: expected a dict, got list"),
])
def test_write_topk_cache_refuses_bad_arguments_before_writing(tmp_path, kwargs, words):
    teacher, variables = lookup_teacher()
    kwargs = {"k": K} | kwargs
    with pytest.raises((InputError, InputTypeError), match=words):
        offline.write_topk_cache(tmp_path / "c", teacher, variables, TOKENS, **kwargs)
    assert not (tmp_path / "c").exists()


def test_write_topk_cache_refuses_a_directory_that_is_a_file(tmp_path):
    teacher, variables = lookup_teacher()
    (tmp_path / "c").write_text("mine")
    refused(lambda: offline.write_topk_cache(tmp_path / "c", teacher, variables, TOKENS, K),
            "directory: expected a folder for the cache, got the existing file")
    assert (tmp_path / "c").read_text() == "mine"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_cache_of_non_finite_teacher_logits_is_never_written(tmp_path, value):
    teacher, variables = lookup_teacher(row=0, value=value)
    refused(lambda: offline.write_topk_cache(tmp_path / "c", teacher, variables, TOKENS, K, shard_rows=2),
            r"teacher: expected finite logits, got NaN or infinite ones on token rows \[0, 2\)")
    assert not (tmp_path / "c").exists()


def test_rows_after_non_finite_teacher_logits_are_not_written(tmp_path):
    """Rows 0-1 hold ids 1..2 only, rows 2-3 an id 0 whose logits are NaN: the first shard
    is written, the second never, and the cache stays unfinished (refused on read)."""
    tokens = np.concatenate([np.ones((2, LENGTH), np.int32), np.zeros((2, LENGTH), np.int32)])
    teacher, variables = lookup_teacher(row=0, value=np.nan)
    refused(lambda: offline.write_topk_cache(tmp_path / "c", teacher, variables, tokens, K, shard_rows=2),
            r"on token rows \[2, 4\)")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "shard-00000.npz"]
    refused(lambda: offline.read_topk_cache(tmp_path / "c"), "unfinished")


def test_float16_values_that_underflow_are_never_written(tmp_path):
    teacher, variables = lookup_teacher()
    table = variables["params"]["Embed_0"]["embedding"]
    variables = {"params": {"Embed_0": {"embedding": table.at[:, 0].set(1e6)}}}  # log-probs of -1e6 elsewhere
    refused(lambda: offline.write_topk_cache(tmp_path / "c", teacher, variables, TOKENS, VOCAB,
                                             values_dtype=np.float16), "values_dtype: .* got float16")
    assert not (tmp_path / "c").exists()
    offline.write_topk_cache(tmp_path / "c", teacher, variables, TOKENS, VOCAB)  # float32 holds them


@pytest.mark.parametrize("kwargs,words", [
    ({"prompt_mask": np.ones((4, 3), bool)}, r"prompt_mask: expected bool \[4, 2\]"),
    ({"prompts": np.full((4, 2), VOCAB)}, r"prompts: expected ids in \[0, 11\)"),
    ({"rng": 3}, "rng: expected None .* or a jax.random key, got int"),
    ({"temperature": float("inf")}, "temperature: expected a finite number >= 0, got inf"),
    ({"temperature": "hot"}, "temperature: expected a number >= 0"),
    ({"top_k": 2.5}, "top_k: expected None or an int, got 2.5"),
    ({"metadata": {"x": {1, 2}}}, "metadata: expected JSON values"),
])
def test_write_generations_refuses_bad_arguments_before_writing(built, tmp_path, kwargs, words):
    _, teacher, variables, tokens = built
    kwargs = {"prompts": tokens[:4, :2]} | kwargs
    with pytest.raises((InputError, InputTypeError), match=words):
        offline.write_generations(tmp_path / "g", teacher, variables, max_new_tokens=2, batch_size=2, shard_rows=2,
                                  **kwargs)
    assert not (tmp_path / "g").exists()


def test_write_generations_stores_numpy_int_options_as_json(built, tmp_path):
    _, teacher, variables, tokens = built
    m = offline.write_generations(tmp_path / "g", teacher, variables, tokens[:2, :2], 2, eos_id=np.int32(3),
                                  batch_size=2, shard_rows=2)
    assert m["sampling"]["eos_id"] == 3 and offline.read_generations(tmp_path / "g")[2] == m


# ----------------------------------------------------------------------------- 6. the tokenizer, by content

@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """Two byte-level BPE tokenizers of the same size trained on different text."""
    pytest.importorskip("tokenizers")
    from kdjax import tokenizer as tk

    root = tmp_path_factory.mktemp("tok")
    a = tk.train_bpe(["the cat sat on the mat and the dog ran far away, " * 40], 264, root / "a.json")
    b = tk.train_bpe(["print('hello world'); import sys; x = 1 + 2 " * 40], 264, root / "b.json")
    assert a.get_vocab_size() == b.get_vocab_size()
    return root, a, b


def test_a_cache_of_the_same_tokenizer_is_accepted_however_its_file_is_formatted(tokenizers_pair):
    root, a, _ = tokenizers_pair
    manifest = {"metadata": {"tokenizer_sha256": offline._sha(a.to_str().encode())}}
    offline.check_cache_tokenizer(manifest, a)
    offline.check_cache_tokenizer(manifest, root / "a.json")
    (root / "a-pretty.json").write_text(json.dumps(json.loads((root / "a.json").read_text()), indent=7))
    offline.check_cache_tokenizer(manifest, root / "a-pretty.json")


def test_a_cache_of_another_tokenizer_of_the_same_size_is_refused(tokenizers_pair):
    _, a, b = tokenizers_pair
    want, got = offline._sha(a.to_str().encode()), offline._sha(b.to_str().encode())
    line = refused(lambda: offline.check_cache_tokenizer({"metadata": {"tokenizer_sha256": want}}, b),
                   "tokenizer: expected the cache's tokenizer")
    assert want in line and got in line


def test_a_cache_that_records_no_tokenizer_is_refused(tokenizers_pair):
    refused(lambda: offline.check_cache_tokenizer({"metadata": {}}, tokenizers_pair[1]),
            "expected a cache that records its tokenizer")


def test_check_cache_tokenizer_refuses_what_is_not_a_manifest_or_tokenizer(tokenizers_pair):
    with pytest.raises(InputTypeError, match="manifest: expected a cache's manifest"):
        offline.check_cache_tokenizer([], tokenizers_pair[1])
    with pytest.raises(InputTypeError, match="tokenizer: expected a tokenizers.Tokenizer"):
        offline.check_cache_tokenizer({"metadata": {"tokenizer_sha256": "ab" * 32}}, 300)


def test_the_tokenizer_hash_is_covered_by_the_cache_checksum(cache, tokenizers_pair):
    """A cache rebuilt for tokenizer b by editing its hash is refused before any compare."""
    _, _, b = tokenizers_pair
    edit(cache, lambda m: m["metadata"].update(tokenizer_sha256=offline._sha(b.to_str().encode())))
    refused(lambda: offline.read_topk_cache(cache), "its checksum does not match")
