"""The model server end to end: a real Ray Serve app on 127.0.0.1 (a free port), real HTTP.

A handful of cases that only real Serve can show (the proxy, the multiplexed model cache, serve.batch
across clients, replica health, the `densiray serve` command and its signals); the error matrix and
the routing by capability run in-process in ``test_serve_api.py``. One Serve app is started for the
module (Serve takes ~15-30 s to come up) and shut down after it; the `densiray serve` tests then
start their own from a subprocess on the same Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from test_serve_api import export_copy, make_store

import densiray

LIMITS = {"max_rows": 500, "max_samples": 300, "max_texts": 4, "max_text_chars": 50, "max_body_bytes": 64 << 10,
          "model_refresh_s": 0.2, "max_rows_per_call": 8, "batching": True}
ROW = [0.5, 0.25]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body=None, raw: bytes | None = None, **kw) -> requests.Response:
    if raw is not None:
        return requests.post(url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60, **kw)
    return requests.post(url + path, json=body, timeout=60, **kw)


def refused(r: requests.Response, status: int, *words: str) -> str:
    """Assert a one-line JSON error with ``status`` mentioning ``words``; returns the message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    msg = body["error"]
    assert "\n" not in msg and msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    import densiray.serve as ds

    store = make_store(tmp_path_factory.mktemp("serve"), toys=False)
    url = ds.start(store=store, port=free_port(), **LIMITS)
    yield url, store
    ds.shutdown()


class TestServeApp:
    def test_health_openapi_model_list_and_refusals_through_the_proxy(self, app):
        url, _ = app
        assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
        spec = requests.get(url + "/openapi.json", timeout=30).json()
        for path in ("log_prob", "sample", "score", "classify", "condition"):
            assert f"/v1/models/{{name}}/{path}" in spec["paths"]
        assert spec["components"]["schemas"]["RowsRequest"]["properties"]["x"]["maxItems"] == LIMITS["max_rows"]
        models = {m["name"]: m for m in requests.get(url + "/v1/models", timeout=30).json()["models"]}
        assert {"moons", "moons-shifted", "tampered", "edited", "broken"} <= set(models)
        assert models["moons"]["kind"] == "dnmm" and models["moons"]["dim"] == 2
        assert models["moons"]["capabilities"] == ["density", "sampler"]
        assert "not valid JSON" in models["broken"]["error"] and "sha256" in models["tampered"]["error"]
        assert requests.get(url + "/v1/models/moons", timeout=30).json()["endpoints"] == ["log_prob", "score", "sample"]
        # the refusals keep their status, one-line body and headers through the proxy
        refused(post(url, "/v1/models/nope/log_prob", {"x": [ROW]}), 404, "unknown model 'nope'", "moons")
        refused(post(url, "/v1/models/moons/classify", {"texts": ["great"]}), 400, "no classify")
        r = requests.get(url + "/v1/models/moons/log_prob", timeout=30)
        refused(r, 405, "POST")
        assert r.headers["Allow"] == "POST"
        big = json.dumps({"x": [ROW] * 10_000}).encode()
        refused(post(url, "/v1/models/moons/log_prob", raw=big), 413, "more than the 65536")
        chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))
        refused(post(url, "/v1/models/moons/log_prob", raw=chunks), 413, "65536")

    def test_log_prob_sample_and_score_match_the_loaded_model(self, app):
        url, store = app
        local = densiray.load_model("moons", store=store)
        x = [[0.5, 0.25], [-1.0, 2.0], [1e300, 0.0]]
        lp = post(url, "/v1/models/moons/log_prob", {"x": x}).json()["log_prob"]
        np.testing.assert_allclose(lp[:2], local.log_prob(x[:2]), rtol=1e-6)
        assert lp[2] is None  # the density underflows to 0 there: JSON has no -inf
        s1 = post(url, "/v1/models/moons/sample", {"n": 5, "seed": 3}).json()["samples"]
        np.testing.assert_allclose(s1, local.sample(5, seed=3), rtol=1e-6)
        sc = post(url, "/v1/models/moons/score", {"x": x[:2], "percentile": 5}).json()
        ref = local.score(x[:2], percentile=5)
        np.testing.assert_allclose(sc["score"], ref["score"], rtol=1e-6)
        assert sc["outlier"] == ref["outlier"].tolist() and sc["threshold"] == pytest.approx(ref["threshold"])

    def test_concurrent_requests_for_two_models_are_batched_correctly(self, app):
        url, store = app
        models = {n: densiray.load_model(n, store=store) for n in ("moons", "moons-shifted")}
        rng = np.random.default_rng(0)
        # 1-20 rows: batched and sliced into calls of 8 rows; from 8 rows a request skips the queue
        jobs = [("moons" if i % 2 else "moons-shifted", rng.normal(size=(1 + i % 20, 2)).tolist()) for i in range(48)]
        with ThreadPoolExecutor(16) as pool:
            out = list(pool.map(lambda j: post(url, f"/v1/models/{j[0]}/log_prob", {"x": j[1]}), jobs))
        for (name, x), r in zip(jobs, out):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["log_prob"], models[name].log_prob(x), rtol=1e-6)

    def test_a_model_exported_again_is_served_afresh(self, app):
        url, store = app
        export_copy(store, "moons", "fresh")
        before = post(url, "/v1/models/fresh/log_prob", {"x": [ROW]}).json()["log_prob"]
        export_copy(store, "moons", "fresh", shift=0.5)  # the same name, new weights
        time.sleep(0.5)  # model_refresh_s is 0.2 here
        after = post(url, "/v1/models/fresh/log_prob", {"x": [ROW]}).json()["log_prob"]
        np.testing.assert_allclose(after, densiray.load_model("fresh", store=store).log_prob([ROW]), rtol=1e-6)
        assert after != before

    def test_the_replica_stays_healthy_after_bad_requests_and_broken_models(self, app):
        from ray import serve

        url, _ = app
        before = serve.status().applications["densiray"].deployments["DensityService"]
        bad = [b'{"x": [[NaN, 1]]}', b'{"x": [[1, 2, 3]]}', b"\xff\xfe", b'{"x": ' + b"[" * 5000,
               b'{"x": [[1e308, -1e308]]}', json.dumps({"x": [[0.5, 0.25]] * 10_000}).encode()]
        for raw in bad:
            r = post(url, "/v1/models/moons/log_prob", raw=raw)
            assert 400 <= r.status_code < 500 or r.status_code == 200, (r.status_code, r.text)
            assert set(r.json()) in ({"error"}, {"log_prob"})
        for _ in range(2):  # a failed load is not cached in the multiplexed cache: asking again, the same answer
            refused(post(url, "/v1/models/tampered/log_prob", {"x": [ROW]}), 409, "tampered", "sha256")
            refused(post(url, "/v1/models/edited/sample", {"n": 2}), 409, "edited", "does not match its manifest")
            refused(post(url, "/v1/models/broken/score", {"x": [ROW]}), 409, "broken", "not valid JSON")
        r = post(url, "/v1/models/moons/log_prob", {"x": [ROW]})
        assert r.status_code == 200 and len(r.json()["log_prob"]) == 1
        after = serve.status().applications["densiray"].deployments["DensityService"]
        assert after.status == "HEALTHY" and after.replica_states == before.replica_states


