"""Generalization report (Kadkhodaie et al., ICLR 2024): two diffusion priors trained on disjoint halves
of 2N Kolmogorov fields, for several N. Samples generated from the same initial noise (same seed,
deterministic Heun sampler) are compared by cosine similarity between the two models, and each
sample to its nearest training field. Small N: each model memorises its half (samples close to a
training field, the two models disagree); large N: both learn nearly the same score (the two models'
samples agree and are far from every training field).

The halves are disjoint by trajectory, not only by field (snapshots of one trajectory one time unit
apart are correlated; a random split by field would put near-copies in both halves). For every N the
two models get the same number of optimizer steps (``--opt-steps``), so a small N is trained for many
epochs, as memorisation needs, and the weights after the last step are exported (not the epoch with the
best validation loss, which for a small N is the one before it starts to memorise). As a reference the held-out fields' own cosine similarity to their
nearest training field is reported (what a generalizing model's samples should look like).

A thin driver: training goes through ``densiray.api.train`` (the engine), with the fields passed as
.npy files (80/10/10 % split by field inside; the validation loss picks the exported epoch).

    PYTHONPATH=src python jobs/generalization_diffusion.py --sizes 8 32 128 320 --opt-steps 400

Writes ``generalization_diffusion.json``, ``.md`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

# the benchmark's dataset (jobs/bench_diffusion.py): 32x32 fields from a 128x128 simulation
SIMULATION = {"resolution": 32, "fine": 128, "trajectories": 32, "snapshots": 24, "spinup": 15.0, "interval": 1.0,
              "seed": 0}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def pick(fields: np.ndarray, groups: np.ndarray, trajectories: np.ndarray, n: int, rng) -> np.ndarray:
    """n fields from the given trajectories, spread over them round-robin (each trajectory's snapshots
    in random order)."""
    per = [rng.permutation(np.flatnonzero(groups == t)) for t in trajectories]
    order = [p[i] for i in range(max(len(p) for p in per)) for p in per if i < len(p)]
    if n > len(order):
        raise SystemExit(f"N = {n} needs {n} fields per half, a half has {len(order)}")
    return fields[np.array(order[:n])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128, 320])
    ap.add_argument("--opt-steps", type=int, default=400, help="optimizer steps per model (the same for every N)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32, help="Heun steps of the samplers")
    ap.add_argument("--out", default="jobs/results")
    ap.add_argument("--name", default="generalization_diffusion", help="stem of the result files")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import densiray.api as dr
    from densiray.data.fields import kolmogorov
    from densiray.store import load_model

    data = kolmogorov(SIMULATION)
    fields, groups = data.x, data.groups
    rng = np.random.default_rng(0)
    trajs = rng.permutation(np.unique(groups))
    test_trajs, half_trajs = trajs[:2], (trajs[2:2 + (len(trajs) - 2) // 2], trajs[2 + (len(trajs) - 2) // 2:])
    held_out = fields[np.isin(groups, test_trajs)]
    from densiray.bench import scratch_dir

    work = Path(scratch_dir("densiray-generalization-"))
    rows, t_start = [], time.perf_counter()
    for n in args.sizes:
        halves = [pick(fields, groups, half_trajs[h], n, np.random.default_rng([n, h])) for h in (0, 1)]
        samples, times = [], []
        for h, part in enumerate(halves):
            path = work / f"n{n}_half{h}.npy"
            np.save(path, part)
            name = f"gen-n{n}-h{h}"
            bs = min(args.batch_size, max(1, round(0.8 * n)))
            per_epoch = max(1, math.ceil(max(1, n - 2 * max(1, round(0.1 * n))) / bs))
            epochs = max(2, math.ceil(args.opt_steps / per_epoch))
            t0 = time.perf_counter()
            dr.train("diffusion", str(path), name=name, store=str(work / "store"), restart=True, plot=False,
                     overrides={"model": {"base": args.base, "mults": [1, 2, 2], "ema_decay": 0.995,
                                          # N counts the fields as seen (the .npy halves' default too)
                                          "symmetry": "none"},
                                "train": {"epochs": epochs, "workers": 0, "batch_size": bs, "lr": 2e-3,
                                          "patience": 0, "zero_stage": 0, "schedule": "cosine",
                                          "warmup_fraction": 0.02, "checkpoint_every": max(1, epochs // 8),
                                          # the weights after the budget, not the best validation epoch
                                          # (which would stop a memorising small-N model early)
                                          "keep": "last"}})
            times.append(time.perf_counter() - t0)
            samples.append(load_model(name, str(work / "store")).sample(args.samples, seed=0, steps=args.steps))
        between = np.diag(cosine(samples[0], samples[1]))
        nearest = [cosine(samples[h], halves[h]).max(axis=1) for h in (0, 1)]
        other = [cosine(samples[h], halves[1 - h]).max(axis=1) for h in (0, 1)]
        reference = np.concatenate([cosine(held_out, halves[h]).max(axis=1) for h in (0, 1)])
        rows.append({"n": n, "epochs": epochs, "batch_size": bs, "train_s": [round(t, 1) for t in times],
                     "between_models": float(between.mean()), "between_models_sd": float(between.std()),
                     "to_nearest_own_training_field": float(np.mean(nearest)),
                     "to_nearest_other_half_field": float(np.mean(other)),
                     "held_out_to_nearest_training_field": float(reference.mean()), "samples": args.samples})
        print(json.dumps(rows[-1]), flush=True)
        write(rows, args, time.perf_counter() - t_start)  # after every size: a bounded run keeps what it did


def write(rows: list[dict], args, total: float) -> None:
    """JSON, markdown and the plot of the rows so far."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = {"simulation": SIMULATION, "opt_steps": args.opt_steps, "base": args.base, "sampler_steps": args.steps,
               "halves": "disjoint by trajectory (15 trajectories each; 2 more held out)",
               "hardware": f"CPU, 1 torch thread, 2 cores shared with other jobs (1-min load average "
                           f"{os.getloadavg()[0]:.1f} at the end)", "wall_s": round(total, 1)}
    (out / f"{args.name}.json").write_text(json.dumps({"rows": rows, "setting": setting}, indent=2))
    lines = ["# Generalization of diffusion priors: two models on disjoint halves of 2N fields", "",
             f"32x32 Kolmogorov vorticity ({SIMULATION['fine']}x{SIMULATION['fine']} simulation, block means); "
             f"U-Net base {args.base}, EDM, EMA 0.995, {args.opt_steps} optimizer steps per model (cosine lr from 2e-3), "
             f"{args.samples} samples per model from the same noise (deterministic Heun, {args.steps} steps); "
             f"{setting['halves']}; {total / 60:.1f} min in all ({setting['hardware']}).", "",
             "| N per model | epochs | A vs B (same noise) | sample vs nearest own training field | "
             "sample vs nearest field of the other half | held-out field vs nearest field of a half |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['epochs']} | {r['between_models']:.3f} ± {r['between_models_sd']:.3f} | "
                     f"{r['to_nearest_own_training_field']:.3f} | {r['to_nearest_other_half_field']:.3f} | "
                     f"{r['held_out_to_nearest_training_field']:.3f} |")
    lines += ["", "Memorisation shows as samples closer to their own half's fields than held-out fields are "
              "(column 4 above column 6) and two models that disagree (column 3 low); generalization as the two "
              "models agreeing on the same noise while their samples are no closer to their own training "
              "fields than to the other half's.", "",
              f"Command: `PYTHONPATH=src python jobs/generalization_diffusion.py --sizes "
              f"{' '.join(map(str, args.sizes))} --opt-steps {args.opt_steps}"
              f"{'' if args.name == 'generalization_diffusion' else ' --name ' + args.name}` (plot: {args.name}.png)."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ns = [r["n"] for r in rows]
    ax.semilogx(ns, [r["between_models"] for r in rows], "o-", label="model A vs model B (same noise)")
    ax.semilogx(ns, [r["to_nearest_own_training_field"] for r in rows], "s--", label="sample vs nearest own training field")
    ax.semilogx(ns, [r["to_nearest_other_half_field"] for r in rows], "^:", label="sample vs nearest other-half field")
    ax.semilogx(ns, [r["held_out_to_nearest_training_field"] for r in rows], "k-", lw=0.8,
                label="held-out field vs nearest training field")
    ax.set_xlabel("training fields per model (N)")
    ax.set_ylabel("cosine similarity")
    ax.legend(fontsize=7)
    fig.savefig(out / f"{args.name}.png", dpi=90, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
