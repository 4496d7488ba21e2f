"""A Ray Tune sweep over a family's architecture and training settings, and export of the winner.

    summary = densiray.tune.sweep.tune(kind, dataset, settings={"trials": 24}, name="my-model")

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
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from densiray import runs
from densiray.errors import ConfigError, DensirayError
from densiray.tune.space import to_tune, validate_space


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
    pareto_tolerance: float = Field(0.01, ge=0, description="multi-objective sweeps: the exported winner is the "
                                    "Pareto trial best on the other objectives among those within this much of the "
                                    "best selection metric")
    refit: bool = Field(False, description="retrain the winner on train+validation rows for its best number of "
                                          "epochs before export (the sweep's selection needs validation rows; "
                                          "the final model need not leave them out)")
    ensemble: int = Field(1, ge=1, le=32, description="export a weighted mixture of up to this many trials, chosen "
                                                  "greedily on the validation rows from the winner on (1: the winner "
                                                  "alone); with refit, every member is refitted")


def load_space(space: str | os.PathLike | dict | None) -> dict | None:
    """A search space from a YAML file or a dict (None: the family's default)."""
    if space is None or isinstance(space, dict):
        return space
    from densiray.api import load_yaml

    data = load_yaml(space, "search-space")
    return data.get("space", data) if set(data) == {"space"} else data


RUN = "run"  # the engine's run name inside each trial


def group_storage(sweep_path: str, trial_id: str) -> str:
    """Where a trial that launches a Ray Train worker group keeps its run (:data:`RUN`) and checkpoints."""
    return f"{sweep_path}/train/{trial_id}"


def _trial(params: dict, *, task, train: dict, sweep_path: str) -> None:
    """One Tune trial: the Task under this trial's config, trained by the engine."""
    import ray.tune

    from densiray.train.engine import TrainConfig, fit

    trial_task = task.with_model(params.get("model", {}))
    tc = TrainConfig(**{**train, **params.get("train", {})})
    ctx = ray.tune.get_context()
    run_storage = (os.path.join(ctx.get_trial_dir(), "engine") if tc.workers == 0
                   else group_storage(sweep_path, ctx.get_trial_id()))
    fit(trial_task, tc, name=RUN, storage=run_storage, progress=False)


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


def _flat(config: dict) -> dict:
    return {f"{section}.{k}": v for section in ("model", "train") for k, v in (config.get(section) or {}).items()}


@dataclass
class Plan:
    """A validated sweep, ready to run: the Task (data loaded), settings, space and objectives."""

    kind: str
    name: str
    task: Any
    settings: SweepSettings
    train: Any  # TrainConfig of every trial (before the space's train.* settings)
    space: dict
    objectives: list[tuple[str, str]]  # (reported metric, mode); the first selects, the rest make a Pareto front
    digest: str
    path: str  # the sweep's folder: <store>/.runs/tune-<name>

    @property
    def metric(self) -> str:
        return self.objectives[0][0]


def _plan(kind: str, spec, settings: dict | None, space, name: str | None, store: str | None) -> Plan:
    """Validate everything (settings, space, data) before Ray starts."""
    import densiray.api as api
    from densiray import families
    from densiray.store import check_name
    from densiray.train.engine import TrainConfig
    from densiray.train.task import Task

    family = families.get(kind)
    try:
        st = SweepSettings(**{**family.tune_defaults, **spec.tune, **{k: v for k, v in (settings or {}).items() if v is not None}})
    except ValidationError as e:
        raise ConfigError(api.validation_message(e, "tune")) from e
    name = check_name(name or f"{kind}-{Path(spec.dataset or '').stem}-tuned")
    tc = api.validate_sections(kind, spec, TrainConfig, {"workers": st.workers_per_trial, "epochs": st.epochs,
                                                         "cpus_per_worker": st.cpus_per_trial, "patience": st.patience})
    search = load_space(space) or spec.space
    if search is not None:  # before the data: nothing in a model config's validation depends on it
        validate_space(search, family.config_class(), TrainConfig, dict(spec.model), tc.model_dump())
    task = api.build_task(kind, spec)
    if st.refit and type(task).with_validation_rows is Task.with_validation_rows:
        raise ConfigError(f"{kind} cannot refit on its validation rows; leave tune.refit (--refit) off")
    if st.ensemble > 1 and type(task).select_ensemble is Task.select_ensemble:
        raise ConfigError(f"{kind} cannot export an ensemble of trials; leave tune.ensemble (--ensemble) at 1")
    search = search or family.space(task)
    if search is None:
        raise ConfigError(f"{kind} has no default search space; pass one with --space FILE.yaml")
    if st.searcher == "optuna" and any(isinstance(v, dict) and "grid" in v for v in search.values()):
        raise ConfigError("a grid in the search space needs --searcher random (Optuna samples, it does not enumerate)")
    task.warm(search)
    objectives = [(f"best_{task.metric}", task.mode), *family.objectives]
    digest = runs.config_hash({"task": task.describe(), "train": tc.model_dump(), "space": search,
                               "tune": st.model_dump(exclude={"time_budget_s"})})
    return Plan(kind=kind, name=name, task=task, settings=st, train=tc, space=search, objectives=objectives,
                digest=digest, path=f"{api.runs_uri(store)}/tune-{name}")


def _tuner(plan: Plan, action: str, verbose: bool = False):
    """A new Tuner (Optuna TPE, multi-objective where the family has several objectives, and ASHA on the
    selection metric), or the interrupted one restored."""
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    from densiray.console import trial_view

    st = plan.settings
    resources, concurrent = _concurrency(st)
    trainable = rtune.with_resources(
        rtune.with_parameters(_trial, task=plan.task, train=plan.train.model_dump(), sweep_path=plan.path),
        resources)
    if action == "resume":
        print(f"densiray: resuming unfinished sweep {plan.name!r}")
        return rtune.Tuner.restore(plan.path, trainable=trainable, resume_unfinished=True, resume_errored=True), \
            concurrent
    grids = math.prod(len(v["grid"]) for v in plan.space.values() if isinstance(v, dict) and "grid" in v)
    callbacks = [] if verbose else [trial_view(plan.metric, plan.objectives[0][1], st.trials * grids, st.epochs,
                                               st.time_budget_s)]  # Tune runs every grid point trials times
    multi = len(plan.objectives) > 1
    search_alg = None
    if st.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = (OptunaSearch(metric=[m for m, _ in plan.objectives], mode=[d for _, d in plan.objectives],
                                   seed=st.seed) if multi else OptunaSearch(seed=st.seed))
    primary, mode = plan.objectives[0]
    tuner = rtune.Tuner(
        trainable,
        param_space=to_tune(plan.space),
        tune_config=rtune.TuneConfig(
            metric=None if multi else primary, mode=None if multi else mode, search_alg=search_alg,
            num_samples=st.trials, max_concurrent_trials=concurrent, time_budget_s=st.time_budget_s,
            scheduler=ASHAScheduler(metric=primary if multi else None, mode=mode if multi else None,
                                    time_attr="training_iteration", max_t=st.epochs,
                                    grace_period=min(st.grace_period, st.epochs), reduction_factor=st.reduction_factor),
        ),
        run_config=rtune.RunConfig(
            name=Path(plan.path).name, storage_path=plan.path.rsplit("/", 1)[0], verbose=1 if verbose else 0,
            callbacks=callbacks,
            checkpoint_config=rtune.CheckpointConfig(num_to_keep=1),
            failure_config=rtune.FailureConfig(max_failures=1),
        ),
    )
    return tuner, concurrent


def _at_best_epoch(result, metrics: list[str]) -> dict:
    """The values of ``metrics`` at the trial's best epoch (its last report where the history lacks it)."""
    m = result.metrics or {}
    out = {k: m.get(k) for k in metrics}
    df, best = result.metrics_dataframe, m.get("best_epoch")
    if df is not None and isinstance(best, (int, float)) and best >= 0 and "epoch" in df:
        rows = df[df["epoch"] == best]
        for k in metrics:
            if k in rows and len(rows):
                out[k] = float(rows[k].iloc[-1])
    return out


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _collect(grid, plan: Plan) -> tuple[list[dict], dict[str, list[float]], dict[str, Any]]:
    """One row per trial (config, objectives, epochs, error), each trial's validation curve, and the
    results of the trials that can be exported (a checkpoint and a finite selection score) by trial id."""
    rows, curves, results = [], {}, {}
    extra = [m for m, _ in plan.objectives[1:]]
    for r in grid:
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path or "").name
        values = {plan.metric: _finite(m.get(plan.metric)),
                  **{k: _finite(v) for k, v in _at_best_epoch(r, extra).items()}}
        rows.append({"trial_id": tid, **_flat(r.config or {}), **values, "epochs": m.get("training_iteration"),
                     "best_epoch": m.get("best_epoch"),
                     "error": " ".join(str(r.error).split())[:200] if r.error else None})
        df = r.metrics_dataframe
        if df is not None and plan.task.metric in df:
            curves[tid] = [float(v) for v in df[plan.task.metric]]
        if _checkpoint(r, plan) is not None and values[plan.metric] is not None:
            results[tid] = r
    return rows, curves, results


