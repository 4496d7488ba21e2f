"""Benchmark: a diffusion prior of 2-D Kolmogorov flow, conditioned zero-shot on held-out fields.

A thin driver: training runs through densiray's engine (``densiray.api.train``), sampling and
conditioning through the exported model (``densiray.load_model``). Measures, on fields from held-out
trajectories:

* 4× coarse observations (block means, noise σ = 0.1): RMSE of the posterior mean against bicubic
  (periodic) upsampling of the coarse field, the residual std of A(x) − y of the samples against σ,
  coverage of the central 90 % interval (mean ± 1.645 std) and the spread–skill ratio;
* 5 % random point sensors only (σ = 0.1): RMSE of the posterior mean against thin-plate RBF
  interpolation (scipy);
* unconditional samples: radial energy spectrum against the held-out data's;
* held-out log-likelihood by the probability-flow ODE (nats per dimension, data units).

    PYTHONPATH=src python jobs/bench_diffusion.py [--resolution 32] [--epochs 36] [--out jobs/results]
    PYTHONPATH=src python jobs/bench_diffusion.py --reuse --store STORE   # condition an exported prior again

Writes ``diffusion.json``, ``diffusion.md`` and ``diffusion.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# 32x32 fields block-averaged from a 128x128 simulation (the simulator's default 4x grid; a 64x64 run under-
# resolves Re 1000 and piles enstrophy up near its cut-off), 32 trajectories x 24 snapshots
SIMULATION = {"fine": 128, "trajectories": 32, "snapshots": 24, "spinup": 15.0, "interval": 1.0}


def bicubic(coarse: np.ndarray, factor: int) -> np.ndarray:
    """Periodic bicubic upsampling of block means (pad one cell circularly, interpolate, crop)."""
    t = torch.as_tensor(coarse, dtype=torch.float64)[None, None]
    t = torch.nn.functional.pad(t, (1, 1, 1, 1), mode="circular")
    up = torch.nn.functional.interpolate(t, scale_factor=factor, mode="bicubic", align_corners=False)
    return up[0, 0, factor:-factor, factor:-factor].numpy()


def rbf(sensors: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Thin-plate RBF interpolation of point sensors (rows i, j, value) onto the grid, with periodic images."""
    from scipy.interpolate import RBFInterpolator

    h, w = shape
    pts, vals = [], []
    for di in (-h, 0, h):
        for dj in (-w, 0, w):
            pts.append(sensors[:, :2] + [di, dj])
            vals.append(sensors[:, 2])
    f = RBFInterpolator(np.concatenate(pts), np.concatenate(vals), kernel="thin_plate_spline", smoothing=1e-3)
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return f(np.stack([ii.ravel(), jj.ravel()], 1)).reshape(h, w)


