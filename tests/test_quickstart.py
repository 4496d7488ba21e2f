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


def test_a_dnmm_that_kept_its_starting_mixture_is_reported_as_that_not_as_worse(capsys):
    """Iris at a tiny budget: no epoch beat the base mixture, so the exported DNMM is the GMM up to the
    normalisers' rounding (a paired difference of -1e-7 with an SE of 5e-8 is not 'DNMM worse')."""
    from densiray.quickstart import _print

    same = {"test_log_lik": -2.4798, "test_log_lik_se": 0.353}
    report = {"dnmm": {**same, "integral": 1.0, "integral_se": 0.0}, "config": {"model.hidden": 256},
              "trial_id": "t", "trials": 2, "tune_time_s": 7.0, "path": "/m/q", "url": "http://127.0.0.1:1",
              "name": "q", "plots": [], "total_time_s": 24.0,
              "http": {"log_prob": {"log_prob": [-1.0]}, "score": {"outlier": [False, True]}},
              "baselines": {"GMM": {**same, "paired": {"diff": -1e-7, "diff_se": 5e-8, "z": -2.3, "rows": 30}},
                            "KDE": {"test_log_lik": -2.76, "test_log_lik_se": 0.19,
                                    "paired": {"diff": 0.2825, "diff_se": 0.2666, "z": 1.1, "rows": 30}}}}
    _print(report, [[5.8, 2.8, 5.1, 2.4]])
    out = capsys.readouterr().out
    assert "DNMM worse" not in out
    assert "DNMM − GMM: -0.0000 ± 0.0000 nats per test row (-2.3 SE, 30 rows): the same density to 4 decimals" in out
    assert "DNMM − KDE: +0.2825 ± 0.2666 nats per test row (+1.1 SE, 30 rows): no clear difference" in out