def _checkpoint(result, plan: Plan):
    """A trial's newest checkpoint: Tune's for an in-process trial; for a trial that launched a Ray Train
    worker group, the one Ray Train persisted (TuneReportCallback forwards only its path, as a metric)."""
    if result.checkpoint is not None:
        return result.checkpoint
    reported = (result.metrics or {}).get("checkpoint_path")
    if not reported:
        return None
    import ray.train

    tid = result.metrics.get("trial_id")
    path = f"{group_storage(plan.path, tid)}/{RUN}/{Path(reported).name}"  # the same folder, with the storage's scheme
    return ray.train.Checkpoint(path) if "://" in path or os.path.isdir(path) else None


def pareto_front(rows: list[dict], objectives: list[tuple[str, str]]) -> list[dict]:
    """The rows no other row beats on every objective (and strictly on one); rows missing a value are out."""
    keyed = [r for r in rows if all(r.get(m) is not None for m, _ in objectives)]

    def better_or_equal(a, b):
        return all((a[m] >= b[m]) if d == "max" else (a[m] <= b[m]) for m, d in objectives)

    return [r for r in keyed
            if not any(better_or_equal(o, r) and any(o[m] != r[m] for m, _ in objectives) for o in keyed if o is not r)]


def _select(rows: list[dict], exportable: dict, plan: Plan) -> tuple[str, list[dict]]:
    """The winning trial id (and the Pareto front of a multi-objective sweep, else [])."""
    primary, mode = plan.objectives[0]
    candidates = [r for r in rows if r["trial_id"] in exportable]
    if not candidates:
        return "", []
    sign = 1 if mode == "max" else -1
    if len(plan.objectives) == 1:
        return max(candidates, key=lambda r: sign * r[primary])["trial_id"], []
    front = pareto_front(candidates, plan.objectives)
    best = max(sign * r[primary] for r in front)
    near = [r for r in front if sign * r[primary] >= best - plan.settings.pareto_tolerance]
    others = plan.objectives[1:]
    winner = max(near, key=lambda r: tuple((1 if d == "max" else -1) * r[m] for m, d in others))
    return winner["trial_id"], front


