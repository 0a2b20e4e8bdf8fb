"""tunix's top-k logit distillation in PyTorch, written by us from google-tunix 0.1.7's
``tunix/distillation/strategies/logit.py`` (``LogitStrategy.compute_loss`` with
``distill_top_k > 0``, added by google/tunix pull request 991): the teacher's k largest
logits (``jax.lax.top_k``), the student's logits gathered at those ids, both softened and
normalised over the k ids alone (``log_softmax`` for the student, ``softmax`` for the
teacher), ``optax.kl_divergence`` per position, times T², averaged over every position; plus
``(1 - alpha)`` times the mean cross-entropy of the full student logits against one-hot
labels. tunix casts both logits to float32 first; here they keep their dtype."""

from __future__ import annotations

import torch


def topk_kl(student_logits, teacher_logits, k, temperature):
    """Per position: ``sum p (log p - log q)`` over the teacher's top k (``optax.kl_divergence``:
    ``0 log 0 = 0``), p and q renormalised over the k ids at ``temperature``."""
    t_k, ids = torch.topk(teacher_logits, k, dim=-1)
    s_k = torch.gather(student_logits, -1, ids)
    log_q = torch.log_softmax(s_k / temperature, dim=-1)
    p = torch.softmax(t_k / temperature, dim=-1)
    return (p * (torch.where(p == 0, torch.zeros_like(p), torch.log(p)) - log_q)).sum(-1)


def logit_strategy_loss(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """``LogitStrategy(temperature, alpha, distill_top_k=k).compute_loss(s, t, one_hot(labels))[0]``."""
    soft = (topk_kl(student_logits, teacher_logits, k, temperature) * temperature**2).mean()
    ce = -(torch.log_softmax(student_logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)).mean()
    return alpha * soft + (1.0 - alpha) * ce
