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


def density_report(module, test_z: np.ndarray, history: list[dict], title: str, metric: str = "val_log_lik") -> bytes:
    """A PNG: (2-D) data, learned density, samples and the validation curve; (d > 2) the first two
    coordinates of data and samples, the histogram of test log-densities and the validation curve.

    ``module`` is a density ``nn.Module`` with frozen normalisers (``log_prob``, ``sample``); the
    data are standardised rows.
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
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("nats per sample")
    axes[3].legend()
    axes[3].set_title("learning curve")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
