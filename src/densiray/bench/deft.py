"""The DEFT benchmark's runs and report: plain PEFT (density weight 0) against DEFT, per PEFT method.

Every run trains through densiray's own engine (``densiray.api.train``: Ray Train worker(s), the
engine's strategy, its linear warm-up + decay schedule, checkpoints), on MiniLM (bundled) and the
fine-food reviews; the numbers come from the exported model's manifest (test accuracy and activation
density are measured once, on the test split, by the DEFT Task). ``jobs/bench_deft.py`` drives it. The
DEFT setting reported for a method is chosen on validation: the lowest validation density whose
validation accuracy is within one point of plain PEFT's.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from densiray.bench import scratch_dir

TAUS = (0.0, 1e-3, 1e-2)
TAU = 1e-3  # the headline threshold
LR = {"lora": 2e-3, "adapter": 1e-3, "prefix": 1e-2, "prompt": 3e-2}
METHODS = ("lora", "adapter", "prefix", "prompt")
SCHEDULE = {"schedule": "linear", "warmup_fraction": 0.06, "grad_clip": 1.0, "weight_decay": 0.0}


def run_spec(spec: dict, setup: dict, store: str | None = None) -> dict:
    """Train one (method, density weight, eps, relu) setting through the engine; the run's record."""
    import densiray.api as api
    from densiray.store import Store

    store = store or scratch_dir("densiray-bench-deft-")
    name = spec_name(spec)
    model = {"model": setup["model"], "peft": spec["method"], "density_weight": float(spec.get("weight", 0.0)),
             "eps": spec.get("eps", 1e-7), "tau": TAU, "relu": bool(spec.get("relu", False)),
             "max_length": setup["max_length"]}
    train = {**SCHEDULE, "lr": spec.get("lr", LR[spec["method"]]), "epochs": setup["epochs"], "patience": 0,
             "batch_size": setup["batch_size"], "seed": setup["seed"], "workers": setup.get("workers", 1),
             **setup.get("train", {})}
    t0 = time.perf_counter()
    summary = api.train("deft", setup.get("dataset", "finefood"), overrides={"n": setup.get("n"), "model": model,
                                                                            "train": train},
                        name=name, store=store, restart=True, plot=False)
    manifest = Store(store).read(name).manifest
    m, prov = manifest["metrics"], manifest["provenance"]
    history = prov.get("history", [])
    timed = [h["train_samples"] / h["train_time_s"] for h in history[1:] or history
             if h.get("train_time_s") and h.get("train_samples")]  # the first epoch pays for warm-up
    return {"name": name, **{k: spec.get(k) for k in ("method", "weight", "eps", "relu")},
            "lr": train["lr"], "epochs": setup["epochs"], "batch_size": setup["batch_size"], "seed": setup["seed"],
            "best_epoch": prov.get("best_epoch"), "val_accuracy": m["val_accuracy"], "val_density": m["val_density"],
            "test_accuracy": m["test_accuracy"], "test_density": m["density"],
            "test_density_at": {f"{float(t):g}": v for t, v in m["density_at"].items()},
            "test_density_per_layer": {f"{TAU:g}": m["density_per_layer"]}, "test_nonzero": m["nonzero"],
            "train_samples_per_s": round(float(np.median(timed)), 1) if timed else None,
            "strategy": prov.get("strategy"), "trainable_params": m.get("trainable_params"),
            "wall_s": round(time.perf_counter() - t0, 1), "train_time_s": summary["train_time_s"],
            "split": manifest["config"]["dataset"]["split"], "majority": m.get("majority_accuracy"),
            "history": [{k: h.get(k) for k in ("epoch", "val_accuracy", "val_density", "epoch_time_s")} for h in history]}


def compare(runs: list[dict], reference: dict) -> dict:
    """These runs against the same runs of another implementation (``reference``: a result JSON with ``runs``),
    matched by name. Accuracies agree "within noise" when they differ by less than twice the standard error of
    the difference of two accuracies on ``n_test`` rows; densities when they differ by less than 0.02."""
    ref = {r["name"]: r for r in reference.get("runs", [])}
    n_test = reference.get("setup", {}).get("n_test") or (runs[0].get("split") or {}).get("test") or 1000
    rows = []
    for r in runs:
        o = ref.get(r["name"])
        if o is None:
            continue
        p = (r["test_accuracy"] + o["test_accuracy"]) / 2
        se = (2 * p * (1 - p) / n_test) ** 0.5
        d_acc, d_den = r["test_accuracy"] - o["test_accuracy"], r["test_density"] - o["test_density"]
        rows.append({"name": r["name"], "engine_test_accuracy": r["test_accuracy"], "loop_test_accuracy": o["test_accuracy"],
                     "accuracy_diff": round(d_acc, 4), "accuracy_noise_2se": round(2 * se, 4),
                     "engine_density": r["test_density"], "loop_density": o["test_density"],
                     "density_diff": round(d_den, 4), "within_noise": bool(abs(d_acc) <= 2 * se and abs(d_den) <= 0.02),
                     "engine_samples_per_s": r.get("train_samples_per_s"), "loop_samples_per_s": o.get("train_samples_per_s")})
    return {"what": reference.get("setup", {}).get("loop", "reference"), "n_test": n_test, "runs": rows,
            "all_within_noise": bool(rows) and all(x["within_noise"] for x in rows)}


