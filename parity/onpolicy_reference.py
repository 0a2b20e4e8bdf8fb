"""On-policy distillation losses in PyTorch, written by us from their sources: what
``kdjax.onpolicy`` must equal.

* ``generalized_jsd``: TRL's ``GKDTrainer.generalized_jsd_loss``
  (``trl/experimental/gkd/gkd_trainer.py``, reduction "batchmean" with labels): the
  generalised JSD of Agarwal et al. through ``F.kl_div`` with log targets, beta = 0 and 1
  as the two KLs, the mixture ``log((1 - beta) q + beta p)`` by logsumexp, averaged over
  the positions whose label is not -100.
* ``reverse_kl_advantages`` / ``importance_sampling``: tinker-cookbook's
  ``incorporate_kl_penalty`` (``tinker_cookbook/distillation/train_on_policy.py``: the
  advantage ``-coef * mask * (sampled logprob - teacher logprob)``, then
  ``discounted_future_sum_vectorized`` when the discount is > 0) and the Tinker API's
  ``importance_sampling`` loss, ``-(exp(target - sampling) * advantages).sum()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generalized_jsd(student_logits, teacher_logits, labels, beta, temperature=1.0):
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        per = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        per = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        per = b * F.kl_div(mix, t, reduction="none", log_target=True) \
            + (1 - b) * F.kl_div(mix, s, reduction="none", log_target=True)
    keep = labels != -100
    return per[keep].sum() / keep.sum().clamp_min(1)


def reverse_kl_advantages(sampled, teacher, mask, coef, discount):
    adv = -coef * mask.to(sampled.dtype) * (sampled - teacher)
    if discount > 0:  # discounted future sum along each row
        out = torch.zeros_like(adv)
        running = torch.zeros(adv.shape[0], dtype=adv.dtype)
        for t in reversed(range(adv.shape[1])):
            running = adv[:, t] + discount * running
            out[:, t] = running
        adv = out
    return adv


def importance_sampling(target, sampling, advantages):
    return -(torch.exp(target - sampling) * advantages).sum()
