"""Load benchmark of the model server: Ray Serve (batching on, off) beside a plain uvicorn app.

    .venv/bin/python jobs/bench_serve.py [--requests 2000] [--clients 16] [--rows 64] [--repeats 3]
                                         [--no-sweep] [--no-direct] [--out jobs/results]

One run starts a local Ray, exports a DNMM (moons, default architecture; initial weights, since the
cost of log_prob does not depend on training) and puts the same bounded load on every configuration
over loopback: ``--clients`` concurrent keep-alive clients (aiohttp, in a separate process) send
``log_prob`` requests of ``--rows`` rows until ``--requests`` are done or ``--max-seconds`` pass.
Configurations are interleaved ``--repeats`` times and medians reported:

* ``serve, batching``    -- the Serve app as ``densiray serve`` runs it (serve.batch on)
* ``serve, no batching`` -- the same with ``batching: false``
* ``plain uvicorn``      -- the same FastAPI app in one uvicorn process, no Ray (densiray.serve.plain),
  at the niceness Ray gives its workers, so both compete alike with whatever else runs

Also measured: the CPU each process spends per request (from /proc, Linux), the same load on
``GET /healthz`` (no model, no body: the HTTP path alone), tuning runs (replicas, batch wait, rows
per request; skip with ``--no-sweep``) and, on a second local Ray started with Ray's
throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, direct ingress: the replica serves
HTTP itself), the replica addressed directly, past the proxy (skip with ``--no-direct``).
Writes ``serve.json`` and ``serve.md`` to ``--out``.
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


def replica_url() -> str:
    """The HTTP server of the (single) replica under direct ingress: the port its process listens on."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if "ray::ServeReplica" in " ".join(proc.info["cmdline"] or []):
            for conn in proc.net_connections(kind="tcp"):
                url = f"http://127.0.0.1:{conn.laddr.port}"
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1" and healthy(url):
                    return url
    raise RuntimeError("no replica serves HTTP itself; is direct ingress on?")


