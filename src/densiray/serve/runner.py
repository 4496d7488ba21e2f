"""Start and stop the densiray Serve app from Python (what ``densiray serve`` and the quickstart use).

    import densiray.serve as ds
    url = ds.start(store="./models", port=8000)     # local Ray, or the cluster in RAY_ADDRESS
    requests.post(f"{url}/v1/models/moons/log_prob", json={"x": [[0.5, 0.25]]}).json()
    ds.shutdown()

Two ways in (``ingress``; ``$DENSIRAY_SERVE_INGRESS``; default ``auto``), measured in
``jobs/results/serve.md``:

* ``direct``: Ray Serve's throughput-optimized mode with direct ingress. The replica runs the HTTP
  server itself, on ``port``; Serve's proxy (on a free port beside it) is not on the request path.
  Requests skip a process hop and its (de)serialisation: on small requests this is several times
  the proxy's throughput, and on par with a plain uvicorn process. It needs the environment set
  before Ray starts, so it applies when ``start`` starts a local Ray itself, with one replica.
* ``proxy``: Serve's HTTP proxy on ``port`` balances requests over the replicas (any number, any
  node). It is what a cluster (``RAY_ADDRESS``), several replicas or an already running Ray get.

``auto`` picks ``direct`` where it applies, else ``proxy``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from densiray.errors import DensirayError
from densiray.serve.settings import ServeSettings

READY_TIMEOUT_S = 120
# Serve's controller kills a proxy that is not ready 5 s after it started (Ray's default), and ``serve.start``
# then fails with the dead actor: on a busy machine a proxy takes longer than that to import and bind.
PROXY_READY_TIMEOUT_S = 60


# Linux keeps the port of a closed connection in TCP TIME_WAIT for 60 s where the server closed it first
# (a stop with clients connected); only a socket with SO_REUSEADDR may bind it then, and only if the closed
# connections' own socket had it too (Serve's direct-ingress replica binds without, unless
# deployment.listen_with_reuseaddr applies).
TIME_WAIT_S = 65


def _port_free(host: str, port: int, reuse: bool = True) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _listening(host: str, port: int) -> bool:
    """Something accepts connections on ``host:port``."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        socket.create_connection((target, port), timeout=2).close()
    except OSError:
        return False
    return True


def _claim_port(host: str, port: int, reuse: bool = True) -> None:
    """Raise unless a server could bind ``host:port`` (``reuse``: with SO_REUSEADDR, as Serve's proxy does).

    A port that nothing listens on but that a server which just stopped still holds (TIME_WAIT) is waited
    for, saying so, so that a restart right after a stop comes up instead of failing for a minute."""
    if _port_free(host, port, reuse):
        return
    if not _listening(host, port):
        print(f"densiray: port {port} is still held by the closed connections of a server that stopped "
              f"(TCP TIME_WAIT); waiting for it, up to {TIME_WAIT_S - 5} s", file=sys.stderr, flush=True)
        deadline = time.monotonic() + TIME_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if _port_free(host, port, reuse):
                return
    raise DensirayError(f"port {port} on {host} is in use by another program; pass another --port")


def _running_http_options():
    """The HTTP options of the Serve instance already running on this cluster, or None."""
    from ray import serve

    if not serve.status().proxies:
        return None
    from ray.serve.context import (
        _get_global_client,  # the public API does not expose the running options
    )

    try:
        return _get_global_client().http_config
    except Exception:
        return None


def http_request(method: str, url: str, body: bytes | str | None = None, timeout: float = 60,
                 headers: dict | None = None) -> tuple[int, bytes]:
    """One HTTP request over a connection this side closes: (status, body).

    urllib sends ``Connection: close``, so the server closes first and its port stays in TCP TIME_WAIT for a
    minute after it stops; here the TIME_WAIT lands on this side's ephemeral port."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path or "/", body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _wait_ready(url: str, timeout_s: float) -> None:
    """Until GET /healthz answers 200 through the proxy (its route table lags the deployment)."""
    import http.client

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http_request("GET", f"{url}/healthz", timeout=5)[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise DensirayError(f"the Serve app did not answer {url}/healthz within {timeout_s:.0f} s; "
                                "check `ray status` for free CPUs and the replica logs")
        time.sleep(0.2)


INGRESS = ("auto", "direct", "proxy")
_direct: dict[str, int] = {}  # {"port": p} once this process started a Ray with direct ingress on p


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ingress_mode(ingress: str | None, replicas: int) -> str:
    """``direct`` or ``proxy``: what ``ingress`` (or $DENSIRAY_SERVE_INGRESS, default auto) gives here."""
    import ray

    asked = ingress or os.environ.get("DENSIRAY_SERVE_INGRESS") or "auto"
    if asked not in INGRESS:
        raise DensirayError(f"ingress must be one of {', '.join(INGRESS)}, got {asked!r}")
    fresh = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    can_direct = replicas == 1 and (fresh or "port" in _direct)
    if asked == "direct" and not can_direct:
        raise DensirayError("direct ingress needs one replica and a local Ray that densiray starts itself (no "
                            "RAY_ADDRESS, Ray not yet started in this process); use ingress='proxy'")
    return "direct" if asked == "direct" or (asked == "auto" and can_direct) else "proxy"


def _direct_ingress_env(port: int, host: str) -> None:
    """Ray Serve's throughput-optimized mode with the (single) replica's HTTP server on ``port``.

    Read by Serve's controller and replicas when they start, hence set before Ray starts (the local
    Ray inherits this process's environment)."""
    import ray

    if ray.is_initialized():  # started so by this process before: the replica port is fixed
        if _direct["port"] != port:
            raise DensirayError(f"this Ray serves direct ingress on port {_direct['port']}; pass that port")
        return
    from densiray.serve.deployment import reuseaddr_applies

    _claim_port(host, port, reuse=reuseaddr_applies())  # as the replica will bind it
    _direct["port"] = port
    os.environ.update({
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # direct ingress, user code and router on the main loop, ...
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),  # the replica ports: [min, max)
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",  # no external balancer: a restarted replica takes the port back
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # drain for in-flight requests, not for an ALB
    })


