"""The ``densiray`` command. Failures print one line (``densiray: error: ...``) and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from densiray import __version__, console
from densiray.errors import DensirayError


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _print_metrics(kind: str, metrics: dict) -> None:
    from densiray import families

    for label, text in families.get(kind).summary_lines(metrics):
        print(f"{label:10} {text}")


def print_summary(s: dict) -> None:
    """A short human summary of a finished training run (the family says what its metrics mean)."""
    print()
    shape = f", d={s['d']}" if s.get("d") is not None else ""
    print(f"model      {s['name']}  ({s['kind']} on {s['dataset']}{shape})")
    print(f"stored at  {s['path']}")
    print(f"training   {s['epochs_run']} epochs in {s['train_time_s']:.1f} s, best epoch {s['best_epoch']}"
          + ("  (resumed)" if s.get("resumed") else ""))
    _print_metrics(s["kind"], s["metrics"])
    if s.get("plot"):
        print(f"plot       {s['plot']}")
    if s.get("log"):
        print(f"log        {s['log']}  (Ray's own lines; --verbose shows them here)")


def _family_overrides(args) -> dict:
    """The model-config keys set by the family's own flags (``Family.flags``)."""
    from densiray import families

    return {key: getattr(args, key) for key in families.get(args.family).flags if getattr(args, key, None) is not None}


def _train(args) -> int:
    import densiray.api as api

    overrides = {"model": _family_overrides(args),
                 "train": {"workers": args.workers, "min_workers": args.min_workers, "zero_stage": args.zero_stage,
                           "epochs": args.epochs, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size}}
    # With --json, stdout carries the JSON alone: progress and worker logs go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = api.train(args.family, args.dataset, config=args.config, overrides=overrides, name=args.name,
                            store=args.store, restart=args.restart, verbose=args.verbose)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
    return 0


def print_sweep(s: dict) -> None:
    """A short human summary of a finished sweep and its exported winner."""
    print()
    shape = f", d={s['d']}" if s.get("d") is not None else ""
    print(f"model      {s['name']}  (tuned {s['kind']} on {s['dataset']}{shape})")
    print(f"stored at  {s['path']}")
    print(f"sweep      {s['trials']} trials ({s['errored']} failed, {s['concurrent_trials']} at a time) in "
          f"{s['tune_time_s']:.1f} s" + ("  (resumed)" if s.get("resumed") else ""))
    print(f"winner     trial {s['trial_id']}: " + ", ".join(f"{k.split('.', 1)[1]}={_fmt(v, 4 if isinstance(v, float) and abs(v) >= 0.01 else 6)}"
                                                      for k, v in s["config"].items()))
    if len(s.get("ensemble") or []) > 1:
        print(f"mixture    {console.mixture_line(s['ensemble'])}")
    _print_metrics(s["kind"], s["metrics"])
    for p in s.get("plots", []):
        print(f"plot       {p}")
    if s.get("log"):
        print(f"log        {s['log']}  (Ray's and Tune's own lines; --verbose shows them here)")


def _tune(args) -> int:
    from densiray.tune.sweep import tune

    settings = {"trials": args.trials, "time_budget_s": args.time_budget_s, "epochs": args.epochs,
                "searcher": args.searcher, "workers_per_trial": args.workers_per_trial,
                "cpus_per_trial": args.cpus_per_trial, "max_concurrent_trials": args.max_concurrent_trials,
                "seed": args.seed, "refit": args.refit, "ensemble": args.ensemble}
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = tune(args.family, args.dataset, config=args.config, space=args.space, settings=settings,
                       name=args.name, store=args.store, restart=args.restart, verbose=args.verbose)
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
            time_budget_s=args.time_budget_s, baselines=not args.no_baselines, refit=args.refit,
            ensemble=args.ensemble)
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
    from densiray import families

    print(f"{'name':24} {'kind':10} {'d':>4} {'metric':>13} {'':>8}  created")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:24} {'?':10} {'':>4} {'':>13} {'':>8}  unreadable: {r['error']}")
            continue
        kind = r.get("kind")
        cells = families.get(kind).list_columns(r.get("metrics") or {}) if kind in families.kinds() else ("", "")
        print(f"{r['name']:24} {str(kind):10} {_fmt(r.get('d')):>4} {cells[0]:>13} {cells[1]:>8}  "
              f"{str(r.get('created', ''))[:19]}")
    return 0


def _serve_example(url: str, store: str | None) -> str:
    """A curl line for the first servable model in the store (or a placeholder name)."""
    from densiray.store import Store

    rows = [r for r in Store(store).list() if "error" not in r and r.get("d")]
    name, d = (rows[0]["name"], rows[0]["d"]) if rows else ("<name>", 2)
    body = json.dumps({"x": [[0.0] * d]})
    return f"curl -s -X POST {url}/v1/models/{name}/log_prob -H 'Content-Type: application/json' -d '{body}'"


