"""The SortedNet benchmark, run through the product's own Task and engine (no training loop here).

For one dataset, same data, seed and engine settings:

(a) ``plain``: the full model fine-tuned alone (the Task with ``samples_per_step: 0``);
(b) ``sliced``: that plain model cut into the same grid of sub-models, no SortedNet training;
(c) ``alone``: a few grid points each trained as a model of their own (``only: <point>``);
SortedNet: the full model plus K sampled sub-models per step.

Compared: SortedNet against (b) at every grid point and at matched FLOP budgets (within each budget, the
sub-model the product's ``for_budget`` would serve: the best on the validation rows; the best on the test
rows, an oracle, is recorded beside it), SortedNet against (c) at the same points, the full model against (a),
and training cost (sum of the epochs' training wall time) against (a) and against training
every grid point alone, extrapolated from (c) in proportion to each point's FLOPs.
"""

from __future__ import annotations

import time

import numpy as np

TARGETS = {"n_submodels": 160, "full_within_points": 1.0, "median_relative_accuracy": 0.96, "cost_ratio": 2.0}


def _fit(task, train: dict, name: str, storage: str) -> tuple[object, dict]:
    from densiray.train.engine import TrainConfig, fit

    tc = TrainConfig(**train)
    t0 = time.perf_counter()
    result = fit(task, tc, name=name, storage=storage, progress=False)
    wall = time.perf_counter() - t0
    hist = result.state.get("history", [])
    model = task.trained_model(result.best_weights)
    return model, {"wall_s": round(wall, 2), "train_s": round(sum(h.get("epoch_time_s", 0.0) for h in hist), 2),
                   "train_cpu_s": round(sum(h.get("train_cpu_s", 0.0) for h in hist), 2),
                   "epochs": result.state["epoch"], "best_epoch": result.state["best_epoch"], "history": hist}


def best_within(rows: list[dict], flops: float, key: str = "test_accuracy") -> dict | None:
    fits = [r for r in rows if r["flops"] <= flops * (1 + 1e-9)]
    return max(fits, key=lambda r: (r[key], -r["flops"])) if fits else None