def block_operator(r: int, k: int) -> np.ndarray:
    """The k x k block-mean operator of an r x r grid as a dense ((r/k)², r²) matrix."""
    a = np.zeros(((r // k) ** 2, r * r))
    for bi in range(r // k):
        for bj in range(r // k):
            blk = np.zeros((r, r))
            blk[bi * k:(bi + 1) * k, bj * k:(bj + 1) * k] = 1.0 / k**2
            a[bi * (r // k) + bj] = blk.ravel()
    return a


def wiener(train: np.ndarray, k: int, sigma: float):
    """The linear-Gaussian posterior mean (Wiener filter / kriging) for k x k block means with noise sigma,
    x̂ = μ + Σ Aᵀ (A Σ Aᵀ + σ² I)⁻¹ (y − A μ), with μ and Σ estimated from the training fields and their
    shifts (the flow is statistically homogeneous in x and periodic with the forcing's period in y).
    The best estimator that is linear in y; a reference for how much the coarse field can tell.
    Returns (estimate(y) -> field, posterior std per pixel)."""
    n, r, _ = train.shape
    aug = np.concatenate([np.roll(np.roll(train, sx, axis=2), sy, axis=1)
                          for sx in range(0, r, 2) for sy in range(0, r, r // 4)]).reshape(-1, r * r)
    mu, cov = aug.mean(0), np.cov(aug, rowvar=False)
    a = block_operator(r, k)
    gain = cov @ a.T @ np.linalg.inv(a @ cov @ a.T + sigma**2 * np.eye(len(a)))
    post_sd = np.sqrt(np.clip(np.diag(cov - gain @ a @ cov), 0, None)).reshape(r, r)
    return (lambda y: (mu + gain @ (y.ravel() - a @ mu)).reshape(r, r)), post_sd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=36)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--fields", type=int, default=6, help="held-out fields conditioned on")
    ap.add_argument("--n", type=int, default=16, help="posterior samples per field")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=None, help="gaussian variance term (default: the model's)")
    ap.add_argument("--corrections", type=int, default=None, help="Langevin corrector steps (default: the model's)")
    ap.add_argument("--schedule", default="cosine", help="learning-rate schedule of the training run")
    ap.add_argument("--store", default=None)
    ap.add_argument("--budget-note", default="", help="how the training budget was bounded (written to the results)")
    ap.add_argument("--reuse", action="store_true", help="condition with the model already in --store (no training)")
    ap.add_argument("--out", default="jobs/results")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import densiray.api as dr
    from densiray.bench import scratch_dir
    from densiray.data.fields import field_statistics
    from densiray.models.diffusion import DEFAULT_CORRECTIONS
    from densiray.store import load_model
    from densiray.train.diffusion import DiffusionTask

    store = args.store or scratch_dir("densiray-bench-diffusion-")
    model_cfg = {"resolution": args.resolution, "base": args.base, "mults": [1, 2, 2], "ema_decay": 0.995,
                 "simulation": SIMULATION}
    t0 = time.perf_counter()
    if args.reuse:
        stored = load_model("kolmogorov-bench", store)
        prov = stored.manifest.get("provenance", {})
        summary = {"metrics": stored.metrics, "epochs_run": prov.get("epochs_run"), "best_epoch": prov.get("best_epoch"),
                   "train_time_s": prov.get("train_time_s")}
    else:
        summary = dr.train("diffusion", "kolmogorov", name="kolmogorov-bench", store=store, restart=True, overrides={
            "model": model_cfg,
            "train": {"epochs": args.epochs, "workers": 0, "batch_size": args.batch_size, "lr": args.lr,
                      "patience": 0, "zero_stage": 0, "schedule": args.schedule, "warmup_fraction": 0.02}})
    train_wall = time.perf_counter() - t0 if not args.reuse else float(summary["train_time_s"] or 0)
    model = load_model("kolmogorov-bench", store)
    task = DiffusionTask("kolmogorov", model_cfg)
    test = task.test_x[:, 0] * task.std[0] + task.mean[0]
    rng = np.random.default_rng(0)
    pick = rng.choice(len(test), size=min(args.fields, len(test)), replace=False)
    r, k, sigma = args.resolution, 4, 0.1
    linear, linear_sd = wiener(task.train_x[:, 0] * task.std[0] + task.mean[0], k, sigma)
    post_kw = {key: getattr(args, key) for key in ("gamma", "corrections") if getattr(args, key) is not None}
    load0 = os.getloadavg()[0]

    coarse_rows, sensor_rows, examples = [], [], {}
    t1 = time.perf_counter()
    for idx in pick:
        truth = test[idx]
        coarse = truth.reshape(r // k, k, r // k, k).mean(axis=(1, 3)) + sigma * rng.normal(size=(r // k, r // k))
        out = model.condition(coarse=coarse, noise=sigma, n=args.n, steps=args.steps, seed=int(idx),
                              return_samples=True, **post_kw)
        mean, std, samples = out["mean"], out["std"], out["samples"]
        base = bicubic(coarse, k)
        resid = samples.reshape(args.n, r // k, k, r // k, k).mean(axis=(2, 4)) - coarse[None]
        err = mean - truth
        coarse_rows.append({"rmse": float(np.sqrt((err**2).mean())), "rmse_bicubic": float(np.sqrt(((base - truth) ** 2).mean())),
                            "rmse_wiener": float(np.sqrt(((linear(coarse) - truth) ** 2).mean())),
                            # the posterior mean of n samples carries Monte-Carlo error: E|mean_n - x|² = MSE + var/n
                            "rmse_n_inf": float(np.sqrt(max((err**2).mean() - (std**2).mean() / args.n, 0.0))),
                            "residual_std": float(resid.std()), "coverage_90": float((np.abs(err) <= 1.645 * std).mean()),
                            "spread": float(np.sqrt((std**2).mean()))})
        # 5 % random sensors only
        m = max(1, round(0.05 * r * r))
        flat = rng.choice(r * r, size=m, replace=False)
        ii, jj = flat // r, flat % r
        sens = np.stack([ii, jj, truth[ii, jj] + sigma * rng.normal(size=m)], 1)
        so = model.condition(sensors=sens, noise=sigma, n=args.n, steps=args.steps, seed=int(idx) + 1, **post_kw)
        rb = rbf(sens, (r, r))
        sensor_rows.append({"rmse": float(np.sqrt(((so["mean"] - truth) ** 2).mean())),
                            "rmse_rbf": float(np.sqrt(((rb - truth) ** 2).mean())),
                            "coverage_90": float((np.abs(so["mean"] - truth) <= 1.645 * so["std"]).mean())})
        if not examples:
            examples = {"truth": truth, "coarse": coarse, "mean": mean, "std": std, "bicubic": base,
                        "sensors": sens, "s_mean": so["mean"], "s_std": so["std"], "rbf": rb}
    cond_wall = time.perf_counter() - t1

    def avg(rows, key):
        return float(np.mean([row[key] for row in rows]))

    rmse, rmse_b = avg(coarse_rows, "rmse"), avg(coarse_rows, "rmse_bicubic")
    spread = avg(coarse_rows, "spread")
    uncond = model.sample(16, seed=0, steps=args.steps)[:, 0]
    spec_s, spec_d = field_statistics(uncond), field_statistics(test)
    ks = np.arange(1, len(spec_d["spectrum"]))
    spec_err = float(np.mean(np.abs(np.log(np.array(spec_s["spectrum"][1:]) / np.array(spec_d["spectrum"][1:])))))
    results = {
        "setting": {"resolution": r, "fields": "Kolmogorov flow, Re 1000, drag 0.1, forcing sin(4y); simulated "
                                              f"on {SIMULATION['fine']}x{SIMULATION['fine']} and block-averaged",
                    "simulation": SIMULATION, "split": task.dataset["split"], "model": model_cfg,
                    # the training fields' symmetry group, as the exported prior's manifest records it
                    "symmetry": model.manifest.get("config", {}).get("dataset", {}).get("symmetry", "none"),
                    "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "workers": 0,
                              "schedule": args.schedule},
                    "hardware": f"CPU only, 2 cores shared with other jobs (1-min load average {load0:.1f} before "
                                f"conditioning, {os.getloadavg()[0]:.1f} after), 1 torch thread",
                    "train_wall_s": round(train_wall, 1), "condition_wall_s": round(cond_wall, 1),
                    "reused_prior": bool(args.reuse),
                    "budget": args.budget_note or f"{args.epochs} epochs, workers 0 (in-process engine)",
                    "posterior": {"method": "gaussian (score-based data assimilation)",
                                  "gamma": {"coarse": out["gamma"]["coarse"], "sensors": so["gamma"]["sensors"]},
                                  "corrections": post_kw.get("corrections", DEFAULT_CORRECTIONS),
                                  "n": args.n, "steps": args.steps, "sampler": "EDM Heun"},
                    "held_out_fields": len(pick),
                    "command": "PYTHONPATH=src python jobs/bench_diffusion.py " + " ".join(sys.argv[1:])},
        "coarse_4x": {"rmse": rmse, "rmse_bicubic": rmse_b, "rmse_ratio_to_bicubic": rmse / rmse_b,
                      "rmse_wiener": avg(coarse_rows, "rmse_wiener"),
                      "wiener_ratio_to_bicubic": avg(coarse_rows, "rmse_wiener") / rmse_b,
                      "wiener_posterior_sd": float(np.sqrt((linear_sd**2).mean())),
                      "rmse_n_inf": avg(coarse_rows, "rmse_n_inf"),
                      "ratio_n_inf_to_bicubic": avg(coarse_rows, "rmse_n_inf") / rmse_b,
                      "residual_std": avg(coarse_rows, "residual_std"), "sigma": sigma,
                      "residual_std_over_sigma": avg(coarse_rows, "residual_std") / sigma,
                      "coverage_90": avg(coarse_rows, "coverage_90"), "spread_skill": spread / rmse,
                      "per_field": coarse_rows},
        "sensors_5pct": {"rmse": avg(sensor_rows, "rmse"), "rmse_rbf": avg(sensor_rows, "rmse_rbf"),
                         "rmse_ratio_to_rbf": avg(sensor_rows, "rmse") / avg(sensor_rows, "rmse_rbf"),
                         "coverage_90": avg(sensor_rows, "coverage_90"), "per_field": sensor_rows},
        "spectrum": {"k": ks.tolist(), "samples": spec_s["spectrum"][1:], "data": spec_d["spectrum"][1:],
                     "mean_abs_log_ratio": spec_err, "enstrophy_samples": spec_s["enstrophy"],
                     "enstrophy_data": spec_d["enstrophy"]},
        "log_likelihood": {"test_nats_per_dim": summary["metrics"].get("test_log_lik"),
                           "se": summary["metrics"].get("test_log_lik_se"),
                           "units": summary["metrics"].get("log_lik_units")},
        "denoising_loss": {"val": summary["metrics"].get("val_loss"), "test": summary["metrics"].get("test_loss")},
        "training": {"epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
                     "train_time_s": summary["train_time_s"]},
    }
    results["rmse_ratio_to_bicubic"] = results["coarse_4x"]["rmse_ratio_to_bicubic"]
    results["coverage_90"] = results["coarse_4x"]["coverage_90"]
    c4, s5 = results["coarse_4x"], results["sensors_5pct"]
    results["targets"] = {
        "rmse <= 0.5 x bicubic": {"value": c4["rmse_ratio_to_bicubic"], "met": c4["rmse_ratio_to_bicubic"] <= 0.5},
        "coverage_90 in [0.85, 0.95]": {"value": c4["coverage_90"], "met": 0.85 <= c4["coverage_90"] <= 0.95},
        "residual std <= 1.5 sigma": {"value": c4["residual_std_over_sigma"], "met": c4["residual_std_over_sigma"] <= 1.5},
        "sensors rmse < rbf": {"value": s5["rmse_ratio_to_rbf"], "met": s5["rmse_ratio_to_rbf"] < 1.0},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusion.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "diffusion.md")
    write_figure(examples, results, out / "diffusion.png")
    print(json.dumps({k: v for k, v in results.items() if k in ("rmse_ratio_to_bicubic", "coverage_90", "targets")}, indent=2))


def _resolved_scales(r: int, k: int = 4, forcing: int = 4) -> str:
    """What kxk block means of an rxr field resolve, against the forcing wavenumber (where k²E(k) peaks)."""
    m = r // k
    head = (f"The {k}x{k} block means of a {r}x{r} field form a {m}x{m} grid whose Nyquist wavenumber ({m // 2}) ")
    if m // 2 <= forcing:
        return head + (f"is the forcing's ({forcing}), where the enstrophy spectrum peaks: most of the vorticity is "
                       "below what the observations resolve, so the 0.5 x bicubic target is out of reach of any "
                       "posterior mean on this data (see notes/diffusion.md).")
    return head + (f"is above the forcing's ({forcing}), where the enstrophy spectrum peaks: the observations resolve "
                   "the energetic scales, and what the prior knows of the finer ones is what takes its posterior mean "
                   "below the linear estimator's error.")


def _symmetry_text(kind: str) -> str:
    """How the training fields were augmented (``model.symmetry``)."""
    return {"none": "no data augmentation",
            "kolmogorov": "training fields augmented by Kolmogorov flow's symmetries (shifts in x; x -> -x with "
                          "a half-period shift in y and the sign flipped)",
            "translations": "training fields augmented by periodic shifts"}.get(kind, kind)


def _gamma_text(g) -> str:
    """The posterior's gamma: one number, or the block-mean and point-sensor rows' (results since the per-row
    default)."""
    if isinstance(g, dict):
        return f"{g['coarse']:g} for block means, {g['sensors']:g} for point sensors"
    return f"{g:g}"


def write_markdown(res: dict, path: Path) -> None:
    c4, s5, st = res["coarse_4x"], res["sensors_5pct"], res["setting"]
    ll = res["log_likelihood"]
    lines = [
        "# Diffusion prior on Kolmogorov flow: zero-shot conditioning on held-out fields",
        "",
        f"{st['resolution']}x{st['resolution']} vorticity fields ({st['fields']}); split by trajectory "
        f"{st['split']}. U-Net base {st['model']['base']}, EDM preconditioning, EMA {st['model']['ema_decay']}, "
        f"{_symmetry_text(st.get('symmetry', 'none'))}; "
        f"{res['training']['epochs_run']} epochs (batch {st['train']['batch_size']}, lr {st['train']['lr']}) in "
        f"{res['training']['train_time_s']:.0f} s of training ("
        + ("the prior exported by an earlier run of this job, conditioned again with --reuse; " if st.get("reused_prior")
           else f"{st['train_wall_s']:.0f} s wall with the data's simulation or loading; ")
        + f"{st['budget']}); {st['hardware']}. Posterior: "
        f"{st['posterior']['method']}, gamma {_gamma_text(st['posterior']['gamma'])}, "
        f"{st['posterior'].get('corrections', 0)} "
        f"Langevin corrections per step, n = {st['posterior']['n']} samples, "
        f"{st['posterior']['steps']} Heun steps; {st['held_out_fields']} held-out fields.",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for name, t in res["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else 'NO'} |")
    lines += [
        "",
        "| 4x coarse, sigma 0.1 | value |", "|---|---|",
        f"| RMSE posterior mean | {c4['rmse']:.4f} |", f"| RMSE bicubic | {c4['rmse_bicubic']:.4f} |",
        f"| ratio | {c4['rmse_ratio_to_bicubic']:.3f} |",
        f"| ratio with the n-sample Monte-Carlo error removed (MSE - var/n) | {c4['ratio_n_inf_to_bicubic']:.3f} |",
        f"| RMSE linear-Gaussian (Wiener) posterior mean, training covariance | {c4['rmse_wiener']:.4f} "
        f"(ratio {c4['wiener_ratio_to_bicubic']:.3f}; its posterior std {c4['wiener_posterior_sd']:.3f}) |",
        f"| residual std of A(x) - y | {c4['residual_std']:.4f} (sigma {c4['sigma']}) |",
        f"| coverage of the 90 % interval | {c4['coverage_90']:.3f} |", f"| spread / skill | {c4['spread_skill']:.3f} |",
        "",
        f"What the coarse field can tell: the best estimator linear in y (the Wiener filter with the training "
        f"fields' own covariance) reaches {c4['wiener_ratio_to_bicubic']:.3f} of bicubic's RMSE, and its posterior "
        f"std is {c4['wiener_posterior_sd']:.2f}; the diffusion posterior mean, with the "
        f"Monte-Carlo error of {st['posterior']['n']} samples removed, reaches {c4['ratio_n_inf_to_bicubic']:.3f}. "
        + _resolved_scales(st["resolution"]),
        "",
        "| 5 % sensors, sigma 0.1 | value |", "|---|---|",
        f"| RMSE posterior mean | {s5['rmse']:.4f} |", f"| RMSE thin-plate RBF | {s5['rmse_rbf']:.4f} |",
        f"| ratio | {s5['rmse_ratio_to_rbf']:.3f} |", f"| coverage of the 90 % interval | {s5['coverage_90']:.3f} |",
        "",
        f"Energy spectrum of 16 unconditional samples vs held-out data: mean |log ratio| over shells "
        f"{res['spectrum']['mean_abs_log_ratio']:.3f}; enstrophy {res['spectrum']['enstrophy_samples']:.3f} vs "
        f"{res['spectrum']['enstrophy_data']:.3f}.",
        "",
        f"Held-out log-likelihood: {ll['test_nats_per_dim']:.4f} ± {ll['se']:.4f} nats/dim ({ll['units']}).",
        "",
        f"Command: `{st.get('command', 'PYTHONPATH=src python jobs/bench_diffusion.py')}` (figures: diffusion.png, "
        "diffusion_spectrum.png).",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_figure(ex: dict, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = ex["truth"]
    lim = float(np.abs(t).max())
    k = t.shape[0] // ex["coarse"].shape[0]
    fig, axes = plt.subplots(2, 6, figsize=(19, 6.4))
    row1 = [("truth", t, "RdBu_r", -lim, lim), ("4x coarse obs", np.kron(ex["coarse"], np.ones((k, k))), "RdBu_r", -lim, lim),
            ("posterior mean", ex["mean"], "RdBu_r", -lim, lim), ("posterior std", ex["std"], "viridis", 0, None),
            ("|mean - truth|", np.abs(ex["mean"] - t), "viridis", 0, None), ("|bicubic - truth|", np.abs(ex["bicubic"] - t), "viridis", 0, None)]
    obs = np.full_like(t, np.nan)
    s = ex["sensors"]
    obs[s[:, 0].astype(int), s[:, 1].astype(int)] = s[:, 2]
    row2 = [("truth", t, "RdBu_r", -lim, lim), ("5 % sensors", obs, "RdBu_r", -lim, lim),
            ("posterior mean", ex["s_mean"], "RdBu_r", -lim, lim), ("posterior std", ex["s_std"], "viridis", 0, None),
            ("|mean - truth|", np.abs(ex["s_mean"] - t), "viridis", 0, None), ("|RBF - truth|", np.abs(ex["rbf"] - t), "viridis", 0, None)]
    for axrow, row in zip(axes, (row1, row2)):
        emax = max(float(np.nanmax(img)) for name, img, *_ in row if name.startswith("|"))
        for ax, (name, img, cmap, lo, hi) in zip(axrow, row):
            hi = (emax if name.startswith("|") else float(np.nanmax(img))) if hi is None else hi
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(name, fontsize=9)
            ax.set_axis_off()
            fig.colorbar(im, ax=ax, fraction=0.046)
    c4 = res["coarse_4x"]
    fig.suptitle(f"Kolmogorov {t.shape[0]}², 4x coarse: RMSE ratio to bicubic {c4['rmse_ratio_to_bicubic']:.2f}, "
                 f"coverage90 {c4['coverage_90']:.2f}; sensors: RMSE ratio to RBF {res['sensors_5pct']['rmse_ratio_to_rbf']:.2f}")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    sp = res["spectrum"]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.loglog(sp["k"], sp["data"], "k-", label="held-out data")
    ax.loglog(sp["k"], sp["samples"], "r--", label="diffusion samples")
    ax.set_xlabel("k")
    ax.set_ylabel("E(k)")
    ax.legend()
    fig.savefig(path.with_name("diffusion_spectrum.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