def test_log_prob_batch_groups_by_model_slices_rows_and_isolates_failures():
    """The batch function itself: mixed models, calls of at most max_rows rows, a bad item fails alone."""
    from densiray.serve.backends import log_prob_batch

    class Counting:
        def __init__(self, shift):
            self.shift, self.calls = shift, []

        def log_prob(self, x):
            self.calls.append(len(x))
            x = np.asarray(x)
            if x.shape[1] != 2:
                raise ValueError("bad width")
            return x.sum(axis=1) + self.shift

    a, b = Counting(0.0), Counting(100.0)
    items = [(a, np.ones((2, 2))), (b, np.ones((1, 2))), (a, np.zeros((3, 2)))]
    out = log_prob_batch(items, max_rows=1000)
    assert [o.tolist() for o in out] == [[2.0, 2.0], [102.0], [0.0, 0.0, 0.0]]
    assert a.calls == [5] and b.calls == [1]
    a.calls = []
    out = log_prob_batch([(a, np.ones((3, 2))), (a, np.ones((4, 2)))], max_rows=3)
    assert [o.tolist() for o in out] == [[2.0] * 3, [2.0] * 4] and a.calls == [3, 3, 1]
    out = log_prob_batch([(a, np.ones((1, 2))), (a, np.ones((1, 3)))], max_rows=1000)
    assert out[0].tolist() == [2.0] and isinstance(out[1], ValueError)


@pytest.mark.slow
@pytest.mark.parametrize("sig, own_ray", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["ctrl-c, on a cluster (proxy ingress)",
                              "sigterm to its process group, its own Ray (direct ingress)"])