def _no_winner(rows: list[dict], plan: Plan, elapsed: float) -> DensirayError:
    st = plan.settings
    errors = [row["error"] for row in rows if row["error"]]
    budget = (f" within the time budget of {st.time_budget_s:g} s; raise --time-budget-s"
              if st.time_budget_s and elapsed >= 0.95 * st.time_budget_s else "")
    return DensirayError(f"no trial of sweep {plan.name!r} reached a finite {plan.task.metric}{budget}"
                         + (f"; first error: {errors[0]}" if errors else ""))


def tune(kind: str, dataset: str | None = None, *, config: str | os.PathLike | dict | None = None,
         space: str | os.PathLike | dict | None = None, settings: dict | None = None, overrides: dict | None = None,
         name: str | None = None, store: str | None = None, restart: bool = False, plot: bool = True,
         verbose: bool = False) -> dict:
    """Sweep ``kind`` on ``dataset``, export the best trial to the store; returns a summary.

    ``config`` is a run config (YAML or dict) whose optional ``tune`` and ``space`` sections hold
    the sweep settings and the search space; ``settings``/``space`` arguments take precedence.
    Everything is validated before Ray starts. A family with several objectives (``Family.objectives``)
    gets a multi-objective search; its Pareto front is written beside the winner (``pareto.csv``,
    ``pareto.png``).

    The console shows one live line (trials done/running/stopped, the best so far, time left); Ray's and
    Tune's own lines go to ``densiray.log`` in the sweep's folder (``verbose`` shows them instead).
    """
    import densiray.api as api
    from densiray import console
    from densiray.train.engine import remove_staging_dir, tune_staging_dir, worker_staging_dir

    spec = api._merge(api.load_spec(config), {"dataset": dataset, **(overrides or {})})
    plan = _plan(kind, spec, settings, space, name, store)
    action = runs.prepare(plan.path, plan.digest, restart, lambda: _can_restore(plan.path), what="sweep")
    log_file = f"{plan.path}/densiray.log" if "://" not in plan.path else None
    console.quiet_env(verbose)
    with console.logs_to(log_file, verbose) as log:
        api.ensure_ray(log_to_driver=verbose)
        tuner, concurrent = _tuner(plan, action, verbose)
        t0 = time.perf_counter()
        try:
            grid = tuner.fit()
        except DensirayError:
            raise
        except Exception as e:
            raise DensirayError(f"the sweep failed: {' '.join(str(e).split())[:300]}") from e
    elapsed = time.perf_counter() - t0
    if _interrupted(grid, plan.settings, elapsed):
        raise KeyboardInterrupt  # Tune saved the sweep: the same command resumes it
    rows, curves, exportable = _collect(grid, plan)
    for row in rows:  # what the trials ASHA stopped (killed) left on this node
        remove_staging_dir(tune_staging_dir(row["trial_id"]))
        remove_staging_dir(worker_staging_dir(group_storage(plan.path, row["trial_id"]), RUN))
    trial_id, front = _select(rows, exportable, plan)
    if not trial_id:
        raise _no_winner(rows, plan, elapsed)
    print(f"densiray: best trial {trial_id}: {plan.metric} = "
          f"{next(r[plan.metric] for r in rows if r['trial_id'] == trial_id):.4f} of {len(rows)} trials")
    with console.logs_to(log_file, verbose):  # a refit's engine run logs through Ray Train too
        stored = _export_winner(plan, exportable, trial_id, rows, curves, front, elapsed, store, plot)
    runs.finish(plan.path, plan.digest)
    result = exportable[trial_id]
    return {"name": plan.name, "kind": kind, "path": stored.path, "dataset": plan.task.dataset["name"],
            "d": plan.task.dataset.get("d"), "trials": len(rows), "errored": sum(1 for r in rows if r["error"]),
            "trial_id": trial_id, "config": _flat(result.config), "metrics": stored.manifest["metrics"],
            "ensemble": [{"trial_id": m["trial_id"], "weight": m["weight"]}
                         for m in (stored.manifest["provenance"].get("ensemble") or {}).get("members", [])],
            "tune_time_s": round(elapsed, 2), "concurrent_trials": concurrent, "resumed": action == "resume",
            "pareto": front, "log": str(log) if log else None, "plots": [f"{stored.path}/{f}" for f in ("report.png", "tune.png", "pareto.png")
                                       if f in stored.manifest["files"]]}


