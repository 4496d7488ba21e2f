"""The `densiray` command end to end (real Ray, real DeepSpeed) and its one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import densiray
from densiray.cli import main

SMALL_YAML = """
model:
  components: 4
  hidden: 32
  integration_samples: 256
  eval_integration_samples: 4096
  export_integration_samples: 16384
train:
  lr: 0.01
  patience: 0
"""


def _densiray(args, ray_address, timeout=300):
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run([sys.executable, "-m", "densiray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _json(stdout: str) -> dict:
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text(SMALL_YAML)
    return str(p)


def test_train_on_a_user_csv_then_list_and_load(ray_cluster, tmp_path, store, config):
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=400), rng.gamma(2.0, size=400), rng.uniform(size=400)]
    csv = tmp_path / "mine.csv"
    np.savetxt(csv, x, delimiter=",", header="height,weight,score", comments="")
    r = _densiray(["train", "dnmm", "--dataset", str(csv), "--config", config, "--epochs", "3", "--workers", "2",
                   "--zero-stage", "2", "--name", "mine", "--store", store, "--json"], ray_cluster)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = _json(r.stdout)
    assert summary["name"] == "mine" and summary["d"] == 3 and summary["epochs_run"] == 3
    assert Path(summary["plot"]).stat().st_size > 10_000

    assert main(["models", "--store", store]) == 0
    import densiray

    model = densiray.load_model("mine", store=store)
    lp = model.log_prob(x[:5])
    assert lp.shape == (5,) and np.isfinite(lp).all()
    assert model.sample(7, seed=1).shape == (7, 3)
    manifest = json.loads(Path(store, "mine", "manifest.json").read_text())
    assert manifest["provenance"]["workers"] == 2 and manifest["provenance"]["zero_stage"] == 2
    assert set(manifest["files"]) == {"model.safetensors", "report.png"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a,b\n1,2\n" + "3,nan\n" * 40, "NaN"),
        ("a,b\n" + "1,inf\n" * 40, "inf"),
        ("a,name\n" + "1,x\n" * 40, "non-numeric"),
        ("a,b\n1,2\n3,4\n", "rows"),
    ],
)
def test_bad_data_gives_one_line_and_exit_2(tmp_path, capsys, content, expected, store):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    assert main(["train", "dnmm", "--dataset", str(f), "--store", store]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densiray: error:") and "\n" not in err and expected.lower() in err.lower()
    assert not Path(store).exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--dataset", "mons"], "unknown dataset 'mons'"),
        (["--dataset", "/no/such/file.csv"], "no such file"),
        ([], "no dataset"),
        (["--dataset", "moons", "--zero-stage", "5"], "zero_stage"),
        (["--dataset", "moons", "--epochs", "0"], "epochs"),
        (["--dataset", "moons", "--workers", "2", "--min-workers", "3"], "min_workers 3 must be between 1 and workers"),
        (["--dataset", "moons", "--workers", "2", "--min-workers", "0"], "min_workers"),
        (["--dataset", "moons", "--name", "../evil"], "invalid model name"),
        (["--dataset", "moons", "--config", "/no/such.yaml"], "no such config file"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, args, expected, store):
    assert main(["train", "dnmm", *args, "--store", store]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densiray: error:") and "\n" not in err and expected in err


@pytest.mark.parametrize("command", ["serve", "quickstart"])
@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_a_port_that_is_not_one_is_refused_before_anything_starts(capsys, command, port):
    with pytest.raises(SystemExit) as stop:
        main([command, "--port", port])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densiray: error: argument --port:") and "\n" not in err and "1 to 65535" in err


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`densiray models --json | head`: the reader goes away; no BrokenPipeError traceback, exit 141."""
    proc = subprocess.Popen([sys.executable, "-m", "densiray.cli", "models", "--json", "--store", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err[-2000:]


def test_the_python_serve_api_refuses_a_port_that_is_not_one():
    from densiray.serve import start

    with pytest.raises(densiray.DensirayError, match="not a TCP port"):
        start(port=70000)


def test_more_workers_than_cpus_is_refused_not_left_waiting(ray_cluster, capsys, store, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the embedded local Ray cannot grow
    assert main(["train", "dnmm", "--dataset", "moons", "--workers", "3", "--store", store]) == 2
    err = capsys.readouterr().err
    assert "needs 3 CPUs" in err and "--workers" in err


def test_bad_config_file_names_every_bad_field(tmp_path, capsys, store):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  componnts: 3\n  hidden: -1\ntrain:\n  lr: fast\n")
    assert main(["train", "dnmm", "--dataset", "moons", "--config", str(p), "--store", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for field in ("model.componnts: unknown setting", "model.hidden", "train.lr"):
        assert field in err[0], err
    p.write_text("model: [unclosed\n")
    assert main(["train", "dnmm", "--dataset", "moons", "--config", str(p), "--store", store]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_models_lists_a_corrupt_folder_without_crashing(tmp_path, capsys):
    store = tmp_path / "s"
    (store / "broken").mkdir(parents=True)
    (store / "broken" / "manifest.json").write_text("{not json")
    assert main(["models", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "unreadable" in out
    assert main(["models", "--store", str(tmp_path / "none")]) == 0
    assert "no models" in capsys.readouterr().out


def test_corrupt_model_is_refused_on_load(tmp_path):
    import torch

    import densiray
    from densiray.errors import StoreError
    from densiray.store import Store

    s = Store(str(tmp_path / "s"))
    s.export("m", kind="dnmm", tensors={"w": torch.zeros(2)}, config={}, transform=None, metrics={}, provenance={})
    with pytest.raises(StoreError, match="does not match its manifest"):
        densiray.load_model("m", store=s.uri)
    w = Path(s.uri, "m", "model.safetensors")
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        densiray.load_model("m", store=s.uri)


def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch, capsys):
    """`ray job stop`, `docker stop` and systemd send SIGTERM: a command stops at once (exit 143) and can
    resume, instead of Ray's native handler printing a stack trace while the driver trains on."""
    from densiray import console

    def train_forever(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the command")

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(console, "_sigterm_stops", False)
    try:
        import densiray.cli as cli

        monkeypatch.setattr(cli, "_models", train_forever)  # any command: the handler is main()'s
        t0 = time.monotonic()
        assert main(["models", "--store", "/nonexistent"]) == 143
        assert time.monotonic() - t0 < 10
        assert "stopped (SIGTERM); run the same command again to resume" in capsys.readouterr().err
        assert console._sigterm_stops  # so that ensure_ray installs it again after ray.init replaced it
    finally:
        signal.signal(signal.SIGTERM, previous)