def _reference_markdown(ref: dict) -> list[str]:
    lines = ["", f"Against the same runs of the {ref['what']} (same data, budget and seed; data order and "
             f"initialisation RNG streams differ): accuracies within noise when |Δ| ≤ 2 SE of a difference of two "
             f"accuracies on {ref['n_test']} test rows, densities when |Δ| ≤ 0.02. All within noise: "
             f"**{'yes' if ref['all_within_noise'] else 'no'}**.", "",
             "| run | engine acc | loop acc | Δ acc (2 SE) | engine density | loop density | Δ density | samples/s engine / loop |",
             "|---|---|---|---|---|---|---|---|"]
    for x in ref["runs"]:
        lines.append(f"| {x['name']} | {x['engine_test_accuracy']:.3f} | {x['loop_test_accuracy']:.3f} | "
                     f"{x['accuracy_diff']:+.3f} ({x['accuracy_noise_2se']:.3f}) | {x['engine_density']:.3f} | "
                     f"{x['loop_density']:.3f} | {x['density_diff']:+.3f} | "
                     f"{x['engine_samples_per_s'] or 0:.0f} / {x['loop_samples_per_s'] or 0:.0f} |")
    return lines


def environment() -> dict:
    import peft
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else (platform.processor() or "CPU")
    return {"device": name, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cpu_threads": torch.get_num_threads(), "precision": "bf16 autocast, fp32 weights" if gpu else "fp32"}


def spec_name(spec: dict) -> str:
    act = "relu" if spec.get("relu") else "gelu"
    w = spec.get("weight", 0.0)
    return f"{spec['method']}-{act}-w{w:g}" + (f"-eps{spec['eps']:g}" if w > 0 else "")


def select(runs: list[dict]) -> list[dict]:
    """Per (method, activation): plain PEFT and the DEFT run chosen on validation."""
    rows = []
    keys = sorted({(r["method"], bool(r["relu"])) for r in runs}, key=lambda k: (METHODS.index(k[0]), k[1]))
    for method, relu in keys:
        group = [r for r in runs if r["method"] == method and bool(r["relu"]) == relu]
        plain = [r for r in group if not r["weight"]]
        deft = [r for r in group if r["weight"]]
        if not plain or not deft:
            continue
        p = plain[0]
        ok = [r for r in deft if r["val_accuracy"] >= p["val_accuracy"] - 0.01]
        d = min(ok, key=lambda r: r["val_density"]) if ok else max(deft, key=lambda r: r["val_accuracy"])
        rows.append({"method": method, "activation": "relu" if relu else "gelu", "plain": p["name"], "deft": d["name"],
                     "weight": d["weight"], "eps": d["eps"],
                     "plain_test_accuracy": p["test_accuracy"], "deft_test_accuracy": d["test_accuracy"],
                     "accuracy_change_points": round(100 * (d["test_accuracy"] - p["test_accuracy"]), 2),
                     "plain_density": p["test_density"], "deft_density": d["test_density"],
                     "density_reduction_pct": round(100 * (1 - d["test_density"] / p["test_density"]), 1),
                     "plain_density_at": p["test_density_at"], "deft_density_at": d["test_density_at"],
                     "plain_samples_per_s": p["train_samples_per_s"], "deft_samples_per_s": d["train_samples_per_s"],
                     "within_1pt_val": bool(ok)})
    return rows


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (accuracy up, density down) non-dominated points, by density."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
                                          for q in points)]
    return sorted(front, key=lambda p: p[1])


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["selected"] = select(result["runs"])
    (out / "deft.json").write_text(json.dumps(result, indent=1))
    (out / "deft.md").write_text(markdown(result))
    try:
        plot(result, out / "deft.png")
    except Exception as e:  # a plot must not cost the numbers
        print(f"plot failed: {e}", file=sys.stderr)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# DEFT benchmark: plain PEFT vs DEFT on {result['setup']['model']} + fine-food reviews", "",
             f"Regenerate: `{result['command']}`", "",
             f"Machine: {env['device']} ({env['platform']}), torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}; {env['precision']}.", "",
             f"Setup: {result['setup']['epochs']} epochs, batch {result['setup']['batch_size']}, max_length "
             f"{result['setup']['max_length']}, seed {result['setup']['seed']}, same data order for every run; "
             f"train {result['setup']['n_train']} / val {result['setup']['n_val']} / test {result['setup']['n_test']} "
             f"(test majority class {result['setup']['majority']:.3f}). Density = fraction of MLP activations with "
             f"|a| > τ = {TAU:g} over non-padding tokens, mean over the 6 layers (test set); reduction relative to "
             "plain PEFT with the same activation. DEFT setting per method chosen on validation (lowest density "
             "within 1 point of plain PEFT's validation accuracy).", "",
             "| method | act. | plain acc | DEFT acc | Δ acc (pts) | plain density | DEFT density | reduction | "
             "weight, ε | samples/s plain / DEFT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["selected"]:
        lines.append(f"| {r['method']} | {r['activation']} | {r['plain_test_accuracy']:.3f} | {r['deft_test_accuracy']:.3f} "
                     f"| {r['accuracy_change_points']:+.1f} | {r['plain_density']:.3f} | {r['deft_density']:.3f} | "
                     f"{r['density_reduction_pct']:.1f} % | {r['weight']:g}, {r['eps']:g} | "
                     f"{r['plain_samples_per_s']:.0f} / {r['deft_samples_per_s']:.0f} |")
    maj = result["setup"]["majority"]
    weak = [r["name"] for r in result["runs"] if not r["weight"] and r["test_accuracy"] < maj + 0.02]
    if weak:
        lines += ["", f"Plain PEFT that did not beat the majority class ({maj:.3f}) by 2 points, so its row above "
                  f"compares nothing: {', '.join(weak)}."]
    lines += ["", "Goal check (≥ 50 % lower density than plain PEFT at ≤ 1 point accuracy loss), in hindsight on the "
              "test set: the largest reduction of any DEFT run within 1 point, and within 3 points.", "",
              "| method | act. | best reduction ≤ 1 pt (run) | best reduction ≤ 3 pts (run) |", "|---|---|---|---|"]
    for r in result["selected"]:
        runs = [x for x in result["runs"] if x["method"] == r["method"] and
                ("relu" if x["relu"] else "gelu") == r["activation"]]
        plain = next(x for x in runs if x["name"] == r["plain"])
        cells = []
        for pts in (1, 3):
            ok = [x for x in runs if x["weight"] and x["test_accuracy"] >= plain["test_accuracy"] - pts / 100]
            best = max(ok, key=lambda x: 1 - x["test_density"] / plain["test_density"], default=None)
            cells.append("none" if best is None else
                         f"{100 * (1 - best['test_density'] / plain['test_density']):.1f} % ({best['name']}, "
                         f"{100 * (best['test_accuracy'] - plain['test_accuracy']):+.1f} pts)")
        lines.append(f"| {r['method']} | {r['activation']} | {cells[0]} | {cells[1]} |")
    gelu = {r["method"]: r for r in result["selected"] if r["activation"] == "gelu"}
    relu = [r for r in result["selected"] if r["activation"] == "relu"]
    if gelu and relu:
        lines += ["", "ReLU-swapped DEFT against plain PEFT with the original GELU (what a user switching both gets):", "",
                  "| method | GELU plain acc | ReLU DEFT acc | Δ acc (pts) | GELU plain density | ReLU DEFT density | reduction |",
                  "|---|---|---|---|---|---|---|"]
        for r in relu:
            g = gelu.get(r["method"])
            if g:
                lines.append(f"| {r['method']} | {g['plain_test_accuracy']:.3f} | {r['deft_test_accuracy']:.3f} | "
                             f"{100 * (r['deft_test_accuracy'] - g['plain_test_accuracy']):+.1f} | "
                             f"{g['plain_density']:.3f} | {r['deft_density']:.3f} | "
                             f"{100 * (1 - r['deft_density'] / g['plain_density']):.1f} % |")
    lines += ["", "All runs (test set; density at τ = 0 / 1e-3 / 1e-2; best epoch by validation accuracy):", "",
              "| run | val acc | test acc | density τ=0 | τ=1e-3 | τ=1e-2 | samples/s | best epoch |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        d = r["test_density_at"]
        lines.append(f"| {r['name']} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | {d['0']:.3f} | "
                     f"{d['0.001']:.3f} | {d['0.01']:.3f} | {r['train_samples_per_s']:.0f} | {r['best_epoch']} |")
    lines += ["", "Per-layer density (τ = 1e-3, test) of the selected runs:", ""]
    for r in result["selected"]:
        runs = {x["name"]: x for x in result["runs"]}
        for key in ("plain", "deft"):
            pl = runs[r[key]]["test_density_per_layer"][f"{TAU:g}"]
            lines.append(f"- {r[key]}: " + ", ".join(f"{v:.3f}" for v in pl))
    for method, front in result.get("pareto", {}).items():
        lines += ["", f"Accuracy–density Pareto front ({method}, test): "
                  + "; ".join(f"{n} ({a:.3f}, {d:.3f})" for a, d, n in front)]
    if result.get("reference"):
        lines += _reference_markdown(result["reference"])
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = result["selected"]
    runs = {x["name"]: x for x in result["runs"]}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6))
    ax = axes[0]
    width = 0.8 / max(1, 2 * len(sel))
    for i, r in enumerate(sel):
        for j, key in enumerate(("plain", "deft")):
            pl = runs[r[key]]["test_density_per_layer"][f"{TAU:g}"]
            x = np.arange(len(pl)) + (2 * i + j) * width - 0.4
            ax.bar(x, pl, width=width, label=r[key], color=f"C{i}", alpha=0.45 if key == "plain" else 0.95)
    ax.set_xlabel("MLP layer")
    ax.set_ylabel(f"density (|a| > {TAU:g})")
    ax.set_title("per-layer activation density, plain PEFT (light) vs DEFT (dark), test")
    ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax = axes[1]
    for i, method in enumerate(METHODS):
        for relu, marker in ((False, "o"), (True, "^")):
            pts = [(r["test_accuracy"], r["test_density"]) for r in result["runs"]
                   if r["method"] == method and bool(r["relu"]) == relu]
            if pts:
                a, d = zip(*pts)
                ax.scatter(d, a, color=f"C{i}", marker=marker, label=f"{method} ({'relu' if relu else 'gelu'})")
    for _method, front in result.get("pareto", {}).items():
        if front:
            ax.plot([p[1] for p in front], [p[0] for p in front], "k--", lw=0.8)
    ax.axhline(result["setup"]["majority"], color="grey", lw=0.8, ls=":", label="majority class")
    ax.set_xlabel(f"test activation density (|a| > {TAU:g})")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs density, every run (dashed: Pareto fronts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plan(methods, settings, relus, sweep_weights, sweep_method: str = "lora") -> list[dict]:
    """Runs in priority order, so a time budget cuts the least important: per method and activation,
    plain PEFT and the first DEFT setting; then the other settings; then a density-weight sweep."""
    specs = []
    first, rest = settings[0], settings[1:]
    for m in methods:
        for relu in relus:
            specs.append({"method": m, "weight": 0.0, "eps": first[1], "relu": relu})
            specs.append({"method": m, "weight": first[0], "eps": first[1], "relu": relu})
    for w, e in rest:
        for m in methods:
            for relu in relus:
                specs.append({"method": m, "weight": w, "eps": e, "relu": relu})
    for w in sweep_weights:
        for relu in relus:
            spec = {"method": sweep_method, "weight": w, "eps": first[1], "relu": relu}
            if spec not in specs:
                specs.append(spec)
    return specs


def pareto_fronts(runs: list[dict]) -> dict:
    return {f"{m} ({a})": pareto([(r["test_accuracy"], r["test_density"], r["name"]) for r in runs
                                  if r["method"] == m and ("relu" if r["relu"] else "gelu") == a])
            for m in METHODS for a in ("gelu", "relu")
            if any(r["method"] == m and ("relu" if r["relu"] else "gelu") == a for r in runs)}


def merge(paths: list[str], out: Path, notes: list[str]) -> int:
    """One result out of several runs of this script with the same setup (e.g. two device sessions)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("model", "epochs", "batch_size", "max_length", "seed", "n_train", "n_val", "n_test")
    for part in parts[1:]:
        diff = [k for k in keys if part["setup"][k] != parts[0]["setup"][k]]
        if diff:
            print(f"cannot merge {paths}: setups differ in {diff}", file=sys.stderr)
            return 2
    seen, runs = set(), []
    for part in parts:
        for r in part["runs"]:
            if r["name"] not in seen:
                seen.add(r["name"])
                runs.append(r)
    result = {**parts[0], "runs": runs, "pareto": pareto_fronts(runs),
              "command": " ; ".join(part["command"] for part in parts),
              "parts": [{"command": part["command"], "runs": [r["name"] for r in part["runs"]],
                         "total_s": part.get("total_s"), "notes": part.get("notes", [])} for part in parts],
              "notes": notes}
    write(out, result)
    print(markdown(result))
    return 0


