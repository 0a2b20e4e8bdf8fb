"""A suite that cannot fail proves nothing: break kdjax's loss on purpose, watch parity fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

import kdjax.losses  # noqa: E402
import kdjax.losses.dense as L  # noqa: E402  (where the losses are defined and call each other)
import kdjax.objectives  # noqa: E402
import kdjax.train  # noqa: E402
from parity.checks import Ctx, run_check  # noqa: E402

original_soft_kl = L.soft_kl
original_distillation_loss = L.distillation_loss


def kl_mean_over_classes(s, t, temperature=1.0):
    """'mean' reduction: also divides by the number of classes."""
    return original_soft_kl(s, t, temperature) / s.shape[-1]


def kl_swapped(s, t, temperature=1.0):
    """KL(student || teacher) instead of KL(teacher || student)."""
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(t) / temperature, -1)
    log_q = jax.nn.log_softmax(s / temperature, -1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)


def loss_without_t2(s, t, y, temperature=3.0, alpha=0.7, *, where=None, divergence="kl", beta=0.5):
    with_t2 = original_distillation_loss(s, t, y, temperature, alpha, where=where, divergence=divergence, beta=beta)
    hard = L.masked_mean(L.hard_ce(s, jnp.where(where, y, 0) if where is not None else y), where)
    return (with_t2 - (1 - alpha) * hard) / temperature**2 + (1 - alpha) * hard


MUTANTS = {
    "drop T^2": ("distillation_loss", loss_without_t2),
    "KL 'mean' not 'batchmean'": ("soft_kl", kl_mean_over_classes),
    "student/teacher swapped in KL": ("soft_kl", kl_swapped),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_parity_catches_mutant(mutant, monkeypatch):
    attr, fn = MUTANTS[mutant]
    for module in (L, kdjax.losses, kdjax.objectives, kdjax.train):  # wherever the name is bound
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, fn)
    for dtype in ("float64", "float32"):
        rows = run_check("loss", Ctx(dtype)) + run_check("grads", Ctx(dtype))
        failed = [r.name for r in rows if not r.passed]
        assert failed, f"parity did not notice the mutant '{mutant}' in {dtype}"
    # the token-level rows and the convention table see it too
    rows = run_check("divergences", Ctx("float64")) + run_check("conventions", Ctx("float64"))
    failed = [r.name for r in rows if not r.passed]
    assert any(name.startswith("convention: torchdistill") for name in failed), failed


def test_unmutated_loss_passes():
    rows = run_check("loss", Ctx("float64")) + run_check("grads", Ctx("float64"))
    assert all(r.passed for r in rows)


# ----------------------------------------------------------------------------- ResNet mutants

import flax.linen as nn  # noqa: E402

from kdjax.models import resnet  # noqa: E402


class FlaxDefaultBatchNorm(nn.BatchNorm):
    """Flax's own BatchNorm with its defaults (momentum 0.99 on the old statistics,
    biased running variance), called like kdjax's: ``bn(x, train)``."""

    def __call__(self, x, train: bool = False):
        return super().__call__(x, use_running_average=not train)


def flax_default_batchnorm(dtype, name):
    return FlaxDefaultBatchNorm(dtype=dtype, param_dtype=dtype, name=name)


RESNET_MUTANTS = {
    "Flax's default BatchNorm (momentum 0.99, biased running var)": ("BatchNorm", flax_default_batchnorm),
    "'SAME' padding (asymmetric at stride 2)": ("_padding", lambda kernel_size: "SAME"),
}


@pytest.mark.parametrize("mutant", list(RESNET_MUTANTS))
def test_resnet_parity_catches_mutant(mutant, monkeypatch):
    attr, fn = RESNET_MUTANTS[mutant]
    monkeypatch.setattr(resnet, attr, fn)
    for dtype in ("float64", "float32"):
        rows = run_check("resnet_forward", Ctx(dtype))
        failed = [r.name for r in rows if not r.passed]
        assert failed, f"resnet parity did not notice the mutant '{mutant}' in {dtype}"
        if attr == "BatchNorm":  # the running statistics rows are the ones that see it
            assert sum("running stats" in name for name in failed) == 3, failed


# ----------------------------------------------------------------------------- feature-loss mutants

from kdjax.features import losses as feats  # noqa: E402

from kdjax.features import connectors as feat_connectors, crd as feat_crd, objectives as feat_objectives  # noqa: E402


