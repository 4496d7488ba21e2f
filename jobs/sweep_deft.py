"""Ray Tune sweep of DEFT: the accuracy–activation-density Pareto front, through ``densiray tune deft``.

A thin driver of the product's tuner (``densiray.tune.sweep.tune``): Optuna's multi-objective sampler
(validation accuracy up, validation activation density down) proposes the density weight, ε, learning
rate and PEFT settings of DEFT's default space (or ``--weights`` for a fixed grid of density weights),
ASHA stops poor trials, every trial trains through the engine, and the winner (the Pareto trial with
the lowest density within ``--tolerance`` of the best accuracy) is exported with ``pareto.csv`` and
``pareto.png``. This job copies the front into ``<out>/deft_sweep.{json,md,png}``.

    python jobs/sweep_deft.py --out jobs/results --trials 24                      # a GPU cluster
    python jobs/sweep_deft.py --out /tmp/s --cpu-smoke                            # 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))


def markdown(s: dict, command: str) -> str:
    lines = [f"# DEFT sweep: accuracy vs activation density ({s['trials']} trials, {s['tune_time_s']:.0f} s)", "",
             f"Regenerate: `{command}`", "",
             "Objectives: validation accuracy (up) and validation activation density at the best epoch (down); "
             f"exported winner: trial {s['trial_id']} ({s['path']}).", "",
             "| trial | " + " | ".join(k for k in s["pareto"][0] if k.startswith(("model.", "train."))) +
             " | val accuracy | val density |" if s["pareto"] else "(no Pareto front)"]
    if s["pareto"]:
        keys = [k for k in s["pareto"][0] if k.startswith(("model.", "train."))]
        lines.append("|" + "---|" * (len(keys) + 3))
        for r in sorted(s["pareto"], key=lambda r: r["val_density"]):
            cells = [f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
            lines.append(f"| {r['trial_id']} | " + " | ".join(cells) +
                         f" | {r['best_val_accuracy']:.3f} | {r['val_density']:.3f} |")
    m = s["metrics"]
    lines += ["", f"Winner on the test split: accuracy {m['test_accuracy']:.3f}, density {m['density']:.3f} "
              f"(majority class {m['majority_accuracy']:.3f})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="jobs/results")
    p.add_argument("--dataset", default="finefood")
    p.add_argument("--model", default="minilm")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--weights", help="a fixed grid of density weights instead of the default space, e.g. 0,0.1,1")
    p.add_argument("--relu", action="store_true", help="swap the MLP activation to ReLU")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n", type=int, help="reviews in all (stratified subsample)")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy the winner may give up for density")
    p.add_argument("--time-budget-s", type=float)
    p.add_argument("--store", help="model store (default ./models)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a budget for 2 CPU cores: ReLU LoRA, weights 0/0.1/1, 200 reviews, 1 epoch, max_length 32")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.relu, args.weights, args.n, args.epochs, args.max_length, args.batch_size = True, "0,0.1,1", 200, 1, 32, 16
    from densiray.tune.sweep import tune

    space = None
    if args.weights:
        space = {"model.density_weight": {"grid": [float(w) for w in args.weights.split(",")]}}
    settings = {"trials": 1 if args.weights else args.trials, "epochs": args.epochs, "grace_period": 1,
                "pareto_tolerance": args.tolerance, "time_budget_s": args.time_budget_s,
                "searcher": "random" if args.weights else "optuna"}
    overrides = {"n": args.n, "model": {"model": args.model, "relu": args.relu or None, "max_length": args.max_length},
                 "train": {"batch_size": args.batch_size, "schedule": "linear", "warmup_fraction": 0.06}}
    s = tune("deft", args.dataset, space=space, settings=settings, overrides=overrides, name="deft-sweep",
             store=args.store, restart=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python jobs/sweep_deft.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "deft_sweep.json").write_text(json.dumps({"command": command, **s}, indent=1, default=str))
    (out / "deft_sweep.md").write_text(markdown(s, command))
    png = Path(s["path"], "pareto.png")
    if png.exists():
        (out / "deft_sweep.png").write_bytes(png.read_bytes())
    print((out / "deft_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