class Servers:
    """The plain app (a subprocess, up for the whole phase) and the Serve app (redeployed per config)."""

    def __init__(self, store: str):
        self.store = store
        self.serve_port, self.plain_port = free_port(), free_port()
        nice = worker_niceness()
        self.plain = subprocess.Popen([sys.executable, "-m", "densiray.serve.plain", "--store", store,
                                       "--port", str(self.plain_port)], stdout=subprocess.DEVNULL,
                                      preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.plain_url = f"http://127.0.0.1:{self.plain_port}"
        wait_healthy(self.plain_url)
        self.deployed: dict | None = None

    def url(self, settings: dict | None, direct: bool = False) -> str:
        """The URL of the plain app (settings None) or of the Serve app deployed with ``settings``."""
        if settings is None:
            return self.plain_url
        if settings != self.deployed:
            import densiray.serve as ds
            from densiray.serve.deployment import APP_NAME
            from ray import serve

            if APP_NAME in serve.status().applications:
                serve.delete(APP_NAME)
            ds.start(store=self.store, port=self.serve_port, **settings)
            self.deployed = settings
        return replica_url() if direct else f"http://127.0.0.1:{self.serve_port}"

    def close(self) -> None:
        import densiray.serve as ds

        ds.shutdown()
        self.plain.terminate()
        self.plain.wait(30)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

BATCHING, NO_BATCHING = {"batching": True}, {"batching": False}
# name -> (Serve settings, or None for the plain app; address the replica directly)
MAIN = {"serve, batching": (BATCHING, False), "serve, no batching": (NO_BATCHING, False),
        "plain uvicorn": (None, False)}
METRICS = ("rps", "rows_per_s", "p50_ms", "p99_ms", "non_2xx", "5xx", "errors", "loadavg_1min")


def median_of(runs: list[dict]) -> dict:
    out = {k: round(statistics.median(r.get(k, 0) for r in runs), 2) for k in METRICS}
    roles = sorted({k for r in runs for k in r.get("cpu_ms_per_request", {})})
    out["cpu_ms_per_request"] = {k: round(statistics.median(r["cpu_ms_per_request"].get(k, 0.0) for r in runs), 2)
                                 for k in roles}
    out["runs"] = runs
    return out


def measure(servers: Servers, configs: dict, path: str, body: str | None, rows: int, args, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(repeats):
        for name, (settings, direct) in configs.items():
            url = servers.url(settings, direct)
            r = run_load(url + path, method="POST" if body else "GET", body=body, total=args.requests,
                         clients=args.clients, max_s=args.max_seconds)
            r["rows_per_s"] = round(r["rps"] * rows, 1)
            runs[name].append(r)
            print(f"  [{rep + 1}/{repeats}] {name:44s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                  f"p99 {r['p99_ms']:7.2f} ms  non-2xx {r['non_2xx']}  5xx {r['5xx']}  "
                  f"cpu/req {r['cpu_ms_per_request']}",
                  flush=True)
    return {name: median_of(rs) for name, rs in runs.items()}


def body_of(rows: int, d: int) -> str:
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


def phase_main(store: str, model: str, args) -> dict:
    from densiray.api import ensure_ray

    ensure_ray(log_to_driver=False)
    servers = Servers(store)
    path = f"/v1/models/{model}/log_prob"
    out: dict = {}
    try:
        print(f"log_prob, {args.rows} rows per request, {args.clients} clients:", flush=True)
        out["main"] = measure(servers, MAIN, path, body_of(args.rows, 2), args.rows, args, args.repeats)
        print("GET /healthz:", flush=True)
        out["healthz"] = measure(servers, {"serve": (BATCHING, False), "plain uvicorn": (None, False)}, "/healthz",
                                 None, 0, args, args.repeats)
        if args.sweep:
            print("tuning:", flush=True)
            reps = max(1, args.repeats - 1)
            variants = {
                "serve, batching, 2 replicas": ({"batching": True, "replicas": 2}, False),
                "serve, no batching, 2 replicas": ({"batching": False, "replicas": 2}, False),
                "serve, batching, wait 0 ms": ({"batching": True, "batch_wait_timeout_s": 0.0}, False),
                "serve, batching, wait 10 ms": ({"batching": True, "batch_wait_timeout_s": 0.01}, False),
            }
            sweep = measure(servers, variants, path, body_of(args.rows, 2), args.rows, args, reps)
            for rows in (1, 1024):
                cfg = {f"{k}, {rows} rows/request": v for k, v in MAIN.items()}
                sweep.update(measure(servers, cfg, path, body_of(rows, 2), rows, args, reps))
            out["sweep"] = sweep
    finally:
        servers.close()
    return out


def phase_direct(store: str, model: str, args) -> dict:
    """A second local Ray in throughput-optimized mode; the replica's own HTTP port, past the proxy."""
    import ray

    from densiray.api import ensure_ray

    ray.shutdown()
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read when Serve's actors start: set before Ray starts
    ensure_ray(log_to_driver=False)
    servers = Servers(store)
    configs = {"serve (throughput-optimized), batching, via proxy": (BATCHING, False),
               "serve (throughput-optimized), batching, direct": (BATCHING, True),
               "plain uvicorn": (None, False)}
    try:
        print("throughput-optimized Ray (direct ingress):", flush=True)
        return measure(servers, configs, f"/v1/models/{model}/log_prob", body_of(args.rows, 2), args.rows, args,
                       args.repeats)
    finally:
        servers.close()
        ray.shutdown()


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
                     if k in ("proxy", "replica", "plain app") and v >= 0.05) or "–"


def _table(rows: dict, rows_col: bool = True) -> list[str]:
    head = "| configuration | req/s |" + (" rows/s |" if rows_col else "") + \
        " p50 (ms) | p99 (ms) | non-2xx | 5xx | CPU ms per request | load avg |"
    out = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in rows.items():
        out.append(f"| {name} | {r['rps']:.0f} |" + (f" {r['rows_per_s']:.0f} |" if rows_col else "") +
                   f" {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_2xx']:.0f} | {r['5xx']:.0f} | {_cpu(r)} "
                   f"| {r.get('loadavg_1min', float('nan')):.1f} |")
    return out


def verdict(result: dict) -> list[str]:
    main = result["main"]
    best = max(("serve, batching", "serve, no batching"), key=lambda k: main[k]["rps"])
    s, p = main[best], main["plain uvicorn"]
    every = [run for part in ("main", "healthz", "sweep", "direct") for r in result.get(part, {}).values()
             for run in r["runs"]]
    five, bad = sum(run["5xx"] for run in every), sum(run["non_2xx"] + run["errors"] for run in every)
    lines = [f"**Goal (Serve ≥ plain throughput at no worse p99, zero 5xx):** "
             f"{'met' if s['rps'] >= p['rps'] and s['p99_ms'] <= p['p99_ms'] else 'not met'} at {result['meta']['rows']} "
             f"rows per request. The better Serve configuration ({best}) reaches {s['rps'] / p['rps']:.0%} of the plain "
             f"app's requests/s, p99 {s['p99_ms']:.0f} ms against {p['p99_ms']:.0f} ms. In the whole run ({len(every)} "
             f"loads) {five} responses were 5xx and {bad} were not 2xx or failed.", ""]
    h = result["healthz"]
    plain_cpu = h["plain uvicorn"].get("cpu_ms_per_request", {}).get("plain app", float("nan"))
    lines.append(f"* Where the time goes: on `GET /healthz` Serve answers {h['serve']['rps']:.0f} req/s against the "
                 f"plain app's {h['plain uvicorn']['rps']:.0f}; its request path costs {_cpu(h['serve'])} CPU ms per "
                 f"request before any model work, against {plain_cpu:.2f} ms for the whole plain app.")
    sweep = result.get("sweep", {})
    big = [k for k in sweep if k.startswith("plain uvicorn, ") and "1024" in k]
    if big:
        sb, sn, pb = (sweep[k.replace("plain uvicorn", v)] for k in big[:1]
                      for v in ("serve, batching", "serve, no batching", "plain uvicorn"))
        lines.append(f"* With 1024 rows per request the model work dominates: Serve makes {sb['rps']:.1f} / "
                     f"{sn['rps']:.1f} req/s (batching / not) against the plain app's {pb['rps']:.1f}, p99 "
                     f"{sb['p99_ms']:.0f} / {sn['p99_ms']:.0f} ms against {pb['p99_ms']:.0f} ms.")
    if result.get("direct"):
        d = result["direct"]
        dd, dp = d["serve (throughput-optimized), batching, direct"], d["plain uvicorn"]
        lines.append(f"* Past the proxy (throughput-optimized Ray, replica addressed directly) Serve makes "
                     f"{dd['rps']:.0f} req/s against the plain app's {dp['rps']:.0f} in the same phase "
                     f"({dd['rps'] / dp['rps']:.0%}), p99 {dd['p99_ms']:.0f} ms against {dp['p99_ms']:.0f} ms.")
    return lines


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["meta"]
    lines = [
        "# Model server load benchmark", "",
        f"{m['machine']}; Ray {m['ray']}; load average {m['loadavg_start']} when the run started and "
        f"{m['loadavg_end']} when it ended (the machine is shared, so absolute numbers move with the other work on "
        f"it). {m['clients']} concurrent keep-alive clients (aiohttp, one process, on the same cores) over loopback; {m['requests']} `log_prob` requests of {m['rows']} "
        f"rows per configuration and repeat; medians of {m['repeats']} interleaved repeats (tuning runs: "
        f"{max(1, m['repeats'] - 1)}). Model: {m['model']}. "
        f"Serve: defaults of `densiray serve` ({m['serve_defaults']}). The plain app is the same FastAPI app and "
        f"validation in one uvicorn process without Ray, run at Ray's worker niceness ({m['niceness']}). CPU ms per "
        f"request: CPU time of each process during the load divided by the requests (from /proc). Load avg: the "
        f"machine's 1-minute load average at the end of each load (median), to read the rows against.", "",
        f"Regenerate: `{m['command']}` (about {m['minutes']:.0f} minutes).", "",
        "## log_prob", "", *_table(result["main"]), "",
        "## GET /healthz (no model, no body: the HTTP path alone)", "", *_table(result["healthz"], rows_col=False), "",
    ]
    if result.get("sweep"):
        lines += ["## Tuning runs", "", *_table(result["sweep"]), ""]
    if result.get("direct"):
        lines += ["## Throughput-optimized Ray, replica addressed directly (experimental)", "",
                  "A second local Ray started with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (direct ingress: each replica "
                  "runs its own HTTP server; the proxy on the Serve port still forwards). `direct` sends the load to "
                  "the replica's port, past the proxy.", "", *_table(result["direct"]), ""]
    lines += ["## Verdict", "", *verdict(result), ""]
    (out / "serve.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per configuration and repeat")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--rows", type=int, default=64, help="rows per log_prob request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap on one measured load")
    p.add_argument("--data-n", type=int, default=4000, help="rows of the moons data the model is fitted to")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the tuning runs")
    p.add_argument("--no-direct", dest="direct", action="store_false", help="skip the throughput-optimized phase")
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
    with tempfile.TemporaryDirectory() as store:
        model, described = export_model(store, args.data_n)
        result = phase_main(store, model, args)
        if args.direct:
            result["direct"] = phase_direct(store, model, args)
    result["meta"] = {
        "machine": machine(), "ray": ray.__version__, "loadavg_start": loadavg, "clients": args.clients,
        "requests": args.requests, "rows": args.rows, "repeats": args.repeats, "model": described,
        "niceness": worker_niceness(), "minutes": (time.time() - t0) / 60,
        "loadavg_end": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "serve_defaults": f"1 replica x {defaults.replica_cpus} CPU, max_ongoing_requests "
                          f"{defaults.max_ongoing_requests}, max_batch_size {defaults.max_batch_size}, batch wait "
                          f"{defaults.batch_wait_timeout_s * 1e3:g} ms, max_rows_per_call {defaults.max_rows_per_call}, "
                          f"{defaults.torch_threads} torch thread, access log {'on' if defaults.access_log else 'off'}",
        "command": " ".join([".venv/bin/python jobs/bench_serve.py", *sys.argv[1:]]),
    }
    write_report(Path(args.out), result)
    print(f"wrote {args.out}/serve.json and serve.md")


if __name__ == "__main__":
    main()