def _pool_window_equals_stride(x, shape):  # tunix's VALID window replaced by the stride
    strides = tuple(1 if n == m else n // m for n, m in zip(x.shape, shape))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, strides, strides, "VALID")
    return (summed / float(np.prod(strides)))[tuple(slice(0, m) for m in shape)]


FEATURE_MUTANTS = {  # (module, function to replace, replacement, the rows that must fail)
    "AT/SP: no normalisation": (feats, "_l2_normalize", lambda v, axis=-1, eps=1e-12: v, "attention transfer"),
    "RKD: distances not divided by their mean": (feats, "_pairwise_distances", lambda e, squared, eps: 3.0 * jnp.where(
        jnp.eye(e.shape[0], dtype=bool), 0.0, jnp.sqrt(jnp.maximum(
            jnp.sum(e * e, 1)[:, None] + jnp.sum(e * e, 1)[None, :] - 2 * e @ e.T, eps)))
        * (1.0 + 0.1 * jnp.arange(e.shape[0])[:, None]), "relational"),
    "Keras cosine: no normalisation": (feats, "_keras_normalize", lambda v, eps=1e-7: v, "cosine_similarity"),
    "tunix pooling: window = stride": (feats, "pool_to_shape", _pool_window_equals_stride, "tunix"),
    "CRD: bank rows not renormalised": (feat_crd, "_unit_rows", lambda v: v, "CRD step 1: memory"),
    "FitNet: connector without its ReLU": (feat_objectives, "connector_for", lambda s, t, **kw:
        feat_connectors.connector_for(s, t, **{**kw, "relu": False}), "FitNet 20 sgd steps"),
}


@pytest.mark.parametrize("mutant", list(FEATURE_MUTANTS))
def test_feature_parity_catches_mutant(mutant, monkeypatch):
    module, attr, fn, rows_that_fail = FEATURE_MUTANTS[mutant]
    monkeypatch.setattr(module, attr, fn)
    rows = run_check("features", Ctx("float64"))
    failed = [r.name for r in rows if not r.passed]
    assert any(rows_that_fail in name for name in failed), failed


def test_at_channel_mean_versus_sum_is_invisible_after_normalisation():
    """Why "channel sum instead of mean" is not a mutant above: AT L2-normalises the map, so
    the constant factor (sum = C x mean) cancels exactly; this documents it instead of
    pretending a check could catch it."""
    import numpy as np

    f = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 8)))
    a = feats._attention_map(f, 2)
    b = feats._l2_normalize(jnp.sum(f ** 2, axis=-1).reshape(2, -1))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# ----------------------------------------------------------------------------- Llama-family mutants

from kdjax.models import llama as llama_model  # noqa: E402

