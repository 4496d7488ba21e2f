"""Multi-node for real: a head with no CPUs and two 1-CPU worker nodes, each its own raylet
(:class:`densiray.cluster.LocalCluster`), driven only the way a user drives a cluster: ``ray job
submit --working-dir .`` of ``jobs/train.py``, ``jobs/tune.py`` and ``jobs/serve.py``, ``ray job logs``,
the job API's stop, and the state API.

* a 2-worker DeepSpeed ZeRO-3 elastic run (``--min-workers 1``) whose workers sit on the two worker
  nodes, stopped with the job API (what ``ray job stop`` sends: SIGTERM, then SIGKILL after 3 s) and
  resumed by submitting it again; node_b is then killed (its raylet, SIGKILL by pid) for good and the
  run goes on with node_a's worker from its last checkpoint, resharded (universal checkpoint), ending
  with the metrics of an in-process run;
* (opt-in) a worker node killed mid-run without ``--min-workers``: the run waits for capacity,
  restarts from its last checkpoint when the node is back, and the store holds nothing half-written;
* a sweep (two trials at a time, one per node) loses node_b: its trial is retried from its checkpoint
  and the sweep completes;
* Serve with two replicas, one per node, loses node_b: the other replica answers, and both serve again
  once the node is back.

The test process never joins that cluster (it may hold the session's one-node Ray); it talks to it
over HTTP and through subprocesses. Slow by nature (a cluster start is ~1 min on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # node starts alone take minutes on a busy machine
# The first three tests below run in every suite (~5 min with the cluster's start on 2 cores); the one that
# waits for a lost node to come back is opt-in (`DENSIRAY_MULTINODE=1`): it adds ~2 min and the elastic
# test covers the same node loss, checkpoint and resume.
OPT_IN = pytest.mark.skipif(not os.environ.get("DENSIRAY_MULTINODE"),
                            reason="opt-in multi-node test (DENSIRAY_MULTINODE=1): ~2 min on 2 cores")

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"components": 4, "hidden": 32, "integration_samples": 256, "eval_integration_samples": 4096,
         "export_integration_samples": 16384}
SMALL_FLAGS = ["--config", None]  # filled by the fixture with a YAML file holding SMALL
# long enough that `ray job stop`, sent at the first checkpoint, lands before the run ends on a quiet machine
EPOCHS = 20


@pytest.fixture(scope="module")
def cluster():
    from densiray.cluster import LocalCluster, client_auth

    root = tempfile.mkdtemp(prefix="drc")  # short: Ray's socket paths must stay under 107 characters
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep),
           # a killed node is declared dead after 5 failed health checks: 1 s apart instead of Ray's 3 s
           "RAY_health_check_period_ms": "1000"}
    c = LocalCluster(root=root, env=env).up(timeout=1200, attempts=5)  # a busy 2-core machine starts nodes slowly
    try:
        client_auth()
        yield c
    finally:
        c.down()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump({"model": SMALL, "train": {"patience": 0, "lr": 0.01}}))
    return str(path)


def _cli_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    return env


def ray_job(cluster, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """The ``ray job`` command line against the test cluster (submission retried while the head's job
    agent still refuses: "No available agent to submit job")."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run([ray_cli, "job", args[0], "--address", cluster.dashboard, *args[1:]], cwd=ROOT,
                              env=_cli_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr \
                or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def submit_training(cluster, name: str, store: str, config: str, epochs: int,
                    scale: tuple[str, ...] = ("--zero-stage", "3")) -> str:
    sid = f"{name}-{int(time.time() * 1000)}"
    proc = ray_job(cluster, "submit", "--no-wait", "--submission-id", sid, "--working-dir", ".", "--",
                   "python", "jobs/train.py", "dnmm", "--dataset", "moons", "--config", config, "--workers", "2",
                   *scale, "--epochs", str(epochs), "--name", name, "--store", store, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sid


def job_status(cluster, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.dashboard).get_job_status(sid)).rsplit(".", 1)[-1]


def wait_status(cluster, sid: str, until: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_status(cluster, sid)) not in until:
        assert time.monotonic() < deadline, f"job {sid} still {status} after {timeout} s:\n" + logs(cluster, sid)
        time.sleep(1)
    return status


def logs(cluster, sid: str) -> str:
    return ray_job(cluster, "logs", sid).stdout


