"""A small PyTorch implementation of the seed's semantics, written for parity checks.

Same models, loss, optimizer and training loops as ``08_distillation.py``, with two
doors left open so kdjax and this reference can be fed identical inputs:

* the minibatch index schedule is passed in (``[steps, batch]`` indices) instead of
  drawn inside the loop with ``torch.randperm``;
* the teacher's dropout masks can be passed in (``[2, batch, hidden]`` 0/1 per step).

Works in float32 and float64 (``model.double()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class TeacherMLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int = 256, num_classes: int = 5, p: float = 0.3):
        super().__init__()
        self.p = p
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, hidden_dim // 2)
        self.fc4 = nn.Linear(hidden_dim // 2, num_classes)

    def _dropout(self, h, mask):
        if mask is not None:  # injected keep-mask, scaled as inverted dropout
            return h * mask / (1 - self.p)
        return F.dropout(h, self.p, self.training)

    def forward(self, x, masks=None):
        m1, m2 = (None, None) if masks is None else masks
        h = self._dropout(F.relu(self.fc1(x)), m1)
        h = self._dropout(F.relu(self.fc2(h)), m2)
        return self.fc4(F.relu(self.fc3(h)))


class StudentMLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int = 64, num_classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x, masks=None):
        return self.fc2(F.relu(self.fc1(x)))


class MLP(nn.Module):
    """A plain ReLU MLP (fc1 .. fc{k+1}), no dropout: the benchmarks' hinton/wide nets."""

    def __init__(self, input_dim: int, hidden_dims=(800, 800), num_classes: int = 10):
        super().__init__()
        widths = [input_dim, *hidden_dims, num_classes]
        for i in range(len(widths) - 1):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        self.depth = len(widths) - 1

    def forward(self, x, masks=None):
        for i in range(1, self.depth):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.depth}")(x)


def soft_term(student_logits, teacher_logits, temperature):
    """kl_div(log_softmax(s/T), softmax(t/T), 'batchmean'), not yet scaled by T^2."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")


def hard_term(student_logits, labels):
    return F.cross_entropy(student_logits, labels)


def distillation_loss(student_logits, teacher_logits, labels, temperature=3.0, alpha=0.7):
    soft = soft_term(student_logits, teacher_logits, temperature) * temperature**2
    return alpha * soft + (1 - alpha) * hard_term(student_logits, labels)


def train(model, x, y, schedule, *, objective="ce", teacher=None, temperature=3.0, alpha=0.7,
          lr=1e-3, masks=None):
    """The seed's loop: one Adam step per row of ``schedule``; returns the per-step losses.

    ``objective`` is "ce" (teacher or standard student) or "kd" (distil from ``teacher``
    in eval mode). ``masks[k]`` are the teacher's dropout masks for step k (optional).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if teacher is not None:
        teacher.eval()
    losses = []
    for k, idx in enumerate(schedule):
        model.train()
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        logits = model(xb, None if masks is None else masks[k])
        if objective == "ce":
            loss = F.cross_entropy(logits, yb)
        else:
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = distillation_loss(logits, t_logits, yb, temperature, alpha)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(stride) -> bn -> relu -> conv3x3 -> bn, + shortcut -> relu."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (``state_dict`` names and init as there), NCHW.

    ``stem="imagenet"``: 7x7/2 conv, bn, relu, 3x3/2 max pool (torchvision's resnet18 with
    ``stage_sizes=(2, 2, 2, 2)``); ``stem="cifar"``: 3x3/1 conv, bn, relu.
    """

    def __init__(self, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 stem: str = "imagenet", in_channels: int = 3):
        super().__init__()
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        for i, (n, planes) in enumerate(zip(stage_sizes, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.num_stages = len(stage_sizes)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, masks=None):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_resnet_kd(model, x, y, teacher_logits, schedule, opt, *, temperature, alpha, scheduler=None):
    """Distil ``model`` (train mode, BatchNorm statistics updated) from cached teacher logits:
    one ``opt`` step per row of ``schedule``; returns the per-step losses."""
    losses = []
    model.train()
    for idx in schedule:
        opt.zero_grad()
        loss = distillation_loss(model(x[idx]), teacher_logits[idx], y[idx], temperature, alpha)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- token-level losses

def kl_per_position(student, teacher, temperature):
    """KL(P || Q) per position over the last axis, P = softmax(t/T), Q = softmax(s/T)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                    reduction="none").sum(-1)


def reverse_kl_per_position(student, teacher, temperature):
    """KL(Q || P) per position."""
    return F.kl_div(F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1),
                    reduction="none", log_target=True).sum(-1)


