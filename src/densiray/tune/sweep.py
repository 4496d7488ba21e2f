"""A Ray Tune sweep over a family's architecture and training settings, and export of the winner.

    summary = densiray.tune.sweep.tune("dnmm", "moons", settings={"trials": 24}, name="moons-tuned")

Every trial trains through the engine (``densiray.train.engine.fit``): in its own process with one
DeepSpeed rank by default (``workers_per_trial: 0``; cheap for small models, and trials run side by
side), or as a Ray Train worker group (``workers_per_trial: N``). Optuna's TPE proposes the configs,
ASHA stops poor trials early on the validation metric, and the sweep lives at
``<store>/.runs/tune-<name>``: run the same command again after an interruption and it resumes
(finished trials are kept, unfinished ones continue from their last checkpoint). The trial with the
best validation score is exported to the store with the whole sweep as its provenance.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from densiray.errors import ConfigError, DensirayError
from densiray.tune.space import to_tune, validate_space

MARKER = "densiray_sweep.json"


class SweepSettings(BaseModel):
    """How much to search and how trials share the cluster (the ``tune`` section of a config)."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(24, ge=1, le=100_000, description="configurations to try")
    time_budget_s: float | None = Field(None, gt=0, description="stop starting trials after this many seconds")
    epochs: int = Field(100, ge=1, le=100_000, description="most epochs a trial may train (ASHA's max_t)")
    patience: int = Field(20, ge=0, description="a trial stops after this many epochs without improvement")
    grace_period: int = Field(10, ge=1, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA keeps 1/reduction_factor at each rung")
    searcher: Literal["optuna", "random"] = "optuna"
    workers_per_trial: int = Field(0, ge=0, le=4096, description="0: each trial trains in its own process")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs of a trial (per worker with workers_per_trial)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the CPUs hold")
    seed: int = 0
    refit: bool = Field(False, description="retrain the winner on train+validation rows for its best number of "
                                          "epochs before export (the sweep's selection needs validation rows; "
                                          "the final model need not leave them out)")


def load_space(space: str | os.PathLike | dict | None) -> dict | None:
    """A search space from a YAML file or a dict (None: the family's default)."""
    if space is None or isinstance(space, dict):
        return space
    path = Path(space)
    if not path.is_file():
        raise ConfigError(f"no such search-space file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"search space {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"search space {path} must be a mapping of model.<setting>/train.<setting>")
    return data.get("space", data) if set(data) == {"space"} else data


def _trial(params: dict, *, task, train: dict, storage: str) -> None:
    """One Tune trial: the Task under this trial's config, trained by the engine."""
    import ray.tune

    from densiray.train.engine import TrainConfig, fit

    trial_task = task.with_model(params.get("model", {}))
    tc = TrainConfig(**{**train, **params.get("train", {})})
    ctx = ray.tune.get_context()
    run_storage = os.path.join(ctx.get_trial_dir(), "engine") if tc.workers == 0 else f"{storage}/{ctx.get_trial_id()}"
    fit(trial_task, tc, name="run", storage=run_storage, progress=False)


def _concurrency(settings: SweepSettings) -> tuple[dict, int]:
    """Per-trial resources and how many trials run at once, so that no trial waits forever."""
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    # A trial that launches a worker group holds a token 0.01 CPU itself (Tune needs some resource).
    per_trial = settings.cpus_per_trial * max(settings.workers_per_trial, 1) + 0.01 * (settings.workers_per_trial > 0)
    if per_trial > have + 1e-9 and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"a trial needs {per_trial:g} CPUs but the cluster has {have:g}; lower "
                          "tune.cpus_per_trial or tune.workers_per_trial")
    fits = max(1, int(have // per_trial + 1e-9))
    concurrent = min(settings.max_concurrent_trials or fits, settings.trials)
    if settings.max_concurrent_trials and settings.max_concurrent_trials > fits and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"{settings.max_concurrent_trials} concurrent trials need {settings.max_concurrent_trials * per_trial:g} "
                          f"CPUs but the cluster has {have:g}; lower tune.max_concurrent_trials")
    # An in-process trial holds its CPUs itself; a trial that launches a worker group only waits on it.
    resources = {"CPU": settings.cpus_per_trial} if settings.workers_per_trial == 0 else {"CPU": 0.01}
    return resources, concurrent


def _sweep_state(path: str, config_hash: str, restart: bool) -> str:
    """"new", "resume" or "restart" for the sweep at ``path`` (see api._run_marker for runs)."""
    import pyarrow.fs as pafs
    from ray import tune

    from densiray.api import _fs

    fs, root = _fs(path)
    marker = f"{root}/{MARKER}"
    action = "new"
    if fs.get_file_info(marker).type == pafs.FileType.File:
        with fs.open_input_stream(marker) as f:
            previous = json.loads(f.read())
        if restart or previous.get("done") or not tune.Tuner.can_restore(path):
            action = "restart"
        elif previous.get("config_hash") != config_hash:
            raise ConfigError("an unfinished sweep of this name exists with different settings; run it again with "
                              "the same settings to resume, pass --restart to discard it, or choose another --name")
        else:
            action = "resume"
    elif restart:
        action = "restart"
    if action != "resume":
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            fs.delete_dir(root)
        fs.create_dir(root, recursive=True)
        _write_marker(path, config_hash, done=False)
    return action


def _write_marker(path: str, config_hash: str, done: bool) -> None:
    from densiray.api import _fs

    fs, root = _fs(path)
    with fs.open_output_stream(f"{root}/{MARKER}") as f:
        f.write(json.dumps({"config_hash": config_hash, "done": done}).encode())


def _flat(config: dict) -> dict:
    return {f"{section}.{k}": v for section in ("model", "train") for k, v in (config.get(section) or {}).items()}


def tune(kind: str, dataset: str | None = None, *, config: str | os.PathLike | dict | None = None,
         space: str | os.PathLike | dict | None = None, settings: dict | None = None, overrides: dict | None = None,
         name: str | None = None, store: str | None = None, restart: bool = False, plot: bool = True) -> dict:
    """Sweep ``kind`` on ``dataset``, export the best trial to the store; returns a summary.

    ``config`` is a run config (YAML or dict) whose optional ``tune`` and ``space`` sections hold
    the sweep settings and the search space; ``settings``/``space`` arguments take precedence.
    Everything is validated before Ray starts.
    """
    import densiray.api as api
    from densiray import families
    from densiray.store import check_name
    from densiray.train.engine import TrainConfig

    spec = api._merge(api.load_spec(config), {"dataset": dataset, **(overrides or {})})
    try:
        st = SweepSettings(**{**spec.tune, **{k: v for k, v in (settings or {}).items() if v is not None}})
    except ValidationError as e:
        raise ConfigError(api.validation_message(e, "tune")) from e
    name = check_name(name or f"{kind}-{Path(spec.dataset or '').stem}-tuned")
    family = families.get(kind)
    model_cls = family.config_class()
    train = {**spec.train, "workers": st.workers_per_trial, "cpus_per_worker": st.cpus_per_trial,
             "epochs": st.epochs, "patience": st.patience}
    try:
        tc = TrainConfig(**train)
    except ValidationError as e:
        raise ConfigError(api.validation_message(e, "train")) from e
    search = load_space(space) or spec.space
    if search is not None:  # before the data: nothing in a model config's validation depends on d
        validate_space(search, model_cls, TrainConfig, {**spec.model, "dim": 1}, tc.model_dump())
    task = api.build_task(kind, spec)
    dim = task.dataset.get("d") or 0
    search = search or family.space(task)
    if search is None:
        raise ConfigError(f"{kind} has no default search space; pass one with --space FILE.yaml")
    task.warm(search)

    described = {"task": task.describe(), "train": tc.model_dump(), "space": search,
                 "tune": st.model_dump(exclude={"time_budget_s"})}
    config_hash = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
    api.ensure_ray()
    import ray
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    resources, concurrent = _concurrency(st)
    runs = api.runs_uri(store)
    exp_name = f"tune-{name}"
    path = f"{runs}/{exp_name}"
    action = _sweep_state(path, config_hash, restart)
    trainable = rtune.with_resources(
        rtune.with_parameters(_trial, task=task, train=tc.model_dump(), storage=f"{path}/train"), resources)
    metric = f"best_{task.metric}"
    t0 = time.perf_counter()
    if action == "resume":
        print(f"densiray: resuming unfinished sweep {name!r}")
        tuner = rtune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if st.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=st.seed)
        else:
            search_alg = None
        tuner = rtune.Tuner(
            trainable,
            param_space=to_tune(search),
            tune_config=rtune.TuneConfig(
                metric=metric, mode=task.mode, search_alg=search_alg, num_samples=st.trials,
                max_concurrent_trials=concurrent, time_budget_s=st.time_budget_s,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=st.epochs,
                                        grace_period=min(st.grace_period, st.epochs),
                                        reduction_factor=st.reduction_factor),
            ),
            run_config=rtune.RunConfig(
                name=exp_name, storage_path=runs, verbose=1,
                checkpoint_config=rtune.CheckpointConfig(num_to_keep=1),
                failure_config=rtune.FailureConfig(max_failures=1),
            ),
        )
    try:
        grid = tuner.fit()
    except DensirayError:
        raise
    except Exception as e:
        raise DensirayError(f"the sweep failed: {' '.join(str(e).split())[:300]}") from e
    sweep_time = time.perf_counter() - t0
    if _interrupted(grid, st, sweep_time):
        raise KeyboardInterrupt  # Tune saved the sweep: the same command resumes it


    rows, curves, best = [], {}, None
    for r in grid:
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path or "").name
        score = m.get(metric)
        if not (isinstance(score, (int, float)) and math.isfinite(score)):
            score = None  # e.g. no epoch reached a finite validation score
        row = {"trial_id": tid, **_flat(r.config or {}), metric: score, "epochs": m.get("training_iteration"),
               "best_epoch": m.get("best_epoch"), "error": " ".join(str(r.error).split())[:200] if r.error else None}
        rows.append(row)
        df = r.metrics_dataframe
        if df is not None and task.metric in df:
            curves[tid] = [float(v) for v in df[task.metric]]
        ok = r.checkpoint is not None and score is not None
        if ok and (best is None or (score > best[0] if task.mode == "max" else score < best[0])):
            best = (score, r, tid)
    if best is None:
        errors = [row["error"] for row in rows if row["error"]]
        budget = (f" within the time budget of {st.time_budget_s:g} s; raise --time-budget-s"
                  if st.time_budget_s and sweep_time >= 0.95 * st.time_budget_s else "")
        raise DensirayError(f"no trial of sweep {name!r} reached a finite {task.metric}{budget}"
                            + (f"; first error: {errors[0]}" if errors else ""))
    score, result, trial_id = best
    print(f"densiray: best trial {trial_id}: {metric} = {score:.4f} of {len(rows)} trials")

    from safetensors.torch import load_file

    with result.checkpoint.as_directory() as d:
        weights = load_file(os.path.join(d, "best.safetensors"))
    winner = task.with_model(result.config.get("model", {}))
    winner_tc = TrainConfig(**{**tc.model_dump(), **result.config.get("train", {})})
    model = winner.trained_model(weights)
    refit = None
    if st.refit:
        winner, model, refit = _refit(winner, model, winner_tc, result.metrics.get("best_epoch"), name, runs)
    provenance = {"sweep": path, "sweep_name": exp_name, "trial_id": trial_id, "config": _flat(result.config),
                  "selected_by": f"{metric} ({task.mode})", "searcher": st.searcher,
                  "scheduler": f"ASHA(grace_period={min(st.grace_period, st.epochs)}, reduction_factor={st.reduction_factor:g}, max_t={st.epochs})",
                  "settings": st.model_dump(), "space": search, "trials": rows, "tune_time_s": round(sweep_time, 2),
                  "best_epoch": result.metrics.get("best_epoch"), "ray_version": ray.__version__,
                  "base_selection": winner.base_selection, "refit": refit}
    extra = {"trials.csv": _csv(rows)}
    if plot:
        png = winner.report_plot(model, _history(result), title=f"{name}: tuned {kind} on {task.dataset['name']}")
        if png:
            extra["report.png"] = png
        from densiray.plots import trial_curves

        extra["tune.png"] = trial_curves(curves, trial_id, task.metric, title=f"{name}: {len(rows)} trials")
    stored = winner.export(model, store=store, name=name, provenance=provenance, extra_files=extra,
                           train_config=winner_tc.model_dump())
    _write_marker(path, config_hash, done=True)
    return {"name": name, "kind": kind, "path": stored.path, "dataset": task.dataset["name"], "d": dim,
            "trials": len(rows), "errored": sum(1 for r in rows if r["error"]), "trial_id": trial_id,
            "config": _flat(result.config), "metrics": stored.manifest["metrics"], "tune_time_s": round(sweep_time, 2),
            "concurrent_trials": concurrent, "resumed": action == "resume",
            "plots": [f"{stored.path}/{f}" for f in ("report.png", "tune.png") if f in extra]}


