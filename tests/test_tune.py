"""Ray Tune sweeps for real: trials train through the engine on the 2-CPU local Ray, the winner is
exported with its provenance, an interrupted sweep resumes, and bad settings fail in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import densiray
from densiray.store import Store
from densiray.train.engine import tune_staging_dir, worker_staging_dir
from densiray.tune.sweep import tune

DATA = {"n": 600, "model": {"components": 2, "covariance": "full", "integration_samples": 128,
                            "eval_integration_samples": 2048, "export_integration_samples": 16384}}
SPACE = {"model.hidden": {"choice": [8, 16]}, "model.depth": {"randint": [1, 2]},
         "train.lr": {"loguniform": [1e-3, 2e-2]}}


def test_sweep_finishes_on_two_cpus_and_exports_the_winner_with_provenance(ray_cluster, store):
    s = tune("dnmm", "moons", overrides=DATA, space=SPACE, settings={"trials": 4, "epochs": 3, "grace_period": 1},
             name="swept", store=store)
    assert s["trials"] == 4 and s["errored"] == 0 and s["concurrent_trials"] == 2 and not s["resumed"]
    stored = Store(store).read("swept")
    m, prov = stored.manifest, stored.manifest["provenance"]
    rows = prov["trials"]
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    best = max(rows, key=lambda r: r["best_val_log_lik"])
    assert prov["trial_id"] == s["trial_id"] == best["trial_id"]
    assert prov["config"] == {k: v for k, v in best.items() if k.startswith(("model.", "train."))}
    assert m["config"]["model"]["hidden"] == best["model.hidden"] and m["config"]["model"]["depth"] == best["model.depth"]
    assert m["config"]["train"]["lr"] == pytest.approx(best["train.lr"])
    # the exported model is the winning trial's best epoch (frozen normalisers: a close, not equal, estimate)
    assert m["metrics"]["val_log_lik"] == pytest.approx(best["best_val_log_lik"], abs=0.02)
    assert {"report.png", "tune.png", "trials.csv"} <= set(m["files"])
    assert "best_val_log_lik" in Path(stored.path, "trials.csv").read_text().splitlines()[0]
    model = densiray.load_model("swept", store=store)
    assert np.isfinite(model.log_prob([[0.5, 0.2], [40.0, -3.0]])).all()
    # Tune keeps each trial's checkpoints: the engine's staging copies neither pile up in the sweep's folder
    # (Tune copies the trial folders to storage over and over) nor stay behind in the temp folder
    assert not list((Path(store) / ".runs" / "tune-swept").rglob("densiray-ckpt-*"))
    assert not any(os.path.exists(tune_staging_dir(r["trial_id"])) for r in rows)


def test_trials_with_their_own_train_worker_groups_report_to_tune_and_leave_nothing_behind(ray_cluster, store):
    """workers_per_trial >= 1: each trial launches a Ray Train worker group (DeepSpeed on CPU) whose epochs
    reach Tune through TuneReportCallback; the winner is exported like an in-process trial's."""
    s = tune("dnmm", "moons", overrides=DATA, space={"model.hidden": {"choice": [8, 16]}},
             settings={"trials": 2, "epochs": 2, "grace_period": 1, "workers_per_trial": 1, "cpus_per_trial": 0.9},
             name="grouped", store=store)
    assert s["trials"] == 2 and s["errored"] == 0 and s["concurrent_trials"] == 2
    rows = Store(store).read("grouped").manifest["provenance"]["trials"]
    assert all(r["epochs"] in (1, 2) and np.isfinite(r["best_val_log_lik"]) for r in rows)
    assert np.isfinite(densiray.load_model("grouped", store=store).log_prob([[0.5, 0.2]])).all()
    runs = Path(store) / ".runs" / "tune-grouped"
    assert not any(os.path.exists(worker_staging_dir(f"{runs}/train/{r['trial_id']}", "run")) for r in rows)


