"""kdjax.crosstok.text.paired_text (one corpus in two tokenizations, aligned by offsets), the
ULD objective on it, and ``kdjax distill --method uld`` end to end: refusals, the standard
student's equality at alpha 0, and a run killed with SIGKILL that resumes bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import crosstok, data
from kdjax import tokenizer as tk
from kdjax.crosstok.text import paired_text
from kdjax.errors import InputError, InputTypeError

from test_cli import kdjax_here
from test_cli_trust import refused

TEXT_BYTES = 20000


def _docs(n=TEXT_BYTES):
    _, train, _, _ = data.text_documents(None, utf8=True)
    return [data.decode_text(d) for d in data._first(train, n)]


@pytest.fixture(scope="module")
def tokenizers():
    docs = _docs()
    return tk.train_bpe(docs, 400), tk.train_bpe(docs[::-1], 300)  # other merges, other sizes


@pytest.fixture(scope="module")
def paired(tokenizers):
    s, t = tokenizers
    return paired_text(16, student_tokenizer=s, teacher_tokenizer=t, max_bytes=TEXT_BYTES)


def test_each_side_is_the_corpus_as_kdjax_data_text_tokenises_it(paired, tokenizers):
    s, t = tokenizers
    for ds, tok in ((paired.student, s), (paired.teacher, t)):
        ref = data.text(16, max_bytes=TEXT_BYTES, tokenizer=tok)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(ds, name), getattr(ref, name))
        assert ds.num_classes == tok.get_vocab_size()


def _byte_decoder():
    """GPT-2's byte-level alphabet (what a byte-level BPE's token strings spell), inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_bytes(tok, ids, decoder=_byte_decoder()):
    """The UTF-8 bytes of byte-level tokens, token by token (a token may end inside a character)."""
    eos = tk.eos_id(tok)
    return b"".join(b"<EOS>" if i == eos else bytes(decoder[c] for c in tok.id_to_token(int(i))) for i in ids)


def _check_groups(paired, s, t):
    """Every valid group's two sides are the same bytes; the teacher's window is inside the student's."""
    e, ds = paired.extra, paired.student
    valid_groups = 0
    for w in range(len(ds.x_train)):
        window = _token_bytes(s, list(ds.x_train[w]) + [int(ds.y_train[w, -1])])
        used = e["teacher_index"][w][e["teacher_member"][w]]
        m = int(used.max()) + 1 if used.size else 1
        assert _token_bytes(t, list(e["teacher_x"][w, :m]) + [int(e["teacher_y"][w, m - 1])]) in window
        np.testing.assert_array_equal(e["teacher_x"][w, 1:m], e["teacher_y"][w, :m - 1])  # next tokens
        for g in np.flatnonzero(e["group_valid"][w]):
            ys = ds.y_train[w, e["student_index"][w, g][e["student_member"][w, g]]]
            yt = e["teacher_y"][w, e["teacher_index"][w, g][e["teacher_member"][w, g]]]
            assert _token_bytes(s, ys) == _token_bytes(t, yt), (w, g)
            valid_groups += 1
    return valid_groups / e["group_valid"].size


def test_groups_compare_the_same_bytes(paired, tokenizers):
    assert _check_groups(paired, *tokenizers) > 0.9  # most group slots hold a checked group