def start(store: str | None = None, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          batching: bool | None = None, ingress: str | None = None, **settings) -> str:
    """Deploy the densiray app on Ray Serve (starting Serve on ``host:port`` if needed); returns its URL.

    Uses the cluster in RAY_ADDRESS, else a local Ray. ``ingress`` (``auto``, ``direct``, ``proxy``;
    see the module's doc) says who answers on ``port``: the replica itself or Serve's proxy.
    ``settings`` are further :class:`~densiray.serve.settings.ServeSettings` (e.g. ``max_rows=1000``,
    ``replica_cpus=0.25``). Returns once the app answers ``GET /healthz``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DensirayError(f"port {port!r} is not a TCP port: give an integer from 1 to 65535")
    if batching is not None:  # None: the settings' default
        settings["batching"] = batching
    resolved = ServeSettings.parse({"store": store, "replicas": replicas, **settings})
    from ray import serve

    from densiray.api import ensure_ray
    from densiray.serve.deployment import APP_NAME, build_app

    mode = ingress_mode(ingress, resolved.replicas)
    if mode == "direct":
        _direct_ingress_env(port, host)
    ensure_ray(log_to_driver=False)
    running = _running_http_options()
    proxy_port = port if mode == "proxy" else running.port if running is not None else _free_port(host)
    if running is not None and (running.host, running.port) != (host, proxy_port):
        raise DensirayError(f"Ray Serve already runs on this cluster at http://{running.host}:{running.port}; "
                            f"pass --host {running.host} --port {running.port}, or stop it with `serve shutdown`")
    if running is None:
        _claim_port(host, proxy_port)
    # The proxy's access log costs CPU on every request; it follows the `access_log` setting.
    _start_serve(serve, host, proxy_port, resolved.access_log)
    serve.run(build_app(resolved.model_dump()), name=APP_NAME, route_prefix="/")
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    _wait_ready(url, READY_TIMEOUT_S)
    return url


def _start_serve(serve, host: str, port: int, access_log: bool) -> None:
    """``serve.start`` with a proxy ready-check that a busy machine can meet; a proxy that still dies on the
    first try is left to the controller, which restarts it, and a second call joins that controller."""
    import ray

    ready = os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_TIMEOUT_S))
    for attempt in (1, 2):
        try:
            serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly",
                        logging_config={"enable_access_log": access_log},
                        controller_options={"runtime_env": {"env_vars": {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": ready}}})
            return
        except (ray.exceptions.RayActorError, TimeoutError) as e:
            if attempt == 2:
                raise DensirayError(f"Ray Serve's HTTP proxy did not start ({' '.join(str(e).split())[:120]}); "
                                    f"the machine may be overloaded (1-min load average {os.getloadavg()[0]:.1f}): "
                                    "try again") from None


def shutdown() -> None:
    """Remove the densiray app; shut Serve down too when no other app runs on it."""
    from ray import serve

    from densiray.serve.deployment import APP_NAME

    status = serve.status()
    if APP_NAME in status.applications:
        serve.delete(APP_NAME)
    if not set(serve.status().applications) - {APP_NAME}:
        serve.shutdown()


def forget_direct_ingress() -> None:
    """After ``ray.shutdown()``: the next local Ray starts without the direct-ingress environment."""
    for key in [k for k in os.environ if k.startswith(("RAY_SERVE_DIRECT_INGRESS_", "RAY_SERVE_PORT_QUARANTINE"))]:
        del os.environ[key]
    os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    _direct.clear()
