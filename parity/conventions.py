"""What other libraries call "the KD loss", re-implemented here (PyTorch or NumPy, written
by us) from the file each follows, so that ``parity.checks.check_conventions`` can show
which kdjax call returns the same number (the README's convention table).

Libraries without token masks are given the valid tokens only, flattened to
``[tokens, vocab]``, as their users do.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax


def torchdistill_kd(student, teacher, targets, temperature, alpha, beta=None):
    """torchdistill ``losses/mid_level.py`` ``KDLoss.forward``: ``alpha * CE + beta * T^2 *
    KL_batchmean`` with ``beta = 1 - alpha`` by default; with ``alpha`` 0 (or None, or no
    targets) only the batchmean KL, without T^2."""
    beta = 1 - alpha if beta is None else beta
    soft = F.kl_div(torch.log_softmax(student / temperature, dim=1), torch.softmax(teacher / temperature, dim=1),
                    reduction="batchmean")
    if not alpha or targets is None:
        return soft
    return alpha * F.cross_entropy(student, targets) + beta * temperature**2 * soft


def mdistiller_kd(student, teacher, targets, temperature, ce_weight=0.1, kd_weight=0.9):
    """mdistiller ``distillers/KD.py``: ``ce_weight * CE + kd_weight * T^2 * mean_i sum_c KL``."""
    log_q = F.log_softmax(student / temperature, dim=1)
    p = F.softmax(teacher / temperature, dim=1)
    kd = F.kl_div(log_q, p, reduction="none").sum(1).mean() * temperature**2
    return ce_weight * F.cross_entropy(student, targets) + kd_weight * kd


def mdistiller_dkd(student, teacher, targets, temperature, alpha=1.0, beta=8.0, ce_weight=1.0):
    """mdistiller ``distillers/DKD.py``: ``ce_weight * CE + dkd_loss`` (warm-up factor 1), with
    ``dkd_loss = alpha * TCKD + beta * NCKD``, each ``kl_div(..., sum) * T^2 / batch``, NCKD's
    target class pushed out with ``- 1000 * gt_mask``."""
    gt = torch.zeros_like(student).scatter_(1, targets.unsqueeze(1), 1).bool()
    ps = F.softmax(student / temperature, dim=1)
    pt = F.softmax(teacher / temperature, dim=1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], dim=1)
    n = targets.shape[0]
    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * temperature**2 / n
    pt2 = F.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    log_ps2 = F.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_ps2, pt2, reduction="sum") * temperature**2 / n
    return ce_weight * F.cross_entropy(student, targets) + alpha * tckd + beta * nckd


def liger_jsd(log_q, log_p, shift_labels=None, beta=0.5, ignore_index=-100):
    """Liger-Kernel ``ops/jsd.py`` (``_jsd_kernel`` and ``jsd_forward``), student ``log_q`` and
    teacher ``log_p`` in log space, ``[BT, V]``: per token ``sum P (log P - log Q)`` at
    ``beta = 0``, ``sum Q (log Q - log P)`` at ``beta = 1``, else ``sum(beta P log P +
    (1 - beta) Q log Q - M log M)`` with ``M = beta P + (1 - beta) Q``; summed over the
    non-ignored tokens and divided by their count."""
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        per_token = (p * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        per_token = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per_token = (beta * p * log_p + (1 - beta) * q * log_q - m * torch.log(m)).sum(-1)
    keep = torch.ones_like(per_token, dtype=torch.bool) if shift_labels is None else shift_labels != ignore_index
    return per_token[keep].sum() / keep.sum()


def tunix_logit(student, teacher, one_hot_labels, temperature=2.0, alpha=0.5):
    """tunix ``distillation/strategies/logit.py`` ``LogitStrategy.compute_loss`` (no top-k), in
    NumPy: ``alpha * mean(T^2 * KL) + (1 - alpha) * mean(CE)``, means over every position
    of ``[..., V]`` (padding included)."""
    log_q = np_log_softmax(student / temperature, -1)
    p = np_softmax(teacher / temperature, -1)
    kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0), -1)
    ce = -np.sum(one_hot_labels * np_log_softmax(student, -1), -1)
    return alpha * np.mean(kl * temperature**2) + (1 - alpha) * np.mean(ce)


def easydel_distillation(student, teacher, attention_mask=None, labels=None, use_hard_labels=True,
                         temperature=4.0, alpha=0.9):
    """EasyDeL ``trainers/distillation_trainer/_fn.py`` ``distillation_loss``, in NumPy: the
    per-token cross-entropy of the student against the teacher minus the teacher's
    entropy (i.e. KL), masked by ``attention_mask`` and ``labels != -100`` and averaged
    over the valid tokens (at least 1), times ``alpha * T^2``; plus ``(1 - alpha)`` times
    the masked mean CE with hard labels."""
    t = teacher / temperature
    log_p = t - np.log(np.sum(np.exp(t - t.max(-1, keepdims=True)), -1, keepdims=True)) - t.max(-1, keepdims=True)
    p = np.exp(log_p)
    s = student / temperature
    s_lse = np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1)) + s.max(-1)
    xent = s_lse - np.sum(p * s, -1)
    entropy = -np.sum(p * log_p, -1)
    mask = np.ones(student.shape[:-1]) if attention_mask is None else attention_mask.astype(np.float64)
    if labels is not None:
        mask = mask * (labels != -100)
    norm = max(mask.sum(), 1.0)
    kl = (np.sum(xent * mask) / norm - np.sum(entropy * mask) / norm) * temperature**2
    total = alpha * kl
    if use_hard_labels and labels is not None:
        safe = np.where(labels == -100, 0, labels)
        ce = -np.take_along_axis(np_log_softmax(student, -1), safe[..., None], -1)[..., 0]
        total = total + (1 - alpha) * np.sum(ce * mask) / norm
    return total


def trl_generalized_jsd(student, teacher, labels=None, beta=0.5, temperature=1.0):
    """TRL ``trl/experimental/gkd/gkd_trainer.py`` ``GKDTrainer.generalized_jsd_loss``
    (reduction "batchmean"), torch ``[B, L, V]``: per element ``kl_div(..., log_target=True)``
    — at ``beta = 0`` KL(P‖Q), at ``beta = 1`` KL(Q‖P), else ``beta KL(P‖M) + (1 - beta)
    KL(Q‖M)`` with ``M = beta P + (1 - beta) Q`` — summed over the positions whose label
    is not -100 and divided by their count (at least 1); without labels divided by the
    batch size. No T²; GKDTrainer calls it at temperature 1 (its temperature samples)."""
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    if beta == 0:
        per = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        per = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_q.dtype)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), 0)
        per = b * F.kl_div(log_m, log_p, reduction="none", log_target=True) \
            + (1 - b) * F.kl_div(log_m, log_q, reduction="none", log_target=True)
    if labels is None:
        return per.sum() / max(per.shape[0], 1)
    keep = labels != -100
    return per[keep].sum() / keep.sum().clamp_min(1)


def easydel_gkd_jsd(student, teacher, mask=None, beta=0.5, temperature=1.0):
    """EasyDeL ``trainers/generalized_knowledge_distillation_trainer/_fn.py``
    ``generalized_jsd_loss``, in NumPy: at ``beta <= 0`` KL(Q‖P), at ``beta >= 1`` KL(P‖Q),
    else ``beta KL(P‖M) + (1 - beta) KL(Q‖M)`` with ``M = (1 - beta) P + beta Q`` (the
    mixture weighted the other way from Liger's and TRL's); masked mean over tokens."""
    log_q, log_p = np_log_softmax(student / temperature, -1), np_log_softmax(teacher / temperature, -1)
    kl = lambda a, b: np.sum(np.exp(a) * (a - b), -1)  # KL(exp a || exp b)
    if beta <= 0:
        per = kl(log_q, log_p)
    elif beta >= 1:
        per = kl(log_p, log_q)
    else:
        log_m = np.logaddexp(log_p + np.log1p(-beta), log_q + np.log(beta))
        per = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if mask is None:
        return np.mean(per)
    m = mask.astype(np.float64)
    return np.sum(per * m) / max(m.sum(), 1.0)


def keras_logits_distillation(student, teacher, temperature=3.0, kl_instance=False):
    """Keras 3 ``keras/src/distillation/distillation_loss.py`` ``LogitsDistillation.compute_loss``
    (one output), in NumPy. Both outputs are divided by T. With ``loss=KLDivergence()``
    (``kl_instance``) they go through softmax and ``KLDivergence`` (``losses/losses.py``:
    ``sum y_true log(y_true / y_pred)`` over the last axis, both clipped to [1e-7, 1],
    averaged over the other positions), times T². With the default ``loss="kl_divergence"``
    the same function is applied to the scaled *logits* themselves (clipped to [1e-7, 1]),
    with no softmax and no T²."""
    clip = lambda a: np.clip(a, 1e-7, 1.0)
    s, t = student / temperature, teacher / temperature
    if kl_instance:
        p, q = clip(np_softmax(t, -1)), clip(np_softmax(s, -1))
        return np.mean(np.sum(p * np.log(p / q), -1)) * temperature**2
    p, q = clip(t), clip(s)
    return np.mean(np.sum(p * np.log(p / q), -1))


def modelopt_logits(student, teacher, temperature=1.0, reduction="batchmean"):
    """NVIDIA ModelOpt ``modelopt/torch/distill/losses.py`` ``LogitsDistillationLoss``: logits
    flattened to ``[N, V]``, ``kl_div(log_softmax(s/T), softmax(t/T), reduction) * T²``;
    "batchmean" divides the sum by N (every position, padding included), "mean" by N·V."""
    log_q = torch.log_softmax(student / temperature, -1).reshape(-1, student.shape[-1])
    p = torch.softmax(teacher / temperature, -1).reshape(-1, teacher.shape[-1])
    return F.kl_div(log_q, p, reduction=reduction) * temperature**2