def _can_restore(path: str) -> bool:
    from ray import tune as rtune

    return rtune.Tuner.can_restore(path)


def _export_winner(plan: Plan, exportable: dict, trial_id: str, rows, curves, front, elapsed: float, store,
                   plot: bool):
    """The winning trial's best epoch (with ``tune.ensemble`` a mixture of it and other trials; refitted on
    train+validation rows if asked), exported with the sweep as its provenance."""
    import ray

    import densiray.api as api

    st = plan.settings
    result = exportable[trial_id]
    members = [_member(plan, result, trial_id)]
    winner, winner_tc = members[0]["task"], members[0]["tc"]
    weights, ensemble = [1.0], None
    if st.ensemble > 1:
        members, weights, ensemble = _ensemble(plan, members[0], rows, exportable, st.ensemble)
    refit = None
    if st.refit:
        before = (ensemble["winner_alone"] if ensemble and len(members) == 1
                  else _scores(winner, _combined(winner, members, weights)))
        print(f"densiray: refitting {'the winner' if len(members) == 1 else f'the {len(members)} members'} on "
              f"train+validation rows for {', '.join(str(_epochs(m)) for m in members)} epochs", flush=True)
        t0 = time.perf_counter()
        for k, m in enumerate(members):
            m["task"], m["model"] = _refit(m["task"], m["tc"], _epochs(m), plan.name + (f"-{k}" if k else ""),
                                           api.runs_uri(store))
        refit = {"rows": "train+validation", "epochs": _epochs(members[0]),
                 "time_s": round(time.perf_counter() - t0, 2), "before_refit": before}
        if len(members) > 1:
            refit["member_epochs"] = [_epochs(m) for m in members]
        winner = members[0]["task"]
    model = _combined(winner, members, weights)
    grace = min(st.grace_period, st.epochs)
    provenance = {"sweep": plan.path, "sweep_name": Path(plan.path).name, "trial_id": trial_id,
                  "config": _flat(result.config), "objectives": [list(o) for o in plan.objectives],
                  "selected_by": f"{plan.metric} ({plan.objectives[0][1]})" + (
                      f", then the Pareto front within {st.pareto_tolerance:g} of the best" if front else ""),
                  "searcher": st.searcher,
                  "scheduler": f"ASHA(grace_period={grace}, reduction_factor={st.reduction_factor:g}, max_t={st.epochs})",
                  "settings": st.model_dump(), "space": plan.space, "trials": rows, "pareto": front,
                  "tune_time_s": round(elapsed, 2), "best_epoch": result.metrics.get("best_epoch"),
                  "ray_version": ray.__version__, "refit": refit, "ensemble": ensemble, "history": _history(result)}
    extra = {"trials.csv": _csv(rows)}
    if plot:
        from densiray.plots import pareto_plot, trial_curves

        extra["tune.png"] = trial_curves(curves, trial_id, plan.task.metric, title=f"{plan.name}: {len(rows)} trials")
        if front:
            extra["pareto.csv"] = _csv(front)
            extra["pareto.png"] = pareto_plot(rows, front, trial_id, plan.objectives, title=f"{plan.name}: Pareto front")
    return api.export_trained(winner, None, model=model, name=plan.name, store=store,
                              provenance=provenance, train_config=winner_tc.model_dump(), plot=plot, extra_files=extra,
                              title=f"{plan.name}: tuned {plan.kind} on {plan.task.dataset['name']}")


