"""Distillation losses: small pure functions, arrays in, arrays out.

Every divergence is per position (unreduced, optax style) over logits ``[..., classes]``
of any rank and returns ``[...]``: ``soft_kl`` (teacher -> student, the seed's),
``reverse_kl``, ``jsd`` (Liger-Kernel's generalised Jensen-Shannon divergence) and
``dkd`` (decoupled KD, mdistiller's); ``hard_ce`` is the per-position cross-entropy.
``distillation_loss`` is the scalar objective, averaged over all positions or over
those a ``where`` mask selects (token-level KD: padding excluded).

P = softmax(t / T) is the teacher's distribution, Q = softmax(s / T) the student's;
the teacher side never carries a gradient. None of the divergences but ``dkd`` is
multiplied by T² (``distillation_loss`` does that).

Checks on shapes and dtypes run at trace time. Range checks on ``temperature``,
``alpha``, ``beta``, the label values and the teacher logits' finiteness (a NaN or
infinite teacher logit is refused) run whenever those values are concrete
(Python numbers, NumPy arrays, jax arrays outside ``jit``); traced values cannot be
inspected, so ``kdjax.train`` validates them at its entry points instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError

__all__ = ["soft_kl", "reverse_kl", "jsd", "dkd", "hard_ce", "distillation_loss", "masked_mean",
           "check_temperature", "check_alpha", "check_beta", "check_where", "check_labels", "check_finite",
           "divergence_per_position", "DIVERGENCES"]


def _concrete_scalar(name: str, value):
    """Return ``value`` as a Python float if it is concrete, else None (traced)."""
    if isinstance(value, jax.core.Tracer):
        return None
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise InputError(f"{name}: expected a scalar, got an array of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputTypeError(f"{name}: expected a real number, got dtype {arr.dtype}")
    return float(arr)


def check_temperature(temperature, name: str = "temperature") -> None:
    """Raise InputError unless a concrete temperature is finite and > 0."""
    t = _concrete_scalar(name, temperature)
    if t is not None and not (math.isfinite(t) and t > 0):
        raise InputError(f"{name}: expected a finite number > 0, got {t}")


def check_alpha(alpha) -> None:
    """Raise ValueError unless a concrete alpha lies in [0, 1]."""
    a = _concrete_scalar("alpha", alpha)
    if a is not None and not (0.0 <= a <= 1.0):  # NaN fails both comparisons
        raise InputError(f"alpha: expected a number in [0, 1], got {a}")


def check_beta(beta, name: str = "beta", upper: float | None = 1.0) -> None:
    """Raise ValueError unless a concrete beta lies in [0, upper] (``upper=None``: [0, inf))."""
    b = _concrete_scalar(name, beta)
    if b is not None and not (0.0 <= b and (b <= upper if upper is not None else math.isfinite(b))):
        bound = f"[0, {upper:g}]" if upper is not None else "[0, inf)"
        raise InputError(f"{name}: expected a number in {bound}, got {b}")


def _check_logits(name: str, logits) -> None:
    if logits.ndim < 1:
        raise InputError(f"{name}: expected shape [..., num_classes], got a scalar")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise InputTypeError(f"{name}: expected a floating-point dtype, got {logits.dtype}")
    if logits.size == 0:
        raise InputError(f"{name}: expected a non-empty batch, got shape {logits.shape}")


def check_finite(name: str, values) -> None:
    """Raise ``InputError`` naming the first non-finite entry of concrete ``values`` (a
    NumPy array or a jax array outside ``jit``); traced values are not checked (no host
    callback: under ``jit`` a NaN or infinity goes through)."""
    if isinstance(values, jax.core.Tracer):
        return
    host = np.asarray(values)  # NumPy, not jnp: inside a jit trace jnp would stage the check
    if not np.isfinite(host).all():
        bad = np.argwhere(~np.isfinite(host))
        first = tuple(int(i) for i in bad[0])
        raise InputError(f"{name}: expected finite values, got {host[first]} at index {list(first)} "
                         f"({len(bad)} non-finite of {host.size})")


def _check_pair(student_logits, teacher_logits) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"teacher_logits: expected the student's shape {student_logits.shape}, "
                         f"got {teacher_logits.shape}")
    # one +inf teacher logit would make its position's divergence silently 0
    check_finite("teacher_logits", teacher_logits)


def check_where(where, positions: tuple) -> None:
    """Raise unless ``where`` is None or a bool mask of shape ``positions``."""
    if where is None:
        return
    if not hasattr(where, "dtype") or where.dtype != jnp.bool_:
        raise InputTypeError(f"where: expected a bool mask, got dtype {getattr(where, 'dtype', type(where))}")
    if tuple(where.shape) != tuple(positions):
        raise InputError(f"where: expected shape {tuple(positions)} (the logits without the class axis), "
                         f"got {tuple(where.shape)}")


def check_labels(labels, logits_shape, where=None) -> None:
    """Raise unless ``labels`` are integer class indices of shape ``logits_shape[:-1]``, in
    ``[0, classes)`` wherever ``where`` (if given) is true (checked when concrete)."""
    positions, num_classes = tuple(logits_shape[:-1]), logits_shape[-1]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputTypeError(f"labels: expected an integer dtype (class indices), got {labels.dtype}")
    if tuple(labels.shape) != positions:
        raise InputError(f"labels: expected shape {positions} to match logits {tuple(logits_shape)}, "
                         f"got shape {tuple(labels.shape)}")
    if isinstance(labels, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
        return
    values = np.asarray(labels)
    if where is not None:  # masked positions may hold anything (e.g. -100 padding)
        values = values[np.asarray(where)]
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            raise InputError(f"labels: expected values in [0, {num_classes}), got values in [{lo}, {hi}]")


def _log_probs(student_logits, teacher_logits, temperature):
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    return (jax.nn.log_softmax(teacher_logits / temperature, axis=-1),
            jax.nn.log_softmax(student_logits / temperature, axis=-1))


def soft_kl(student_logits, teacher_logits, temperature=1.0):
    r"""Per-position KL divergence of the softened teacher from the student, KL(P‖Q).

    .. math::
        \mathrm{KL}_i = \sum_c p_{ic} (\log p_{ic} - \log q_{ic}), \quad
        p = \mathrm{softmax}(t / T),\; q = \mathrm{softmax}(s / T)

    with :math:`0 \log 0 = 0` (as ``torch.nn.functional.kl_div``). The teacher side
    carries no gradient. Not multiplied by :math:`T^2`; ``distillation_loss`` does that.

    Args:
      student_logits: ``[..., num_classes]`` floating array.
      teacher_logits: same shape as ``student_logits``.
      temperature: scalar > 0 (Python float or traced scalar).

    Returns:
      ``[...]`` array of KL values.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(soft_kl(s, s, 2.0)[0])
    0.0
    """
    _check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    log_p, log_q = _log_probs(student_logits, teacher_logits, temperature)
    p = jnp.exp(log_p)
    # p == 0 (an underflowed teacher probability) contributes exactly 0, never NaN.
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    r"""Per-position KL divergence of the student from the softened teacher, KL(Q‖P).

    .. math::
        \mathrm{RKL}_i = \sum_c q_{ic} (\log q_{ic} - \log p_{ic})

    Mode-seeking (the student concentrates on the teacher's modes); no :math:`T^2`.
    Shapes and arguments as ``soft_kl``.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 1.0]])
    >>> bool(reverse_kl(s, t)[0] != soft_kl(s, t)[0])
    True
    """
    _check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    log_p, log_q = _log_probs(student_logits, teacher_logits, temperature)
    q = jnp.exp(log_q)
    return jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=-1)


def _generalised_jsd(log_p, log_q, beta):
    # M = beta P + (1 - beta) Q in log space; beta KL(P||M) + (1 - beta) KL(Q||M)
    log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    kl_pm = jnp.sum(jnp.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
    kl_qm = jnp.sum(jnp.where(q > 0, q * (log_q - log_m), 0.0), axis=-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def jsd(student_logits, teacher_logits, temperature=1.0, beta=0.5):
    r"""Per-position generalised Jensen-Shannon divergence, as Liger-Kernel's ``LigerJSD``.

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(P \| M) + (1 - \beta)\,\mathrm{KL}(Q \| M),
        \quad M = \beta P + (1 - \beta) Q,

    except at the ends, where (as in Liger-Kernel's kernel, and unlike the formula's
    limit, which is 0) ``beta = 0`` is the forward KL(P‖Q) (``soft_kl``) and ``beta = 1``
    the reverse KL(Q‖P) (``reverse_kl``). Symmetric in P and Q at ``beta = 0.5``, where
    it is at most log 2. No :math:`T^2`. A traced ``beta`` computes all three and selects.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 3.0]]), jnp.array([[2.0, 0.0]])
    >>> bool(jnp.allclose(jsd(s, t, beta=0.0), soft_kl(s, t)))
    True
    """
    _check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    check_beta(beta)
    log_p, log_q = _log_probs(student_logits, teacher_logits, temperature)
    b = _concrete_scalar("beta", beta)
    if b == 0.0:
        return soft_kl(student_logits, teacher_logits, temperature)
    if b == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    if b is not None:
        return _generalised_jsd(log_p, log_q, b)
    inner = jnp.clip(beta, 1e-6, 1 - 1e-6)  # the selected branch never sees a log(0)
    return jnp.where(beta == 0, soft_kl(student_logits, teacher_logits, temperature),
                     jnp.where(beta == 1, reverse_kl(student_logits, teacher_logits, temperature),
                               _generalised_jsd(log_p, log_q, inner)))


def dkd(student_logits, teacher_logits, labels, temperature=4.0, alpha=1.0, beta=8.0, *, where=None):
    r"""Per-position decoupled KD (Zhao et al., 2022), as mdistiller's ``dkd_loss``.

    .. math::
        \mathrm{DKD}_i = T^2 \left(\alpha\, \mathrm{KL}(b^P_i \| b^Q_i)
                         + \beta\, \mathrm{KL}(\hat p_i \| \hat q_i)\right)

    where :math:`b = (p_y, 1 - p_y)` is the binary target-vs-rest distribution (TCKD)
    and :math:`\hat p, \hat q` the distributions over the non-target classes,
    renormalised (NCKD). Its mean over a batch is mdistiller's ``dkd_loss(s, t, y,
    alpha, beta, T)`` (T² included, as there; the CE term is separate). Computed from
    log-probabilities, so it stays finite where the target probability rounds to 1.

    Args:
      labels: ``[...]`` integer targets in ``[0, num_classes)`` (anything, e.g. -100, where
        ``where`` is false); needs ``num_classes >= 2``.
      alpha, beta: the TCKD and NCKD weights (>= 0; mdistiller's CIFAR defaults 1 and 8).
      where: optional bool ``[...]``: positions where it is false give 0 (padding tokens;
        ``masked_mean(dkd(..., where=mask), mask)`` is the valid-token mean).
    """
    _check_pair(student_logits, teacher_logits)
    check_where(where, student_logits.shape[:-1])
    check_labels(labels, student_logits.shape, where)
    check_temperature(temperature)
    check_beta(alpha, "alpha", None)
    check_beta(beta, "beta", None)
    if student_logits.shape[-1] < 2:
        raise InputError(f"dkd: expected at least 2 classes, got {student_logits.shape[-1]}")
    log_p, log_q = _log_probs(student_logits, teacher_logits, temperature)
    if where is not None:  # any valid class at masked positions; their value is replaced by 0 below
        labels = jnp.where(where, labels, 0)
    target = jax.nn.one_hot(labels, student_logits.shape[-1], dtype=bool)

    def split(log_probs):  # log p_y, log(1 - p_y), and the renormalised non-target log-probs
        at_y = jnp.sum(jnp.where(target, log_probs, 0.0), axis=-1)
        rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_probs), axis=-1)
        # 0 at the target, so that no exp there can overflow (its gradient would be NaN)
        return at_y, rest, jnp.where(target, 0.0, log_probs - rest[..., None])

    (p_y, p_rest, p_hat), (q_y, q_rest, q_hat) = split(log_p), split(log_q)
    tckd = jnp.exp(p_y) * (p_y - q_y) + jnp.exp(p_rest) * (p_rest - q_rest)
    nckd = jnp.sum(jnp.exp(p_hat) * (p_hat - q_hat), axis=-1)  # target terms are exp(0) * 0
    value = temperature**2 * (alpha * tckd + beta * nckd)
    return value if where is None else jnp.where(where, value, 0.0)


def hard_ce(logits, labels, *, where=None):
    r"""Per-position cross-entropy with integer labels: :math:`-\log\mathrm{softmax}(s)_{y}`.

    Args:
      logits: ``[..., num_classes]`` floating array.
      labels: ``[...]`` integer class indices in ``[0, num_classes)`` (anything where
        ``where`` is false, e.g. PyTorch's ``ignore_index`` -100).
      where: optional bool ``[...]``: positions where it is false give 0.
        ``masked_mean(hard_ce(s, y, where=m), m)`` is ``F.cross_entropy(s[m], y[m])``.

    Returns:
      ``[...]`` array of losses.

    >>> import jax.numpy as jnp
    >>> round(float(hard_ce(jnp.zeros((1, 4)), jnp.array([2]))[0]), 6)  # log 4
    1.386294
    """
    _check_logits("logits", logits)
    check_where(where, logits.shape[:-1])
    check_labels(labels, logits.shape, where)
    ce = _hard_ce(logits, labels)
    return ce if where is None else jnp.where(where, ce, 0.0)


def _hard_ce(logits, labels):
    log_q = jax.nn.log_softmax(logits, axis=-1)
    # A one-hot dot instead of take_along_axis: the same number (one nonzero term), but
    # no gather forward / scatter backward, which are slow inside XLA:CPU loops. (Labels
    # outside [0, classes), e.g. -100 at masked positions, give 0 there.)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=log_q.dtype)
    return -jnp.sum(one_hot * log_q, axis=-1)


def masked_mean(values, where=None):
    """Mean of ``values`` over the positions ``where`` selects (all when None); 0 when it
    selects none (EasyDeL's and Liger-Kernel's normalisation by the valid-token count).

    Args:
      values: an array ``[...]``.
      where: None or a bool array of exactly ``values``' shape.

    Returns:
      A scalar.

    Raises:
      InputTypeError: ``where`` that is not bool.
      InputError: ``where`` of another shape (no broadcasting: a mask of the wrong shape
        would select the wrong positions silently).
    """
    if where is None:
        return jnp.mean(values) if np.size(values) else jnp.zeros((), jnp.result_type(values))
    if not hasattr(where, "dtype") or where.dtype != jnp.bool_:
        raise InputTypeError(f"where: expected a bool mask, got {getattr(where, 'dtype', type(where).__name__)}")
    if tuple(where.shape) != tuple(np.shape(values)):
        raise InputError(f"where: expected the values' shape {tuple(np.shape(values))}, got {tuple(where.shape)}")
    count = jnp.sum(where)
    total = jnp.sum(jnp.where(where, values, 0))
    return total / jnp.maximum(count, 1).astype(total.dtype)


DIVERGENCES = ("kl", "reverse_kl", "jsd")


def divergence_per_position(student_logits, teacher_logits, temperature, divergence="kl", beta=0.5):
    """The divergence ``distillation_loss`` names, per position ``[...]``: ``"kl"``
    (``soft_kl``), ``"reverse_kl"``, ``"jsd"`` (with ``beta``) or a callable ``f(s, t, T)``."""
    if callable(divergence):
        return divergence(student_logits, teacher_logits, temperature)
    if divergence == "kl":
        return soft_kl(student_logits, teacher_logits, temperature)
    if divergence == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if divergence == "jsd":
        return jsd(student_logits, teacher_logits, temperature, beta)
    raise InputError(f"divergence: expected one of {DIVERGENCES} or a callable f(s, t, T), got {divergence!r}")


def distillation_loss(student_logits, teacher_logits, labels, temperature=3.0, alpha=0.7, *,
                      where=None, divergence="kl", beta=0.5):
    r"""The knowledge-distillation objective (Hinton et al., 2015), token-level with ``where``.

    .. math::
        L = \alpha\, T^2\, \overline{D_i} + (1 - \alpha)\, \overline{\mathrm{CE}_i}

    with :math:`D` the divergence (``"kl"``: ``soft_kl``, the seed's; ``"reverse_kl"``;
    ``"jsd"`` with ``beta``; or a callable ``f(s, t, T) -> [...]``) and the means over
    every leading position, or over the positions where ``where`` (bool ``[...]``) is
    true (0 if none is). For 2-D logits without ``where`` this is the seed's loss:
    ``kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T**2`` weighted by
    ``alpha``, plus ``(1 - alpha) * cross_entropy(s, y)``. The teacher side carries no
    gradient. ``temperature``, ``alpha`` and ``beta`` may be traced scalars (a vmapped
    sweep over them compiles once).

    Args:
      student_logits: ``[..., num_classes]``.
      teacher_logits: ``[..., num_classes]``.
      labels: ``[...]`` integer class indices (anything at masked positions).
      temperature: softening temperature T > 0.
      alpha: weight of the soft term, in [0, 1].
      where: optional bool ``[...]`` mask of the positions that count.
      divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"`` or a callable.
      beta: ``jsd``'s mixture weight in [0, 1].

    Returns:
      A scalar ``jax.Array``.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[2.0, 1.0, 0.1]]); y = jnp.array([0])
    >>> bool(jnp.allclose(distillation_loss(s, s, y, 3.0, 0.0), hard_ce(s, y)[0]))
    True
    """
    check_alpha(alpha)
    _check_pair(student_logits, teacher_logits)
    check_where(where, student_logits.shape[:-1])
    check_labels(labels, student_logits.shape, where)
    per_position = divergence_per_position(student_logits, teacher_logits, temperature, divergence, beta)
    soft = masked_mean(per_position, where)
    hard = masked_mean(_hard_ce(student_logits, labels), where)
    return alpha * (soft * temperature**2) + (1 - alpha) * hard
