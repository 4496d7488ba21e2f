"""Ray Tune sweep over DEFT's density weight: the accuracy–activation-density Pareto front.

One function trainable per trial (``run_one`` of ``jobs/bench_deft.py``: plain PyTorch, bf16 on a GPU),
the tokenized data shipped once through the object store (``tune.with_parameters``), per-epoch
validation reports, then the trial's test accuracy and density. Trials are sized to the cluster:
``--cpus-per-trial`` (fractional is fine) and ``--gpus-per-trial`` with ``max_concurrent_trials``, and a
trial the cluster cannot place is refused up front instead of waiting forever.

    python jobs/sweep_deft.py --out jobs/results --weights 0,0.03,0.1,0.3,1 --gpus-per-trial 1   # a GPU cluster
    python jobs/sweep_deft.py --out jobs/results --cpu-smoke                                    # 2 CPU cores

Writes ``<out>/deft_sweep.json``, ``deft_sweep.md`` and ``deft_sweep.png``. Under ``ray job submit`` (or
with RAY_ADDRESS) it joins that cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent / "src").is_dir():
    sys.path.insert(0, str(HERE.parent / "src"))

import bench_deft as bench  # noqa: E402


def trainable(config: dict, data: dict, setup: dict) -> None:
    """One Tune trial: train DEFT with ``config["weight"]``; report validation per epoch, then test."""
    import torch
    from ray import tune

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(max(1, int(setup["threads"])))
    spec = {"method": setup["method"], "weight": float(config["weight"]), "eps": setup["eps"], "relu": setup["relu"]}
    r = bench.run_one(spec, data, epochs=setup["epochs"], batch_size=setup["batch_size"], seed=setup["seed"],
                      model=setup["model"], max_length=setup["max_length"], log=lambda s: None,
                      report=lambda epoch, m: tune.report({**m, "final": False}))
    tune.report({"epoch": len(r["history"]) - 1, "final": True, "val_accuracy": r["val_accuracy"],
                 "val_density": r["val_density"], "test_accuracy": r["test_accuracy"],
                 "test_density": r["test_density"], "test_nonzero": r["test_nonzero"],
                 "train_samples_per_s": r["train_samples_per_s"], "best_epoch": r["best_epoch"]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="jobs/results")
    p.add_argument("--method", default="lora", choices=bench.METHODS)
    p.add_argument("--weights", default="0,0.03,0.1,0.3,1")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--relu", action="store_true", help="swap the MLP activation to ReLU")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-eval", type=int, help="use only the first N validation and test reviews")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--time-budget-s", type=float, default=3600)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a budget for 2 CPU cores: ReLU LoRA, weights 0/0.1/1, 160 reviews, 1 epoch, max_length 32")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.relu, args.weights, args.n_train, args.n_eval = True, "0,0.1,1", 160, 160
        args.epochs, args.max_length, args.batch_size = 1, 32, 16
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    from ray import tune

    from densiray.models.deft import load_tokenizer, resolve_model

    t0 = time.time()
    raw = bench.load_data(args.data_dir, args.seed)
    model_path = resolve_model(args.model)
    data = bench.encode(load_tokenizer(model_path), raw, args.max_length, args.n_train)
    if args.n_eval:
        for split in ("val", "test"):
            data[split] = {k: v[:args.n_eval] for k, v in data[split].items()}

    if not ray.is_initialized():  # trials import bench_deft and densiray from this checkout
        paths = [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(x for x in paths if x),
                                           "RAY_TRAIN_V2_ENABLED": "1"}})
    have = ray.cluster_resources()
    if args.cpus_per_trial > have.get("CPU", 0) or args.gpus_per_trial > have.get("GPU", 0):
        print(f"sweep_deft: error: a trial needs {args.cpus_per_trial:g} CPU and {args.gpus_per_trial:g} GPU but the "
              f"cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; lower --cpus-per-trial or "
              "--gpus-per-trial", file=sys.stderr)
        return 2
    weights = [float(w) for w in args.weights.split(",")]
    setup = {"method": args.method, "eps": args.eps, "relu": args.relu, "epochs": args.epochs,
             "batch_size": args.batch_size, "seed": args.seed, "model": model_path, "max_length": args.max_length,
             "threads": max(1, int(args.cpus_per_trial))}
    concurrent = max(1, min(args.max_concurrent, int(have.get("CPU", 1) // args.cpus_per_trial),
                            int(have.get("GPU", 0) // args.gpus_per_trial) if args.gpus_per_trial else 1 << 30))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, data=data, setup=setup),
                            {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}),
        param_space={"weight": tune.grid_search(weights)},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", max_concurrent_trials=concurrent,
                                    time_budget_s=args.time_budget_s),
        run_config=tune.RunConfig(name=f"deft-sweep-{int(t0)}", verbose=1),  # trials under ~/ray_results
    )
    grid = tuner.fit()
    rows = []
    for res in grid:
        m = res.metrics or {}
        if res.error or not m.get("final"):
            rows.append({"weight": res.config["weight"], "error": str(res.error or "no final report")[:200]})
            continue
        rows.append({"weight": res.config["weight"], **{k: m[k] for k in (
            "val_accuracy", "val_density", "test_accuracy", "test_density", "test_nonzero", "train_samples_per_s",
            "best_epoch")}})
    rows.sort(key=lambda r: r["weight"])
    ok = [r for r in rows if "error" not in r]
    front = bench.pareto([(r["test_accuracy"], r["test_density"], f"w={r['weight']:g}") for r in ok])
    import platform

    import peft
    import torch
    import transformers

    result = {"command": "python jobs/sweep_deft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Ray cluster {dict(have)}",
              "versions": {"ray": ray.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__},
              "setup": {**setup, "model": args.model, "weights": weights, "cpus_per_trial": args.cpus_per_trial,
                        "gpus_per_trial": args.gpus_per_trial, "max_concurrent_trials": concurrent,
                        "n_train": len(data["train"]["labels"]), "n_val": len(data["val"]["labels"]),
                        "n_test": len(data["test"]["labels"]), "tau": bench.TAU},
              "trials": rows, "pareto_front": [{"weight": n, "test_accuracy": a, "test_density": d} for a, d, n in front],
              "wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deft_sweep.json").write_text(json.dumps(result, indent=1))
    md = [f"# DEFT density-weight sweep (Ray Tune): {args.method}, {'ReLU' if args.relu else 'GELU'}, ε = {args.eps:g}", "",
          f"Regenerate: `{result['command']}`", "", f"Machine: {result['machine']}; {result['wall_s']} s.", "",
          f"{len(weights)} trials (grid over the density weight), {concurrent} at a time, {args.cpus_per_trial:g} CPU / "
          f"{args.gpus_per_trial:g} GPU each; train {result['setup']['n_train']} reviews, "
          f"{args.epochs} epoch(s), max_length {args.max_length}; density at τ = {bench.TAU:g} (test).", "",
          "| weight | val acc | test acc | test density | non-zero | samples/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['weight']:g} | failed: {r['error']} | | | | |")
        else:
            md.append(f"| {r['weight']:g} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | {r['test_density']:.3f} "
                      f"| {r['test_nonzero']:.3f} | {r['train_samples_per_s']:.0f} |")
    md += ["", "Pareto front (accuracy up, density down): " + "; ".join(f"{n} ({a:.3f}, {d:.3f})" for a, d, n in front)]
    if args.cpu_smoke:
        md += ["", "This is the 2-CPU smoke budget: one short epoch leaves every trial near the majority class, so the "
               "front shows the density side only. The trade-off at a real budget is the GPU benchmark's density-weight "
               "sweep for LoRA (deft.md, Pareto fronts); run this script with --gpus-per-trial 1 on a GPU cluster for it."]
    (out / "deft_sweep.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.scatter([r["test_density"] for r in ok], [r["test_accuracy"] for r in ok])
        for r in ok:
            ax.annotate(f"w={r['weight']:g}", (r["test_density"], r["test_accuracy"]), fontsize=8)
        ax.plot([d for _, d, _ in front], [a for a, _, _ in front], "k--", lw=0.8, label="Pareto front")
        ax.set_xlabel(f"test activation density (|a| > {bench.TAU:g})")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Ray Tune sweep: {args.method}, {'ReLU' if args.relu else 'GELU'}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "deft_sweep.png", dpi=90)
        plt.close(fig)
    except Exception as e:
        print(f"plot failed: {e}", file=sys.stderr)
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