def run_dataset(dataset: str, *, model: dict, train: dict, alone: list[str], storage: str, n: int | None = None,
                log=print) -> dict:
    """All runs of one dataset; returns its JSON section (and ``_plots``: what the report plot needs)."""
    from densiray.api import RunSpec, build_task
    from densiray.models.sortednet import pick_for_budget, spec_name

    t0 = time.perf_counter()
    out: dict = {"dataset": dataset, "model": model, "train": train, "n": n}
    sorted_task = build_task("sortednet", RunSpec(dataset=dataset, model=model, n=n))
    out["data"] = sorted_task.dataset
    log(f"[{dataset}] SortedNet (K={sorted_task.config.samples_per_step}, {len(sorted_task.full_grid)} grid points)")
    sn_model, sn_run = _fit(sorted_task, train, f"{dataset}-sortednet", storage)
    sn = sorted_task.metrics(sn_model)
    log(f"[{dataset}] SortedNet: full {sn['test_accuracy']:.4f}, median relative {sn['median_relative_accuracy']:.4f} "
        f"({sn_run['train_s']:.0f} s)")

    plain_task = sorted_task.with_model({"samples_per_step": 0})
    plain_model, plain_run = _fit(plain_task, train, f"{dataset}-plain", storage)
    plain = plain_task.metrics(plain_model)  # every grid point of the plain model: (b)
    log(f"[{dataset}] plain: full {plain['test_accuracy']:.4f}, sliced median relative "
        f"{plain['median_relative_accuracy']:.4f} ({plain_run['train_s']:.0f} s)")

    alone_rows = []
    for point in alone:
        task = sorted_task.with_model({"only": point, "samples_per_step": 0})
        m, run = _fit(task, train, f"{dataset}-alone-{point}", storage)
        row = task.metrics(m)["submodels"][0]
        name = spec_name(task.only)
        alone_rows.append({"name": name, "flops": row["flops"], "params": row["params"],
                           "test_accuracy": row["test_accuracy"], "train_s": run["train_s"]})
        log(f"[{dataset}] alone {name}: {row['test_accuracy']:.4f} ({run['train_s']:.0f} s)")

    sn_rows, b_rows = sn["submodels"], {r["name"]: r for r in plain["submodels"]}
    table = [{"name": r["name"], "layers": r["layers"], "width": r["width"], "heads": r["heads"], "flops": r["flops"],
              "params": r["params"], "latency_ms": r["latency_ms"], "sortednet_accuracy": r["test_accuracy"],
              "sortednet_val_accuracy": r["val_accuracy"], "relative_accuracy": r["relative_accuracy"],
              "sliced_plain_accuracy": b_rows[r["name"]]["test_accuracy"]} for r in sn_rows]
    by_name = {r["name"]: r for r in table}
    vs_alone = [{**a, "sortednet_accuracy": by_name[a["name"]]["sortednet_accuracy"],
                 "sliced_plain_accuracy": by_name[a["name"]]["sliced_plain_accuracy"]} for a in alone_rows]
    # matched budgets (8 quantiles of the grid's FLOPs): on each side the sub-model for_budget would serve
    # (best validation accuracy, pick_for_budget), and the best on the test rows (an oracle) beside it
    flops = sorted({r["flops"] for r in table})
    budgets = sorted({flops[min(len(flops) - 1, int(q * (len(flops) - 1)))] for q in np.linspace(0, 1, 8)})
    matched = []
    for f in budgets:
        s, b = pick_for_budget(sn_rows, flops=f), pick_for_budget(plain["submodels"], flops=f)
        so, bo = best_within(sn_rows, f), best_within(plain["submodels"], f)
        matched.append({"flops_budget": f, "sortednet": s["test_accuracy"], "sortednet_pick": s["name"],
                        "sliced_plain": b["test_accuracy"], "sliced_plain_pick": b["name"],
                        "sortednet_oracle": so["test_accuracy"], "sliced_plain_oracle": bo["test_accuracy"]})
    diffs = [r["sortednet_accuracy"] - r["sliced_plain_accuracy"] for r in table]
    # training every grid point alone, extrapolated from (c): seconds per (FLOP of the point)
    per_flop = float(np.mean([a["train_s"] / a["flops"] for a in alone_rows])) if alone_rows else float("nan")
    all_alone = per_flop * sum(r["flops"] for r in table)
    cost_ratio = sn_run["train_s"] / plain_run["train_s"]
    full_gap = 100 * (sn["test_accuracy"] - plain["test_accuracy"])
    out.update({
        "n_submodels": sn["n_submodels"],
        "median_relative_accuracy": sn["median_relative_accuracy"],
        "share_at_96": sn["share_at_96"],
        "full_accuracy": sn["test_accuracy"], "plain_accuracy": plain["test_accuracy"],
        "full_minus_plain_points": full_gap,
        "sliced_plain_median_relative_accuracy": plain["median_relative_accuracy"],
        "sliced_plain_share_at_96": plain["share_at_96"],
        "sortednet_beats_sliced_share": float(np.mean([d > 0 for d in diffs])),
        "sortednet_minus_sliced_median_points": 100 * float(np.median(diffs)),
        "matched_budgets": matched,
        "sortednet_beats_sliced_at_every_budget": all(m["sortednet"] > m["sliced_plain"] for m in matched),
        "vs_alone": vs_alone,
        "train_s": {"sortednet": sn_run["train_s"], "plain": plain_run["train_s"],
                    "alone": {a["name"]: a["train_s"] for a in alone_rows}, "all_alone_extrapolated": round(all_alone, 1)},
        "train_cpu_s": {"sortednet": sn_run["train_cpu_s"], "plain": plain_run["train_cpu_s"]},
        "cost_ratio_vs_plain": cost_ratio,
        "cost_ratio_per_epoch_vs_plain": (sn_run["train_s"] / sn_run["epochs"]) / (plain_run["train_s"] / plain_run["epochs"]),
        "cost_ratio_vs_all_alone": sn_run["train_s"] / all_alone if all_alone == all_alone and all_alone > 0 else None,
        "epochs": {"sortednet": sn_run["epochs"], "plain": plain_run["epochs"]},
        "flops_per": sn["flops_per"], "eval_rows": sn["eval_rows"], "latency_batch": sn["latency_batch"],
        "submodels": table,
        "targets": {
            "n_submodels>=160": {"value": sn["n_submodels"], "met": sn["n_submodels"] >= TARGETS["n_submodels"]},
            "full within 1 point of plain": {"value": round(full_gap, 2), "met": full_gap >= -TARGETS["full_within_points"]},
            "median sub-model >= 96 % of full": {"value": round(sn["median_relative_accuracy"], 4),
                                                 "met": sn["median_relative_accuracy"] >= TARGETS["median_relative_accuracy"]},
            "training cost <= 2x plain": {"value": round(cost_ratio, 2), "met": cost_ratio <= TARGETS["cost_ratio"]},
            "sliced plain below SortedNet at every matched budget": {
                "value": f"{sum(m['sortednet'] > m['sliced_plain'] for m in matched)}/{len(matched)} budgets",
                "met": all(m["sortednet"] > m["sliced_plain"] for m in matched)},
        },
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_s_note": "sum of the epochs' training wall time (validation excluded), on a shared 2-core machine",
        "_plots": {"metrics": sn, "history": sn_run["history"], "plain": plain["submodels"], "alone": alone_rows},
    })
    return finalize(out)


