"""DEFT benchmark: plain PEFT (density weight 0) against DEFT, for LoRA, adapters, prefix and prompt tuning.

A thin driver: every run trains through densiray's engine (``densiray.api.train``, see
``src/densiray/bench/deft.py``), MiniLM (bundled) on the fine-food reviews; results are the exported
models' held-out test accuracy and activation density.

    python jobs/bench_deft.py --out jobs/results                     # a GPU: the full grid
    python jobs/bench_deft.py --out /tmp/b --quick                   # a smoke test on CPU
    python jobs/bench_deft.py --out jobs/results/deft_cpu --n 1000 --epochs 3 --max-length 48 \\
        --specs lora:gelu:0:1e-3,lora:relu:0:1e-3,lora:relu:0.1:1e-3 --reference old_loop.json

``--reference JSON`` puts the same runs of another implementation (the pre-engine plain-PyTorch loop)
beside these, run by run. Writes ``<out>/deft.json``, ``deft.md`` and ``deft.png`` after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

from densiray.bench import deft as bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="jobs/results")
    p.add_argument("--model", default="minilm", help="minilm (bundled), a Hugging Face name or a model folder")
    p.add_argument("--dataset", default="finefood")
    p.add_argument("--methods", default=",".join(bench.METHODS))
    p.add_argument("--settings", default="1:1e-3,1:1e-7,3:1e-2",
                   help="DEFT (density weight:eps) settings, the first the main one (plain PEFT, weight 0, always runs)")
    p.add_argument("--sweep", default="0.3,3,10", help="more density weights for --sweep-method (at the main eps)")
    p.add_argument("--sweep-method", default="lora")
    p.add_argument("--specs", help="explicit runs instead of the plan: method:gelu|relu:weight:eps,...")
    p.add_argument("--relu", default="gelu,relu", help="activations: gelu (as pretrained) and/or relu (swapped)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n", type=int, help="use N reviews in all (a stratified subsample; default: all 5,000)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    p.add_argument("--reference", help="JSON of the same runs by another implementation, compared run by run")
    p.add_argument("--quick", action="store_true", help="smoke test: 200 reviews, 1 epoch, max_length 32, lora")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier results (same setup) into --out")
    p.add_argument("--note", action="append", default=[], help="a line for the report")
    args = p.parse_args(argv)
    if args.merge:
        return bench.merge(args.merge, Path(args.out), args.note)
    if args.quick:
        args.n, args.epochs, args.max_length = 200, 1, 32
        args.methods, args.settings, args.sweep, args.relu = "lora", "1:1e-3", "", "gelu"
    setup = {"model": args.model, "dataset": args.dataset, "epochs": args.epochs, "batch_size": args.batch_size,
             "max_length": args.max_length, "seed": args.seed, "n": args.n, "workers": args.workers}
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    specs = bench.plan(args.methods.split(","), settings, [a == "relu" for a in args.relu.split(",")],
                       [float(w) for w in args.sweep.split(",") if w], args.sweep_method)
    if args.specs:
        specs = [{"method": m, "relu": a == "relu", "weight": float(w), "eps": float(e)}
                 for m, a, w, e in (x.split(":") for x in args.specs.split(","))]
    result = {"command": "python jobs/bench_deft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": bench.environment(),
              "setup": {**setup, "tau": bench.TAU, "lr": bench.LR,
                        "engine": {**bench.SCHEDULE, "note": "densiray's engine: linear warm-up 6 %, then linear decay"}},
              "runs": [], "notes": list(args.note)}
    out, t_start = Path(args.out), time.time()
    print(f"{len(specs)} runs on {result['environment']['device']}", flush=True)
    for i, spec in enumerate(specs):
        if time.time() - t_start > args.budget_s:
            result["notes"].append(f"Stopped after {i} of {len(specs)} runs (time budget {args.budget_s:g} s).")
            break
        r = bench.run_spec(spec, setup)
        result["runs"].append(r)
        result["setup"].update(n_train=r["split"]["train"], n_val=r["split"]["val"], n_test=r["split"]["test"],
                               majority=r["majority"])
        print(f"[{i + 1}/{len(specs)}] {r['name']}: test acc {r['test_accuracy']:.4f} density {r['test_density']:.4f} "
              f"({r['wall_s']} s, {time.time() - t_start:.0f} s total)", flush=True)
        result["pareto"] = bench.pareto_fronts(result["runs"])
        result["total_s"] = round(time.time() - t_start, 1)
        if args.reference:
            result["reference"] = bench.compare(result["runs"], json.loads(Path(args.reference).read_text()))
        bench.write(out, result)
    print((out / "deft.md").read_text() if (out / "deft.md").exists() else "no run finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