def test_refit_retrains_the_winner_on_train_and_validation_rows_for_its_best_epochs(ray_cluster, store):
    data = {**DATA, "model": {**DATA["model"], "min_gain_se": 0}}  # any gain selects an epoch: the refit trains
    tune("dnmm", "moons", overrides=data, space={"model.hidden": {"choice": [8, 16]}, "train.lr": {"choice": [0.01]}},
         settings={"trials": 2, "epochs": 3, "grace_period": 3, "refit": True}, name="refitted", store=store)
    m = Store(store).read("refitted").manifest
    refit, best_epoch = m["provenance"]["refit"], m["provenance"]["best_epoch"]
    assert refit["rows"] == "train+validation" and refit["epochs"] == best_epoch + 1 >= 1
    # the exported model is the retrained one, not the trial's: other weights, another test score
    assert m["metrics"]["test_log_lik"] != pytest.approx(refit["before_refit"]["test_log_lik"], abs=1e-6)
    assert np.isfinite(densiray.load_model("refitted", store=store).log_prob([[0.5, 0.2]])).all()


def _finished_trials(exp: Path) -> int:
    done = 0
    for result in exp.glob("_trial_*/result.json"):
        lines = result.read_text().strip().splitlines()
        done += bool(lines) and json.loads(lines[-1]).get("done", False)
    return done


def test_interrupted_sweep_resumes_and_keeps_finished_trials(ray_cluster, store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("model.hidden: {choice: [8, 16]}\ntrain.lr: {loguniform: [0.001, 0.02]}\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(DATA))
    cmd = [sys.executable, "-m", "densiray.cli", "tune", "dnmm", "--dataset", "moons", "--config", str(cfg),
           "--space", str(space), "--trials", "4", "--epochs", "4", "--max-concurrent-trials", "1",
           "--name", "resumable", "--store", store, "--json"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    exp = Path(store) / ".runs" / "tune-resumable"
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _finished_trials(exp) < 1 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[1][-2000:]
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    before = {p.name.split("_")[2] for p in exp.glob("_trial_*")}
    assert 1 <= _finished_trials(exp) < 4
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    s = json.loads(second.stdout)
    assert s["resumed"] and s["trials"] == 4 and s["errored"] == 0
    assert before <= {r["trial_id"] for r in Store(store).read("resumable").manifest["provenance"]["trials"]}


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "tune.trials: Input should be greater than or equal to 1"),
    (["--trials", "many"], "argument --trials: invalid int value"),
    (["--time-budget-s", "-5"], "tune.time_budget_s: Input should be greater than 0"),
    (["--epochs", "0"], "tune.epochs"),
    (["--searcher", "grid"], "argument --searcher: invalid choice"),
    (["--space", "SPACE:model.hiden: {choice: [8]}"], "unknown model setting 'hiden'"),
    (["--space", "SPACE:model.hidden: {choice: []}"], "choice needs a non-empty list"),
    (["--space", "SPACE:train.lr: {loguniform: [0, 0.1]}"], "loguniform needs low > 0"),
    (["--space", "SPACE:model.depth: {randint: [1, 99]}"], "model.depth: value 99 is invalid"),
    (["--space", "SPACE:model.hidden: {normal: [1, 2]}"], "expected one of {choice, uniform, loguniform, randint, grid}"),
    (["--space", "SPACE:train.workers: {choice: [1, 2]}"], "set for the whole sweep"),
    (["--space", "SPACE:[1, 2]"], "must be a mapping"),
    (["--space", "no-such-space.yaml"], "no such search-space file"),
    (["--space", "SPACE:model.hidden: {grid: [8, 16]}"], "needs --searcher random"),
])
def test_bad_search_space_or_budget_gives_one_line(tmp_path, capsys, monkeypatch, args, message):
    """In-process through the command's main(); every case fails before Ray is touched."""
    from densiray.cli import main

    if args[-1].startswith("SPACE:"):
        path = tmp_path / "space.yaml"
        path.write_text(args[-1][len("SPACE:"):] + "\n")
        args = [*args[:-1], str(path)]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    try:
        rc = main(["tune", "dnmm", "--dataset", "moons", *args, "--store", str(tmp_path / "m")])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densiray: error:") and message in lines[0], lines


@pytest.mark.parametrize("flags, message", [(["--refit"], "sortednet cannot refit on its validation rows"),
                                            (["--ensemble", "3"], "sortednet cannot export an ensemble of trials")])
