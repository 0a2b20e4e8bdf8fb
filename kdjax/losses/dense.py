"""Distillation losses: small pure functions, arrays in, arrays out (listed in ``kdjax.losses``).

Divergences are per position (unreduced, optax style): logits ``[..., classes]`` of any rank in,
``[...]`` out. P = softmax(t / T) is the teacher's distribution, Q = softmax(s / T) the student's;
the teacher side never carries a gradient. Shape and dtype checks run at trace time, range checks
(a non-finite teacher logit too) on concrete values only (``kdjax.train`` checks traced ones on entry).
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
    """Check a concrete temperature (a traced one passes).

    Args: temperature, name: the value and its name in the message.
    Raises: InputError: not a finite scalar > 0. InputTypeError: not a real number.
    """
    t = _concrete_scalar(name, temperature)
    if t is not None and not (math.isfinite(t) and t > 0):
        raise InputError(f"{name}: expected a finite number > 0, got {t}")


def check_alpha(alpha) -> None:
    """Check a concrete alpha (a traced one passes).

    Args: alpha: the value.
    Raises: InputError: not a scalar in [0, 1] (NaN is not). InputTypeError: not a real number.
    """
    a = _concrete_scalar("alpha", alpha)
    if a is not None and not (0.0 <= a <= 1.0):  # NaN fails both comparisons
        raise InputError(f"alpha: expected a number in [0, 1], got {a}")


def check_beta(beta, name: str = "beta", upper: float | None = 1.0) -> None:
    """Check a concrete beta (a traced one passes).

    Args: beta, name: the value and its name in the message; upper: None for [0, inf).
    Raises: InputError: not a scalar in [0, upper]. InputTypeError: not a real number.
    """
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
    """Check that concrete ``values`` are finite; traced ones pass (no host callback).

    Args: name, values: the name in the message; a NumPy array or a jax array outside ``jit``.
    Raises: InputError: naming the first non-finite entry and how many there are.
    """
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
    check_finite("teacher_logits", teacher_logits)  # one +inf would zero its position's divergence


def check_where(where, positions: tuple) -> None:
    """Check a ``where`` mask.

    Args: where, positions: None or the mask; its expected shape (the logits' without classes).
    Raises: InputTypeError: a mask that is not bool. InputError: one of another shape.
    """
    if where is None:
        return
    if not hasattr(where, "dtype") or where.dtype != jnp.bool_:
        raise InputTypeError(f"where: expected a bool mask, got dtype {getattr(where, 'dtype', type(where))}")
    if tuple(where.shape) != tuple(positions):
        raise InputError(f"where: expected shape {tuple(positions)} (the logits without the class axis), "
                         f"got {tuple(where.shape)}")


def check_labels(labels, logits_shape, where=None) -> None:
    """Check integer class labels (their values only when labels and ``where`` are concrete).

    Args: labels, logits_shape, where: ``[...]`` indices; ``[..., classes]``; None or the positions checked.
    Raises: InputTypeError: not integer. InputError: not of shape ``[...]``, a value out of range.
    """
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


def _checked_log_probs(student_logits, teacher_logits, temperature):
    _check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    return _log_probs(student_logits, teacher_logits, temperature)


def _log_probs(student_logits, teacher_logits, temperature):
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    return (jax.nn.log_softmax(teacher_logits / temperature, axis=-1),
            jax.nn.log_softmax(student_logits / temperature, axis=-1))


def _kl(log_p, log_q):
    """Per-position KL(P‖Q) from log-probabilities, with 0 log 0 = 0: p == 0 (an underflow) gives 0, never NaN."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def soft_kl(student_logits, teacher_logits, temperature=1.0):
    r"""Per-position KL divergence of the softened teacher from the student, KL(P‖Q).

    .. math::
        \mathrm{KL}_i = \sum_c p_{ic} (\log p_{ic} - \log q_{ic}), \quad
        p = \mathrm{softmax}(t / T),\; q = \mathrm{softmax}(s / T)

    with :math:`0 \log 0 = 0` (as ``torch.nn.functional.kl_div``); no :math:`T^2` (``distillation_loss``'s).

    Args:
      student_logits, teacher_logits: ``[..., num_classes]`` floating arrays of one shape.
      temperature: scalar > 0 (Python float or traced scalar).
    Returns:
      ``[...]`` array of KL values.
    Raises:
      InputError, InputTypeError: logits not floating, empty or of two shapes; a non-finite teacher
        logit; a temperature not > 0.
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(soft_kl(s, s, 2.0)[0])
    0.0
    """
    log_p, log_q = _checked_log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p, log_q)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    r"""Per-position KL divergence of the student from the softened teacher, KL(Q‖P).

    .. math::
        \mathrm{RKL}_i = \sum_c q_{ic} (\log q_{ic} - \log p_{ic})

    Mode-seeking (the student concentrates on the teacher's modes); no :math:`T^2`.

    Args: student_logits, teacher_logits, temperature: as ``soft_kl``, and so are returns and raises.
    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 1.0]])
    >>> bool(reverse_kl(s, t)[0] != soft_kl(s, t)[0])
    True
    """
    log_p, log_q = _checked_log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_q, log_p)


