"""``densiray condition NAME --coarse FILE [--sensors FILE] ...``: zero-shot posterior sampling with a
stored diffusion prior (or any model with the ConditionalSampler capability).

Writes ``mean.npy``, ``std.npy`` (and ``samples.npy`` with ``--samples``) and ``condition.png`` (truth if
given, the observations, the posterior mean and std) into ``--out``. Wired into :mod:`densiray.cli` by
``condition.add_parser(sub)``.

Files: ``--coarse`` a ``.npy``/``.npz``/``.csv`` array (h, w) or (C, h, w) of k×k block means;
``--sensors`` rows ``i,j,value`` (or ``channel,i,j,value``) in a ``.csv``/``.npy``; ``--truth`` the
full field, for the figure and an RMSE line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from densiray.errors import DataError


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``condition`` sub-command to an argparse ``sub``-parsers object."""
    c = sub.add_parser("condition", help="posterior samples of a diffusion prior given coarse and/or sensor data")
    c.add_argument("name", help="a stored model (diffusion prior)")
    c.add_argument("--coarse", help="k x k block means of the field: .npy/.npz/.csv, shape (h, w) or (C, h, w)")
    c.add_argument("--sensors", help="point sensors: .csv/.npy rows i,j,value (or channel,i,j,value)")
    c.add_argument("--factor", type=int, help="coarse-graining factor k (default: grid / coarse shape)")
    c.add_argument("--noise", type=float, default=0.1, help="observation noise std, data units (default 0.1)")
    c.add_argument("--n", type=int, default=16, help="posterior samples (default 16)")
    c.add_argument("--steps", type=int, default=64, help="sampler steps (default 64)")
    c.add_argument("--method", choices=["gaussian", "dps"], default="gaussian",
                   help="likelihood-score approximation: gaussian (score-based data assimilation) or dps")
    c.add_argument("--gamma", type=float, help="gaussian: variance term gamma for every row (default: 0.16 for block means, "
                   "min(0.16, 4/steps) for point sensors)")
    c.add_argument("--zeta", type=float, help="dps: step size zeta (default 0.5)")
    c.add_argument("--corrections", type=int, help="gaussian: Langevin corrector steps after each step (default 0)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--truth", help="the true field (.npy), for the figure and the RMSE")
    c.add_argument("--samples", action="store_true", help="also write samples.npy")
    c.add_argument("--store", help="model store (default $DENSIRAY_STORE or ./models)")
    c.add_argument("--out", default="condition", help="output folder (default ./condition)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(func=run)
    return c


def _numbers(cells: list[str]) -> bool:
    try:
        [float(c) for c in cells]
    except ValueError:
        return False
    return True


def read_array(path: str, what: str) -> np.ndarray:
    """A numeric array from .npy, .npz (its only array, or 'x'/'fields'/'data') or .csv/.txt (a first line
    that is not all numbers, such as ``i,j,value``, is a header)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such {what} file: {path}")
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("x", "fields", "data", what) if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"{path}: the .npz holds several arrays ({', '.join(keys)}); keep one")
                return z[key]
        delimiter = "," if p.suffix == ".csv" else None
        with open(p) as f:
            first = f.readline().split(delimiter)
        return np.loadtxt(p, delimiter=delimiter, ndmin=2, skiprows=0 if _numbers(first) else 1)  # a header
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {what} file {path}: {' '.join(str(e).split())[:200]}") from e


def figure(out: dict, coarse: np.ndarray | None, sensors: np.ndarray | None, truth: np.ndarray | None,
           path: Path, title: str = "") -> None:
    """Truth (if given), observations, posterior mean, std (and |error| with a truth), channel 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = np.asarray(out["mean"]), np.asarray(out["std"])
    if mean.ndim == 3:
        mean, std = mean[0], std[0]
        truth = truth[0] if truth is not None and truth.ndim == 3 else truth
        coarse = coarse[0] if coarse is not None and coarse.ndim == 3 else coarse
    panels = []
    lim = float(np.abs(mean).max() if truth is None else np.abs(truth).max())
    if truth is not None:
        panels.append(("truth", truth, "RdBu_r", (-lim, lim)))
    obs = np.full(mean.shape, np.nan)
    if coarse is not None:
        k = mean.shape[0] // coarse.shape[0]
        obs = np.kron(coarse, np.ones((k, k)))
    panels.append(("observations", obs, "RdBu_r", (-lim, lim)))
    panels.append(("posterior mean", mean, "RdBu_r", (-lim, lim)))
    panels.append(("posterior std", std, "viridis", (0, float(std.max()) or 1)))
    if truth is not None:
        panels.append(("|mean - truth|", np.abs(mean - truth), "viridis", (0, float(np.abs(mean - truth).max()) or 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (name, img, cmap, (lo, hi)) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        if name == "observations" and sensors is not None and len(sensors):
            s = np.asarray(sensors)
            s = s[:, 1:] if s.shape[1] == 4 else s
            ax.scatter(s[:, 1], s[:, 0], c=s[:, 2], cmap="RdBu_r", vmin=-lim, vmax=lim, s=14, edgecolors="k",
                       linewidths=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def run(args) -> int:
    """The ``densiray condition`` command."""
    from densiray.store import load_model

    if not args.coarse and not args.sensors:
        raise DataError("give --coarse FILE, --sensors FILE or both")
    model = load_model(args.name, args.store)
    if not callable(getattr(model, "condition", None)):
        raise DataError(f"model {args.name!r} ({getattr(model, 'kind', '?')}) cannot condition on observations")
    coarse = read_array(args.coarse, "coarse") if args.coarse else None
    sensors = read_array(args.sensors, "sensors") if args.sensors else None
    truth = read_array(args.truth, "truth") if args.truth else None
    kwargs = {k: getattr(args, k) for k in ("gamma", "zeta", "corrections") if getattr(args, k) is not None}
    out = model.condition(coarse=coarse, factor=args.factor, sensors=sensors, noise=args.noise, n=args.n,
                          steps=args.steps, seed=args.seed, return_samples=args.samples, method=args.method, **kwargs)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mean.npy", np.asarray(out["mean"]))
    np.save(folder / "std.npy", np.asarray(out["std"]))
    if args.samples:
        np.save(folder / "samples.npy", np.asarray(out["samples"]))
    summary = {"model": args.name, "out": str(folder), "n": out.get("n"), "steps": out.get("steps"),
               "method": out.get("method"), "factor": out.get("factor"), "sensors": out.get("sensors"),
               "noise": args.noise, "mean_std": float(np.mean(out["std"]))}
    if truth is not None:
        t = np.asarray(truth, dtype=np.float64).reshape(np.shape(out["mean"]))
        summary["rmse"] = float(np.sqrt(np.mean((np.asarray(out["mean"]) - t) ** 2)))
        truth = t
    figure(out, None if coarse is None else np.asarray(coarse, dtype=np.float64), sensors, truth,
           folder / "condition.png", title=f"{args.name}: {out.get('method')} posterior, n={out.get('n')}")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {folder}/mean.npy, std.npy{', samples.npy' if args.samples else ''} and condition.png")
        print(f"posterior  n={summary['n']} samples, {summary['steps']} steps, {summary['method']}; "
              f"mean std {summary['mean_std']:.4f}" + (f"; RMSE to truth {summary['rmse']:.4f}" if "rmse" in summary else ""))
    return 0
