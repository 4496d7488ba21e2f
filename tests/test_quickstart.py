"""The quickstart end to end at a CI-sized budget: Tune -> export -> Serve -> HTTP -> report -> clean up."""

import os
import socket
import subprocess
import sys

import pytest

import densiray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_quickstart_tunes_serves_queries_and_cleans_up(ray_cluster, store):
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "densiray.cli", "quickstart", "--trials", "2", "--epochs", "3",
                        "--n", "600", "--time-budget-s", "400", "--port", str(port), "--store", store],
                       env={**os.environ, "RAY_ADDRESS": ray_cluster}, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for line in ("winner     trial", "DNMM (tuned)", "GMM", "KDE", f"served     http://127.0.0.1:{port}",
                 f"curl -s -X POST http://127.0.0.1:{port}/v1/models/quickstart-moons/log_prob", "tune.png"):
        assert line in out, out
    assert "outlier flags for [a test row, a far point] = [False, True]" in out, out
    assert "paired     DNMM − GMM: " in out and "nats per test row" in out, out
    model = densiray.load_model("quickstart-moons", store=store)
    m = model.metrics  # exported with an independent check of its normalisation
    assert abs(m["integral"] - 1) < 4 * m["integral_se"] + 0.02 and 0 < m["integral_se"] < 0.05
    # Serve was shut down: nothing listens on the port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
