"""DNMM with default settings on every bundled dataset, beside the reference table of DESIGN.md.

    .venv/bin/python jobs/bench_dnmm_defaults.py [--out jobs/results] [--datasets moons,iris]

Each dataset is trained through the real pipeline (local Ray, 2 DeepSpeed ZeRO-2 workers, default
DNMM and engine settings) on the protocol splits; the test log-likelihood is in nats per sample of
standardised rows, as in the reference table. Writes dnmm_defaults.json and dnmm_defaults.md.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import densiray.api as api  # noqa: E402
from densiray import __version__  # noqa: E402

# DESIGN.md, "Reference figures": KDE, GMM, MAF, NSF held-out log-likelihoods (same protocol).
REFERENCE = {
    "moons": (-1.168, -1.124, -1.213, -1.140),
    "rings": (-1.632, -1.596, -2.325, -1.771),
    "checkerboard": (-1.932, -1.955, -1.998, -2.019),
    "iris": (-2.759, -2.565, -8.905, -3.407),
    "wine": (-14.882, -15.934, -34.936, -15.392),
    "breast_cancer": (-29.043, -7.044, -19.287, -8.333),
    "digits": (-67.819, -58.327, -63.795, -51.422),
    "diabetes": None,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--datasets", default=",".join(REFERENCE))
    args = p.parse_args()
    api.ensure_ray(log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as store:
        for name in args.datasets.split(","):
            t0 = time.perf_counter()
            s = api.train("dnmm", name, name=f"bench-{name}", store=store, plot=False)
            m = s["metrics"]
            rows.append({"dataset": name, "d": s["d"], "test_log_lik": m["test_log_lik"],
                         "test_log_lik_se": m["test_log_lik_se"], "val_log_lik": m["val_log_lik"],
                         "integral": m["integral"], "integral_se": m["integral_se"],
                         "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"],
                         "train_time_s": s["train_time_s"], "wall_time_s": round(time.perf_counter() - t0, 1),
                         "reference": dict(zip(["KDE", "GMM", "MAF", "NSF"], REFERENCE[name])) if REFERENCE[name] else None})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"densiray": __version__, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "setup": "local Ray, 2 workers x 1 CPU, DeepSpeed ZeRO-2, fp32, default DNMM and engine settings"}
    (out / "dnmm_defaults.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| dataset | d | DNMM (default) | KDE | GMM | MAF | NSF | ∫p | epochs | train time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = r["reference"] or {}
        best = max(ref.values()) if ref else None
        mark = " **(best)**" if best is not None and r["test_log_lik"] >= best else ""
        refs = " | ".join(f"{ref[k]:.3f}" if k in ref else "–" for k in ("KDE", "GMM", "MAF", "NSF"))
        lines.append(f"| {r['dataset']} | {r['d']} | {r['test_log_lik']:.3f} ± {r['test_log_lik_se']:.3f}{mark} | {refs} | "
                     f"{r['integral']:.4f} ± {r['integral_se']:.4f} | {r['epochs_run']} | {r['train_time_s']:.0f} |")
    (out / "dnmm_defaults.md").write_text("\n".join(
        ["# DNMM with default settings", "", f"{meta['setup']}; test log-likelihood in nats per sample of "
         "standardised rows (DESIGN.md protocol). Regenerate: `.venv/bin/python jobs/bench_dnmm_defaults.py`.", "",
         *lines, ""]))


if __name__ == "__main__":
    main()