def finalize(r: dict) -> dict:
    """Derived cost figures of one dataset section (idempotent; recomputed from the raw times).

    Training every grid point alone is extrapolated from the (c) runs two ways: in proportion to each
    point's FLOPs (``by_flops``), and as the (c) runs' mean time per point (``by_mean``: on this machine a
    small model costs about as much wall time as a large one, fixed per-step costs dominate)."""
    t, alone = r["train_s"], r["vs_alone"]
    n = r["n_submodels"]
    if alone:
        per_flop = float(np.mean([a["train_s"] / a["flops"] for a in alone]))
        by_flops = per_flop * sum(x["flops"] for x in r["submodels"])
        by_mean = float(np.mean([a["train_s"] for a in alone])) * n
        t["all_alone_extrapolated"] = {"by_flops": round(by_flops, 1), "by_mean": round(by_mean, 1)}
        r["cost_ratio_vs_all_alone"] = t["sortednet"] / min(by_flops, by_mean)
    r["cost_ratio_vs_plain"] = t["sortednet"] / t["plain"]
    r["cost_ratio_per_epoch_vs_plain"] = per_epoch(r)
    cpu = r.get("train_cpu_s") or {}
    if cpu.get("plain"):
        r["cpu_ratio_vs_plain"] = cpu["sortednet"] / cpu["plain"]
    r["targets"]["training cost <= 2x plain"] = {
        "value": f"x{r['cost_ratio_vs_plain']:.2f} total, x{r['cost_ratio_per_epoch_vs_plain']:.2f} per epoch",
        "met": r["cost_ratio_vs_plain"] <= TARGETS["cost_ratio"]}
    return r


def per_epoch(r: dict) -> float:
    """SortedNet's training time per epoch over plain fine-tuning's."""
    return (r["train_s"]["sortednet"] / r["epochs"]["sortednet"]) / (r["train_s"]["plain"] / r["epochs"]["plain"])


def _cell(m: dict, key: str) -> str:
    return f"{m[key]:.4f}" if key in m else "-"


def markdown(results: dict) -> str:
    """The short markdown report of a benchmark JSON."""
    lines = ["# SortedNet benchmark", "", results.get("note", ""), ""]
    for ds, r in results["datasets"].items():
        lines += [f"## {ds}", "", r.get("budget_note", ""), "",
                  f"{r['n_submodels']} sub-models from one run; full model {r['full_accuracy']:.4f} test accuracy "
                  f"(plain fine-tuning {r['plain_accuracy']:.4f}, {r['full_minus_plain_points']:+.2f} points); median "
                  f"sub-model at {r['median_relative_accuracy']:.4f} of the full model ({100 * r['share_at_96']:.1f} % at "
                  f">= 96 %), the plain model sliced: {r['sliced_plain_median_relative_accuracy']:.4f} "
                  f"({100 * r['sliced_plain_share_at_96']:.1f} %). SortedNet beats the sliced plain model at "
                  f"{100 * r['sortednet_beats_sliced_share']:.1f} % of the grid points (median "
                  f"{r['sortednet_minus_sliced_median_points']:+.2f} points).", "",
                  f"Training time (sum of the epochs' training steps, validation excluded): SortedNet {r['train_s']['sortednet']:.0f} s, "
                  f"plain {r['train_s']['plain']:.0f} s (x{r['cost_ratio_vs_plain']:.2f}; {r['epochs']['sortednet']} and "
                  f"{r['epochs']['plain']} epochs, x{per_epoch(r):.2f} per epoch)"
                  + (f"; CPU time of the training worker (less sensitive to the other jobs on the machine): "
                     f"SortedNet {r['train_cpu_s']['sortednet']:.1f} s, plain {r['train_cpu_s']['plain']:.1f} s "
                     f"(x{r['cpu_ratio_vs_plain']:.2f})" if r.get("cpu_ratio_vs_plain") else "")
                  + "; every grid point trained alone, "
                  f"extrapolated from the runs below: {r['train_s']['all_alone_extrapolated']['by_mean']:.0f} s (their mean "
                  f"time x {r['n_submodels']}) or {r['train_s']['all_alone_extrapolated']['by_flops']:.0f} s (by FLOPs), "
                  f"so SortedNet costs x{r['cost_ratio_vs_all_alone']:.3f} of the cheaper estimate.", "",
                  "Matched budgets: on each side the sub-model `for_budget` serves (the best on the validation rows), "
                  "its test accuracy; the oracle columns: the best test accuracy within the budget.", "",
                  "| FLOP budget | SortedNet (pick) | plain sliced (pick) | SortedNet oracle | plain sliced oracle |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m['flops_budget']:.3g} | {m['sortednet']:.4f} ({m['sortednet_pick']}) | "
                  f"{m['sliced_plain']:.4f} ({m['sliced_plain_pick']}) | {_cell(m, 'sortednet_oracle')} | "
                  f"{_cell(m, 'sliced_plain_oracle')} |" for m in r["matched_budgets"]]
        lines += ["", "| sub-model trained alone | FLOPs | alone | SortedNet | plain sliced | alone train s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {a['name']} | {a['flops']:.3g} | {a['test_accuracy']:.4f} | {a['sortednet_accuracy']:.4f} | "
                  f"{a['sliced_plain_accuracy']:.4f} | {a['train_s']:.0f} |" for a in r["vs_alone"]]
        lines += ["", "| target | value | met |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['value']} | {'yes' if v['met'] else '**no**'} |" for k, v in r["targets"].items()]
        lines += [""]
    return "\n".join(lines) + "\n"