def _bpe_across_words(texts, vocab_size):
    """A byte-level BPE whose merges cross spaces (no pre-split): its tokens straddle the
    student's, so a window often ends inside one of them (a leftover group to drop)."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[tk.EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_groups_compare_the_same_bytes_in_text_that_splits_characters(tmp_path):
    """CJK, accents and emoji: byte-level tokens end inside characters; groups still pair equal bytes."""
    text = "".join(f"def f{i}(x):  # héllo wörld 日本語のテキスト {i} 🙂 naïve café\n    return x * {i}\n"
                   for i in range(300))
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    s, t = tk.train_bpe([text[:5000]], 300), _bpe_across_words([text[5000:9000]], 290)
    paired = paired_text(16, tmp_path / "c.txt", student_tokenizer=s, teacher_tokenizer=t)
    assert _check_groups(paired, s, t) > 0.3
    raw = text.encode("utf-8")
    val = raw[len(raw) - len(raw) // 10:]
    for side, ds in (("student", paired.student), ("teacher", paired.teacher)):
        ratio = ds.y_test.size / len(val)
        assert abs(paired.tokens_per_byte[side] - ratio) / ratio < 16 / ds.y_test.size + 0.02, side


def test_tokens_per_byte_is_targets_over_their_bytes(paired, tokenizers):
    _, _, val, _ = data.text_documents(None, utf8=True)
    val = data._first(val, TEXT_BYTES // 10)
    total_bytes = sum(len(bytes(d)) for d in val)
    for side, ds in (("student", paired.student), ("teacher", paired.teacher)):
        ratio = ds.y_test.size / total_bytes  # the windows drop less than one window at the end
        assert abs(paired.tokens_per_byte[side] - ratio) / ratio < 16 / ds.y_test.size + 0.02, side
    # a finer tokenizer (fewer merges) has more tokens per byte
    assert paired.tokens_per_byte["teacher"] > paired.tokens_per_byte["student"]


def test_paired_text_refusals(tokenizers):
    s, t = tokenizers
    with pytest.raises(InputError, match="a smaller vocabulary"):
        paired_text(16, student_tokenizer=s, teacher_tokenizer=t, max_bytes=TEXT_BYTES, max_teacher_length=17)
    with pytest.raises(InputError, match="teacher evaluates on windows of 16"):
        paired_text(16, student_tokenizer=s, teacher_tokenizer=t, max_bytes=TEXT_BYTES, max_teacher_length=8)
    with pytest.raises(InputTypeError, match="teacher_tokenizer: expected a tokenizers.Tokenizer"):
        paired_text(16, student_tokenizer=s, teacher_tokenizer=None)
    with pytest.raises(InputTypeError, match="max_bytes: expected an int"):
        paired_text(16, student_tokenizer=s, teacher_tokenizer=t, max_bytes=1.5)
    with pytest.raises(InputError, match="max_bytes: expected an int >= 1"):
        paired_text(16, student_tokenizer=s, teacher_tokenizer=t, max_bytes=-5)


def test_uld_objective_on_paired_windows_equals_uld_loss_aligned(paired):
    from kdjax.models import Llama

    make = lambda v: Llama(vocab_size=v, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, max_position_embeddings=64)
    student, teacher = make(paired.student.num_classes), make(paired.teacher.num_classes)
    rows = np.arange(4)
    batch = {"x": paired.student.x_train[rows], "y": paired.student.y_train[rows],
             **{k: v[rows] for k, v in paired.extra.items()}}
    t_vars = teacher.init(jax.random.PRNGKey(1), jnp.asarray(batch["teacher_x"]))
    t_vars = jax.tree_util.tree_map(lambda a: 4 * a, t_vars)  # a sharper teacher than a fresh init
    fresh = lambda: kdjax.create_train_state(student, jax.random.PRNGKey(0), jnp.asarray(batch["x"][:1]))
    obj = crosstok.ULD(crossentropy_weight=0.25, distillation_weight=0.5, teacher=teacher)
    _, m = kdjax.make_train_step(student, obj)(fresh(), batch, jax.random.PRNGKey(2), None, t_vars["params"])
    s_logits = student.apply({"params": fresh().params}, jnp.asarray(batch["x"]))
    t_logits = teacher.apply(t_vars, jnp.asarray(batch["teacher_x"]))
    want = crosstok.uld_loss_aligned(s_logits, t_logits, student_tokens=batch["y"], teacher_tokens=batch["teacher_y"],
                                     alignment={k: batch[k] for k in crosstok.align.ALIGNMENT})
    ce = kdjax.losses.masked_mean(kdjax.losses.hard_ce(s_logits, batch["y"]), np.ones(batch["y"].shape, bool))
    np.testing.assert_allclose(float(m["loss"]), 0.5 * float(want) + 0.25 * float(ce), rtol=1e-5)
    assert float(want) > 0.1  # the two random models disagree: the term is not vacuous
    bayes = crosstok.ULD(distillation_weight=1.0, merge="bayesian", teacher=teacher)
    _, mb = kdjax.make_train_step(student, bayes)(fresh(), batch, jax.random.PRNGKey(2), None, t_vars["params"])
    want_b = crosstok.uld_loss_aligned(s_logits, t_logits, student_tokens=batch["y"],
                                       teacher_tokens=batch["teacher_y"], merge="bayesian",
                                       alignment={k: batch[k] for k in crosstok.align.ALIGNMENT})
    np.testing.assert_allclose(float(mb["loss"]), float(want_b), rtol=2e-6)
    # the windows have multi-token groups, so the merging shows (the gap is 100 float32 roundings)
    assert (batch["teacher_member"].sum(-1) > 1).any() and abs(float(want_b) - float(want)) > 1e-5


# --------------------------------------------------------------------------- the CLI

LM = ["--dataset", "text", "--arch", "llama", "--seeds", "1", "--text-bytes", str(TEXT_BYTES), "--context", "16",
      "--student-dim", "16", "--vocab-size", "400", "--quiet", "--no-plots"]


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A Llama folder with its own 300-token BPE (the student trains a 400-token one)."""
    from kdjax import convert
    from kdjax.models import Llama

    root = tmp_path_factory.mktemp("uld") / "teacher"
    tok = tk.train_bpe(_docs()[::-1], 300)
    teacher = Llama(vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    convert.save_hf(teacher, teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)), root)
    tok.save(str(root / "tokenizer.json"))
    return root