def _serve(args) -> int:
    """Start the Serve app, print its URL and a curl example, block until Ctrl-C or SIGTERM, then stop:
    Serve drains the requests in flight (its graceful replica shutdown), then Serve and Ray shut down."""
    import logging
    import time

    import densiray.serve as ds
    from densiray.store import Store

    if not args.verbose:
        # Serve's driver-side INFO lines name its internal proxy port ("ready at http://127.0.0.1:60489/")
        # and say new http_options "will not be applied": both wrong for the URL printed below
        logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= logging.WARNING)

    store = Store(args.store)
    try:
        url = ds.start(store=args.store, host=args.host, port=args.port, replicas=args.replicas,
                       batching=args.batching, ingress=args.ingress, max_replicas_per_node=args.max_replicas_per_node)
        print(f"densiray: serving the models in {store.uri} at {url}  (API docs: {url}/docs)")
        if not store.list():
            print("densiray: the store is empty; train a model (densiray train ...) and it is served by name")
        print(f"  curl -s {url}/v1/models")
        print(f"  {_serve_example(url, args.store)}")
        print("press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray

        print(f"densiray: {'SIGTERM received, ' if console.terminated else ''}stopping Serve", flush=True)
        if console.ray_lost:  # the SIGTERM reached Ray's processes too
            from densiray import api

            print("densiray: stopped (Ray's own processes got the signal too)", flush=True)
            api.abandon_local_ray(0)
        if ray.is_initialized():
            # Ray relays a benign "ServeController.graceful_shutdown failed ... killed by ray.kill" notice
            # while Serve stops; it stays in Ray's own logs, off the console
            with console.stdout_to(os.devnull):
                ds.shutdown()
                ray.shutdown()  # a local Ray started here stops; a cluster's (RAY_ADDRESS) is only disconnected
        print("densiray: stopped", flush=True)
    return 0


def _quickstart(args) -> int:
    """Tune a DNMM, export the winner, serve it on Ray Serve, query it over HTTP, report, clean up."""
    from densiray.quickstart import run

    run(dataset=args.dataset, store=args.store, trials=args.trials, epochs=args.epochs,
        time_budget_s=args.time_budget_s, n=args.n, host=args.host, port=args.port, keep_serving=args.keep_serving)
    return 0


def _port(value: str) -> int:
    """A TCP port for argparse: an integer in 1..65535."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port: give an integer from 1 to 65535")
    return port


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``densiray: error: ...``, exit 2), like every other failure."""

    def error(self, message: str):
        self.exit(2, f"densiray: error: {message} (see '{self.prog} --help')\n")


STORE_HELP = "model store directory or URI (default $DENSIRAY_STORE or ./models)"


def _train_parser(sub) -> None:
    """``densiray train KIND``: one sub-command per registered family, with that family's own flags."""
    from densiray import families

    t = sub.add_parser("train", help="train a model and export its best epoch to the store")
    kinds = t.add_subparsers(dest="family", required=True, metavar="{" + ",".join(families.kinds()) + "}")
    for kind in families.kinds():
        fam = families.get(kind)
        f = kinds.add_parser(kind, help=fam.description)
        f.add_argument("--dataset", help=fam.datasets)
        f.add_argument("--config", help="YAML file with sections dataset/model/train")
        f.add_argument("--workers", type=int, help="Ray Train workers (0: in-process, for debugging)")
        f.add_argument("--min-workers", type=int, help="elastic training: start or go on with as few as this many "
                                                       "workers when the cluster has no room for --workers")
        f.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3")
        f.add_argument("--epochs", type=int)
        f.add_argument("--lr", type=float)
        f.add_argument("--batch-size", type=int)
        f.add_argument("--seed", type=int)
        f.add_argument("--name", help="model name in the store (default <family>-<dataset>)")
        f.add_argument("--store", help=STORE_HELP)
        f.add_argument("--restart", action="store_true", help="discard an unfinished run of the same name")
        f.add_argument("--json", action="store_true", help="print the summary as JSON")
        f.add_argument("--verbose", action="store_true", help="show Ray's own log lines (else: densiray.log)")
        if fam.flags:
            g = f.add_argument_group(kind, f"{kind} options (the model section of the config)")
            for key, kwargs in fam.flags.items():
                g.add_argument("--" + key.replace("_", "-"), dest=key, **kwargs)
        f.set_defaults(func=_train)


def _tune_parser(sub) -> None:
    from densiray import families

    u = sub.add_parser("tune", help="select architecture and hyperparameters with a Ray Tune sweep; export the winner")
    u.add_argument("family", choices=families.kinds())
    u.add_argument("--dataset", help="a dataset name or path (as for densiray train)")
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
    u.add_argument("--ensemble", type=int, metavar="K",
                   help="export a weighted mixture of up to K trials, chosen greedily on the validation rows "
                        "(dnmm; default 1: the winner alone)")
    u.add_argument("--name", help="model name of the winner (default <family>-<dataset>-tuned)")
    u.add_argument("--store", help=STORE_HELP)
    u.add_argument("--restart", action="store_true", help="discard an unfinished sweep of the same name")
    u.add_argument("--json", action="store_true", help="print the summary as JSON")
    u.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own output (else: densiray.log)")
    u.set_defaults(func=_tune)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="run a benchmark and write its JSON + markdown results")
    b.add_argument("suite", choices=["density"])
    b.add_argument("--out", help="results folder (default jobs/results/<suite>)")
    b.add_argument("--datasets", help="comma-separated bundled datasets (default: all of the reference table)")
    b.add_argument("--trials", type=int, default=24, help="DNMM sweep trials per dataset")
    b.add_argument("--epochs", type=int, default=150, help="most epochs per trial")
    b.add_argument("--time-budget-s", type=float, default=600, help="sweep time budget per dataset")
    b.add_argument("--no-baselines", action="store_true", help="keep the earlier MAF/NSF rows (KDE and GMM are refitted for the paired comparison)")
    b.add_argument("--refit", action="store_true", help="refit each winner on train+validation rows (tune.refit)")
    b.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="export a mixture of up to K trials of each sweep (tune.ensemble)")
    b.set_defaults(func=_bench)


