"""Plots people would rather look at than read: learned densities, samples and learning curves."""

from __future__ import annotations

import io

import numpy as np
import torch


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    """The figure as PNG bytes (then closed)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def density_report(module, test_z: np.ndarray, history: list[dict], title: str, metric: str = "val_log_lik",
                   initial: float | None = None) -> bytes:
    """A PNG: (2-D) data, learned density, samples and the validation curve; (d > 2) the first two
    coordinates of data and samples, the histogram of test log-densities and the validation curve.

    ``module`` is a density ``nn.Module`` with frozen normalisers (``log_prob``, ``sample``); the
    data are standardised rows. ``initial``: the metric of the model before training (drawn as a
    dashed line, so a curve that never rises above its starting point shows as such).
    """
    plt = _figure()
    d = test_z.shape[1]
    samples, efficiency = module.sample(min(len(test_z), 2000), seed=0)
    samples = samples.numpy()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    lim = np.quantile(np.abs(test_z[:, :2]), 0.995) * 1.25 + 0.2
    axes[0].scatter(test_z[:, 0], test_z[:, 1] if d > 1 else np.zeros(len(test_z)), s=3, alpha=0.5)
    axes[0].set_title("test data (standardised)")
    if d == 2:
        g = np.linspace(-lim, lim, 300)
        xx, yy = np.meshgrid(g, g)
        with torch.no_grad():
            lp = module.log_prob(torch.tensor(np.c_[xx.ravel(), yy.ravel()], dtype=torch.float32)).numpy()
        axes[1].imshow(np.exp(lp).reshape(xx.shape), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
        axes[1].set_title("learned density p(x)")
    else:
        with torch.no_grad():
            lp = module.log_prob(torch.tensor(test_z, dtype=torch.float32)).numpy()
        axes[1].hist(lp[np.isfinite(lp)], bins=40)
        axes[1].set_title("test log-densities")
        axes[1].set_xlabel("log p (nats)")
    axes[2].scatter(samples[:, 0], samples[:, 1] if d > 1 else np.zeros(len(samples)), s=3, alpha=0.5, color="C1")
    axes[2].set_title(f"model samples (rejection efficiency {efficiency:.1%})")
    for ax in (axes[0], axes[2]):
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    epochs = [h["epoch"] for h in history if metric in h]
    axes[3].plot(epochs, [h[metric] for h in history if metric in h], label=metric)
    if history and "train_nll" in history[0]:
        axes[3].plot(epochs, [-h["train_nll"] for h in history if metric in h], label="train log-lik", alpha=0.6)
    if initial is not None and np.isfinite(initial):
        axes[3].axhline(initial, color="0.4", ls="--", lw=1, label=f"before training ({initial:.4f})")
        finite = [v for h in history if metric in h
                  for v in (h[metric], -h.get("train_nll", h[metric])) if np.isfinite(v)]
        if finite:  # zoom on the part of the curve around and above the starting point
            lo = min(initial, np.quantile(finite, 0.1))
            hi = max(initial, max(finite))
            pad = 0.1 * (hi - lo) + 1e-3
            axes[3].set_ylim(lo - pad, hi + pad)
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("nats per sample")
    axes[3].legend()
    axes[3].set_title("learning curve")
    fig.suptitle(title)
    return _png(plt, fig)


def trial_curves(curves: dict[str, list[float]], winner: str, metric: str, title: str) -> bytes:
    """A PNG: the validation curve of every trial of a sweep, the winner highlighted."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    finite = [v for c in curves.values() for v in c if np.isfinite(v)]
    for tid, c in curves.items():
        if tid != winner:
            ax.plot(range(len(c)), c, color="0.6", lw=0.8, alpha=0.7)
    if winner in curves:
        ax.plot(range(len(curves[winner])), curves[winner], color="C3", lw=2, label=f"winner {winner}")
        ax.legend()
    if finite:  # keep the interesting top of the range in view
        lo, hi = np.quantile(finite, 0.1), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title)
    return _png(plt, fig)


def classifier_report(metrics: dict, history: list[dict], title: str) -> bytes:
    """A PNG for a DEFT text classifier: per-layer activation density (|a| > τ and exact non-zero, test
    set) and the learning curve (validation accuracy and density per epoch)."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    dens, nz = metrics["density_per_layer"], metrics["nonzero_per_layer"]
    x = np.arange(len(dens))
    axes[0].bar(x - 0.2, dens, width=0.4, label=f"|a| > τ = {metrics['tau']:g}")
    axes[0].bar(x + 0.2, nz, width=0.4, label="a ≠ 0", alpha=0.6)
    axes[0].set_xticks(x)
    axes[0].set_xlabel("hooked MLP layer")
    axes[0].set_ylabel("fraction of activations")
    axes[0].set_ylim(0, 1.25)
    axes[0].set_title(f"activation density (test): mean {metrics['density']:.3f} at τ, {metrics['nonzero']:.3f} non-zero")
    axes[0].legend(loc="upper center", ncol=2)
    epochs = [h["epoch"] for h in history if "val_accuracy" in h]
    ax = axes[1]
    ax.plot(epochs, [h["val_accuracy"] for h in history if "val_accuracy" in h], "o-", label="val accuracy")
    if history and "train_accuracy" in history[0]:
        ax.plot(epochs, [h.get("train_accuracy", np.nan) for h in history if "val_accuracy" in h], "s--",
                label="train accuracy", alpha=0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("val_density", np.nan) for h in history if "val_accuracy" in h], "^-", color="C3",
             label="val density (τ)")
    ax2.set_ylabel("activation density")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="best")
    ax.set_title(f"learning curve (test accuracy {metrics['test_accuracy']:.3f}, majority {metrics['majority_accuracy']:.3f})")
    fig.suptitle(title)
    return _png(plt, fig)


def pareto_plot(rows: list[dict], front: list[dict], winner: str, objectives: list, title: str) -> bytes:
    """Every trial on the first two objectives, the Pareto front joined, the exported winner circled."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    (mx, _), (my, _) = objectives[0], objectives[1]
    pts = [(r[mx], r[my]) for r in rows if r.get(mx) is not None and r.get(my) is not None]
    if pts:
        ax.scatter(*zip(*pts), s=18, color="0.6", label="trials")
    line = sorted((r[mx], r[my]) for r in front)
    if line:
        ax.plot(*zip(*line), "o-", color="C0", label="Pareto front")
    win = [(r[mx], r[my]) for r in rows if r["trial_id"] == winner and r.get(my) is not None]
    if win:
        ax.scatter(*zip(*win), s=160, facecolors="none", edgecolors="C3", linewidths=2, label="exported")
    ax.set_xlabel(mx)
    ax.set_ylabel(my)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _png(plt, fig)