def _member(plan: Plan, result, trial_id: str) -> dict:
    """A trial's exported best epoch: its Task, engine settings and inference-ready model."""
    from safetensors.torch import load_file

    from densiray.train.engine import TrainConfig

    with _checkpoint(result, plan).as_directory() as d:
        weights = load_file(os.path.join(d, "best.safetensors"))
    task = plan.task.with_model(result.config.get("model", {}))
    return {"trial_id": trial_id, "task": task, "model": task.trained_model(weights),
            "tc": TrainConfig(**{**plan.train.model_dump(), **result.config.get("train", {})}),
            "best_epoch": result.metrics.get("best_epoch"), "score": result.metrics.get(plan.metric)}


def _ensemble(plan: Plan, winner: dict, rows: list[dict], exportable: dict,
              size: int) -> tuple[list[dict], list[float], dict]:
    """The members (the winner first) and weights of the mixture the winner's Task selects among every
    exportable trial, best first by the sweep's metric; and its provenance record."""
    sign = 1 if plan.objectives[0][1] == "max" else -1
    ranked = sorted((r for r in rows if r["trial_id"] != winner["trial_id"] and r["trial_id"] in exportable),
                    key=lambda r: -sign * r[plan.metric])
    candidates = [winner] + [_member(plan, exportable[r["trial_id"]], r["trial_id"]) for r in ranked]
    weights = winner["task"].select_ensemble([c["model"] for c in candidates], size)
    members = [c for c, w in zip(candidates, weights) if w > 0]
    kept = [w for w in weights if w > 0]
    chosen = ", ".join(f"{m['trial_id']} {w:.2f}" for m, w in zip(members, kept))
    print(f"densiray: ensemble of {len(members)} trials ({chosen}) chosen on the validation rows among "
          f"{len(candidates)}", flush=True)
    record = {"size": size, "candidates": len(candidates), "method": "greedy forward selection with replacement "
              "on the validation rows (Caruana et al. 2004)", "winner_alone": _scores(winner["task"], winner["model"]),
              "members": [{"trial_id": m["trial_id"], "weight": round(w, 6), "best_epoch": m["best_epoch"],
                           plan.metric: m["score"]} for m, w in zip(members, kept)]}
    return members, kept, record


def _combined(task, members: list[dict], weights: list[float]):
    """The one model to export: the member's own, or the Task's mixture of several."""
    return members[0]["model"] if len(members) == 1 else task.ensemble_model([m["model"] for m in members], weights)


def _epochs(member: dict) -> int:
    """Epochs a refit of ``member`` trains: its best epoch's count (0: it kept its untrained model)."""
    best = member["best_epoch"]
    return (best if isinstance(best, int) else -1) + 1


def _scores(task, model) -> dict:
    return {k: v for k, v in task.metrics(model).items() if k.startswith(("test_", "val_")) and isinstance(v, (int, float))}


def _refit(task, tc, epochs: int, name: str, runs_path: str):
    """Retrain ``task``'s model on train+validation rows for ``epochs`` epochs (no early stopping, the last
    epoch kept, the schedule compressed into those epochs); returns the refit Task and its model."""
    from densiray.train.engine import fit

    full = task.with_validation_rows()
    if epochs == 0:  # the selected model was the initial one: the base mixture refitted on all rows
        return full, full.trained_model(full.build_model().state_dict())
    rtc = tc.model_copy(update={"epochs": epochs, "patience": 0, "keep": "last"})
    run = f"refit-{name}"
    runs.prepare(f"{runs_path}/{run}", "refit", restart=True, resumable=lambda: False)
    return full, full.trained_model(fit(full, rtc, name=run, storage=runs_path, progress=False).best_weights)


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