def _generalised_jsd(log_p, log_q, beta):
    # M = beta P + (1 - beta) Q in log space; beta KL(P||M) + (1 - beta) KL(Q||M)
    log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def jsd(student_logits, teacher_logits, temperature=1.0, beta=0.5):
    r"""Per-position generalised Jensen-Shannon divergence, as Liger-Kernel's ``LigerJSD``.

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(P \| M) + (1 - \beta)\,\mathrm{KL}(Q \| M),
        \quad M = \beta P + (1 - \beta) Q,

    except at the ends (as Liger-Kernel's kernel, not the formula's limit 0): ``beta = 0`` is KL(P‖Q)
    (``soft_kl``), ``beta = 1`` KL(Q‖P) (``reverse_kl``). Symmetric at ``beta = 0.5`` (at most log 2);
    no :math:`T^2`; a traced ``beta`` computes all three and selects.

    Args:
      student_logits, teacher_logits, temperature: as ``soft_kl``, and so are returns and raises.
      beta: the mixture weight in [0, 1] (Liger-Kernel's default; InputError outside).
    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 3.0]]), jnp.array([[2.0, 0.0]])
    >>> bool(jnp.allclose(jsd(s, t, beta=0.0), soft_kl(s, t)))
    True
    """
    log_p, log_q = _checked_log_probs(student_logits, teacher_logits, temperature)
    check_beta(beta)
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

    where :math:`b = (p_y, 1 - p_y)` is the target-vs-rest distribution (TCKD) and :math:`\hat p,
    \hat q` the renormalised non-target ones (NCKD). The batch mean is mdistiller's ``dkd_loss(s, t,
    y, alpha, beta, T)`` (T² included, CE apart); finite where the target probability is 1.

    Args:
      student_logits, teacher_logits, temperature: as ``soft_kl``; ``num_classes >= 2``.
      labels: ``[...]`` integer targets in ``[0, num_classes)`` (anything, e.g. -100, where not ``where``).
      alpha, beta: the TCKD and NCKD weights (>= 0; mdistiller's CIFAR defaults 1 and 8).
      where: optional bool ``[...]``; false positions give 0 (``masked_mean(_, where)``: the valid mean).
    Returns:
      ``[...]``; raises as ``soft_kl``, and on unfit labels or ``where``, a negative weight, < 2 classes.
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
      labels: ``[...]`` integer class indices in ``[0, num_classes)`` (anything where ``where`` is false, e.g. -100).
      where: optional bool ``[...]``: positions where it is false give 0.
        ``masked_mean(hard_ce(s, y, where=m), m)`` is ``F.cross_entropy(s[m], y[m])``.
    Returns:
      ``[...]`` array of losses.
    Raises:
      InputError, InputTypeError: logits not floating ``[..., classes]``; labels, ``where`` unfit.
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
    # a one-hot dot, not take_along_axis (gather/scatter are slow in XLA:CPU loops); -100 gives 0
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=log_q.dtype)
    return -jnp.sum(one_hot * log_q, axis=-1)


def masked_mean(values, where=None):
    """Mean of ``values`` where ``where`` is true (all if None; 0 if none, as EasyDeL, Liger-Kernel).

    Args:
      values: an array ``[...]``.
      where: None or a bool array of exactly ``values``' shape.
    Returns:
      A scalar.
    Raises:
      InputTypeError: ``where`` not bool. InputError: ``where`` of another shape (no
        broadcasting: a mask of the wrong shape would select the wrong positions silently).
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
    """The divergence ``distillation_loss`` names, per position ``[...]``.

    Args:
      student_logits, teacher_logits, temperature, beta: as ``jsd`` (``beta`` for ``"jsd"`` only).
      divergence: ``"kl"`` (``soft_kl``), ``"reverse_kl"``, ``"jsd"`` or a callable ``f(s, t, T)``
        (raises as the divergence does; InputError for an unknown name).
    """
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

    with :math:`D` the divergence and the means over all positions, or those ``where`` selects (0
    if none). For 2-D logits without ``where``, the reference script's ``alpha * kl_div(log_softmax(s/T),
    softmax(t/T), 'batchmean') * T**2 + (1 - alpha) * cross_entropy(s, y)``. ``temperature``,
    ``alpha`` and ``beta`` may be traced scalars (a vmapped sweep over them compiles once).

    Args:
      student_logits, teacher_logits: ``[..., num_classes]``.
      labels: ``[...]`` integer class indices (anything at masked positions).
      temperature, alpha: the softening temperature T > 0; the soft term's weight, in [0, 1].
      where: optional bool ``[...]`` mask of the positions that count.
      divergence: ``"kl"`` (``soft_kl``, the reference script's), ``"reverse_kl"``, ``"jsd"`` (with
        ``beta``) or a callable ``f(s, t, T) -> [...]``.
      beta: ``jsd``'s mixture weight in [0, 1].
    Returns:
      A scalar ``jax.Array``.
    Raises:
      InputError, InputTypeError: as the divergence's and ``hard_ce``'s; ``alpha`` outside [0, 1].
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