def test_refit_or_ensemble_in_a_family_that_cannot_is_refused_before_the_sweep(tmp_path, capsys, monkeypatch, flags,
                                                                              message):
    from densiray.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there: the refusal comes before Ray
    rc = main(["tune", "sortednet", "--dataset", "digits", *flags, "--store", str(tmp_path / "m")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines


def test_greedy_ensemble_selection_adds_members_only_while_the_validation_score_rises():
    from densiray.models.dnmm import select_ensemble

    rng = np.random.default_rng(0)
    a = rng.normal(-1.0, 1.0, 500)
    b = a[::-1].copy()  # as good on average, right where a is wrong: mixing them pays
    assert select_ensemble([a, b], size=1) == [1.0, 0.0]  # size 1: the winner alone
    w = select_ensemble([a, b, a - 5.0], size=3)
    assert w[2] == 0 and w[0] > 0 and w[1] > 0 and sum(w) == pytest.approx(1)  # a far worse model is left out
    assert select_ensemble([a, a.copy()], size=2) == [1.0, 0.0]  # a copy adds nothing


@pytest.mark.slow
def test_an_ensemble_of_trials_is_exported_refitted_loaded_and_sampled_as_one_density(ray_cluster, store, capsys):
    from densiray.models.dnmm import DNMMEnsemble

    data = {**DATA, "model": {**DATA["model"], "min_gain_se": 0}}
    s = tune("dnmm", "moons", overrides=data, space={"model.components": {"grid": [8, 9, 10]}},
             settings={"trials": 1, "epochs": 3, "grace_period": 3, "ensemble": 3, "refit": True, "searcher": "random"},
             name="mixed", store=store)
    m = Store(store).read("mixed").manifest
    ens, refit = m["provenance"]["ensemble"], m["provenance"]["refit"]
    members = ens["members"]
    assert ens["candidates"] == 3 and members[0]["trial_id"] == s["trial_id"]  # the winner first
    assert len(members) >= 2, members  # mixtures on 8, 9 and 10 Gaussians: mixing them raises the validation score
    assert sum(x["weight"] for x in members) == pytest.approx(1)
    assert m["config"]["ensemble"]["weights"] == pytest.approx([x["weight"] for x in members])
    assert refit["member_epochs"] == [x["best_epoch"] + 1 for x in members]
    from densiray.cli import print_sweep

    capsys.readouterr()
    print_sweep(s)  # what densiray tune prints
    assert [x["trial_id"] for x in s["ensemble"]] == [x["trial_id"] for x in members]
    assert f"the exported model mixes {len(members)} trials" in capsys.readouterr().out
    model = densiray.load_model("mixed", store=store)
    assert isinstance(model.module, DNMMEnsemble) and len(model.module.members) == len(members)
    x = np.array([[0.5, 0.25], [1.0, -0.4], [-0.8, 0.6]])
    z = torch.as_tensor(model.transform.transform(x), dtype=torch.float32)
    with torch.no_grad():
        mixed = np.logaddexp.reduce([np.log(w) + member.log_prob(z).double().numpy()
                                     for w, member in zip(model.module.weights, model.module.members)], axis=0)
    mixed += model.transform.log_abs_det()
    assert np.allclose(model.log_prob(x), mixed, atol=1e-5)
    assert abs(m["metrics"]["integral"] - 1) < 5 * m["metrics"]["integral_se"] + 0.01
    samples = model.sample(300, seed=1)
    assert samples.shape == (300, 2) and np.isfinite(samples).all()
    assert np.array_equal(samples, model.sample(300, seed=1))  # seeded, reproducible


def test_a_family_tunes_with_its_own_sweep_defaults_unless_the_user_sets_them(store):
    from densiray import families
    from densiray.api import RunSpec
    from densiray.tune.sweep import SweepSettings, _plan

    # ASHA's first rung, and a mixture of up to 4 trials exported (notes/dnmm.md)
    assert families.get("dnmm").tune_defaults == {"grace_period": 30, "ensemble": 4}
    spec = RunSpec(dataset="moons", **DATA)
    assert _plan("dnmm", spec, {"trials": 2}, SPACE, "p", store).settings.grace_period == 30
    assert _plan("dnmm", spec, {"trials": 2, "grace_period": 5}, SPACE, "p", store).settings.grace_period == 5
    spec.tune = {"grace_period": 7}  # a config file's tune section beats the family too
    assert _plan("dnmm", spec, {"trials": 2}, SPACE, "p", store).settings.grace_period == 7
    assert _plan("dnmm", spec, {"trials": 2}, SPACE, "p", store).settings.ensemble == 4
    assert SweepSettings().grace_period == 10 and SweepSettings().ensemble == 1  # other families: the generic ones
