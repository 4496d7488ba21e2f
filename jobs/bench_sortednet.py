"""SortedNet benchmark driver: SortedNet against plain fine-tuning, the plain model sliced, and sub-models
trained alone, on digits (MLP) and the fine-food reviews (MiniLM). A thin driver of the product's Task and
engine (:mod:`densiray.bench.sortednet`); every model trains through ``densiray.train.engine.fit``.

    python jobs/bench_sortednet.py --out jobs/results                        # both datasets
    python jobs/bench_sortednet.py --out jobs/results --datasets digits      # one (merged into the JSON)
    python jobs/bench_sortednet.py --out /tmp/b --quick                      # a smoke test

Results: ``<out>/sortednet.json`` (per dataset ``n_submodels``, ``median_relative_accuracy`` and the
per-sub-model table), ``sortednet.md`` and ``sortednet_<dataset>.png``. On a CPU-only machine MiniLM runs
on a CPU budget (texts truncated to 64 tokens, 3 epochs), recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

from densiray.bench.sortednet import finalize, markdown, run_dataset  # noqa: E402

SETTINGS = {
    "digits": {
        "model": {"hidden": 256, "depth": 5, "latency_batch": 64, "latency_repeats": 3},  # the product's recipe
        "train": {"workers": 1, "cpus_per_worker": 2, "zero_stage": 0, "epochs": 20, "patience": 10, "lr": 1e-3, "batch_size": 128, "seed": 0},
        "alone": ["l1-w0.125", "l2-w0.25", "l3-w0.5", "l5-w0.75"],
        "n": None,
        "note": "8x8 digits (sklearn, 1,797 images; 64/16/20 % train/val/test, stratified), an MLP of 5 x 256 "
                "ReLU units; grid 5 depths x 32 widths; the family's default budget of 20 epochs for every run (early "
                "stopping patience 10; plain fine-tuning stops itself at 19), AdamW 1e-3, batch 128. SortedNet with the "
                "product's default recipe: sorted sampling, K=2 passes per step (the full model + one (width) point "
                "drawn uniformly), every depth of each pass trained through the shared head, the full model's "
                "cross-entropy plus the mean of the sub-models', no distillation.",
    },
    "finefood": {
        "model": {"model": "minilm", "max_length": 64, "latency_batch": 4, "latency_repeats": 1},  # the product's recipe
        "train": {"workers": 1, "cpus_per_worker": 2, "zero_stage": 0, "epochs": 3, "patience": 0, "lr": 1e-4, "batch_size": 16, "seed": 0},
        "alone": ["l1-w0.25-h3", "l2-w0.5-h6", "l4-w0.75-h9"],
        "n": None,
        "note": "CPU BUDGET (2 cores, no GPU): all 5,000 fine-food reviews (the dataset's own 4,000 training rows split "
                "80/20 into train/val, its 1,000 test rows for test), texts truncated to 64 tokens, 3 epochs for every "
                "run, MiniLM (all-MiniLM-L6-v2) fully fine-tuned at AdamW 1e-4, batch 16; grid 6 depths x 8 widths "
                "x 4 head counts = 192. SortedNet with the product's default recipe: sorted sampling, K=2 passes per step "
                "(the full model + one (width, heads) point drawn uniformly), every depth of each pass trained through "
                "the shared head, the full model's cross-entropy plus the mean of the sub-models', no distillation.",
    },
}
QUICK = {"digits": {"model": {"hidden": 32, "depth": 2, "grid": "2x4"}, "train": {"epochs": 2}, "alone": ["l1-w0.5"]},
         "finefood": {"model": {"grid": "2x2x2", "max_length": 16}, "train": {"epochs": 1}, "alone": ["l3-w0.5-h6"], "n": 60}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="jobs/results")
    p.add_argument("--datasets", default="digits,finefood")
    p.add_argument("--quick", action="store_true", help="tiny settings, a smoke test")
    p.add_argument("--storage", default=None, help="where the engine keeps runs (default: a temporary folder)")
    p.add_argument("--report-only", action="store_true", help="recompute derived figures and the markdown from the JSON")
    args = p.parse_args()
    if args.report_only:
        path = Path(args.out) / "sortednet.json"
        results = json.loads(path.read_text())
        for r in results["datasets"].values():
            finalize(r)
        path.write_text(json.dumps(results, indent=1, default=float))
        (Path(args.out) / "sortednet.md").write_text(markdown(results))
        return 0
    from densiray.api import ensure_ray

    ensure_ray(num_cpus=2, log_to_driver=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sortednet.json"
    results = json.loads(path.read_text()) if path.exists() and not args.quick else {"datasets": {}}
    from densiray.bench import scratch_dir

    storage = args.storage or scratch_dir("densiray-bench-sortednet-")
    for ds in args.datasets.split(","):
        s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SETTINGS[ds].items()}
        if args.quick:
            for k, v in QUICK[ds].items():
                s[k] = {**s[k], **v} if isinstance(v, dict) else v
        t0 = time.perf_counter()
        r = run_dataset(ds, model=s["model"], train=s["train"], alone=s["alone"], n=s["n"], storage=storage)
        plots = r.pop("_plots")
        r["budget_note"] = s["note"] + (" QUICK smoke settings." if args.quick else "")
        results["datasets"][ds] = r
        from densiray.train.sortednet import pareto_plot

        png = pareto_plot(plots["metrics"], plots["history"], f"SortedNet on {ds}",
                          others={"plain model sliced (b)": plots["plain"], "trained alone (c)": plots["alone"]})
        (out / f"sortednet_{ds}.png").write_bytes(png)
        results.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), no GPU",
                        "note": "SortedNet (its recipe per dataset below) against (a) plain fine-tuning, (b) the "
                                "plain model sliced, (c) sub-models trained alone, all through the same engine with "
                                "the same epoch budget and early-stopping rule. Accuracy on the test split; FLOPs "
                                "counted by torch.utils.flop_counter per example; training time = sum of the epochs' "
                                "training wall time (validation excluded) on a shared 2-core machine, with the "
                                "training worker's CPU time beside it (the other jobs on the machine make the wall "
                                "time noisy).",
                        "command": "python jobs/bench_sortednet.py --out jobs/results --datasets " + args.datasets})
        for other in results["datasets"].values():
            finalize(other)
        path.write_text(json.dumps(results, indent=1, default=float))
        (out / "sortednet.md").write_text(markdown(results))
        print(f"{ds}: done in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
