"""A multi-node Ray cluster on one machine: a head and worker nodes as separate raylets.

For trying the cluster path without a cloud account, and for the multi-node tests::

    python -m densiray.cluster up        # head (0 CPUs) + two 1-CPU worker nodes; prints the addresses
    RAY_ADDRESS=http://127.0.0.1:PORT ray job submit --working-dir . -- \\
        python jobs/train.py dnmm --dataset moons --workers 2 --zero-stage 3
    python -m densiray.cluster status    # the nodes Ray sees, alive or dead
    python -m densiray.cluster down      # stops exactly the processes `up` started

Each node is one ``ray start --block`` process started in a session of its own (its own process
group), with its own temp dir and its own ports, so the cluster never touches any other Ray on the
machine: ``down`` signals only those process groups (never ``ray stop``, which would stop every Ray
the user runs). The head has no CPUs (``--num-cpus 0``), so Ray Train workers land on the worker
nodes; worker node ``i`` carries the custom resource ``node_<letter>`` = 1 (``node_a``, ``node_b``)
so that work can be pinned to it. Nodes are started one after another, each waited for until the
head lists it alive (starting them at the same moment made one time out), and ``up`` returns only
when the head's job agent accepts submissions (right after start it answers "No available agent to
submit job" for a while).

A worker node can be killed the way a machine dies (``kill_node``: SIGKILL to its raylet, by pid)
and started again (``restart_node``) to test fault tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE = "cluster.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    """``ray`` of this Python environment, run through :func:`_patient_ray` (see there)."""
    return [sys.executable, "-m", "densiray.cluster", "_ray"]


def _patient_ray(argv: list[str]) -> None:
    """Ray's command line, with a node's start-up wait stretched from Ray's fixed 30 s to
    ``$DENSIRAY_NODE_START_WAIT_S`` (default 300 s).

    ``ray start`` gives up when its raylet has not registered with the GCS within 30 s; on a busy
    machine (a laptop running a test suite, a shared CI runner) that happens, and the node exits.
    The wait polls ``ray._private.services.get_node``; this keeps that call retrying longer."""
    wait_s = float(os.environ.get("DENSIRAY_NODE_START_WAIT_S", "300"))
    try:
        import ray._private.services as services

        original = services.get_node

        def get_node(gcs_address, node_id):
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    return original(gcs_address, node_id)
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)

        services.get_node = get_node
    except (ImportError, AttributeError):  # another Ray version: its own wait applies
        pass
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *argv]
    ray_main()


@dataclass
class NodeProc:
    """One node: the ``ray start --block`` process (leader of its own process group) and its settings."""

    name: str
    pid: int
    temp_dir: str
    args: list[str]
    log: str
    resources: dict = field(default_factory=dict)


@dataclass
class LocalCluster:
    """A head and ``workers`` worker nodes on this machine; use as a context manager or via up()/down().

    ``address`` is the GCS address (``ray.init(address=...)``, ``RAY_ADDRESS`` for drivers), and
    ``dashboard`` the HTTP address of the job API (``ray job submit --address``, the state API).
    """

    root: str
    head_cpus: int = 0
    workers: int = 2
    worker_cpus: int = 1
    object_store_bytes: int = 150 * 1024**2
    env: dict = field(default_factory=dict)
    port: int = 0
    dashboard_port: int = 0
    nodes: list = field(default_factory=list)

    # ----------------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.port}"  # Ray replaces 127.0.0.1 by the machine's own IP

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _env(self) -> dict:
        env = {**os.environ, **self.env}
        env.pop("RAY_ADDRESS", None)  # a node must not join whatever cluster the caller points at
        # its processes find the state API here, not by searching the machine for Ray instances (see
        # densiray.api._init_local_ray)
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard
        if env.get("PYTHONPATH"):  # the nodes' workers run elsewhere: relative entries would break
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
        # a job's entrypoint `python ...` must be this environment's Python (the one the nodes run), not
        # whatever `python` comes first on the caller's PATH (a venv used without `activate`)
        bindir = os.path.dirname(sys.executable)
        if env.get("PATH", "").split(os.pathsep)[0] != bindir:
            env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]).rstrip(os.pathsep)
        env.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("RAY_AUTH_MODE", "token")  # Ray's token auth (~/.ray/auth_token), created if missing
        # a raylet dies when its Python agents take over 15 s to start, as they do on a busy machine
        env.setdefault("RAY_agent_register_timeout_ms", "300000")
        return env

    def _ports(self) -> list[str]:
        """Explicit free ports for everything a node listens on (the defaults collide between nodes)."""
        return [
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        ]

    def _spawn(self, name: str, args: list[str], resources: dict) -> NodeProc:
        temp_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=self.root)
        log = os.path.join(self.root, f"{name}.log")
        argv = [*_ray_cli(), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                f"--object-store-memory={self.object_store_bytes}", *args]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self._env(), start_new_session=True)
        return NodeProc(name=name, pid=proc.pid, temp_dir=temp_dir, args=args, log=log, resources=resources)

    def _save(self) -> None:
        Path(self.root, STATE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: str) -> LocalCluster:
        """The cluster whose state ``up`` wrote into ``root``."""
        data = json.loads(Path(root, STATE).read_text())
        data["nodes"] = [NodeProc(**n) for n in data["nodes"]]
        return cls(**data)

    # ----------------------------------------------------------------------------------------------
    def up(self, timeout: float = 600.0, wait_for_jobs: bool = True, attempts: int = 3) -> LocalCluster:
        """Start the head, then each worker node in turn (waiting for each), then wait for the job agent.

        A node whose raylet does not register within Ray's fixed 30 s (a busy machine) exits; it is
        started again, up to ``attempts`` times."""
        os.makedirs(self.root, exist_ok=True)
        self.port, self.dashboard_port = _free_port(), _free_port()
        deadline = time.monotonic() + timeout
        self.nodes = []
        try:
            self._start_with_retries(self._start_head, deadline, attempts)
            for i in range(self.workers):
                self._start_with_retries(lambda i=i: self._start_worker(i), deadline, attempts)
            if wait_for_jobs:
                self.wait_for_job_agent(max(deadline - time.monotonic(), 60.0))
        except BaseException:
            self.down()
            raise
        return self

    def _start_head(self) -> NodeProc:
        return self._spawn("head", [
            "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}", *self._ports()], {})

    def _start_with_retries(self, start, deadline: float, attempts: int, index: int | None = None) -> None:
        """Start one node and wait until the head lists it; start it again if it exits while starting."""
        for _attempt in range(attempts):
            node = start()
            if index is None:
                self.nodes.append(node)
            else:
                self.nodes[index] = node
            self._save()
            if self._wait_nodes(len(self.nodes), deadline, node):
                return
            _stop_group(node.pid)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
            if index is None:
                self.nodes.remove(node)
        raise RuntimeError(f"Ray node {node.name} did not start in {attempts} attempts; see {node.log}")

    def _start_worker(self, i: int) -> NodeProc:
        name = f"node_{string.ascii_lowercase[i]}"
        resources = {name: 1}
        args = [f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                f"--resources={json.dumps(resources)}", *self._ports()]
        return self._spawn(name, args, resources)

    def _alive(self) -> list[dict]:
        """The nodes the head lists as alive (empty while the head is not up)."""
        from ray.util.state import list_nodes

        client_auth()
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            try:
                nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], timeout=10,
                                   raise_on_missing_output=False)
            except Exception:  # the dashboard is not up yet
                return []
        return [n.__dict__ if hasattr(n, "__dict__") else dict(n) for n in nodes]

    def _wait_nodes(self, count: int, deadline: float, starting: NodeProc) -> bool:
        """Wait until the head lists ``count`` alive nodes; False if ``starting`` exited meanwhile or its
        raylet died (a raylet whose agents start too slowly aborts while ``ray start`` keeps waiting)."""
        seen_raylet = False
        while True:
            if len(self._alive()) >= count:
                return True
            if not _running(starting.pid):
                return False
            if _raylet_pid(starting.pid) is not None:
                seen_raylet = True
            elif seen_raylet:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self._alive())} of {count} Ray nodes came up; see {self.root}/*.log")
            time.sleep(1.0)

    def wait_for_job_agent(self, timeout: float = 120.0) -> None:
        """Return once the head accepts a job (a no-op probe job is submitted until one succeeds)."""
        sid = submit(self.dashboard, "python -c pass", timeout=timeout)
        from ray.job_submission import JobSubmissionClient

        wait_job(JobSubmissionClient(self.dashboard), sid, timeout=timeout)

    def node_ids(self) -> dict[str, str]:
        """Ray node id of each node started here, by name (``head``, ``node_a``, ...)."""
        out = {}
        for n in self._alive():
            resources = n.get("resources_total") or {}
            for node in self.nodes:
                if (node.name == "head" and n.get("is_head_node")) or (node.resources and all(
                        k in resources for k in node.resources)):
                    out[node.name] = n["node_id"]
        return out

    def kill_node(self, name: str) -> int:
        """Kill worker node ``name`` as a machine dies: SIGKILL its raylet (by pid); returns that pid.

        Its ``ray start --block`` process notices and kills the node's other processes."""
        node = self._node(name)
        raylet = _raylet_pid(node.pid)
        if raylet is None:
            raise RuntimeError(f"node {name} has no running raylet")
        os.kill(raylet, signal.SIGKILL)
        return raylet

    def restart_node(self, name: str, timeout: float = 300.0) -> None:
        """Start worker node ``name`` again (a fresh raylet with the same resources) and wait for it."""
        node = self._node(name)
        _stop_group(node.pid)
        i = string.ascii_lowercase.index(name.removeprefix("node_"))
        self._start_with_retries(lambda: self._start_worker(i), time.monotonic() + timeout, 3,
                                 index=self.nodes.index(node))

    def _node(self, name: str) -> NodeProc:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}; nodes: {[n.name for n in self.nodes]}")

    def down(self) -> None:
        """Stop every node at once (SIGTERM, one grace period for all, then SIGKILL): each by its own process
        group, nothing else."""
        _stop_group(*(node.pid for node in reversed(self.nodes)))
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.root, STATE))

    def __enter__(self) -> LocalCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


