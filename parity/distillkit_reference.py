"""DistillKit's sparse losses in PyTorch, written by us from arcee-ai/DistillKit's
``distillkit/lossfuncs/``: ``kl.py`` (``sparse_kl_div_inner``, ``log1mexp``,
``log_missing_prob``; commit bf942070), ``common.py`` (``get_target_logprobs``,
``get_logprobs``; commit a61c2e7d), and ``jsd.py`` (``sparse_jsd_inner``), ``tvd.py``
(``sparse_tvd_inner``), ``hingeloss.py`` (``sparse_hinge_loss``), ``logistic_ranking.py``
(``sparse_logistic_ranking_loss``) of the revision whose ``common.py`` adds
``divergence_dtype`` (read from the public index, December 2026; the hash is not recorded
there). Log-probability targets generated at ``gen`` (DistillKit's
``target_generation_temperature``), student logits at 1. The divergences per position
(DistillKit sums them under its mask; kdjax averages); the ranking losses as DistillKit
returns them (a scalar normalised by the number of preferred pairs)."""

from __future__ import annotations

import math

import torch


def log1mexp(x):
    out = torch.empty_like(x)
    big = x > -1
    out[big] = torch.log(-torch.expm1(x[big]))
    out[~big] = torch.log1p(-torch.exp(x[~big]))
    return out


def log_missing_prob(logprobs, eps=1e-6):
    return log1mexp(torch.logsumexp(logprobs, dim=-1).clamp(max=-eps))


def target_logprobs(values, temperature, missing, gen=1.0):
    a = gen / temperature
    if missing == "symmetric_uniform" and math.isclose(temperature, gen):
        return values
    lse_in = torch.logsumexp(values, dim=-1, keepdim=True)
    leftover = (1.0 - lse_in.exp()).clamp(0, 1)
    alpha_lse = torch.logsumexp(a * values, dim=-1, keepdim=True)
    if missing == "symmetric_uniform":
        return a * values - (alpha_lse.exp() + leftover.pow(a)).log()
    return a * values - alpha_lse


def logprobs(logits, ids, values, temperature, missing, gen=1.0):
    s = logits / temperature
    student = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)
    with torch.no_grad():
        target = target_logprobs(values, temperature, missing, gen)
    return student, target


def sparse_kl(logits, ids, values, temperature, missing, eps=1e-6, gen=1.0):
    student, target = logprobs(logits, ids, values, temperature, missing, gen)
    p = target.exp()
    kl = (p * (target - student)).sum(-1)
    if missing == "symmetric_uniform":
        log_t, log_s = log_missing_prob(target, eps), log_missing_prob(student, eps)
        p_m = log_t.exp()
        kl = kl + torch.where(p_m > eps, p_m * (log_t - log_s), torch.zeros_like(p_m))
    return kl


def sparse_jsd(logits, ids, values, temperature, missing, eps=1e-8, gen=1.0):
    student, target = logprobs(logits, ids, values, temperature, missing, gen)
    p, q = target.exp(), student.exp()
    log_m = torch.log((0.5 * (p + q)).clamp(min=eps))
    zero = torch.zeros_like(p)
    kl_pm = torch.where(p > eps, p * (target - log_m), zero).sum(-1)
    kl_qm = torch.where(q > eps, q * (student - log_m), zero).sum(-1)
    if missing == "symmetric_uniform":
        log_pm = torch.log1p(-p.sum(-1).clamp(min=eps, max=1 - eps))
        log_qm = torch.log1p(-q.sum(-1).clamp(min=eps, max=1 - eps))
        p_m, q_m = log_pm.exp(), log_qm.exp()
        log_mm = torch.log((0.5 * (p_m + q_m)).clamp(min=eps))
        kl_pm = kl_pm + torch.where(p_m > eps, p_m * (log_pm - log_mm), torch.zeros_like(p_m))
        kl_qm = kl_qm + torch.where(q_m > eps, q_m * (log_qm - log_mm), torch.zeros_like(q_m))
    else:
        kl_qm = kl_qm + (1.0 - q.sum(-1)).clamp(min=0.0) * math.log(2.0)
    return 0.5 * (kl_pm + kl_qm)


def sparse_tvd(logits, ids, values, temperature, missing, gen=1.0):
    student, target = logprobs(logits, ids, values, temperature, missing, gen)
    p, q = target.exp(), student.exp()
    inside = (p - q).abs().sum(-1)
    if missing == "symmetric_uniform":
        outside = ((1.0 - p.sum(-1)).clamp(0.0, 1.0) - (1.0 - q.sum(-1)).clamp(0.0, 1.0)).abs()
    else:
        outside = (1.0 - q.sum(-1)).clamp(min=0.0)
    return 0.5 * (inside + outside)


def _preferred(values, mask, eps):
    p = values.exp()
    supported = p > eps
    pairs = (p.unsqueeze(-1) > p.unsqueeze(-2) + eps) & supported.unsqueeze(-1) & supported.unsqueeze(-2)
    if mask is not None:
        pairs = pairs & mask.unsqueeze(-1).unsqueeze(-1)
    return p, pairs.to(values.dtype)


def sparse_hinge(logits, ids, values, mask=None, margin=None, eps=1e-8):
    p, pairs = _preferred(values, mask, eps)
    q = torch.softmax(logits, dim=-1).gather(-1, ids)
    gap = p.unsqueeze(-1) - p.unsqueeze(-2) if margin is None else margin
    terms = torch.relu(gap - (q.unsqueeze(-1) - q.unsqueeze(-2)))
    return (terms * pairs).sum() / (pairs.sum() + eps)


def sparse_logistic_ranking(logits, ids, values, mask=None, eps=1e-9):
    _, pairs = _preferred(values, mask, eps)
    s = logits.gather(-1, ids)
    terms = torch.nn.functional.softplus(-(s.unsqueeze(-1) - s.unsqueeze(-2)))
    return (terms * pairs).sum() / (pairs.sum() + eps)


def hidden_state_loss(kind, pairs, mask=None):
    """DistillKit's ``compute_hs_loss`` (``distillkit/lossfuncs/hidden_state.py``, read from the
    public index as the fork zcomputerwiz/DistillKit at b32fad3c carries it; arcee-ai's own copy
    is not stored there) after the projection: ``pairs`` is the list of ``(student_h,
    teacher_h)`` layers ``[batch, length, width]``, ``mask`` the ``[batch, length]`` attention
    mask (None: every token). ``"mse"``: the masked sum of squared errors over ``mask.sum() *
    width``; ``"cosine"``: the masked sum of ``1 - F.cosine_similarity`` over ``mask.sum()``;
    the mean over the layers."""
    if mask is None:
        mask = torch.ones(pairs[0][0].shape[:-1], dtype=torch.bool, device=pairs[0][0].device)
    if mask.dim() == 2:
        mask = mask.unsqueeze(-1)
    total = torch.tensor(0.0, dtype=pairs[0][0].dtype, device=pairs[0][0].device)
    for student_h, teacher_h in pairs:
        teacher_h = teacher_h.to(dtype=student_h.dtype)
        layer_mask = mask.to(student_h.dtype)
        if kind == "mse":
            layer = ((student_h - teacher_h) ** 2 * layer_mask).sum() / (layer_mask.sum() * student_h.shape[-1])
        elif kind == "cosine":
            cos = torch.nn.functional.cosine_similarity(student_h, teacher_h, dim=-1)
            layer = ((1 - cos) * layer_mask.squeeze(-1)).sum() / layer_mask.sum()
        else:
            raise RuntimeError(f"Unimplemented hidden state loss type {kind!r}")
        total = total + layer
    return total / len(pairs)