def test_densiray_serve_command_starts_answers_and_stops_on_ctrl_c_and_sigterm(ray_cluster, tmp_path, sig, own_ray):
    """``densiray serve`` stops on SIGTERM (container runtimes, systemd) as on Ctrl-C: requests in flight
    are answered, Serve (and a Ray it started) shut down, exit 0, no traceback (native or Python).

    On the test cluster (RAY_ADDRESS) it serves through Serve's proxy; on a Ray of its own, by
    default, through the replica itself (direct ingress). Its own Ray gets the SIGTERM as systemd and
    `timeout` send it, to the whole process group: Ray's processes stop with it, and the command must not
    wait 60 s for a GCS that is gone (it did, and ended on a fatal-looking Ray error)."""
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if not own_ray:
        env["RAY_ADDRESS"] = ray_cluster
        serve.shutdown()  # an earlier test's Serve on the shared cluster would hold another port
    proc = subprocess.Popen([sys.executable, "-m", "densiray.cli", "serve", "--store", str(tmp_path / "empty"),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=own_ray)
    lines: list[str] = []
    statuses: list[int] = []
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"at {url}" in out and "curl -s -X POST" in out, out[-3000:]
        assert requests.get(f"{url}/v1/models", timeout=30).json() == {"models": []}

        def load() -> None:  # requests in flight while the signal arrives: answered, or refused once it is down
            with requests.Session() as s:
                while proc.poll() is None:
                    try:
                        statuses.append(s.get(f"{url}/healthz", timeout=10).status_code)
                    except requests.RequestException:
                        time.sleep(0.05)

        client = threading.Thread(target=load, daemon=True)
        client.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        if own_ray:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - t0
        client.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if own_ray:  # it did not wait out Ray's 60 s GCS timeout, and nothing of its Ray is left behind
        import psutil

        assert stop_s < 45, stop_s
        deadline = time.monotonic() + 30  # the dashboard's module processes notice their parent is gone in ~3 s
        while (left := [q.info for q in psutil.process_iter(["pid", "name"]) if _session_of(q.info["pid"]) == proc.pid]):
            assert time.monotonic() < deadline, left
            time.sleep(0.5)
        # The replica closed its connections to the client first, so they sit in TCP TIME_WAIT for a minute; its
        # socket had SO_REUSEADDR (deployment.listen_with_reuseaddr), so a restart on this port need not wait.
        from densiray.serve import runner

        assert runner._port_free("127.0.0.1", port), "the port is held: a restart would wait up to 60 s"
    text = out + rest
    assert proc.returncode == 0, text[-3000:]
    assert "densiray: stopped" in rest and "Traceback" not in text and "PC: @" not in text, text[-3000:]
    # the console shows densiray's lines only: no Serve INFO naming its internal proxy port, no Ray notice
    # such as "ServeController.graceful_shutdown failed" while Serve stops
    assert " INFO " not in text and "graceful_shutdown" not in text, text[-3000:]
    # answered up to the signal; while the app drains, new requests get the proxy's 404; never a 5xx
    assert statuses and statuses[0] == 200 and max(statuses) < 500, statuses
    if not own_ray:
        assert "densiray" not in serve.status().applications
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_a_restart_waits_for_the_port_a_stopped_server_left_in_time_wait_and_refuses_a_taken_one(monkeypatch, capsys):
    """A server stopped with clients connected closes first and leaves its port in TCP TIME_WAIT for 60 s; if
    its socket lacked SO_REUSEADDR (Serve's direct-ingress replica's did, before listen_with_reuseaddr), no
    listener can bind the port meanwhile, and ``densiray serve`` restarted at once failed with "in use by
    another program". It now waits for such a port, saying so; a port that something listens on is refused
    at once."""
    from densiray.errors import DensirayError
    from densiray.serve import runner

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server's side first, as a stop does
    srv.close()
    time.sleep(0.1)
    client.close()
    assert not runner._port_free("127.0.0.1", port, reuse=False)  # TIME_WAIT, nothing listening
    monkeypatch.setattr(runner, "TIME_WAIT_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(DensirayError, match=f"port {port} on 127.0.0.1 is in use"):
        runner._claim_port("127.0.0.1", port, reuse=False)
    assert time.monotonic() - t0 >= 1.0 and "TIME_WAIT); waiting for it" in capsys.readouterr().err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t0 = time.monotonic()
        with pytest.raises(DensirayError, match="in use by another program; pass another --port"):
            runner._claim_port("127.0.0.1", busy.getsockname()[1], reuse=False)
        assert time.monotonic() - t0 < 0.9 and "waiting" not in capsys.readouterr().err


def test_the_readiness_probe_closes_its_connection_itself_leaving_the_servers_port_free():
    """The start-up probe of ``GET /healthz`` used to send ``Connection: close``: the server then closed
    first, and its port stayed in TIME_WAIT for a minute after every start."""
    import http.server

    import psutil

    from densiray.serve import runner

    class Healthz(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        runner._wait_ready(f"http://127.0.0.1:{port}", timeout_s=10)
        time.sleep(0.3)
    finally:
        server.shutdown()
        server.server_close()
    held = [c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port]
    assert not [c for c in held if c.status == psutil.CONN_TIME_WAIT], held
    assert runner._port_free("127.0.0.1", port, reuse=False)


def test_settings_and_config_file_are_validated():
    import yaml

    from densiray.errors import ConfigError
    from densiray.serve import ServeSettings
    from densiray.serve.deployment import build_app

    config = yaml.safe_load(Path(__file__).parents[1].joinpath("serve", "config.yaml").read_text())
    (app_cfg,) = config["applications"]
    assert config["http_options"]["host"] == "127.0.0.1"
    assert app_cfg["import_path"] == "densiray.serve.deployment:build_app"
    ServeSettings.parse(app_cfg["args"])
    build_app(app_cfg["args"])
    with pytest.raises(ConfigError, match="serve.max_rows"):
        ServeSettings.parse({"max_rows": 0})
    with pytest.raises(ConfigError, match="unknown setting"):
        build_app({"batch_size": 4})