class WorkerNodes:
    """Records, in a thread, the node of every live Ray Train worker of a job (state API over HTTP)."""

    def __init__(self, cluster, sid: str):
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.nodes, self._stop = cluster, set(), threading.Event()
        self._client, self._sid = JobSubmissionClient(cluster.dashboard), sid
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        from ray.util.state import list_actors

        while not self._stop.is_set():
            try:
                job_id = self._client.get_job_info(self._sid).job_id
                if job_id:
                    actors = list_actors(address=self.cluster.dashboard, timeout=10, raise_on_missing_output=False,
                                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"),
                                                  ("job_id", "=", job_id)])
                    self.nodes.update(a.node_id for a in actors)
            except Exception:  # the dashboard is busy; try again
                pass
            self._stop.wait(1.0)

    def follow(self, sid: str) -> None:
        """Record the workers of job ``sid`` from now on (a resubmission of the same run)."""
        self._sid = sid

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.nodes


def newest_epoch(store: str, name: str) -> int:
    """The loop's epoch counter in the run's newest complete checkpoint (-1: none yet)."""
    import pyarrow.fs as pafs

    from densiray.train.engine import checkpoint_complete

    fs = pafs.LocalFileSystem()
    states = [checkpoint_complete(fs, str(p)) for p in Path(store, ".runs", name).glob("checkpoint_*")]
    return max((s["epoch"] for s in states if s), default=-1)


def wait_for_epoch(cluster, sid: str, store: str, name: str, epoch: int, timeout: float = 420) -> None:
    """Wait until job ``sid`` has a complete checkpoint at ``epoch`` or later, failing if the job ends."""
    deadline = time.monotonic() + timeout
    while newest_epoch(store, name) < epoch:
        assert job_status(cluster, sid) in {"PENDING", "RUNNING"}, logs(cluster, sid)
        assert time.monotonic() < deadline, f"no checkpoint at epoch {epoch} after {timeout} s:\n" + logs(cluster, sid)
        time.sleep(0.5)


def half_written(store: str) -> list[str]:
    """Folders an export left behind in the store (its temporary and replaced copies)."""
    return [p.name for p in Path(store).iterdir() if p.name.startswith((".tmp-", ".old-"))]


def summary_from(text: str) -> dict:
    """The JSON summary ``train --json`` prints last (Ray may stream a node's death notice after it)."""
    start = text.rfind("\n{")
    return json.JSONDecoder().raw_decode(text[start + 1:] if start >= 0 else text[text.index("{"):])[0]


def _replica_nodes(cluster) -> list[str]:
    """Node ids of the densiray Serve replicas alive now (state API over HTTP)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, timeout=20, raise_on_missing_output=False,
                         filters=[("state", "=", "ALIVE")])
    return sorted(a.node_id for a in actors if "DensityService" in (a.class_name or ""))


def _hammer(url: str, seconds: float) -> list:
    """POST log_prob requests one after another for ``seconds``: each response's status (or the error)."""
    import requests

    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(requests.post(f"{url}/v1/models/m/log_prob", json={"x": [[0.0, 0.5]]}, timeout=10).status_code)
        except requests.RequestException as e:
            out.append(type(e).__name__)
    return out


