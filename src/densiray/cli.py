"""The ``densiray`` command. Failures print one line (``densiray: error: ...``) and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from densiray import __version__
from densiray.errors import DensirayError

FAMILIES = ["dnmm", "deft"]  # families whose Task is implemented (see densiray.train.TASKS)
# `train` flags that set the DEFT model config (overrides["model"]), and their config keys
DEFT_FLAGS = {"model": "model", "peft": "peft", "density_weight": "density_weight", "relu": "relu",
              "max_length": "max_length", "tau": "tau", "eps": "eps"}


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def print_summary(s: dict) -> None:
    """A short human summary of a finished training run."""
    m = s["metrics"]
    print()
    shape = f", d={s['d']}" if s.get("d") is not None else ""
    print(f"model      {s['name']}  ({s['kind']} on {s['dataset']}{shape})")
    print(f"stored at  {s['path']}")
    print(f"training   {s['epochs_run']} epochs in {s['train_time_s']:.1f} s, best epoch {s['best_epoch']}"
          + ("  (resumed)" if s.get("resumed") else ""))
    if "test_accuracy" in m:  # a classifier (DEFT)
        print(f"held-out   test accuracy {_fmt(m['test_accuracy'])} (validation {_fmt(m.get('val_accuracy'))}; "
              f"majority class {_fmt(m.get('majority_accuracy'))})")
        print(f"density    {_fmt(m.get('density'))} of MLP activations with |a| > {m.get('tau')} "
              f"({_fmt(m.get('nonzero'))} non-zero), per layer "
              + " ".join(f"{v:.2f}" for v in m.get("density_per_layer", [])))
        print(f"peft       {m.get('peft')}, density weight {m.get('density_weight')}, "
              f"{m.get('trainable_params')} trainable of {m.get('total_params')} parameters")
    if "test_log_lik" in m:
        print(f"held-out   test log-likelihood {_fmt(m['test_log_lik'])} ± {_fmt(m.get('test_log_lik_se'))} nats/sample"
              f" (validation {_fmt(m.get('val_log_lik'))}; standardised units)")
    if "integral" in m:
        print(f"integral   ∫p = {m['integral']:.5f} ± {m['integral_se']:.5f} (independent estimate)")
    if s.get("plot"):
        print(f"plot       {s['plot']}")


def _train(args) -> int:
    import densiray.api as api

    from densiray.errors import ConfigError

    given = [f for f in DEFT_FLAGS if getattr(args, f) is not None and getattr(args, f) is not False]
    model = {DEFT_FLAGS[f]: getattr(args, f) for f in given}
    if model and args.family != "deft":
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ConfigError(f"{flags} apply to 'densiray train deft' only; set {args.family}'s model options in --config")
    overrides = {"model": model, "train": {"workers": args.workers, "zero_stage": args.zero_stage, "epochs": args.epochs,
                                           "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size}}
    # With --json, stdout carries the JSON alone: progress and worker logs go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = api.train(args.family, args.dataset, config=args.config, overrides=overrides, name=args.name,
                            store=args.store, restart=args.restart)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
    return 0


def print_sweep(s: dict) -> None:
    """A short human summary of a finished sweep and its exported winner."""
    m = s["metrics"]
    print()
    print(f"model      {s['name']}  (tuned {s['kind']} on {s['dataset']}, d={s['d']})")
    print(f"stored at  {s['path']}")
    print(f"sweep      {s['trials']} trials ({s['errored']} failed, {s['concurrent_trials']} at a time) in "
          f"{s['tune_time_s']:.1f} s" + ("  (resumed)" if s.get("resumed") else ""))
    print(f"winner     trial {s['trial_id']}: " + ", ".join(f"{k.split('.', 1)[1]}={_fmt(v, 4 if isinstance(v, float) and abs(v) >= 0.01 else 6)}"
                                                      for k, v in s["config"].items()))
    print(f"held-out   test log-likelihood {_fmt(m.get('test_log_lik'))} ± {_fmt(m.get('test_log_lik_se'))} nats/sample"
          f" (validation {_fmt(m.get('val_log_lik'))}; standardised units)")
    if "integral" in m:
        print(f"integral   ∫p = {m['integral']:.5f} ± {m['integral_se']:.5f} (independent estimate)")
    for p in s.get("plots", []):
        print(f"plot       {p}")


def _tune(args) -> int:
    from densiray.tune.sweep import tune

    settings = {"trials": args.trials, "time_budget_s": args.time_budget_s, "epochs": args.epochs,
                "searcher": args.searcher, "workers_per_trial": args.workers_per_trial,
                "cpus_per_trial": args.cpus_per_trial, "max_concurrent_trials": args.max_concurrent_trials,
                "seed": args.seed, "refit": args.refit}
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = tune(args.family, args.dataset, config=args.config, space=args.space, settings=settings,
                       name=args.name, store=args.store, restart=args.restart)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_sweep(summary)
    return 0


def _bench(args) -> int:
    if args.suite == "density":
        from densiray.bench.density import DATASETS, run

        datasets = args.datasets.split(",") if args.datasets else DATASETS
        run(datasets, args.out or "jobs/results/density", trials=args.trials, epochs=args.epochs,
            time_budget_s=args.time_budget_s, baselines=not args.no_baselines)
        print(f"results in {args.out or 'jobs/results/density'}/density.md")
    return 0


def _models(args) -> int:
    from densiray.store import Store

    store = Store(args.store)
    rows = store.list()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no models in {store.uri}")
        return 0
    print(f"{'name':24} {'kind':10} {'d':>4} {'test log-lik':>13} {'∫p':>8}  created")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:24} {'?':10} {'':>4} {'':>13} {'':>8}  unreadable: {r['error']}")
            continue
        m = r.get("metrics") or {}
        if "test_accuracy" in m:  # a classifier: accuracy and activation density instead
            print(f"{r['name']:24} {r['kind']:10} {'':>4} {'acc ' + _fmt(m.get('test_accuracy'), 3):>13} "
                  f"{'dens ' + _fmt(m.get('density'), 2):>8}  {str(r.get('created', ''))[:19]}")
            continue
        print(f"{r['name']:24} {r['kind']:10} {_fmt(r.get('d')):>4} {_fmt(m.get('test_log_lik')):>13} "
              f"{_fmt(m.get('integral'), 3):>8}  {str(r.get('created', ''))[:19]}")
    return 0


def _serve_example(url: str, store: str | None) -> str:
    """A curl line for the first servable model in the store (or a placeholder name)."""
    from densiray.store import Store

    rows = [r for r in Store(store).list() if "error" not in r and r.get("d")]
    name, d = (rows[0]["name"], rows[0]["d"]) if rows else ("<name>", 2)
    body = json.dumps({"x": [[0.0] * d]})
    return f"curl -s -X POST {url}/v1/models/{name}/log_prob -H 'Content-Type: application/json' -d '{body}'"


def _serve(args) -> int:
    """Start the Serve app, print its URL and a curl example, block until Ctrl-C, then shut Serve down."""
    import time

    import densiray.serve as ds
    from densiray.store import Store

    store = Store(args.store)
    try:
        url = ds.start(store=args.store, host=args.host, port=args.port, replicas=args.replicas,
                       batching=not args.no_batching)
        print(f"densiray: serving the models in {store.uri} at {url}  (API docs: {url}/docs)")
        if not store.list():
            print("densiray: the store is empty; train a model (densiray train ...) and it is served by name")
        print(f"  curl -s {url}/v1/models")
        print(f"  {_serve_example(url, args.store)}")
        print("press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("densiray: stopping Serve", flush=True)
        ds.shutdown()
        print("densiray: stopped", flush=True)
    return 0


def _quickstart(args) -> int:
    """Tune a DNMM, export the winner, serve it on Ray Serve, query it over HTTP, report, clean up."""
    from densiray.quickstart import run

    run(dataset=args.dataset, store=args.store, trials=args.trials, epochs=args.epochs,
        time_budget_s=args.time_budget_s, n=args.n, host=args.host, port=args.port, keep_serving=args.keep_serving)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``densiray: error: ...``, exit 2), like every other failure."""

    def error(self, message: str):
        self.exit(2, f"densiray: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="densiray", description="Deep density models on Ray: Train + DeepSpeed, Tune, Serve.")
    p.add_argument("--version", action="version", version=f"densiray {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and export its best epoch to the store")
    t.add_argument("family", choices=FAMILIES)
    t.add_argument("--dataset", help="a bundled dataset name or a .csv/.tsv/.parquet/.npy path "
                                     "(deft: finefood or a .csv/.tsv/.jsonl file with columns text,label)")
    t.add_argument("--config", help="YAML file with sections dataset/model/train")
    t.add_argument("--workers", type=int, help="Ray Train workers (0: in-process, for debugging)")
    t.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3")
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--name", help="model name in the store (default <family>-<dataset>)")
    t.add_argument("--store", help="model store directory or URI (default $DENSIRAY_STORE or ./models)")
    t.add_argument("--restart", action="store_true", help="discard an unfinished run of the same name")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    d = t.add_argument_group("deft", "DEFT options (model section of the config)")
    d.add_argument("--model", help="base transformer: minilm (bundled), a Hugging Face name or a local folder")
    d.add_argument("--peft", choices=["lora", "adapter", "prefix", "prompt"], help="PEFT method")
    d.add_argument("--density-weight", type=float, help="weight of the activation-density loss (0: plain PEFT)")
    d.add_argument("--relu", action="store_true", help="swap the MLP activation to ReLU before fine-tuning")
    d.add_argument("--max-length", type=int, help="tokens per text (longer texts are truncated)")
    d.add_argument("--tau", type=float, help="reported density counts |a| > tau")
    d.add_argument("--eps", type=float, help="epsilon of the density loss a^2/(a^2+eps)")
    t.set_defaults(func=_train)

    u = sub.add_parser("tune", help="select architecture and hyperparameters with a Ray Tune sweep; export the winner")
    u.add_argument("family", choices=["dnmm"])
    u.add_argument("--dataset", help="a bundled dataset name or a .csv/.tsv/.parquet/.npy path")
    u.add_argument("--config", help="YAML file with sections dataset/model/train/tune/space")
    u.add_argument("--space", help="YAML search space (model.<setting>/train.<setting> -> distribution)")
    u.add_argument("--trials", type=int, help="configurations to try (default 24)")
    u.add_argument("--time-budget-s", type=float, help="stop starting new trials after this many seconds")
    u.add_argument("--epochs", type=int, help="most epochs per trial (default 100; ASHA stops poor trials early)")
    u.add_argument("--searcher", choices=["optuna", "random"], help="optuna (TPE, default) or random search")
    u.add_argument("--workers-per-trial", type=int, help="0 (default): each trial trains in its own process")
    u.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (per worker), default 1")
    u.add_argument("--max-concurrent-trials", type=int, help="default: as many as the CPUs hold")
    u.add_argument("--seed", type=int, help="searcher seed")
    u.add_argument("--refit", action="store_true", default=None,
                   help="retrain the winner on train+validation rows for its best number of epochs before export")
    u.add_argument("--name", help="model name of the winner (default <family>-<dataset>-tuned)")
    u.add_argument("--store", help="model store directory or URI (default $DENSIRAY_STORE or ./models)")
    u.add_argument("--restart", action="store_true", help="discard an unfinished sweep of the same name")
    u.add_argument("--json", action="store_true", help="print the summary as JSON")
    u.set_defaults(func=_tune)

    b = sub.add_parser("bench", help="run a benchmark and write its JSON + markdown results")
    b.add_argument("suite", choices=["density"])
    b.add_argument("--out", help="results folder (default jobs/results/<suite>)")
    b.add_argument("--datasets", help="comma-separated bundled datasets (default: all of the reference table)")
    b.add_argument("--trials", type=int, default=24, help="DNMM sweep trials per dataset")
    b.add_argument("--epochs", type=int, default=150, help="most epochs per trial")
    b.add_argument("--time-budget-s", type=float, default=600, help="sweep time budget per dataset")
    b.add_argument("--no-baselines", action="store_true", help="only the tuned DNMM (keep earlier baseline rows)")
    b.set_defaults(func=_bench)

    m = sub.add_parser("models", help="list the models in a store")
    m.add_argument("--store")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_models)

    s = sub.add_parser("serve", help="serve the store's models over HTTP with Ray Serve (until Ctrl-C)")
    s.add_argument("--store", help="model store directory or URI (default $DENSIRAY_STORE or ./models)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1, help="Serve replicas (each takes 0.5 CPU)")
    s.add_argument("--no-batching", action="store_true", help="compute each log_prob request on its own")
    s.set_defaults(func=_serve)

    q = sub.add_parser("quickstart", help="tune a DNMM, serve the winner on Ray Serve, query it; all on a local Ray")
    q.add_argument("--dataset", default="moons", help="a bundled dataset (default moons)")
    q.add_argument("--store")
    q.add_argument("--trials", type=int, default=8)
    q.add_argument("--epochs", type=int, default=40, help="most epochs per trial")
    q.add_argument("--time-budget-s", type=float, default=180)
    q.add_argument("--n", type=int, help="rows of a synthetic dataset (default 4000)")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8000)
    q.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    q.set_defaults(func=_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DensirayError as e:
        print(f"densiray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densiray: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