# --------------------------------------------------------------------------------------------------
# processes


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _raylet_pid(pid: int) -> int | None:
    """The raylet among the descendants of a node's ``ray start`` process."""
    import psutil

    try:
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "raylet" or "raylet" in os.path.basename((child.cmdline() or [""])[0]):
                    return child.pid
    except psutil.NoSuchProcess:
        return None
    return None


def _stop_group(*pids: int, grace: float = 15.0) -> None:
    """Stop nodes: SIGTERM each one's ``ray start`` process (which shuts its Ray processes down), wait up to
    ``grace`` seconds for all of them together, then SIGKILL whatever is left of their process groups and
    descendants. Only those nodes' processes are touched."""
    import psutil

    procs = []
    for pid in pids:
        try:
            leader = psutil.Process(pid)
            procs += [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap it if this process started it


# --------------------------------------------------------------------------------------------------
# jobs


def client_auth() -> None:
    """Make this process's Ray clients (job submission, state API) send Ray's auth token, as the
    nodes require one (``RAY_AUTH_MODE=token``, the token in ``~/.ray/auth_token``); a no-op when the
    user disabled token auth or it is on already."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    from ray._private.authentication import authentication_token_setup as auth
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        auth._enable_token_auth()


def submit(dashboard: str, entrypoint: str, *, timeout: float = 120.0, **kwargs) -> str:
    """``JobSubmissionClient.submit_job``, retried while the head's job agent is not ready yet
    ("No available agent to submit job") for up to ``timeout`` seconds; returns the submission id."""
    from ray.job_submission import JobSubmissionClient

    client_auth()
    deadline = time.monotonic() + timeout
    while True:
        try:
            return JobSubmissionClient(dashboard).submit_job(entrypoint=entrypoint, **kwargs)
        except (RuntimeError, ConnectionError) as e:
            text = str(e)
            transient = "No available agent" in text or "Failed to connect" in text or "503" in text
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def wait_job(client, submission_id: str, timeout: float = 600.0, until=("SUCCEEDED", "FAILED", "STOPPED")) -> str:
    """Poll a job until its status is one of ``until``; returns the status."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]
        if status in until:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f} s")
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------------
# command line


