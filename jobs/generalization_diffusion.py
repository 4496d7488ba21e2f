"""Generalization report (Kadkhodaie et al., ICLR 2024): two diffusion priors trained on disjoint halves
of N Kolmogorov fields, for several N. Samples generated from the same initial noise (same seed,
deterministic Heun sampler) are compared by cosine similarity between the two models, and each
sample to its nearest training field. Small N: each model memorises its half (samples close to a
training field, the two models disagree); large N: both learn nearly the same score (the two models'
samples agree and are far from every training field).

A thin driver: training goes through ``densiray.api.train`` (the engine), with the fields passed as
.npy files.

    PYTHONPATH=src python jobs/generalization_diffusion.py --sizes 16 256 --epochs 30 [--out jobs/results]

Writes ``generalization_diffusion.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="jobs/results")
    args = ap.parse_args()

    import densiray.api as dr
    from densiray.data.fields import kolmogorov
    from densiray.store import load_model

    sim = {"resolution": args.resolution, "fine": 64, "trajectories": 16, "snapshots": 24, "spinup": 15.0, "interval": 1.0}
    fields = kolmogorov(sim).x
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="densiray-generalization-"))
    rows = []
    for n in args.sizes:
        if 2 * n > len(fields):
            raise SystemExit(f"N = {n} needs {2 * n} fields, the dataset has {len(fields)}")
        idx = rng.permutation(len(fields))[:2 * n]
        halves = [fields[idx[:n]], fields[idx[n:]]]
        samples = []
        for h, part in enumerate(halves):
            path = work / f"n{n}_half{h}.npy"
            np.save(path, part)
            name = f"gen-n{n}-h{h}"
            dr.train("diffusion", str(path), name=name, store=str(work / "store"), restart=True, plot=False, overrides={
                "model": {"base": 16, "mults": [1, 2, 2], "ema_decay": 0.995},
                "train": {"epochs": args.epochs, "workers": 0, "batch_size": min(16, n), "lr": 2e-3, "patience": 0,
                          "zero_stage": 0}})
            samples.append(load_model(name, str(work / "store")).sample(args.samples, seed=0, steps=args.steps))
        between = np.diag(cosine(samples[0], samples[1]))
        nearest = [cosine(samples[h], halves[h]).max(axis=1) for h in (0, 1)]
        rows.append({"n": n, "between_models": float(between.mean()), "between_models_sd": float(between.std()),
                     "to_nearest_training_field": float(np.mean(nearest)), "samples": args.samples})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generalization_diffusion.json").write_text(json.dumps(
        {"rows": rows, "setting": {"simulation": sim, "epochs": args.epochs, "steps": args.steps}}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ns = [r["n"] for r in rows]
    ax.semilogx(ns, [r["between_models"] for r in rows], "o-", label="model A vs model B (same noise)")
    ax.semilogx(ns, [r["to_nearest_training_field"] for r in rows], "s--", label="sample vs nearest training field")
    ax.set_xlabel("training fields per model (N)")
    ax.set_ylabel("cosine similarity")
    ax.legend(fontsize=7)
    fig.savefig(out / "generalization_diffusion.png", dpi=90, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
