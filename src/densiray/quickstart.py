"""``densiray quickstart``: the whole product in one command, on the embedded local Ray.

Tune a DNMM on a bundled dataset with Ray Tune (every trial through the Ray Train engine),
export the winner, deploy it on Ray Serve, query it over HTTP, and print a short report: the winner's
config, its held-out log-likelihood beside KDE and GMM on the same split, and a curl example. Serve
and Ray are shut down at the end unless ``keep_serving``.
"""

from __future__ import annotations

import json
import os
import time

from densiray import console


def _post(url: str, body: dict) -> dict:
    from densiray.serve.runner import http_request

    status, data = http_request("POST", url, json.dumps(body), headers={"Content-Type": "application/json"})
    if status >= 400:
        raise OSError(f"HTTP {status} from {url}: {data[:300].decode(errors='replace')}")
    return json.loads(data)


def _mean_se(lp) -> dict:
    import numpy as np

    lp = np.asarray(lp, dtype=np.float64)
    return {"test_log_lik": float(lp.mean()), "test_log_lik_se": float(lp.std(ddof=1) / np.sqrt(len(lp)))}


def paired(a, b) -> dict:
    """The paired difference ``a - b`` of two models' log-densities on the same test rows: its mean,
    standard error and their ratio (z). Pairing removes the rows' shared difficulty, so this SE is far
    smaller than either model's own."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"diff": mean, "diff_se": se, "z": mean / se if se > 0 else float("inf"), "rows": int(len(d))}


def run(*, dataset: str = "moons", store: str | None = None, trials: int = 8, epochs: int = 100,
        time_budget_s: float = 300, n: int | None = None, host: str = "127.0.0.1", port: int = 8000,
        keep_serving: bool = False) -> dict:
    """Run the quickstart; returns its report as a dict (also printed)."""
    import numpy as np

    import densiray.api as api
    from densiray.bench.density import fit_gmm, fit_kde
    from densiray.tune.sweep import tune

    name = f"quickstart-{dataset}"
    print(f"densiray quickstart: tuning a Deep Neural Mixture Model on {dataset!r} with Ray Tune "
          f"({trials} trials of up to {epochs} epochs, each through the Ray Train engine), then serving it "
          "with Ray Serve on the local Ray", flush=True)
    started_ray = not os.environ.get("RAY_ADDRESS")
    import ray

    started_ray = started_ray and not ray.is_initialized()
    t0 = time.perf_counter()
    summary = tune("dnmm", dataset, overrides={"n": n}, settings={"trials": trials, "epochs": epochs,
                                                                   "time_budget_s": time_budget_s},
                   name=name, store=store, restart=True)
    task = api.build_task("dnmm", api.RunSpec(dataset=dataset, n=n, model={"components": 1, "covariance": "full"}))
    tr, va, te = (a.astype(np.float64) for a in (task.train_x, task.val_x, task.test_x))
    from densiray.store import load_model

    dnmm_lp = load_model(name, store=store).log_prob_standardized(task.test_x)
    baselines = {}
    for label, fit in (("GMM", lambda: fit_gmm(tr, va, te)), ("KDE", lambda: fit_kde(tr, te))):
        lp, info = fit()
        baselines[label] = {**_mean_se(lp), "paired": paired(dnmm_lp, lp), **info}

    import densiray.serve as ds

    with console.logs_to(summary.get("log")):  # Serve's own lines go to the sweep's log too
        url = ds.start(store=store, host=host, port=port)
        try:
            point = task.transform.inverse(task.test_x[:3].astype(np.float64)).round(3).tolist()
            answers = {
                "log_prob": _post(f"{url}/v1/models/{name}/log_prob", {"x": point}),
                "sample": _post(f"{url}/v1/models/{name}/sample", {"n": 3, "seed": 0}),
                "score": _post(f"{url}/v1/models/{name}/score", {"x": [point[0], [40.0] * len(point[0])]}),
            }
            report = {"name": name, "url": url, "trial_id": summary["trial_id"], "config": summary["config"],
                      "trials": summary["trials"], "tune_time_s": summary["tune_time_s"],
                      "ensemble": summary.get("ensemble") or [],
                      "dnmm": {k: summary["metrics"][k] for k in ("test_log_lik", "test_log_lik_se", "integral", "integral_se")},
                      "baselines": baselines, "http": answers, "plots": summary["plots"], "path": summary["path"],
                      "total_time_s": round(time.perf_counter() - t0, 1)}
            _print(report, point)
            if keep_serving:
                print(f"\nserving at {url} — press Ctrl-C to stop", flush=True)
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        finally:
            if not console.ray_lost:  # else the command line exits without Ray's shutdown
                with console.stdout_to(summary.get("log")):  # Ray's notices while Serve stops: to the log
                    ds.shutdown()
                    if started_ray:
                        ray.shutdown()
    return report


def _print(r: dict, point: list) -> None:
    d = r["dnmm"]
    config = ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                       for k, v in r["config"].items())
    print()
    print(f"winner     trial {r['trial_id']} of {r['trials']} ({r['tune_time_s']:.0f} s): {config}")
    if len(r.get("ensemble") or []) > 1:
        print(f"mixture    {console.mixture_line(r['ensemble'])}")
    print(f"stored at  {r['path']}")
    print("held-out   test log-likelihood, nats per sample (standardised units, the same split for all):")
    rows = [("DNMM (tuned)", d)] + list(r["baselines"].items())
    for label, m in sorted(rows, key=lambda kv: -kv[1]["test_log_lik"]):
        print(f"             {label:13} {m['test_log_lik']:8.4f} ± {m['test_log_lik_se']:.4f}")
    for label, m in r["baselines"].items():
        p = m["paired"]
        verdict = "DNMM better" if p["z"] >= 2 else ("DNMM worse" if p["z"] <= -2 else "no clear difference")
        if abs(p["diff"]) < 5e-5 and p["diff_se"] < 5e-5:  # a z of numerical noise (frozen normalisers)
            verdict = "the same density to 4 decimals" + (
                ": no trained epoch beat the starting mixture, so the DNMM is that mixture" if label == "GMM" else "")
        print(f"paired     DNMM − {label}: {p['diff']:+.4f} ± {p['diff_se']:.4f} nats per test row "
              f"({p['z']:+.1f} SE, {p['rows']} rows): {verdict}")
    print(f"integral   ∫p = {d['integral']:.5f} ± {d['integral_se']:.5f}")
    h = r["http"]
    print(f"served     {r['url']}: log p of 3 test rows = {[round(v, 3) for v in h['log_prob']['log_prob']]}; "
          f"outlier flags for [a test row, a far point] = {h['score']['outlier']}")
    print(f"curl       curl -s -X POST {r['url']}/v1/models/{r['name']}/log_prob "
          f"-H 'Content-Type: application/json' -d '{json.dumps({'x': [point[0]]})}'")
    for p in r["plots"]:
        print(f"plot       {p}")
    print(f"total      {r['total_time_s']:.0f} s")