def test_serve_on_two_nodes_keeps_answering_when_one_is_lost(cluster, config_file, tmp_path, ray_cluster):
    """`densiray serve` submitted as a job, two replicas spread over the two worker nodes; node_b dies:
    node_a's replica answers, and once node_b is back both replicas serve again with no 5xx; the job
    stops cleanly (SIGTERM)."""
    import requests

    from densiray import api
    from densiray.serve.runner import _free_port

    store = str(tmp_path / "models")
    api.train("dnmm", "moons", config=config_file, overrides={"train": {"workers": 0, "epochs": 2}}, name="m",
              store=store, plot=False)
    port = _free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    sid = f"serve-{int(time.time() * 1000)}"
    proc = ray_job(cluster, "submit", "--no-wait", "--submission-id", sid, "--working-dir", ".", "--",
                   "python", "jobs/serve.py", "--store", store, "--port", str(port), "--replicas", "2",
                   "--max-replicas-per-node", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = cluster.node_ids()
    deadline = time.monotonic() + 420
    while True:
        assert job_status(cluster, sid) in {"PENDING", "RUNNING"}, logs(cluster, sid)
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200 and len(_replica_nodes(cluster)) == 2:
                break
        assert time.monotonic() < deadline, "Serve not up after 420 s:\n" + logs(cluster, sid)
        time.sleep(1)
    assert set(_replica_nodes(cluster)) == {ids["node_a"], ids["node_b"]}  # spread: one replica per node
    assert set(_hammer(url, 3)) == {200}

    cluster.kill_node("node_b")
    during = _hammer(url, 12)
    (tmp_path / "during.json").write_text(json.dumps(during))  # kept by pytest: what clients saw
    failed = [c for c in during if c != 200]
    assert during.count(200) >= 0.9 * len(during), failed  # the other replica keeps answering
    assert set(during[-len(during) // 4:]) == {200}, during[-20:]  # and once Serve noticed, only it answers

    cluster.restart_node("node_b")
    deadline = time.monotonic() + 300
    while len(_replica_nodes(cluster)) < 2:  # Serve's controller replaces the lost replica on node_b
        assert time.monotonic() < deadline, "no second replica 300 s after node_b came back"
        time.sleep(1)
    after = _hammer(url, 5)
    assert set(after) == {200}, after

    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(cluster.dashboard).stop_job(sid)
    assert wait_status(cluster, sid, {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"
    assert "stopping Serve" in logs(cluster, sid)


def test_a_sweep_survives_a_lost_node(cluster, config_file, tmp_path):
    """`densiray tune` submitted as a job, two trials at a time (one per worker node); node_b dies mid-sweep:
    its trial is retried from its checkpoint and the sweep completes with every trial and no error."""
    store = str(tmp_path / "models")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [0.003, 0.02]}\n")
    sid = f"tune-{int(time.time() * 1000)}"
    proc = ray_job(cluster, "submit", "--no-wait", "--submission-id", sid, "--working-dir", ".", "--",
                   "python", "jobs/tune.py", "dnmm", "--dataset", "moons", "--config", config_file, "--space",
                   str(space), "--trials", "4", "--epochs", "40", "--max-concurrent-trials", "2", "--name", "swept",
                   "--store", store, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exp = Path(store, ".runs", "tune-swept")

    node_b = cluster.node_ids()["node_b"]

    def trial_on_node_b() -> bool:  # a trial in a process on node_b, with epochs behind it and more to come
        from ray.util.state import list_actors

        try:
            pids = {a.pid for a in list_actors(address=cluster.dashboard, timeout=10, raise_on_missing_output=False,
                                               filters=[("node_id", "=", node_b), ("state", "=", "ALIVE")])}
        except Exception:  # the dashboard is busy; ask again
            return False
        for result in exp.glob("_trial_*/result.json"):
            rows = result.read_text().splitlines()[:-1]  # the last line may be half-written
            last = json.loads(rows[-1]) if len(rows) >= 2 else None
            if last and last["pid"] in pids and not last.get("done"):
                return True
        return False

    deadline = time.monotonic() + 420
    while not trial_on_node_b():
        assert job_status(cluster, sid) in {"PENDING", "RUNNING"}, logs(cluster, sid)
        assert time.monotonic() < deadline, "no trial progress on node_b after 420 s:\n" + logs(cluster, sid)
        time.sleep(0.5)
    cluster.kill_node("node_b")
    time.sleep(10)
    assert job_status(cluster, sid) == "RUNNING", logs(cluster, sid)
    cluster.restart_node("node_b")
    assert wait_status(cluster, sid, {"SUCCEEDED", "FAILED", "STOPPED"}, 900) == "SUCCEEDED", logs(cluster, sid)
    summary = summary_from(logs(cluster, sid))
    assert summary["trials"] == 4 and summary["errored"] == 0, summary
    from densiray.store import Store

    trials = Store(store).read("swept").manifest["provenance"]["trials"]  # hashes verified
    assert len(trials) == 4
    # the trial node_b took down ran on in a new process, from its checkpoint (no epoch trained twice). The
    # epochs, not Tune's iteration counter: when the node dies between a report and Tune's registration of
    # its checkpoint, Tune restores its counter one behind while the engine resumes from the newest complete
    # checkpoint on disk (the epoch Tune had not registered is not trained again)
    retried = []
    for result in exp.glob("_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert [r["epoch"] for r in rows] == list(range(len(rows))), result
        if len({r["pid"] for r in rows}) > 1:
            retried.append(result.parent.name)
    assert retried, "no trial was running on node_b when it died"


@OPT_IN
def test_a_lost_worker_node_is_waited_for(cluster, config_file, tmp_path):
    """SIGKILL node_b's raylet mid-run; the run waits, restarts from its last checkpoint once the node is
    back, and finishes; the store holds one complete model and nothing half-written."""
    store = str(tmp_path / "models")
    sid = submit_training(cluster, "lost", store, config_file, epochs=EPOCHS)
    wait_for_epoch(cluster, sid, store, "lost", 2)  # two epochs checkpointed
    killed = cluster.kill_node("node_b")
    assert killed > 0
    time.sleep(10)  # the node is gone; the run cannot place its second worker
    assert job_status(cluster, sid) == "RUNNING"
    cluster.restart_node("node_b")
    assert wait_status(cluster, sid, {"SUCCEEDED", "FAILED", "STOPPED"}, 600) == "SUCCEEDED", logs(cluster, sid)
    summary = summary_from(logs(cluster, sid))
    assert summary["epochs_run"] == EPOCHS
    from densiray.store import Store

    manifest = Store(store).read("lost").manifest  # hashes verified
    history = manifest["provenance"]["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert any(h.get("resumed_from_epoch", 0) > 0 for h in history), history
    assert not half_written(store)


def test_zero3_across_nodes_stops_resumes_and_goes_on_elastic_after_a_lost_node(cluster, config_file, tmp_path,
                                                                              ray_cluster):
    """One run through the whole cluster path: a 2-worker ZeRO-3 run (``--min-workers 1``) submitted from
    the checkout, its ranks on the two worker nodes; stopped with the job API at its first checkpoint and
    submitted again, it resumes; then node_b's raylet is SIGKILLed and stays down, and the run goes on
    with the worker on node_a from its last checkpoint, resharded for one rank (DeepSpeed's universal
    checkpoint). It ends where an in-process run of the same config does: every step's gradient is the
    same at any world size."""
    store = str(tmp_path / "models")
    ids = cluster.node_ids()
    assert set(ids) == {"head", "node_a", "node_b"}, ids
    scale = ("--zero-stage", "3", "--min-workers", "1")

    # 1. submitted from the checkout; progress shows in `ray job logs`; `ray job stop` stops it
    first = submit_training(cluster, "cross", store, config_file, epochs=EPOCHS, scale=scale)
    watch = WorkerNodes(cluster, first)
    wait_for_epoch(cluster, first, store, "cross", 0)
    # what `ray job stop` sends (its CLI alone takes seconds to start, time in which a quiet machine trains on)
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(cluster.dashboard).stop_job(first)
    assert wait_status(cluster, first, {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"
    text = logs(cluster, first)
    (tmp_path / "first.log").write_text(text)  # kept by pytest for a look after a failure
    assert "epoch" in text  # the progress reaches the job's log
    marker = json.loads(Path(store, ".runs", "cross", "densiray_run.json").read_text())
    assert marker["done"] is False, "the run finished before the stop reached it"  # stopped, not finished
    assert "densiray: stopped (SIGTERM); run the same command again to resume" in text, text[-3000:]

    # 2. the same submission again resumes from the last checkpoint; two epochs later node_b dies for good
    stopped_at = newest_epoch(store, "cross")
    second = submit_training(cluster, "cross", store, config_file, epochs=EPOCHS, scale=scale)
    watch.follow(second)
    wait_for_epoch(cluster, second, store, "cross", stopped_at + 2)
    assert cluster.kill_node("node_b") > 0  # not brought back: this module's last test
    assert wait_status(cluster, second, {"SUCCEEDED", "FAILED", "STOPPED"}, 600) == "SUCCEEDED", \
        logs(cluster, second)
    worker_nodes = watch.stop()
    text = logs(cluster, second)
    (tmp_path / "second.log").write_text(text)
    assert "resuming unfinished run 'cross'" in text
    summary = summary_from(text)
    assert summary["resumed"] is True and summary["epochs_run"] == EPOCHS

    # 3. the two ZeRO-3 ranks ran on the two worker nodes, never on the CPU-less head; then on node_a alone
    from densiray.store import Store

    manifest = Store(store).read("cross").manifest  # hashes verified
    assert worker_nodes == {ids["node_a"], ids["node_b"]}, (worker_nodes, ids)
    history = manifest["provenance"]["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    worlds = [h["world"] for h in history]
    assert worlds[0] == 2 and worlds[-1] == 1 and worlds == sorted(worlds, reverse=True), worlds
    assert manifest["provenance"]["strategy"] == "deepspeed" and manifest["provenance"]["zero_stage"] == 3
    assert manifest["provenance"]["rank_nodes"] == [ids["node_a"]], manifest["provenance"]["rank_nodes"]
    assert not half_written(store)

    # 4. the metrics of the same config trained in one process (same global batch, same gradients)
    from densiray import api

    local = api.train("dnmm", "moons", config=config_file, overrides={"train": {"workers": 0, "epochs": EPOCHS}},
                      name="cross", store=str(tmp_path / "one-process"), plot=False)
    assert abs(local["metrics"]["test_log_lik"] - summary["metrics"]["test_log_lik"]) < 0.01, (local, summary)
