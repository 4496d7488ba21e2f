"""The Python API behind the command line: validate → (local) Ray → engine → store.

    import densiray.api as dr
    summary = dr.train("dnmm", "moons", overrides={"train": {"epochs": 30}}, name="moons")
    model = densiray.load_model("moons")
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from densiray import console, runs
from densiray.errors import ConfigError, DensirayError
from densiray.runs import config_hash, runs_uri
from densiray.store import check_name


class RunSpec(BaseModel):
    """A training run as written in a YAML config file (every section optional)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = None
    data_seed: int = 0
    n: int | None = Field(None, description="rows of a synthetic dataset (default 4000)")
    model: dict = Field(default_factory=dict, description="the family's model config")
    train: dict = Field(default_factory=dict, description="engine settings (TrainConfig)")
    tune: dict = Field(default_factory=dict, description="sweep settings (densiray.tune.sweep.SweepSettings)")
    space: dict | None = Field(None, description="search space of a sweep (densiray.tune.space)")


def validation_message(e: ValidationError, where: str) -> str:
    """One line out of a pydantic error: every bad field with its reason."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].replace("Extra inputs are not permitted", "unknown setting")
        parts.append(f"{where}{'.' if where else ''}{loc}: {msg}")
    return "; ".join(parts)


def load_yaml(path: str | os.PathLike, what: str) -> dict:
    """A YAML mapping from ``path``; a one-line ConfigError for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such {what} file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data


def load_spec(config: str | os.PathLike | dict | None) -> RunSpec:
    """A RunSpec from a YAML file, a dict or nothing (defaults)."""
    if config is None:
        return RunSpec()
    if not isinstance(config, dict):
        config = load_yaml(config, "config")
    try:
        return RunSpec(**config)
    except ValidationError as e:
        raise ConfigError(validation_message(e, "config")) from e


def _merge(spec: RunSpec, overrides: dict | None) -> RunSpec:
    data = spec.model_dump()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            data[key] = value
    try:
        return RunSpec(**data)
    except ValidationError as e:
        raise ConfigError(validation_message(e, "")) from e


# Ray Train's controller takes one report per worker each health-check poll (2 s by default), which
# throttles short epochs to one every ~1.5 s; polling every 0.25 s removes that wait for this job.
# Tune trials checkpoint every epoch by design; Tune's warning about frequent snapshots is noise here.
JOB_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


class _AuthNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster" notice (a default, not a problem)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


API_SERVER_KEY = "RAY_API_SERVER_ADDRESS"


def _init_local_ray(num_cpus, log_to_driver, runtime_env, quiet, attempts: int = 3) -> None:
    """Start a local Ray whose processes find its state API by address, not by searching the machine.

    The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner polls from
    a worker. Without an address Ray looks for ``gcs_server`` processes with ``ps``, and with a second Ray
    instance anywhere on the machine (another user's, a benchmark's) it raises "Found multiple active Ray
    instances": the cleaner's thread dies and a run can hang. So the dashboard gets a port chosen here, and
    the raylet starts with its URL in ``RAY_API_SERVER_ADDRESS``: every worker it starts, for any job on
    this instance, inherits it. The variable is set only while Ray starts: in this process it would
    override every explicit address given to the state and job APIs (another cluster's included). A port
    taken between the choice and the start leaves Ray without a dashboard; that start is undone and tried
    again on another port.
    """
    import ray

    from densiray.cluster import _free_port

    before = os.environ.get(API_SERVER_KEY)
    try:
        for _ in range(attempts):
            port = _free_port()
            os.environ[API_SERVER_KEY] = f"http://127.0.0.1:{port}"
            ctx = ray.init(num_cpus=num_cpus, log_to_driver=log_to_driver, runtime_env=runtime_env,
                           dashboard_host="127.0.0.1", dashboard_port=port, **quiet)
            if ctx.dashboard_url:
                return
            ray.shutdown()
        os.environ.pop(API_SERVER_KEY)  # no dashboard on any port: as Ray starts by itself, searching
        ray.init(num_cpus=num_cpus, log_to_driver=log_to_driver, runtime_env=runtime_env, **quiet)
    finally:
        if before is None:
            os.environ.pop(API_SERVER_KEY, None)
        else:
            os.environ[API_SERVER_KEY] = before


def _node_pids(node) -> list[int]:
    """The pids of the processes a Ray node started (GCS, raylet, dashboard, log monitor, ...)."""
    return [info.process.pid for infos in node.all_processes.values() for info in infos]


