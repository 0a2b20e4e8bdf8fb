"""A teacher of another tokenizer cached for ULD (kdjax.offline.write_uld_cache /
read_uld_cache, kdjax.crosstok.teacher_sorted_groups / uld_loss_cached): the cached loss
equals the online one (float64 to rounding, float32 through the cache), top-k truncation
is what it says, a student trains from the cache alone, and every wrong input or damaged
file is refused in one line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import crosstok, offline
from kdjax.crosstok.align import ALIGNMENT
from kdjax.errors import InputError, InputTypeError
from kdjax.models import Llama

from test_crosstok_text import paired, tokenizers  # noqa: F401  (module fixtures)

ROWS = np.arange(6)


def _llama(v):
    return Llama(vocab_size=v, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                 max_position_embeddings=64)


@pytest.fixture(scope="module")
def models(paired):  # noqa: F811
    student, teacher = _llama(paired.student.num_classes), _llama(paired.teacher.num_classes)
    t_vars = teacher.init(jax.random.PRNGKey(1), jnp.asarray(paired.extra["teacher_x"][:1]))
    t_vars = jax.tree_util.tree_map(lambda a: 4 * a, t_vars)  # sharper than a fresh init
    s_vars = student.init(jax.random.PRNGKey(0), jnp.asarray(paired.student.x_train[:1]))
    return student, s_vars, teacher, t_vars


def _batch(paired, rows=ROWS):  # noqa: F811
    return {"x": paired.student.x_train[rows], "y": paired.student.y_train[rows],
            **{k: v[rows] for k, v in paired.extra.items()}}


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
def test_cached_loss_equals_the_online_loss_in_float64(paired, merge):  # noqa: F811
    b = _batch(paired)
    al = {k: b[k] for k in ALIGNMENT}
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        s = jnp.asarray(3 * rng.standard_normal((*b["x"].shape, paired.student.num_classes)))
        t = jnp.asarray(3 * rng.standard_normal((*b["teacher_x"].shape, paired.teacher.num_classes)))
        assert s.dtype == jnp.float64
        kw = {"student_tokens": b["y"], "alignment": al, "merge": merge}
        want = crosstok.uld_loss_aligned(s, t, teacher_tokens=b["teacher_y"], student_temperature=2.0,
                                         teacher_temperature=1.5, **kw)
        cache = crosstok.teacher_sorted_groups(t, b["teacher_y"], al, temperature=1.5, merge=merge)
        got = crosstok.uld_loss_cached(s, cache, student_temperature=2.0, **kw)
        assert abs(float(got) - float(want)) <= 1e-13 * abs(float(want)) and float(want) > 0.1
        g_want = jax.grad(lambda s: crosstok.uld_loss_aligned(s, t, teacher_tokens=b["teacher_y"], **kw))(s)
        g_got = jax.grad(lambda s: crosstok.uld_loss_cached(
            s, crosstok.teacher_sorted_groups(t, b["teacher_y"], al, merge=merge), **kw))(s)
        np.testing.assert_allclose(g_got, g_want, rtol=0, atol=1e-15)
        # top k: the teacher's mass past its k largest counts as 0, exactly that
        top = crosstok.teacher_sorted_groups(t, b["teacher_y"], al, temperature=1.5, merge=merge, k=8)
        np.testing.assert_array_equal(top, cache[..., :8])
        padded = jnp.pad(top, [(0, 0), (0, 0), (0, cache.shape[-1] - 8)])
        np.testing.assert_allclose(crosstok.uld_loss_cached(s, top, student_temperature=2.0, **kw),
                                   crosstok.uld_loss_cached(s, padded, student_temperature=2.0, **kw), rtol=1e-14)
        assert float(crosstok.uld_loss_cached(s, top, student_temperature=2.0, **kw)) > float(got)


def test_the_cache_holds_teacher_sorted_groups_and_trains_a_student(paired, models, tmp_path):  # noqa: F811
    student, s_vars, teacher, t_vars = models
    rows = len(paired.extra["teacher_x"])
    m = offline.write_uld_cache(tmp_path / "c", teacher, t_vars, paired.extra, batch_size=5, shard_rows=7)
    assert m["k"] == paired.teacher.num_classes and m["rows"] == rows and len(m["shards"]) == -(-rows // 7)
    values, mass, m2 = offline.read_uld_cache(tmp_path / "c", extra=paired.extra, teacher=teacher,
                                               variables=t_vars, temperature=1.0, merge="observed")
    b = _batch(paired)
    al = {k: b[k] for k in ALIGNMENT}
    t = teacher.apply(t_vars, jnp.asarray(b["teacher_x"]))
    want = crosstok.teacher_sorted_groups(t, b["teacher_y"], al)
    np.testing.assert_allclose(values[ROWS], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mass[ROWS], np.sum(want, -1), rtol=1e-5)
    # the objective from the cache alone equals the online teacher's, through one train step
    fresh = lambda: kdjax.create_train_state(student, jax.random.PRNGKey(0), jnp.asarray(b["x"][:1]))
    online = crosstok.ULD(crossentropy_weight=0.3, distillation_weight=0.7, teacher=teacher)
    _, m_on = kdjax.make_train_step(student, online)(fresh(), b, jax.random.PRNGKey(2), None, t_vars["params"])
    cached = {k: v for k, v in b.items() if k not in ("teacher_x", "teacher_y")} | {"teacher_sorted": values[ROWS]}
    _, m_off = kdjax.make_train_step(student, crosstok.ULD(crossentropy_weight=0.3, distillation_weight=0.7))(
        fresh(), cached, jax.random.PRNGKey(2), None)
    np.testing.assert_allclose(float(m_off["loss"]), float(m_on["loss"]), rtol=1e-6)
    # a resumed build is the same bytes; a top-16 float16 cache is smaller and refused with other windows
    again = offline.write_uld_cache(tmp_path / "c", teacher, t_vars, paired.extra, batch_size=5, shard_rows=7)
    assert again == m2
    small = offline.write_uld_cache(tmp_path / "s", teacher, t_vars, paired.extra, 16, values_dtype="float16")
    assert small["bytes_per_group"] == 16 * 2 + 4
    other = dict(paired.extra, group_valid=~paired.extra["group_valid"])
    with pytest.raises(InputError, match="built for other windows"):
        offline.read_uld_cache(tmp_path / "s", extra=other)
    with pytest.raises(InputError, match="written at merge 'observed', expected 'bayesian'"):
        offline.read_uld_cache(tmp_path / "s", merge="bayesian")
    with pytest.raises(InputError, match="written at temperature 1.0, expected 2"):
        offline.read_uld_cache(tmp_path / "s", temperature=2)
    with pytest.raises(InputError, match="holds a cache built with another k"):
        offline.write_uld_cache(tmp_path / "s", teacher, t_vars, paired.extra, 8, values_dtype="float16")


def test_a_damaged_uld_cache_is_refused(paired, models, tmp_path):  # noqa: F811
    _, _, teacher, t_vars = models
    offline.write_uld_cache(tmp_path / "c", teacher, t_vars, paired.extra, 4, shard_rows=1000)
    shard = tmp_path / "c" / "shard-00000.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch"):
        offline.read_uld_cache(tmp_path / "c")
    # a manifest re-signed by hand over unsorted values: the values are checked too
    from kdjax.offline import store

    offline.write_uld_cache(tmp_path / "d", teacher, t_vars, paired.extra, 4, shard_rows=1000)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    with np.load(tmp_path / "d" / "shard-00000.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["values"] = arrays["values"][..., ::-1].copy()
    raw = store._shard_bytes(arrays)
    (tmp_path / "d" / "shard-00000.npz").write_bytes(raw)
    m["shards"][0]["sha256"] = store._sha(raw)
    store._write_manifest(tmp_path / "d", m)
    with pytest.raises(InputError, match="descending order"):
        offline.read_uld_cache(tmp_path / "d")
    with pytest.raises(InputError, match="expected a kdjax-topk/2 cache, got format 'kdjax-uld/1'"):
        offline.read_topk_cache(tmp_path / "d")


def test_wrong_inputs_are_refused(paired, models, tmp_path):  # noqa: F811
    student, s_vars, teacher, t_vars = models
    b = _batch(paired)
    al = {k: b[k] for k in ALIGNMENT}
    t = teacher.apply(t_vars, jnp.asarray(b["teacher_x"]))
    s = student.apply(s_vars, jnp.asarray(b["x"]))
    ts = crosstok.teacher_sorted_groups(t, b["teacher_y"], al, k=4)
    for k in (0, t.shape[-1] + 1, 2.5, True):
        with pytest.raises(InputError, match="k: expected an int in"):
            crosstok.teacher_sorted_groups(t, b["teacher_y"], al, k=k)
    with pytest.raises(InputError, match="merge: expected one of"):
        crosstok.teacher_sorted_groups(t, b["teacher_y"], al, merge="mean")
    with pytest.raises(InputError, match="teacher_sorted: expected \\[batch, groups, k\\]"):
        crosstok.uld_loss_cached(s, ts[:, :-1], student_tokens=b["y"], alignment=al)
    with pytest.raises(InputTypeError, match="teacher_sorted: expected floating"):
        crosstok.uld_loss_cached(s, ts.astype(jnp.int32), student_tokens=b["y"], alignment=al)
    with pytest.raises(InputError, match="alignment: expected alignment_indices"):
        crosstok.uld_loss_cached(s, ts, student_tokens=b["y"], alignment={})
    hybrid = crosstok.Hybrid((0,), (0,))
    with pytest.raises(InputError, match="hybrid=None"):
        crosstok.ULD(hybrid=hybrid).check({"teacher_sorted": ts, **b}, hyper=None, teacher=None)
    with pytest.raises(InputError, match="extra: expected kdjax.crosstok.text.paired_text"):
        offline.write_uld_cache(tmp_path / "x", teacher, t_vars, {"teacher_x": b["teacher_x"]})
    with pytest.raises(InputError, match="k: expected at most the teacher's vocabulary"):
        offline.write_uld_cache(tmp_path / "x", teacher, t_vars, paired.extra, 10**6)
    with pytest.raises(InputError, match="temperature"):
        offline.write_uld_cache(tmp_path / "x", teacher, t_vars, paired.extra, temperature=0)
    bad = dict(paired.extra, teacher_index=paired.extra["teacher_index"] - 5)  # caught before the jitted pass
    with pytest.raises(InputError, match="expected teacher_index in"):
        offline.write_uld_cache(tmp_path / "x", teacher, t_vars, bad)
    assert not (tmp_path / "x").exists()  # nothing written for a refused call
    with pytest.raises(InputError, match="probabilities in \\[0, 1\\]"):
        crosstok.uld_loss_cached(s, -ts, student_tokens=b["y"], alignment=al)


# --------------------------------------------------------------------------- the CLI

from test_cli import kdjax_here  # noqa: E402
from test_cli_trust import refused  # noqa: E402
from test_crosstok_text import LM, TEXT_BYTES, other_teacher  # noqa: E402,F401

CACHE = ["--text-bytes", str(TEXT_BYTES), "--context", "16", "--vocab-size", "400", "--quiet"]
FROM_CACHE = [a for i, a in enumerate(LM) if "--vocab-size" not in LM[max(i - 1, 0):i + 1]]  # the cache's tokenizer


@pytest.fixture(scope="module")
def uld_cache(other_teacher, tmp_path_factory):  # noqa: F811
    """A ULD cache of the teacher's whole 300-token vocabulary (exact)."""
    out = tmp_path_factory.mktemp("uldcache") / "cache"
    p = subprocess.run([sys.executable, "-m", "kdjax", "teacher-logits", "--teacher", str(other_teacher), "--method",
                        "uld", "--k", "300", *CACHE, "--out", str(out), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["k"] == 300 and r["coverage"] == pytest.approx(1.0, abs=1e-5)
    return out


def test_students_from_a_whole_vocabulary_cache_equal_the_online_teacher_s(capsys, other_teacher, uld_cache):  # noqa: F811
    run = lambda lm, *how: kdjax_here(capsys, "distill", *lm, "--steps", "4", "--method", "uld", "--alpha", "0.6",
                                      *how, "--json")
    online, cached = run(LM, "--teacher", other_teacher), run(FROM_CACHE, "--teacher-logits", uld_cache)
    for p in (online, cached):
        assert p.returncode == 0, p.stderr[-2000:]
    a, b = json.loads(online.stdout), json.loads(cached.stdout)
    np.testing.assert_allclose(b["losses"]["distilled"], a["losses"]["distilled"], rtol=2e-5)
    np.testing.assert_array_equal(b["losses"]["standard"], a["losses"]["standard"])
    np.testing.assert_allclose(b["bits_per_byte"]["teacher"], a["bits_per_byte"]["teacher"], rtol=1e-6)
    assert b["teacher_logits"]["method"] == "uld" and b["teacher_logits"]["k"] == 300


def test_uld_cache_refusals(capsys, other_teacher, uld_cache, tmp_path):  # noqa: F811
    dist = lambda *more: kdjax_here(capsys, "distill", *FROM_CACHE, "--steps", "2", "--teacher-logits", uld_cache,
                                    *more)
    refused(dist("--method", "uld", "--temperature", "2"), "--temperature 2", "T = 1")
    refused(dist("--method", "uld", "--uld-merge", "bayesian"), "--uld-merge bayesian", "merged observed")
    refused(dist("--method", "uld", "--uld-hybrid"), "--uld-hybrid", "not used with --teacher-logits")
    refused(dist("--method", "uld", "--topk-loss", "jsd"), "--topk-loss", "not used with --teacher-logits")
    refused(dist(), "a ULD cache", "--method uld")
    more = list(FROM_CACHE)
    more[more.index("--context") + 1] = "24"
    refused(kdjax_here(capsys, "distill", *more, "--steps", "2", "--teacher-logits", uld_cache, "--method", "uld"),
            "--context 24", "windows of 16 tokens")
    tl = lambda *more: kdjax_here(capsys, "teacher-logits", "--teacher", other_teacher, *CACHE, "--out",
                                  tmp_path / "c", *more)
    refused(tl("--temperature", "2"), "--temperature", "only with --method uld")
    refused(tl("--uld-merge", "bayesian"), "--uld-merge", "only with --method uld")
    refused(tl("--method", "uld", "--k", "301"), "--k", "at most the teacher's vocabulary (300)")
    refused(tl("--method", "uld", "--temperature", "0"), "--temperature", "expected")
    assert not (tmp_path / "c").exists()
    # the cache's temperature and merging are the run's when no flag says otherwise
    assert tl("--method", "uld", "--k", "4", "--temperature", "2", "--uld-merge", "bayesian").returncode == 0
    p = kdjax_here(capsys, "distill", *FROM_CACHE, "--steps", "2", "--teacher-logits", tmp_path / "c", "--method",
                   "uld", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert "bayesian merging" in r["objective"] and "T student 2" in r["objective"], r["objective"]
    assert r["teacher_logits"]["k"] == 4 and r["teacher_logits"]["values_dtype"] == "float32"
    # a top-k cache is not a ULD cache
    topk = tmp_path / "topk"
    assert kdjax_here(capsys, "teacher-logits", "--teacher", other_teacher, "--text-bytes", str(TEXT_BYTES),
                      "--context", "16", "--quiet", "--out", topk).returncode == 0
    refused(kdjax_here(capsys, "distill", *FROM_CACHE, "--steps", "2", "--teacher-logits", topk, "--method", "uld"),
            "--teacher-logits", "kdjax-uld/1")