def test_uld_refusals(capsys, other_teacher, tmp_path):
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--method", "uld"), "--method uld", "--teacher DIR")
    refused(kdjax_here(capsys, "distill", "--arch", "transformer", "--dataset", "text", "--method", "uld"),
            "--method uld", "--arch llama")
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--teacher", other_teacher, "--uld-hybrid"),
            "--uld-hybrid", "only used with --method uld")
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--teacher", other_teacher, "--uld-merge",
                       "bayesian"), "--uld-merge", "only used with --method uld")
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--teacher", other_teacher, "--method", "uld",
                       "--save-hf-teacher", tmp_path / "t"), "--save-hf-teacher", "--method uld")
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--teacher", other_teacher, "--method", "uld",
                       "--context", "48"), "--method uld", "max_position_embeddings")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((other_teacher / f).read_bytes())
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--teacher", bare, "--method", "uld"),
            "has no tokenizer.json", "--tokenizer is the student's")
    # without --method uld, the teacher's vocabulary is the student's, and another tokenizer names uld
    other = tmp_path / "other.json"
    tk.train_bpe(_docs(), 400).save(str(other))
    refused(kdjax_here(capsys, "distill", *LM, "--steps", "2", "--teacher", other_teacher, "--tokenizer", other),
            "--tokenizer", "--method uld")


def test_uld_at_alpha_zero_is_the_standard_student(capsys, other_teacher, tmp_path):
    """(1 - alpha) CE + alpha ULD at alpha 0 is cross-entropy: the distilled student ends where
    the standard one does (the same init and minibatches), so the pairing and data are right."""
    p = kdjax_here(capsys, "distill", *LM, "--steps", "3", "--teacher", other_teacher, "--method", "uld",
                   "--alpha", "0", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    np.testing.assert_allclose(r["test_loss"]["distilled"], r["test_loss"]["standard"], rtol=1e-6)
    assert set(r["tokens_per_byte"]) == {"teacher", "standard", "distilled"}
    assert r["bits_per_byte"]["standard"] == pytest.approx(
        np.asarray(r["test_loss"]["standard"]) / np.log(2) * r["tokens_per_byte"]["standard"])


def _run(out, *more):
    return [sys.executable, "-m", "kdjax", "distill", *LM, "--teacher", "{teacher}", "--method", "uld",
            "--uld-hybrid", "--uld-merge", "bayesian", "--steps", "200", "--checkpoint-every", "5", "--batch-size", "8", "--out", str(out), *more]


def test_uld_killed_with_sigkill_resumes_bit_for_bit(other_teacher, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = lambda out, *more: [a.format(teacher=other_teacher) for a in _run(out, *more)]
    p = subprocess.run(cmd(whole), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen(cmd(cut), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    distilled = cut / "checkpoints" / "distilled.ckpt"
    while not distilled.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-phase"
    assert not (cut / "results.json").exists()
    p = subprocess.run(cmd(cut, "--resume"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert a["losses"] == b["losses"] and a["test_loss"] == b["test_loss"]
    assert a["bits_per_byte"] == b["bits_per_byte"]
    assert "hybrid ULD" in a["objective"] and "bayesian merging" in a["objective"], a["objective"]
    from kdjax import checkpoint

    for name in ("student_distilled.ckpt", "student_standard.ckpt"):
        x, _ = checkpoint.load(whole / name)
        y, _ = checkpoint.load(cut / name)
        for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            np.testing.assert_array_equal(u, v)


def test_distill_refuses_teacher_data_the_teacher_cannot_read():
    from kdjax import workflows
    from kdjax.data import Dataset
    from kdjax.errors import InputTypeError
    from kdjax.models import Llama

    t = Llama(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
              max_position_embeddings=16)
    z = np.zeros((4, 8), np.int32)
    ds = Dataset("d", z, z, z, z, 400)
    with pytest.raises(InputError, match="teacher's own tokens"):
        workflows.distill(t, t, ds, None, [0], teacher_state=object(), teacher_data=ds)
    with pytest.raises(InputError, match="expected a loaded teacher_state"):
        workflows.distill(t, t, ds, None, [0], teacher_data=ds)
    with pytest.raises(InputTypeError, match="teacher_data: expected a kdjax.data.Dataset"):
        workflows.distill(t, t, ds, None, [0], teacher_state=object(), teacher_data={"x": 1})
    with pytest.raises(InputTypeError, match="extra_data: expected a dict"):
        workflows.distill(t, t, ds, None, [0], teacher_state=object(), extra_data=[1, 2])


def test_a_bpe_that_does_not_split_words_is_another_segmentation():
    """train_bpe(split_words=False): merges cross spaces, so its tokens straddle the default
    BPE's words (kdjax lm-methods' ULD teacher); paired windows still compare the same bytes."""
    docs = _docs()
    s, t = tk.train_bpe(docs, 400), tk.train_bpe(docs, 400, split_words=False)
    text = "def first(x):\n    return x + 1  # the first one\n"
    a, b = s.encode(text), t.encode(text)
    ends_in_space = lambda tok, ids: [tok.decode([i]) for i in ids if tok.decode([i]).strip() and
                                      tok.decode([i]).endswith(" ")]
    assert a.ids != b.ids and ends_in_space(t, b.ids) and not ends_in_space(s, a.ids)  # 'def ' vs 'de', 'f', ' f'...
    assert s.decode(a.ids) == t.decode(b.ids) == text
    paired = paired_text(16, student_tokenizer=s, teacher_tokenizer=t, max_bytes=TEXT_BYTES)
    assert _check_groups(paired, s, t) > 0.3
