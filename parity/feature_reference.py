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


# ----------------------------------------------------------------------------- Keras 3, tunix

def keras_mse(f_s, f_t):
    """Keras 3 ``FeatureDistillation(loss="mse")`` (``keras/src/distillation/distillation_loss.py``):
    ``mean(mean_squared_error(t, s))``, the inner mean over the last axis."""
    return ((f_t - f_s) ** 2).mean(-1).mean()


def keras_mae(f_s, f_t):
    return (f_t - f_s).abs().mean(-1).mean()


def keras_cosine(f_s, f_t, eps=1e-7):
    """``keras.losses.cosine_similarity`` along the last axis (``normalize``: ``x *
    min(rsqrt(sum x^2), 1/epsilon)``), negated, averaged."""
    unit = lambda v: v * torch.clamp(torch.rsqrt((v * v).sum(-1, keepdim=True)), max=1.0 / eps)
    return (-(unit(f_t) * unit(f_s)).sum(-1)).mean()


def tunix_pooled_cosine(f_s, f_t):
    """tunix ``FeaturePoolingStrategy``: the teacher average-pooled to the student's shape
    (``reduce_array_to_target_shape``, VALID: stride n // m, window n - (m - 1) * stride per
    axis), then ``mean(optax.cosine_distance(s, t, axis=-1))``."""
    for axis, (n, m) in enumerate(zip(f_t.shape, f_s.shape)):
        if n != m:
            stride = n // m
            f_t = f_t.unfold(axis, n - (m - 1) * stride, stride).mean(-1)
    cos = (f_s * f_t).sum(-1) / (f_s.norm(dim=-1) * f_t.norm(dim=-1))
    return (1 - cos).mean()


# ----------------------------------------------------------------------------- CRD

class CRDEmbed(torch.nn.Module):
    """mdistiller ``distillers/CRD.py`` ``Embed``: Linear, then divide by the L2 norm."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def crd_contrast_loss(x, num_data, eps=1e-7):
    """``ContrastLoss.forward``."""
    m = x.shape[1] - 1
    pn = 1.0 / num_data
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + eps))
    log_d0 = torch.log(torch.full_like(x[:, 1:], m * pn) / (x[:, 1:] + m * pn + eps))
    return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)) / x.shape[0]


def crd_memory_forward(memory, v1, v2, y, idx, temperature, momentum):
    """``ContrastMemory.forward`` with given ``idx`` (the dataset's contrast indices):
    ``memory`` is ``{"v1", "v2": [N, dim], "z": [2]}`` and is updated in place, as the
    module's buffers are."""
    bsz, dim = v1.shape
    n = memory["v1"].shape[0]
    w1 = memory["v1"].index_select(0, idx.reshape(-1)).detach().reshape(bsz, -1, dim)
    out_v2 = torch.exp(torch.bmm(w1, v2.reshape(bsz, dim, 1)) / temperature)
    w2 = memory["v2"].index_select(0, idx.reshape(-1)).detach().reshape(bsz, -1, dim)
    out_v1 = torch.exp(torch.bmm(w2, v1.reshape(bsz, dim, 1)) / temperature)
    if memory["z"][0] < 0:
        memory["z"][0] = out_v1.mean().item() * n
    if memory["z"][1] < 0:
        memory["z"][1] = out_v2.mean().item() * n
    out_v1, out_v2 = out_v1 / memory["z"][0].item(), out_v2 / memory["z"][1].item()
    with torch.no_grad():
        for key, v in (("v1", v1), ("v2", v2)):
            pos = memory[key].index_select(0, y.reshape(-1)) * momentum + v * (1 - momentum)
            memory[key].index_copy_(0, y, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
    return out_v1, out_v2


def crd_loss(embed_s, embed_t, f_s, f_t, memory, index, contrast_idx, temperature=0.07, momentum=0.5):
    """``CRD.crd_loss``: embed both, score against the memory, the two contrast losses."""
    n = memory["v1"].shape[0]
    out_s, out_t = crd_memory_forward(memory, embed_s(f_s), embed_t(f_t), index, contrast_idx, temperature, momentum)
    return crd_contrast_loss(out_s.squeeze(-1), n) + crd_contrast_loss(out_t.squeeze(-1), n)


# ----------------------------------------------------------------------------- FitNet

class ConvReg(torch.nn.Module):
    """mdistiller ``distillers/_common.py`` ``ConvReg`` for maps of equal size: a 1x1 conv
    (with bias), BatchNorm, ReLU."""

    def __init__(self, s_channels, t_channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(s_channels, t_channels, kernel_size=1)
        self.bn = torch.nn.BatchNorm2d(t_channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def train_fitnet(student, teacher, conv_reg, x, y, schedule, opt, *, layer, weight):
    """mdistiller's ``FitNet.forward_train``, the features read with forward hooks (as
    torchdistill does): CE + ``weight`` * MSE(conv_reg(student's ``layer``), teacher's), the
    teacher in eval mode, student and connector in train mode; returns per-step losses."""
    feats = {}
    hooks = [getattr(m, layer).register_forward_hook(lambda mod, inp, out, who=who: feats.__setitem__(who, out))
             for who, m in (("s", student), ("t", teacher))]
    student.train(), conv_reg.train(), teacher.eval()
    losses = []
    for idx in schedule:
        opt.zero_grad()
        with torch.no_grad():
            teacher(x[idx])
        logits = student(x[idx])
        loss = F.cross_entropy(logits, y[idx]) + weight * F.mse_loss(conv_reg(feats["s"]), feats["t"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for h in hooks:
        h.remove()
    return losses
