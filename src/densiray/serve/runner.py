"""Start and stop the densiray Serve app from Python (what ``densiray serve`` and the quickstart use).

    import densiray.serve as ds
    url = ds.start(store="./models", port=8000)     # local Ray, or the cluster in RAY_ADDRESS
    requests.post(f"{url}/v1/models/moons/log_prob", json={"x": [[0.5, 0.25]]}).json()
    ds.shutdown()
"""

from __future__ import annotations

import socket
import time

from densiray.errors import DensirayError
from densiray.serve.settings import ServeSettings

READY_TIMEOUT_S = 120


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _running_http_options():
    """The HTTP options of the Serve instance already running on this cluster, or None."""
    from ray import serve

    if not serve.status().proxies:
        return None
    from ray.serve.context import _get_global_client  # the public API does not expose the running options

    try:
        return _get_global_client().http_config
    except Exception:
        return None


def _wait_ready(url: str, timeout_s: float) -> None:
    """Until GET /healthz answers 200 through the proxy (its route table lags the deployment)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DensirayError(f"the Serve app did not answer {url}/healthz within {timeout_s:.0f} s; "
                                "check `ray status` for free CPUs and the replica logs")
        time.sleep(0.2)


def start(store: str | None = None, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          batching: bool = True, **settings) -> str:
    """Deploy the densiray app on Ray Serve (starting Serve on ``host:port`` if needed); returns its URL.

    Uses the cluster in RAY_ADDRESS, else a local Ray. ``settings`` are further
    :class:`~densiray.serve.settings.ServeSettings` (e.g. ``max_rows=1000``, ``replica_cpus=0.25``).
    Returns once the app answers ``GET /healthz``.
    """
    resolved = ServeSettings.parse({"store": store, "replicas": replicas, "batching": batching, **settings})
    from ray import serve

    from densiray.api import ensure_ray
    from densiray.serve.deployment import APP_NAME, build_app

    ensure_ray(log_to_driver=False)
    running = _running_http_options()
    if running is not None and (running.host, running.port) != (host, port):
        raise DensirayError(f"Ray Serve already runs on this cluster at http://{running.host}:{running.port}; "
                            f"pass --host {running.host} --port {running.port}, or stop it with `serve shutdown`")
    if running is None and not _port_free(host, port):
        raise DensirayError(f"port {port} on {host} is in use by another program; pass another --port")
    # The proxy's access log costs CPU on every request; it follows the `access_log` setting.
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly",
                logging_config={"enable_access_log": resolved.access_log})
    serve.run(build_app(resolved.model_dump()), name=APP_NAME, route_prefix="/")
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    _wait_ready(url, READY_TIMEOUT_S)
    return url


def shutdown() -> None:
    """Remove the densiray app; shut Serve down too when no other app runs on it."""
    from ray import serve

    from densiray.serve.deployment import APP_NAME

    status = serve.status()
    if APP_NAME in status.applications:
        serve.delete(APP_NAME)
    if not set(serve.status().applications) - {APP_NAME}:
        serve.shutdown()