def _refit(task, model, tc, best_epoch: int | None, name: str, runs: str):
    """Retrain the winner on train+validation rows for ``best_epoch + 1`` epochs (no early stopping,
    the last epoch kept); returns the refit task, its model and a provenance record."""
    import densiray.api as api
    from densiray.train.engine import fit

    before = {k: model_metric for k, model_metric in task.metrics(model).items()
              if k in ("test_log_lik", "test_log_lik_se", "val_log_lik")}
    full = task.with_validation_rows()
    epochs = (best_epoch if isinstance(best_epoch, int) else -1) + 1
    print(f"densiray: refitting the winner on {len(full.train_x)} train+validation rows for {epochs} epochs",
          flush=True)
    t0 = time.perf_counter()
    if epochs == 0:  # the selected model was the initial one: the base mixture refitted on all rows
        refitted = full.trained_model(full.build_model().state_dict())
    else:
        rtc = tc.model_copy(update={"epochs": epochs, "patience": 0, "keep": "last"})
        run = f"refit-{name}"
        api._run_marker(runs, run, "refit", restart=True)
        refitted = full.trained_model(fit(full, rtc, name=run, storage=runs, progress=False).best_weights)
    record = {"rows": len(full.train_x), "epochs": epochs, "time_s": round(time.perf_counter() - t0, 2),
              "before_refit": before}
    return full, refitted, record


def _interrupted(grid, st: SweepSettings, elapsed: float) -> bool:
    """Whether Tune returned early because of Ctrl-C (it then returns normally with unfinished trials)."""
    trials = grid._experiment_analysis.trials
    if any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return True
    budget_left = st.time_budget_s is None or elapsed < 0.95 * st.time_budget_s
    return len(trials) < st.trials and budget_left


def _history(result) -> list[dict]:
    df = result.metrics_dataframe
    if df is None:
        return []
    cols = [c for c in df.columns if isinstance(c, str) and not c.startswith(("config/", "checkpoint"))]
    return [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in df[cols].to_dict("records")]


def _csv(rows: list[dict]) -> bytes:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()
