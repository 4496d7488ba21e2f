"""Load benchmark of the model server: `densiray serve`'s ways in beside the same app in plain uvicorn.

    .venv/bin/python jobs/bench_serve.py [--clients 16] [--repeats 2] [--max-seconds 8] [--out jobs/results]

One run exports a DNMM (moons, default architecture; initial weights, since the cost of log_prob
does not depend on training) and puts the same bounded load on each Serve configuration and on the
plain app (the same FastAPI app and validation in one uvicorn process, no Ray, at the niceness Ray
gives its workers) over loopback: ``--clients`` concurrent keep-alive clients (aiohttp, in a
separate process) send ``log_prob`` requests of 64, 256 and 1024 rows until a bounded number are
done or ``--max-seconds`` pass. Each Serve load is paired with a plain-app load right after it
(medians of ``--repeats`` pairs), so that both see the same load on the shared machine.

Configurations (Serve settings as `densiray serve` takes them):

* a local Ray started in Serve's throughput-optimized mode with **direct ingress** (the replica
  serves HTTP itself; `densiray serve`'s default when it starts its own Ray with one replica):
  batching on (the default) and off;
* a local Ray in Serve's default mode, requests through **Serve's HTTP proxy** (what a cluster or
  several replicas get): 1 replica with batching (the old default) and without, 2 replicas without.

Also recorded: the CPU each process role spends per request (from /proc, Linux) and the machine's
load average during each load. Writes ``serve.json`` (``ratio_to_plain`` keyed by rows per request,
for `densiray serve`'s defaults) and ``serve.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

# ---------------------------------------------------------------------------------------------
# The load generator (its own process: `bench_serve.py --client '{...}'`)
# ---------------------------------------------------------------------------------------------


async def _load(url: str, method: str, body: bytes | None, total: int, clients: int, max_s: float,
                warmup: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def worker(left: list[int], deadline: float, record: bool) -> None:
            nonlocal errors
            while left[0] > 0 and time.perf_counter() < deadline:
                left[0] -= 1
                t = time.perf_counter()
                try:
                    async with session.request(method, url, data=body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += record
                    continue
                if record:
                    latencies.append(time.perf_counter() - t)
                    statuses[status] = statuses.get(status, 0) + 1

        await worker([warmup], time.perf_counter() + 60, False)
        left = [total]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(left, t0 + max_s, True) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return round(1e3 * latencies[min(n - 1, int(q * n))], 2) if n else float("nan")

    ok = sum(c for s, c in statuses.items() if 200 <= s < 300)
    return {"completed": n, "wall_s": round(wall, 3), "rps": round(n / wall, 1), "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "non_2xx": n - ok, "5xx": sum(c for s, c in statuses.items() if s >= 500),
            "errors": errors}


def client_main(spec: str) -> None:
    s = json.loads(spec)
    body = s["body"].encode() if s.get("body") is not None else None
    print(json.dumps(asyncio.run(_load(s["url"], s["method"], body, s["total"], s["clients"], s["max_s"],
                                       s["warmup"]))))


# ---------------------------------------------------------------------------------------------
# CPU per process role, from /proc (Linux)
# ---------------------------------------------------------------------------------------------

ROLES = {"ray::ProxyActor": "proxy", "ray::ServeReplica": "replica", "densiray.serve.plain": "plain app",
         "--client": "load generator",
         "ray::ServeController": "controller", "raylet": "raylet", "gcs_server": "gcs"}


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by the processes of each role (empty where /proc is missing)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = next((r for key, r in ROLES.items() if key in cmd), None)
        if role:
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def run_load(url: str, method: str = "POST", body: str | None = None, total: int = 1000, clients: int = 16,
             max_s: float = 60.0, warmup: int = 100) -> dict:
    spec = json.dumps({"url": url, "method": method, "body": body, "total": total, "clients": clients,
                       "max_s": max_s, "warmup": warmup})
    before = cpu_by_role()
    out = subprocess.run([sys.executable, __file__, "--client", spec], capture_output=True, text=True,
                         timeout=max_s + 180)
    after = cpu_by_role()
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["loadavg_1min"] = round(os.getloadavg()[0], 1)  # how busy the shared machine was meanwhile
    n = max(result["completed"] + warmup, 1)
    per_request = {r: 1e3 * (after[r] - before.get(r, 0.0)) / n for r in after}
    result["cpu_ms_per_request"] = {r: round(v, 2) for r, v in per_request.items() if v >= 0.01}
    return result


# ---------------------------------------------------------------------------------------------
# The servers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not healthy(url):
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.2)


def worker_niceness() -> int:
    """The niceness Ray gives worker processes (its default 15, or $RAY_worker_niceness)."""
    return int(os.environ.get("RAY_worker_niceness", "15"))


class Plain:
    """The plain app: one uvicorn process without Ray, up for the whole run."""

    def __init__(self, store: str):
        self.port = free_port()
        nice = worker_niceness()
        self.proc = subprocess.Popen([sys.executable, "-m", "densiray.serve.plain", "--store", store,
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.url)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

ROWS = (64, 256, 1024)
REQUESTS = {64: 1500, 256: 600, 1024: 150}  # per load: a few seconds each on 2 cores
DEFAULT = "direct ingress, batching (default)"
# name -> (ingress, Serve settings, rows per request measured)
CONFIGS = {
    DEFAULT: ("direct", {}, ROWS),
    "direct ingress, no batching": ("direct", {"batching": False}, ROWS),
    "proxy, 1 replica, batching (old default)": ("proxy", {"batching": True}, ROWS),
    "proxy, 1 replica, no batching": ("proxy", {"batching": False}, (64,)),
    "proxy, 2 replicas, no batching": ("proxy", {"replicas": 2, "batching": False}, (64,)),
}
METRICS = ("rps", "rows_per_s", "p50_ms", "p99_ms", "non_2xx", "5xx", "errors", "loadavg_1min")


def median_of(runs: list[dict]) -> dict:
    out = {k: round(statistics.median(r.get(k, 0) for r in runs), 2) for k in METRICS}
    roles = sorted({k for r in runs for k in r.get("cpu_ms_per_request", {})})
    out["cpu_ms_per_request"] = {k: round(statistics.median(r["cpu_ms_per_request"].get(k, 0.0) for r in runs), 2)
                                 for k in roles}
    out["runs"] = runs
    return out


def body_of(rows: int, d: int = 2) -> str:
    import numpy as np

    return json.dumps({"x": np.random.default_rng(0).normal(size=(rows, d)).round(6).tolist()})


def export_model(store: str, n: int) -> tuple[str, str]:
    """Export the benchmark DNMM; returns its name and a description."""
    from densiray.api import RunSpec, build_task

    task = build_task("dnmm", RunSpec(dataset="moons", n=n))
    model = task.trained_model(task.build_model().state_dict())
    task.export(model, store=store, name="bench", provenance={})
    c = model.cfg
    return "bench", f"DNMM on moons (d=2), {c.components} components, {c.hidden} hidden x {c.depth} layers"


def measure_config(name: str, serve_url: str, plain: Plain, model: str, rows_list, args) -> dict:
    """Paired loads (this Serve configuration, then the plain app) per rows per request:
    ``--repeats`` pairs for the direct-ingress configurations (the candidates for the default), one for the
    others."""
    out = {}
    path = f"/v1/models/{model}/log_prob"
    repeats = args.repeats if CONFIGS[name][0] == "direct" else 1
    for rows in rows_list:
        body = body_of(rows)
        runs: dict[str, list[dict]] = {"serve": [], "plain": []}
        for rep in range(repeats):
            for who, url in (("serve", serve_url), ("plain", plain.url)):
                r = run_load(url + path, body=body, total=REQUESTS[rows], clients=args.clients,
                             max_s=args.max_seconds, warmup=20)
                r["rows_per_s"] = round(r["rps"] * rows, 1)
                runs[who].append(r)
                print(f"  [{rep + 1}/{repeats}] {rows:5d} rows  {who:5s} {r['rps']:8.1f} req/s  p50 "
                      f"{r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  5xx {r['5xx']}  non-2xx {r['non_2xx']}  "
                      f"load {r['loadavg_1min']}", flush=True)
        s, p = median_of(runs["serve"]), median_of(runs["plain"])
        out[str(rows)] = {"serve": s, "plain": p, "ratio_to_plain": round(s["rps"] / p["rps"], 3) if p["rps"] else None,
                          "p99_ratio": round(s["p99_ms"] / p["p99_ms"], 3) if p["p99_ms"] else None}
    return out


def phase(ingress: str, store: str, model: str, plain: Plain, args) -> dict:
    """One local Ray (started by densiray.serve.start in the way ``ingress`` needs) and its configurations."""
    import ray

    import densiray.serve as ds
    from densiray.serve.runner import forget_direct_ingress

    out = {}
    port = free_port()
    try:
        for name, (way, settings, rows_list) in CONFIGS.items():
            if way != ingress:
                continue
            t = time.time()
            for attempt in range(3):  # on a loaded shared machine Ray's start-up can time out: try again
                try:
                    url = ds.start(store=store, port=port, ingress=ingress, **settings)
                    break
                except Exception as e:  # noqa: BLE001
                    print(f"  start failed ({type(e).__name__}: {str(e)[:120]}); retrying", flush=True)
                    if ray.is_initialized():
                        ray.shutdown()
                    if attempt == 2:
                        raise
            print(f"{name}: up in {time.time() - t:.0f} s at {url}", flush=True)
            out[name] = {"ingress": ingress, "settings": settings,
                         "rows": measure_config(name, url, plain, model, rows_list, args)}
            ds.shutdown()
    finally:
        if ray.is_initialized():
            ds.shutdown()
            ray.shutdown()
        forget_direct_ingress()
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def _cpu(r: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in r.get("cpu_ms_per_request", {}).items()
                     if k in ("proxy", "replica", "plain app") and v >= 0.05) or "-"


def _table(configs: dict) -> list[str]:
    head = ("| configuration | rows/request | Serve req/s | plain req/s | ratio | Serve p99 (ms) | plain p99 (ms) "
            "| 5xx | non-2xx | Serve CPU ms/request | plain CPU ms/request | load avg |")
    out = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, c in configs.items():
        for rows, r in c["rows"].items():
            s, p = r["serve"], r["plain"]
            out.append(f"| {name} | {rows} | {s['rps']:.0f} | {p['rps']:.0f} | {r['ratio_to_plain']:.2f} | "
                       f"{s['p99_ms']:.0f} | {p['p99_ms']:.0f} | {s['5xx'] + p['5xx']:.0f} | "
                       f"{s['non_2xx'] + s['errors']:.0f} | {_cpu(s)} | {_cpu(p)} | {s['loadavg_1min']:.0f} |")
    return out


def verdict(result: dict) -> list[str]:
    ratios, d = result["ratio_to_plain"], result["configs"][DEFAULT]["rows"]
    p99 = {rows: r["p99_ratio"] for rows, r in d.items()}
    every = [run for c in result["configs"].values() for r in c["rows"].values() for who in ("serve", "plain")
             for run in r[who]["runs"]]
    five = sum(run["5xx"] for run in every)
    bad = sum(run["non_2xx"] + run["errors"] for run in every)
    targets = [("64", 0.8), ("256", 1.0), ("1024", 1.0)]
    met = {rows: ratios[rows] >= goal for rows, goal in targets}
    lines = [f"Targets (`densiray serve` defaults against the plain app): throughput >= 0.8x at 64 rows "
             f"({'met' if met['64'] else 'not met'}: {ratios['64']:.3f}x), >= 1.0x at 256 rows "
             f"({'met' if met['256'] else 'not met'}: {ratios['256']:.3f}x) and 1024 rows "
             f"({'met' if met['1024'] else 'not met'}: {ratios['1024']:.3f}x); p99 <= 2x the plain app's "
             f"({', '.join(f'{r} rows {v:.2f}x' for r, v in p99.items())}: "
             f"{'met' if all(v <= 2 for v in p99.values()) else 'not met'}); zero 5xx ({five} in {len(every)} loads; "
             f"{bad} responses not 2xx or failed).", ""]
    others = [f"{name} {c['rows']['64']['ratio_to_plain']:.2f}x" for name, c in result["configs"].items()
              if name != DEFAULT and "64" in c["rows"]]
    lines += [f"At 64 rows the other configurations reach: {'; '.join(others)}.", ""]
    old = result["configs"].get("proxy, 1 replica, batching (old default)")
    if old:
        lines.append("Through Serve's proxy (the old default) the same loads reach " +
                     ", ".join(f"{r['ratio_to_plain']:.2f}x at {rows} rows" for rows, r in old["rows"].items()) +
                     " of the plain app: the proxy is a second Python process on the request path, with its own "
                     "HTTP parsing and a hop to the replica per request (its CPU per request is in the table).")
    return lines


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["meta"]
    lines = [
        "# Model server load benchmark", "",
        f"{m['machine']}; Ray {m['ray']}. **The machine is shared**: the 1-minute load average was {m['loadavg_start']} "
        f"when the run started and {m['loadavg_end']} when it ended (other work on the same 2 cores), so absolute "
        f"numbers move with it; every Serve load is paired with a plain-app load right after it, and the ratios are "
        f"of those pairs' medians ({m['repeats']} pairs per cell for the direct-ingress configurations, the candidates for the default, 1 for the others). {m['clients']} concurrent keep-alive clients "
        f"(aiohttp, one process, on the same cores) over loopback, `log_prob` requests, each load bounded by "
        f"{m['requests']} requests or {m['max_seconds']:g} s. Model: {m['model']}. The plain app is the same FastAPI "
        f"app and validation in one uvicorn process without Ray, at Ray's worker niceness ({m['niceness']}). Serve "
        f"settings: `densiray serve`'s ({m['serve_defaults']}) unless named.", "",
        f"Regenerate: `{m['command']}` (about {m['minutes']:.0f} minutes).", "",
        "## `ratio_to_plain` of `densiray serve`'s default (Serve req/s over the plain app's)", "",
        "| rows/request | " + " | ".join(result["ratio_to_plain"]) + " |",
        "| --- |" + " --- |" * len(result["ratio_to_plain"]),
        "| ratio | " + " | ".join(f"{v:.2f}" for v in result["ratio_to_plain"].values()) + " |", "",
        "## Every configuration", "", *_table(result["configs"]), "",
        "## Verdict", "", *verdict(result), "",
        "## The trade-off", "",
        "* **Direct ingress** (default when `densiray serve` starts its own Ray, one replica): Ray Serve's "
        "throughput-optimized mode; the replica runs the HTTP server on the port itself, so a request costs one "
        "process and no hop. Serve still runs the replica (health checks, restarts on the same port, the "
        "multiplexed model cache, batching). One replica answers: scale up with `--replicas` (then through the proxy).",
        "* **Proxy** (on a cluster, `RAY_ADDRESS`, or with several replicas; `DENSIRAY_SERVE_INGRESS=proxy` forces it): "
        "Serve's HTTP proxy balances requests over replicas on any node, at the cost of a second process and a hop per "
        "request, which dominates for small requests on a small machine.", "",
    ]
    (out / "serve.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--repeats", type=int, default=3, help="paired loads per rows for the direct-ingress configurations")
    p.add_argument("--max-seconds", type=float, default=8.0, help="cap on one measured load")
    p.add_argument("--data-n", type=int, default=4000, help="rows of the moons data the model is fitted to")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client_main(args.client)

    import ray

    from densiray.serve import ServeSettings

    t0 = time.time()
    loadavg = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    defaults = ServeSettings()
    configs: dict = {}
    with tempfile.TemporaryDirectory() as store:
        model, described = export_model(store, args.data_n)
        plain = Plain(store)
        try:
            configs.update(phase("direct", store, model, plain, args))
            configs.update(phase("proxy", store, model, plain, args))
        finally:
            plain.close()
    result = {
        "ratio_to_plain": {rows: r["ratio_to_plain"] for rows, r in configs[DEFAULT]["rows"].items()},
        "p99_ratio_to_plain": {rows: r["p99_ratio"] for rows, r in configs[DEFAULT]["rows"].items()},
        "default": DEFAULT,
        "configs": configs,
    }
    result["meta"] = {
        "machine": machine(), "ray": ray.__version__, "loadavg_start": loadavg, "clients": args.clients,
        "requests": REQUESTS, "repeats": args.repeats, "max_seconds": args.max_seconds, "model": described,
        "niceness": worker_niceness(), "minutes": (time.time() - t0) / 60,
        "loadavg_end": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "serve_defaults": f"direct ingress, 1 replica x {defaults.replica_cpus} CPU, max_ongoing_requests "
                          f"{defaults.max_ongoing_requests}, batching {'on' if defaults.batching else 'off'} "
                          f"(max_batch_size {defaults.max_batch_size}, wait {defaults.batch_wait_timeout_s * 1e3:g} "
                          f"ms), max_rows_per_call {defaults.max_rows_per_call}, {defaults.torch_threads} torch thread, "
                          f"access log {'on' if defaults.access_log else 'off'}",
        "command": " ".join([".venv/bin/python jobs/bench_serve.py", *sys.argv[1:]]),
    }
    write_report(Path(args.out), result)
    print(f"wrote {args.out}/serve.json and serve.md")


if __name__ == "__main__":
    main()