def jsd_per_position(student, teacher, temperature, beta):
    """Liger-Kernel's generalised JSD per position (forward KL at beta 0, reverse KL at 1)."""
    if beta == 0.0:
        return kl_per_position(student, teacher, temperature)
    if beta == 1.0:
        return reverse_kl_per_position(student, teacher, temperature)
    log_p, log_q = F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                            log_q + torch.log(torch.tensor(1 - beta, dtype=log_q.dtype)))
    kl_pm = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_qm = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


DIVERGENCES = {"kl": lambda s, t, T, b: kl_per_position(s, t, T),
               "reverse_kl": lambda s, t, T, b: reverse_kl_per_position(s, t, T),
               "jsd": jsd_per_position}


def masked_distillation_loss(student, teacher, labels, mask, temperature, alpha, divergence="kl", beta=0.5):
    """alpha T^2 mean(D) + (1 - alpha) mean(CE) over the positions ``mask`` selects."""
    div = DIVERGENCES[divergence](student, teacher, temperature, beta)
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), torch.where(mask, labels, 0).reshape(-1),
                         reduction="none").reshape(mask.shape)
    n = mask.sum().clamp(min=1)
    return alpha * temperature**2 * div[mask].sum() / n + (1 - alpha) * ce[mask].sum() / n


def chunked_linear_distillation_loss(hidden, kernel, bias, labels, mask, teacher_logits, temperature, alpha,
                                     divergence="kl", beta=0.5, chunk_size=64):
    """The fused loss the PyTorch way: logits ``hidden @ kernel + bias`` one chunk of tokens at
    a time (``[tokens, hidden]`` inputs), masked sums, one division at the end."""
    n = mask.sum().clamp(min=1)
    soft = hard = 0.0
    for a in range(0, hidden.shape[0], chunk_size):
        sl = slice(a, a + chunk_size)
        logits = hidden[sl] @ kernel + bias
        div = DIVERGENCES[divergence](logits, teacher_logits[sl], temperature, beta)
        ce = F.cross_entropy(logits, torch.where(mask[sl], labels[sl], 0), reduction="none")
        soft = soft + div[mask[sl]].sum()
        hard = hard + ce[mask[sl]].sum()
    return alpha * temperature**2 * soft / n + (1 - alpha) * hard / n


# ----------------------------------------------------------------------------- a tiny GPT

class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias``, weight stored ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(0.0, std))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPTAttention(nn.Module):
    def __init__(self, d: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d, 0.02 / math.sqrt(2 * layers))

    def forward(self, x, allowed):
        b, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        heads = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~allowed, torch.finfo(x.dtype).min)
        out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, n, d)
        return self.c_proj(out)


class GPTMLP(nn.Module):
    def __init__(self, d: int, layers: int):
        super().__init__()
        self.c_fc = Conv1D(d, 4 * d)
        self.c_proj = Conv1D(4 * d, d, 0.02 / math.sqrt(2 * layers))

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, layers: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.attn, self.mlp = GPTAttention(d, heads, layers), GPTMLP(d, layers)

    def forward(self, x, allowed):
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class GPTBody(nn.Module):
    def __init__(self, vocab: int, layers: int, d: int, heads: int, max_len: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        nn.init.normal_(self.wpe.weight, 0.0, 0.02)
        self.h = nn.ModuleList([GPTBlock(d, heads, layers) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d, eps=1e-5)


class GPT(nn.Module):
    """GPT-2 (no dropout) with Hugging Face's names, the head tied to ``wte``: logits
    ``[batch, length, vocab]``; ``mask`` (bool ``[batch, length]``) hides padded keys."""

    def __init__(self, vocab: int, layers: int, d: int, heads: int, max_len: int):
        super().__init__()
        self.transformer = GPTBody(vocab, layers, d, heads, max_len)

    def forward(self, tokens, mask=None):
        t = self.transformer
        n = tokens.shape[1]
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool, device=tokens.device))[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        x = t.wte(tokens) + t.wpe(torch.arange(n, device=tokens.device))[None]
        for block in t.h:
            x = block(x, allowed)
        return t.ln_f(x) @ t.wte.weight.T


def train_lm_kd(model, x, y, mask, teacher_logits, schedule, opt, *, temperature, alpha):
    """Token-level distillation, one Adam step per row of ``schedule``; per-step losses."""
    losses = []
    for idx in schedule:
        opt.zero_grad()
        loss = masked_distillation_loss(model(x[idx]), teacher_logits[idx], y[idx], mask[idx], temperature, alpha)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