def local_ray_gone(wait_s: float = 0.5) -> bool:
    """Whether this process started a local Ray that the same signal reached (waiting up to ``wait_s``).

    A SIGTERM sent to the whole process group (systemd's stop, ``timeout``, ``kill -- -PGID``) reaches Ray's
    own processes too: its dashboard and log monitor exit at once, its GCS within seconds, and Ray's shutdown
    then waits 60 s for the GCS and ends with a fatal-looking error. Sent to this process alone, none of
    them exits before Ray's shutdown.
    """
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if not ray.is_initialized() or node is None or not node.head:
        return False
    pids = _node_pids(node)

    def exited(pid: int) -> bool:  # Popen.poll() answers None while Ray's own thread waits on the process
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + wait_s
    while pids and not any(exited(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return bool(pids)


def abandon_local_ray(code: int):
    """Stop what is left of this process's local Ray and exit with ``code`` at once, skipping Ray's shutdown
    (which would wait 60 s for a GCS that is gone): after :func:`local_ray_gone`."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        # the raylet's own children (its agents, the workers) first: orphaned, an agent lingered over 30 s
        for pid in _node_pids(node):
            with contextlib.suppress(Exception):
                for child in psutil.Process(pid).children(recursive=True):
                    child.kill()
        with contextlib.suppress(Exception):
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    # and Ray's processes of this process group that a dead raylet left orphaned: the group's SIGTERM reached
    # them too, so this only finishes what it asked for (the runtime-env agent outlived it by over 30 s)
    ray_dir, group = os.path.dirname(ray.__file__), os.getpgid(0)
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(Exception):
            if proc.pid != os.getpid() and os.getpgid(proc.pid) == group:
                name, cmd = proc.info["name"] or "", " ".join(proc.info["cmdline"] or [])
                if name.startswith(("ray::", "ray-")) or ray_dir in cmd:
                    proc.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connect to the cluster in RAY_ADDRESS (or the ``ray job submit`` one), else start a local Ray."""
    for k, v in JOB_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": JOB_ENV}
    # Without the workers' output on the console, Ray's own start-up lines stay off it too.
    quiet = {} if log_to_driver else {"logging_level": logging.WARNING, "configure_logging": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver, runtime_env=runtime_env, **quiet)
    else:
        # Ray enables token auth for a new local cluster and says so on the console each time; that notice
        # (not the warning for a cluster without auth) is left out unless verbose.
        if not log_to_driver:
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_AuthNotice())
        _init_local_ray(num_cpus, log_to_driver, runtime_env, quiet)
    if console._sigterm_stops:  # the command line's SIGTERM handler, which ray.init replaced
        console.stop_on_sigterm()


def _check_resources(tc) -> None:
    """Refuse a worker group the cluster can never place (Ray would wait for it forever).

    On a cluster that may still grow (an autoscaler), only warn.
    """
    import ray

    if tc.workers == 0:
        return
    have = ray.cluster_resources()
    workers = tc.min_workers or tc.workers  # an elastic run starts with what fits, from min_workers
    need_cpu = workers * tc.cpus_per_worker
    short = []
    if need_cpu > have.get("CPU", 0) + 1e-9:
        short.append(f"{need_cpu:g} CPUs ({workers} workers x {tc.cpus_per_worker:g}) but the cluster has "
                     f"{have.get('CPU', 0):g}")
    if tc.use_gpu and workers > have.get("GPU", 0):
        short.append(f"{workers} GPUs but the cluster has {have.get('GPU', 0):g}")
    if not short:
        return
    msg = f"the run needs {'; '.join(short)}"
    if os.environ.get("RAY_ADDRESS"):
        print(f"densiray: warning: {msg}; waiting for the cluster to scale up", flush=True)
        return
    raise ConfigError(f"{msg}: lower --workers, or set train.cpus_per_worker (e.g. 0.5) in the config")


def build_task(kind: str, spec: RunSpec):
    """The Task for ``kind``, with its data loaded and config validated (no Ray needed)."""
    from densiray import families

    task_cls = families.get(kind).task_class()
    if not spec.dataset:
        raise ConfigError("no dataset: pass --dataset NAME|PATH or set 'dataset' in the config")
    try:
        return task_cls(spec.dataset, spec.model, data_seed=spec.data_seed, n=spec.n)
    except ValidationError as e:
        raise ConfigError(validation_message(e, "model")) from e


def validate_sections(kind: str, spec: RunSpec, train_cls, train: dict | None = None):
    """The run's engine settings (``train_cls``, the family's defaults under ``spec.train``, then ``train``),
    with its ``train`` and ``model`` sections validated together: one ConfigError naming every bad field."""
    from densiray import families

    family = families.get(kind)
    errors, tc = [], None
    try:
        tc = train_cls(**{**family.train_defaults, **spec.train, **(train or {})})
    except ValidationError as e:
        errors.append(validation_message(e, "train"))
    try:
        family.config_class()(**spec.model)
    except ValidationError as e:
        errors.append(validation_message(e, "model"))
    if errors:
        raise ConfigError("; ".join(errors))
    return tc


def train(kind: str, dataset: str | None = None, *, config: str | os.PathLike | dict | None = None,
          overrides: dict | None = None, name: str | None = None, store: str | None = None,
          restart: bool = False, plot: bool = True, verbose: bool = False) -> dict:
    """Train a model of family ``kind`` and export its best epoch to the store; returns a summary.

    Everything is validated (config, data) before Ray starts. ``overrides`` = {"model": {...},
    "train": {...}} from the command line take precedence over the config file.
    """
    from densiray.train.engine import TrainConfig, fit

    spec = _merge(load_spec(config), {"dataset": dataset, **(overrides or {})})
    tc = validate_sections(kind, spec, TrainConfig)
    name = check_name(name or f"{kind}-{Path(spec.dataset or '').stem}")
    task = build_task(kind, spec)
    run_path = f"{runs_uri(store)}/{name}"
    digest = config_hash({**task.describe(), "train": tc.model_dump()})
    console.quiet_env(verbose)
    action = runs.prepare(run_path, digest, restart, lambda: runs.has_checkpoint(run_path))
    if action == "resume":
        print(f"densiray: resuming unfinished run {name!r} from its latest checkpoint")
    t0 = time.perf_counter()
    with console.logs_to(f"{run_path}/densiray.log" if "://" not in run_path else None, verbose) as log:
        if tc.workers > 0:  # in-process (workers 0) is Ray Train's local mode: no Ray to start
            ensure_ray(log_to_driver=verbose)
            _check_resources(tc)
        view = None if verbose else console.EpochView(task.metric, tc.epochs)
        try:
            result = fit(task, tc, name=name, storage=runs_uri(store), progress=view or True)
        except DensirayError:
            raise
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("^")]
            raise DensirayError(f"training failed: {lines[-1] if lines else type(e).__name__}") from e
        finally:
            if view is not None:
                view.close()
    train_time = time.perf_counter() - t0
    runs.finish(run_path, digest)

    import ray

    provenance = {"run_name": name, "run_path": _with_scheme(result.run_path, run_path),
                  "checkpoint": _with_scheme(result.checkpoint_path, run_path),
                  f"initial_{task.metric}": result.state.get("initial"), "best_epoch": result.state["best_epoch"],
                  "epochs_run": result.state["epoch"], "train_time_s": round(train_time, 2), "ray_version": ray.__version__,
                  "workers": tc.workers, "strategy": result.strategy, "zero_stage": result.zero_stage,
                  "rank_nodes": result.nodes, "history": result.state.get("history", [])}
    stored = export_trained(task, result.best_weights, name=name, store=store, provenance=provenance,
                            train_config=tc.model_dump(), title=f"{name}: {kind} on {task.dataset['name']}", plot=plot)
    path, manifest = stored.path, stored.manifest
    return {"name": name, "kind": kind, "path": path, "dataset": task.dataset["name"], "d": task.dataset.get("d"),
            "metrics": manifest["metrics"], "best_epoch": provenance["best_epoch"],
            "epochs_run": provenance["epochs_run"], "train_time_s": provenance["train_time_s"],
            "plot": f"{path}/report.png" if "report.png" in manifest["files"] else None,
            "resumed": action == "resume", "log": str(log) if log else None}


def _with_scheme(path: str, like: str) -> str:
    """``path`` as a URI with the scheme of ``like`` (Ray reports s3:// paths without their scheme)."""
    if "://" in like and path and "://" not in path:
        return f"{like.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


def export_trained(task, weights: dict | None, *, name: str, store: str | None, provenance: dict, train_config: dict,
                   title: str, plot: bool = True, model=None, extra_files: dict[str, bytes] | None = None):
    """Rebuild the trained model from ``weights`` (or take ``model``), draw its report and export it to the
    store with ``provenance``; returns the StoredModel read back (hashes verified)."""
    model = model if model is not None else task.trained_model(weights)
    extra = dict(extra_files or {})
    png = task.report_plot(model, provenance.get("history", []), title=title) if plot else None
    if png:
        extra["report.png"] = png
    return task.export(model, store=store, name=name, provenance=provenance, extra_files=extra,
                       train_config=train_config)