LLAMA_MUTANTS = {  # (function to replace, replacement, the rows that must fail)
    "rotary halves swapped": ("_rotate_half", lambda x: jnp.concatenate(
        [x[..., x.shape[-1] // 2:], -x[..., :x.shape[-1] // 2]], axis=-1), "Llama (llama3 rope): logits"),
    "GQA heads repeated in the wrong order": ("_repeat_kv", lambda x, g: jnp.tile(x, (1, g, 1, 1)),
                                              "Qwen3 (q/k norm, head_dim 16): logits"),
}


@pytest.mark.parametrize("mutant", list(LLAMA_MUTANTS))
def test_llama_parity_catches_mutant(mutant, monkeypatch):
    pytest.importorskip("transformers")
    attr, fn, rows_that_fail = LLAMA_MUTANTS[mutant]
    monkeypatch.setattr(llama_model, attr, fn)
    rows = run_check("llama_hf", Ctx("float64"))
    failed = [r.name for r in rows if not r.passed]
    assert any(rows_that_fail in name for name in failed), failed


def test_llama_parity_sees_the_sliding_window(monkeypatch):
    """Mistral's window (3 of 10 tokens) changes the logits: ignoring it fails the row."""
    pytest.importorskip("transformers")
    real = llama_model.Llama.from_hf_config.__func__
    monkeypatch.setattr(llama_model.Llama, "from_hf_config",
                        classmethod(lambda cls, c, **kw: real(cls, c, **kw).clone(sliding_windows=None)))
    failed = [r.name for r in run_check("llama_hf", Ctx("float64")) if not r.passed]
    assert any("Mistral (sliding window 3): logits" in name for name in failed), failed


def test_topk_parity_catches_a_dropped_missing_mass(monkeypatch):
    """The symmetric_uniform rows see the leftover-mass term vanish."""
    pytest.importorskip("torch")
    from kdjax.losses import sparse

    monkeypatch.setattr(sparse, "_log_missing", lambda logprobs, eps: jnp.full(logprobs.shape[:-1], -1e30))
    failed = [r.name for r in run_check("topk", Ctx("float64")) if not r.passed]
    assert failed and all("symmetric_uniform" in name for name in failed), failed


def test_gkd_parity_catches_a_swapped_beta_and_an_undiscounted_advantage(monkeypatch):
    """beta read as 1 - beta fails every GKD row but beta = 0.5 (against TRL's package and
    ours); advantages that ignore the discount fail the discounted reverse-KL row only."""
    pytest.importorskip("torch")
    from kdjax import onpolicy

    real_jsd = onpolicy.jsd
    monkeypatch.setattr(onpolicy, "jsd", lambda s, t, temperature, beta: real_jsd(s, t, temperature, 1 - beta))
    failed = [r.name for r in run_check("gkd", Ctx("float64")) if not r.passed]
    assert failed and all("GKD" in n and "beta=0.5" not in n for n in failed), failed
    assert any("TRL 1.16" in n for n in failed) or not any("TRL" in r.name for r in run_check("gkd", Ctx("float64")))
    monkeypatch.setattr(onpolicy, "jsd", real_jsd)
    real_adv = onpolicy.reverse_kl_advantages
    monkeypatch.setattr(onpolicy, "reverse_kl_advantages",
                        lambda s, t, m, coef=1.0, discount=0.0: real_adv(s, t, m, coef, 0.0))
    failed = [r.name for r in run_check("gkd", Ctx("float64")) if not r.passed]
    assert failed == [n for n in failed if "discount=0.9" in n] and failed, failed


def test_topk_parity_catches_an_ignored_generation_temperature(monkeypatch):
    """Targets cached at T = 0.7 read as if at T = 1: exactly the rows with such targets fail."""
    pytest.importorskip("torch")
    from kdjax.losses import sparse

    original = sparse._target_logprobs
    monkeypatch.setattr(sparse, "_target_logprobs", lambda v, t, m, gen=1.0: original(v, t, m))
    rows = run_check("topk", Ctx("float64"))
    failed = sorted(r.name for r in rows if not r.passed)
    assert failed == sorted(r.name for r in rows if "targets at" in r.name) and failed, failed


def test_topk_parity_catches_reversed_ranking_pairs(monkeypatch):
    """The hinge and logistic ranking rows see the teacher's preferences turned around."""
    pytest.importorskip("torch")
    from kdjax.losses import ranking

    original = ranking._pairs

    def reversed_pairs(*args):
        p, pairs = original(*args)
        return p, jnp.swapaxes(pairs, -1, -2)

    monkeypatch.setattr(ranking, "_pairs", reversed_pairs)
    failed = [r.name for r in run_check("topk", Ctx("float64")) if not r.passed]
    assert len(failed) == 3 and all("hinge" in n or "logistic" in n for n in failed), failed


def _crosstok_failed(monkeypatch, attr, fn):
    pytest.importorskip("trl")
    import kdjax.crosstok as crosstok

    monkeypatch.setattr(crosstok, attr, fn(getattr(crosstok, attr)))
    rows = run_check("crosstok", Ctx("float64"))
    return sorted(r.name for r in rows if not r.passed), sorted(r.name for r in rows)


def test_crosstok_parity_catches_unsorted_probabilities(monkeypatch):
    """ULD without its sort (L1 of the padded distributions as they come): every row fails."""
    def unsorted(_):
        def l1(p, q):
            v = max(p.shape[-1], q.shape[-1])
            pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, v - a.shape[-1])])
            return jnp.sum(jnp.abs(pad(p) - pad(q)), axis=-1)
        return l1
    failed, rows = _crosstok_failed(monkeypatch, "_sorted_l1", unsorted)
    assert failed == rows and failed, failed


def test_crosstok_parity_catches_eos_not_skipped(monkeypatch):
    """EOS never skipped (positional and alignment): every row fails but one. A teacher EOS at the
    end of a text the student ends with no EOS forms a last group with no student position, which
    TRL (and kdjax) drop anyway, so skipping it or not is the same loss there."""
    def keep_eos(original):
        return lambda *a, **k: original(*a, **{**k, "skip_student_eos": False, "skip_teacher_eos": False})
    import kdjax.crosstok as crosstok
    monkeypatch.setattr(crosstok, "alignment_indices", keep_eos(crosstok.alignment_indices))
    failed, rows = _crosstok_failed(monkeypatch, "uld_loss", keep_eos)
    assert failed == [r for r in rows if "EOS on the teacher only" not in r or "positional" in r], failed


def test_crosstok_parity_catches_a_skipped_merge(monkeypatch):
    """Alignment groups not merged (each group's first distribution alone): the byte-offset rows fail."""
    def first_only(_):
        def merge(probs, tokens, index, member, *_):  # (*_: a merge strategy, where _merge takes one)
            rows = jnp.take_along_axis(probs, index[..., 0][..., None], axis=1)
            return rows
        return merge
    failed, rows = _crosstok_failed(monkeypatch, "_merge", first_only)
    assert failed == [r for r in rows if "byte-offset" in r] and failed, failed


def test_crosstok_parity_catches_bayesian_merging_ignored(monkeypatch):
    """TRL's "bayesian" strategy computed as "observed": exactly the bayesian rows fail."""
    def always_observed(merge):
        return lambda probs, tokens, index, member, *_: merge(probs, tokens, index, member, "observed")
    failed, rows = _crosstok_failed(monkeypatch, "_merge", always_observed)
    assert failed == [r for r in rows if "bayesian" in r] and failed, failed


def test_crosstok_parity_catches_an_ignored_hybrid(monkeypatch):
    """Hybrid ULD computed as plain ULD (no JSD on the shared tokens): exactly the hybrid rows fail."""
    failed, rows = _crosstok_failed(monkeypatch, "_position_loss", lambda original: lambda p, q, h: original(p, q, None))
    assert failed == [r for r in rows if "hybrid" in r] and failed, failed
