"""DistillKit's sparse KL in PyTorch, written by us from ``distillkit/lossfuncs/kl.py``
(``sparse_kl_div_inner``, ``log1mexp``, ``log_missing_prob``) and
``distillkit/lossfuncs/common.py`` (``get_target_logprobs``, ``get_logprobs``) for
log-probability targets generated at temperature 1: what ``kdjax.offline.topk_kl`` must
equal. Per position (DistillKit sums them; kdjax averages)."""

from __future__ import annotations

import torch


def log1mexp(x):
    out = torch.empty_like(x)
    big = x > -1
    out[big] = torch.log(-torch.expm1(x[big]))
    out[~big] = torch.log1p(-torch.exp(x[~big]))
    return out


def log_missing_prob(logprobs, eps=1e-6):
    return log1mexp(torch.logsumexp(logprobs, dim=-1).clamp(max=-eps))


def target_logprobs(values, temperature, missing):
    a = 1.0 / temperature
    if missing == "symmetric_uniform" and temperature == 1.0:
        return values
    lse_in = torch.logsumexp(values, dim=-1, keepdim=True)
    leftover = (1.0 - lse_in.exp()).clamp(0, 1)
    alpha_lse = torch.logsumexp(a * values, dim=-1, keepdim=True)
    if missing == "symmetric_uniform":
        return a * values - (alpha_lse.exp() + leftover.pow(a)).log()
    return a * values - alpha_lse


def sparse_kl(logits, ids, values, temperature, missing, eps=1e-6):
    s = logits / temperature
    student = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)
    with torch.no_grad():
        target = target_logprobs(values, temperature, missing)
    p = target.exp()
    kl = (p * (target - student)).sum(-1)
    if missing == "symmetric_uniform":
        log_t, log_s = log_missing_prob(target, eps), log_missing_prob(student, eps)
        p_m = log_t.exp()
        kl = kl + torch.where(p_m > eps, p_m * (log_t - log_s), torch.zeros_like(p_m))
    return kl
