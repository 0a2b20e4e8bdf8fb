"""The feature losses in PyTorch, written by us from mdistiller's files (cited per function),
on NCHW maps as there: what ``kdjax.features`` must equal."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fitnet_hint(f_s, f_t):
    """``distillers/FitNet.py``: ``F.mse_loss(conv_reg(f_s), f_t)`` (here after the connector)."""
    return F.mse_loss(f_s, f_t)


def at(f_s, f_t, p=2):
    """``distillers/AT.py`` ``single_stage_at_loss``: the larger map adaptive-average-pooled to
    the smaller's height, then the squared difference of the L2-normalised channel means of
    ``f^p``."""
    hs, ht = f_s.shape[2], f_t.shape[2]
    if hs > ht:
        f_s = F.adaptive_avg_pool2d(f_s, (ht, ht))
    elif hs < ht:
        f_t = F.adaptive_avg_pool2d(f_t, (hs, hs))
    amap = lambda f: F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))
    return (amap(f_s) - amap(f_t)).pow(2).mean()


def sp(f_s, f_t):
    """``distillers/SP.py`` ``similarity_loss``."""
    b = f_s.shape[0]
    gram = lambda f: F.normalize(f.reshape(b, -1) @ f.reshape(b, -1).t())
    return ((gram(f_t) - gram(f_s)) ** 2).sum() / (b * b)


def _pdist(e, squared, eps):
    sq = (e * e).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d if squared else d.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype))


def rkd(f_s, f_t, squared=False, eps=1e-12, distance_weight=25.0, angle_weight=50.0):
    """``distillers/RKD.py`` ``rkd_loss``: distance and angle terms, smooth L1, the teacher's
    side without gradient."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1).detach()

    def dist(e):
        d = _pdist(e, squared, eps)
        return d / d[d > 0].mean()

    def angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)

    return (distance_weight * F.smooth_l1_loss(dist(s), dist(t))
            + angle_weight * F.smooth_l1_loss(angles(s), angles(t)))


def pkt(f_s, f_t, eps=1e-7):
    """``distillers/PKT.py`` ``pkt_loss``."""
    def prob(f):
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
        f = torch.nan_to_num(f, nan=0.0)
        sim = (f @ f.t() + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)

    p, q = prob(f_t.detach()), prob(f_s)
    return (p * torch.log((p + eps) / (q + eps))).mean()
