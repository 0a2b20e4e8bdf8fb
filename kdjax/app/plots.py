"""PNG plots for the CLI (matplotlib, Agg backend). Each writes one file atomically."""

from __future__ import annotations

import io
import os

import numpy as np

from kdjax.checkpoint import atomic_write_bytes


def _figure(**kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(**kw)


def _save(plt, fig, path) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)


def softmax_temperature(path, logits, temperatures, probs, entropies) -> str:
    plt, fig, ax = _figure(figsize=(6.5, 4))
    k = len(logits)
    width = 0.8 / len(temperatures)
    for i, (T, p, h) in enumerate(zip(temperatures, probs, entropies)):
        ax.bar(np.arange(k) + i * width - 0.4 + width / 2, p, width, label=f"T={T:g} (H={h:.2f})")
    ax.set_xticks(range(k), [f"class {c}\nlogit {z:g}" for c, z in enumerate(logits)])
    ax.set_ylabel("softmax(z / T)")
    ax.set_title("Higher temperature -> softer distribution")
    ax.legend()
    return _save(plt, fig, path)


def learning_curves(path, curves: dict, title: str) -> str:
    """curves: name -> [members, steps] per-step minibatch losses (mean and range shown)."""
    plt, fig, ax = _figure(figsize=(6.5, 4))
    for name, c in curves.items():
        c = np.atleast_2d(np.asarray(c))
        steps = np.arange(1, c.shape[1] + 1)
        ax.plot(steps, c.mean(0), label=f"{name} (mean of {c.shape[0]})")
        if c.shape[0] > 1:
            ax.fill_between(steps, c.min(0), c.max(0), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("minibatch training loss")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def comparison(path, names, means, halfwidths, gain, title: str, ylabel: str) -> str:
    """Bars with 95% CIs, plus the paired gain of distillation with its CI."""
    plt, fig, (ax, ax2) = _figure(ncols=2, figsize=(8, 4), gridspec_kw={"width_ratios": [3, 1]})
    ax.bar(names, means, yerr=halfwidths, capsize=6, color=["#777", "#4a7", "#47a"][: len(names)])
    lo = min(m - h for m, h in zip(means, halfwidths))
    ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(m + h for m, h in zip(means, halfwidths)) + 0.05))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    g, gh = gain
    ax2.errorbar([0], [g], yerr=[gh], fmt="o", capsize=8, color="#47a")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks([0], ["distilled -\nstandard"])
    ax2.set_title("paired gain (95% CI)")
    return _save(plt, fig, path)


def hyper_sweeps(path, temps, t_mean, t_ci, alphas, a_mean, a_ci, ylabel: str) -> str:
    plt, fig, (ax1, ax2) = _figure(ncols=2, figsize=(9, 3.8))
    ax1.errorbar(temps, t_mean, yerr=t_ci, fmt="o-", capsize=5)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("temperature T (alpha = 0.7)")
    ax1.set_ylabel(ylabel)
    ax2.errorbar(alphas, a_mean, yerr=a_ci, fmt="o-", capsize=5, color="C1")
    ax2.set_xlabel("alpha (T = 3)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def heatmap(path, temps, alphas, values, title: str) -> str:
    """values: [len(temps), len(alphas)] mean test accuracy."""
    plt, fig, ax = _figure(figsize=(1.2 * len(alphas) + 2.5, 0.6 * len(temps) + 2))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_xlabel("alpha")
    ax.set_ylabel("temperature")
    for i in range(len(temps)):
        for j in range(len(alphas)):
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="mean test accuracy")
    ax.set_title(title)
    return _save(plt, fig, path)


def omitted_class(path, mean_ci: dict, paper: dict, omit: int, title: str) -> str:
    """Accuracy on the omitted class and overall, raw and bias-matched, with 95% CIs;
    the paper's distilled figures as markers. ``mean_ci[when][model][on] = (mean, half)``."""
    plt, fig, axes = _figure(ncols=2, figsize=(9, 4))
    bars = [("teacher", "before", "#777"), ("standard", "before", "#4a7"), ("distilled", "before", "#47a"),
            ("standard", "after", "#9d9"), ("distilled", "after", "#8ad")]
    for ax, on in zip(axes, ("omitted", "overall")):
        for i, (model, when, color) in enumerate(bars):
            m, h = mean_ci[when][model][on]
            ax.bar(i, m, yerr=h, capsize=5, color=color)
        for i, when in ((2, "before"), (4, "after")):
            ax.plot(i, paper[when][on], "k*", ms=12, label="paper (MNIST)" if i == 2 else None)
        ax.set_xticks(range(len(bars)), ["teacher", "standard", "distilled", "standard\n+bias", "distilled\n+bias"])
        ax.set_ylim(0, 1.2)
        ax.set_title(f"test accuracy on class {omit}" if on == "omitted" else "overall test accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    return _save(plt, fig, path)


def methods_bars(path, names, means, halfwidths, title: str, ylabel: str) -> str:
    """One bar per method with its 95% CI (``kdjax lm-methods``, one budget)."""
    plt, fig, ax = _figure(figsize=(max(6, 0.7 * len(names) + 2), 4))
    ax.bar(names, means, yerr=halfwidths, capsize=4, color=["#777"] + ["#47a"] * (len(names) - 1))
    lo, hi = min(m - h for m, h in zip(means, halfwidths)), max(m + h for m, h in zip(means, halfwidths))
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=45)
    return _save(plt, fig, path)


def quality_cost(path, names, costs, means, halfwidths, title: str, xlabel: str, ylabel: str) -> str:
    """Each method's quality (with its 95% CI) against its cost, log scale (``kdjax lm-methods``)."""
    plt, fig, ax = _figure(figsize=(6.5, 4.5))
    ax.errorbar(costs, means, yerr=halfwidths, fmt="o", capsize=4, color="#47a")
    for name, x, y in zip(names, costs, means):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(plt, fig, path)