def _serve_parsers(sub) -> None:
    m = sub.add_parser("models", help="list the models in a store")
    m.add_argument("--store", help=STORE_HELP)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_models)

    s = sub.add_parser("serve", help="serve the store's models over HTTP with Ray Serve (until Ctrl-C)")
    s.add_argument("--store", help=STORE_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--replicas", type=int, default=1, help="Serve replicas (each takes 0.5 CPU)")
    s.add_argument("--max-replicas-per-node", type=int,
                   help="spread the replicas over nodes, at most this many on one (1: a lost node costs one)")
    s.add_argument("--batching", action=argparse.BooleanOptionalAction,
                   help="batch log_prob requests across clients (on by default: measured faster at 64-1024 rows)")
    s.add_argument("--ingress", choices=["auto", "direct", "proxy"],
                   help="who answers on the port: the replica itself (direct; default with one local replica) "
                        "or Serve's proxy")
    s.add_argument("--verbose", action="store_true", help="show Ray Serve's own INFO lines")
    s.set_defaults(func=_serve)

    q = sub.add_parser("quickstart", help="tune a DNMM, serve the winner on Ray Serve, query it; all on a local Ray")
    q.add_argument("--dataset", default="moons", help="a bundled dataset (default moons)")
    q.add_argument("--store", help=STORE_HELP)
    q.add_argument("--trials", type=int, default=8)
    q.add_argument("--epochs", type=int, default=100, help="most epochs per trial")
    q.add_argument("--time-budget-s", type=float, default=300, help="stop starting trials after this many seconds")
    q.add_argument("--n", type=int, help="rows of a synthetic dataset (default 4000)")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=_port, default=8000)
    q.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    q.set_defaults(func=_quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="densiray", description="Deep density models on Ray: Train + DeepSpeed, Tune, Serve.")
    p.add_argument("--version", action="version", version=f"densiray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _tune_parser(sub)
    _bench_parser(sub)
    _serve_parsers(sub)
    from densiray import condition

    condition.add_parser(sub)
    return p


def _unknown(args, extra: list[str]) -> str:
    """The error for arguments no parser took: another family's flags say whose they are."""
    from densiray import families

    flags = [e.split("=", 1)[0] for e in extra if e.startswith("--")]
    if getattr(args, "command", None) == "train" and flags:
        owners = sorted({k for k in families.kinds() for f in flags
                         if f[2:].replace("-", "_") in families.get(k).flags})
        if owners:
            return (f"{', '.join(flags)} apply to {' / '.join(f'densiray train {k}' for k in owners)!r} only; "
                    f"set {args.family}'s model options in --config")
    return f"unrecognized arguments: {' '.join(extra)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(f"densiray: error: {_unknown(args, extra)} (see 'densiray {args.command} --help')", file=sys.stderr)
        return 2
    console.stop_on_sigterm()  # SIGTERM (`ray job stop`, docker stop, systemd) stops a command as Ctrl-C does
    try:
        return args.func(args)
    except DensirayError as e:
        print(f"densiray: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `densiray models --json | head`: the reader is gone; exit quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:
        what = "stopped (SIGTERM)" if console.terminated else "interrupted"
        print(f"densiray: {what}; run the same command again to resume from the last checkpoint", file=sys.stderr)
        if console.ray_lost:  # the SIGTERM reached Ray's processes too: its shutdown would wait 60 s
            from densiray import api

            api.abandon_local_ray(143)
        return 143 if console.terminated else 130
    finally:  # from here on (Ray's shutdown at exit) a SIGTERM simply ends the process, without a traceback
        console.default_sigterm()


if __name__ == "__main__":
    sys.exit(main())