def _default_root() -> str:
    return os.environ.get("DENSIRAY_CLUSTER_DIR") or os.path.join(tempfile.gettempdir(), "densiray-cluster")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ray"]:  # internal: how the nodes are started
        _patient_ray(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m densiray.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--dir", default=_default_root(),
                   help="where the nodes' temp dirs, logs and state live (default $DENSIRAY_CLUSTER_DIR "
                        "or $TMPDIR/densiray-cluster)")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--worker-cpus", type=int, default=1, help="CPUs per worker node (default 1)")
    p.add_argument("--head-cpus", type=int, default=0, help="CPUs of the head (default 0: no work there)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all nodes and the job agent")
    args = p.parse_args(argv)
    state = Path(args.dir, STATE)
    if args.command == "up":
        if state.exists():
            print(f"a cluster is already up (state in {state}); run `python -m densiray.cluster down` first",
                  file=sys.stderr)
            return 2
        def interrupted(signum, frame):  # SIGTERM while starting: stop what was started, like Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupted)
        cluster = LocalCluster(root=args.dir, workers=args.workers, worker_cpus=args.worker_cpus,
                               head_cpus=args.head_cpus).up(timeout=args.timeout)
        print(f"Ray cluster up: {len(cluster.nodes)} nodes ({', '.join(n.name for n in cluster.nodes)})")
        print(f"  drivers:  RAY_ADDRESS={cluster.address}")
        print(f"  jobs:     ray job submit --address {cluster.dashboard} --working-dir . -- "
              "python jobs/train.py dnmm --dataset moons --workers 2 --zero-stage 3")
        print(f"  stop it:  python -m densiray.cluster down --dir {args.dir}")
        return 0
    if not state.exists():
        print(f"no cluster is up (no {state})", file=sys.stderr)
        return 2 if args.command == "status" else 0
    cluster = LocalCluster.load(args.dir)
    if args.command == "down":
        cluster.down()
        print("Ray cluster stopped")
        return 0
    ids = cluster.node_ids()
    for node in cluster.nodes:
        alive = "alive" if node.name in ids else "down"
        print(f"{node.name:8s} {alive:6s} pid {node.pid}  node_id {ids.get(node.name, '-')}")
    print(f"RAY_ADDRESS={cluster.address}  dashboard {cluster.dashboard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
