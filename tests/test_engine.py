"""The engine for real: Ray Train workers running DeepSpeed, export to the store, load without Ray."""

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import densiray
from densiray.api import RunSpec, build_task, runs_uri
from densiray.train.engine import TrainConfig, fit, worker_staging_dir

SMALL = {"components": 4, "hidden": 32, "integration_samples": 256, "eval_integration_samples": 4096,
         "export_integration_samples": 16384}


@pytest.fixture(scope="module")
def moons_run(ray_cluster, tmp_path_factory):
    """DNMM on moons, 2 workers, DeepSpeed ZeRO-2 on CPU; exported to a fresh store."""
    store = str(tmp_path_factory.mktemp("store"))
    task = build_task("dnmm", RunSpec(dataset="moons", model=SMALL))
    tc = TrainConfig(workers=2, zero_stage=2, epochs=6, patience=0, lr=1e-2)
    result = fit(task, tc, name="moons", storage=runs_uri(store))
    model = task.trained_model(result.best_weights)
    manifest = task.export(model, store=store, name="moons", provenance={"run": "test"}).manifest
    return task, result, model, manifest, store


def test_two_workers_zero2_improve_on_the_initialisation(moons_run):
    task, result, _, manifest, _ = moons_run
    state = result.state
    assert state["epoch"] == 6 and state["done"]
    assert state["best"] > state["initial"]
    assert [h["epoch"] for h in state["history"]] == list(range(6))
    assert manifest["metrics"]["val_log_lik"] == pytest.approx(state["best"], abs=0.01)
    assert math.isfinite(manifest["metrics"]["test_log_lik"])


def test_load_model_reproduces_log_prob_exactly(moons_run):
    task, _, model, _, store = moons_run
    loaded = densiray.load_model("moons", store=store)
    z = torch.from_numpy(task.test_x)
    with torch.no_grad():
        expected = model.log_prob(z).double().numpy()
    assert np.array_equal(loaded.log_prob_standardized(task.test_x), expected)
    raw = task.transform.inverse(task.test_x.astype(np.float64))
    np.testing.assert_allclose(loaded.log_prob(raw), expected + task.transform.log_abs_det(), rtol=0, atol=1e-4)
    # a caller's mistake is a one-line DataError (a DensirayError), not numpy's ValueError
    for bad, message in [([[0.1, 0.2, 0.3]], "expected rows of 2 values"), ([["a", "b"]], "expected rows of 2 numbers"),
                         ([[0.1, 0.2], [0.3]], "each row the same length"), ([[float("nan"), 0.0]], "NaN or inf")]:
        with pytest.raises(densiray.DensirayError, match=message):
            loaded.log_prob(bad)


def test_exported_density_integrates_to_one_and_manifest_agrees(moons_run):
    _, _, _, manifest, store = moons_run
    loaded = densiray.load_model("moons", store=store)
    g = np.linspace(-8, 8, 1201)
    xx, yy = np.meshgrid(g, g)
    z = np.c_[xx.ravel(), yy.ravel()]
    mass = np.exp(loaded.log_prob_standardized(z)).sum() * (g[1] - g[0]) ** 2
    assert abs(mass - 1) < 0.02
    m = manifest["metrics"]
    assert abs(m["integral"] - mass) < max(4 * m["integral_se"], 5e-3)
    assert m["integral_method"].endswith(", 16384 draws, seed 1")  # the model's export_integration_samples


def test_samples_match_the_exported_model(moons_run):
    """Two-sample check: model samples vs held-out data moments, and E[log p] vs quadrature."""
    _, _, _, _, store = moons_run
    loaded = densiray.load_model("moons", store=store)
    samples = loaded.sample(20000, seed=0)
    assert samples.shape == (20000, 2)
    g = np.linspace(-8, 8, 801)
    xx, yy = np.meshgrid(g, g)
    z = np.c_[xx.ravel(), yy.ravel()]
    lp = loaded.log_prob_standardized(z)
    w = np.exp(lp)
    w /= w.sum()
    zs = loaded.transform.transform(samples)
    mean = (w[:, None] * z).sum(0)
    sd = np.sqrt((w[:, None] * (z - mean) ** 2).sum(0))
    assert np.all(np.abs(zs.mean(0) - mean) < 4 * sd / np.sqrt(len(zs)))
    lps = loaded.log_prob_standardized(zs)
    assert abs(lps.mean() - (w * lp).sum()) < 4 * lps.std() / np.sqrt(len(lps))


@pytest.mark.slow
def test_zero3_with_ema_ddp_with_accumulation_and_in_process_mode(ray_cluster, store):
    """ZeRO-3 gathers partitioned weights for the best state and for the EMA; two DDP workers accumulate
    gradients over micro-batches; workers=0 runs without Ray workers (auto picks DDP for a small model)."""
    cases = [({"workers": 2, "zero_stage": 3, "ema_decay": 0.5}, "deepspeed", 3),
             ({"workers": 2, "strategy": "ddp", "grad_accum_steps": 2}, "ddp", None),
             ({"workers": 0, "zero_stage": 0}, "ddp", None)]
    for settings, strategy, stage in cases:
        task = build_task("dnmm", RunSpec(dataset="rings", n=800, model=SMALL))
        tc = TrainConfig(epochs=2, patience=0, batch_size=128, **settings)
        result = fit(task, tc, name=f"rings-{strategy}-{settings['workers']}", storage=runs_uri(store))
        assert (result.strategy, result.zero_stage) == (strategy, stage)
        assert len(result.nodes) == max(1, tc.workers) and all(result.nodes)
        assert set(result.best_weights) == set(task.build_model().state_dict())
        # 512 training rows, 128 per optimizer step: 4 steps an epoch whatever the accumulation
        assert result.state["step"] == 8
        assert result.state["ema_updates"] == (8 if tc.ema_decay else 0)
        model = task.trained_model(result.best_weights)
        assert np.isfinite(task.metrics(model)["test_log_lik"])
        json.dumps(result.state)


def _registered_checkpoints(run_dir) -> list[str]:
    """The checkpoints Ray Train's controller has registered (its persisted checkpoint-manager snapshot)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snapshot.read_text())
        data = json.loads(data) if isinstance(data, str) else data
    except (OSError, ValueError):
        return []
    results = data.get("checkpoint_results") or []
    return [r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and r.get("checkpoint_dir_name")]


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_training_resumes(ray_cluster, store):
    """FailureConfig: SIGKILL one Ray Train worker mid-run; the group restarts from the checkpoint."""
    import os
    import signal
    import threading
    import time
    from pathlib import Path


    task = build_task("dnmm", RunSpec(dataset="moons", n=1000, model=SMALL))
    tc = TrainConfig(workers=2, zero_stage=2, epochs=15, patience=0, max_failures=2)
    out = {}

    def run():
        try:
            out["result"] = fit(task, tc, name="flaky", storage=runs_uri(store))
        except Exception as e:  # reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    run_dir = Path(runs_uri(store), "flaky")
    deadline = time.time() + 180
    while time.time() < deadline and not _registered_checkpoints(run_dir):
        time.sleep(0.2)
    assert _registered_checkpoints(run_dir), "Ray Train registered no checkpoint within 180 s"
    staging = Path(worker_staging_dir(runs_uri(store), "flaky"))
    assert staging.is_dir(), "the workers stage their checkpoints elsewhere"
    import ray
    from ray.util.state import list_actors

    # only this job's live workers (the CLI tests' drivers are other jobs on the same cluster)
    job = ray.get_runtime_context().get_job_id()
    # this cluster's state API, not whichever Ray on the machine started last
    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    workers = [a.pid for a in list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                                      ("state", "=", "ALIVE"), ("job_id", "=", job)])]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0], signal.SIGKILL)
    thread.join(timeout=300)
    assert "result" in out, f"training did not recover: {out.get('error', 'still running after 300 s')!r}"
    history = out["result"].state["history"]
    assert [h["epoch"] for h in history] == list(range(15))
    assert history[-1]["resumed_from_epoch"] > 0
    assert not staging.exists(), "a killed worker's staged checkpoint was left in the temp folder"


def test_outlier_score_is_calibrated_on_the_fitted_rows(moons_run):
    task, _, _, manifest, store = moons_run
    loaded = densiray.load_model("moons", store=store)
    cal = manifest["metrics"]["calibration"]
    assert cal["rows"] == "train+validation" and cal["log_prob"] == sorted(cal["log_prob"])
    raw_test = task.transform.inverse(task.test_x.astype(np.float64))
    out = loaded.score(raw_test, percentile=5)
    assert out["threshold"] == loaded.threshold(5)
    assert 0.01 < out["outlier"].mean() < 0.12  # about 5 % of held-out rows
    far = loaded.score([[50.0, 50.0]], percentile=0.1)
    assert far["outlier"].all() and far["score"][0] > far["threshold"]
    with pytest.raises(densiray.DensirayError, match="percentile must be one of"):
        loaded.threshold(3)


# ---------------------------------------------------------------------------------------------------
# schedules, strategy, config (no Ray)


def _lrs(schedule: str, total: int, **kw) -> list[float]:
    from densiray.train.engine import lr_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, TrainConfig(lr=1.0, schedule=schedule, **kw), total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_learning_rate_schedules_warm_up_then_decay_to_zero():
    assert _lrs("constant", 5) == [1.0] * 5
    assert _lrs("constant", 6, warmup_steps=3) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert _lrs("linear", 6, warmup_steps=2) == pytest.approx([1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25])
    cos = _lrs("cosine", 10, warmup_fraction=0.2)
    assert cos[:3] == pytest.approx([1 / 3, 2 / 3, 1])
    assert cos[2:] == sorted(cos[2:], reverse=True) and cos[-1] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2)


def test_strategy_is_chosen_from_the_config_and_the_model_size():
    from densiray.train.engine import choose_strategy

    gib = 2**30
    assert choose_strategy(TrainConfig(), 10**6, 0, 16 * gib)[:2] == ("ddp", None)
    assert choose_strategy(TrainConfig(zero_stage=0), 10**6, 0, 16 * gib)[:2] == ("ddp", None)
    assert choose_strategy(TrainConfig(zero_stage=1), 10**6, 0, 16 * gib)[:2] == ("deepspeed", 1)
    assert choose_strategy(TrainConfig(strategy="deepspeed"), 10**6, 0, 16 * gib)[:2] == ("deepspeed", 2)
    # 1 B trainable parameters need ~16 GB of weights, gradients and AdamW moments: ZeRO-3
    assert choose_strategy(TrainConfig(), 10**9, 0, 16 * gib)[:2] == ("deepspeed", 3)
    assert choose_strategy(TrainConfig(strategy="ddp"), 10**9, 0, 16 * gib)[:2] == ("ddp", None)
    # a frozen base costs 4 bytes a parameter, not 16
    assert choose_strategy(TrainConfig(), 10**6, 10**9, 16 * gib)[:2] == ("ddp", None)


def test_train_config_refuses_unknown_and_contradictory_settings():
    from pydantic import ValidationError

    for bad in ({"warmup": 3}, {"warmup_steps": 2, "warmup_fraction": 0.1}, {"strategy": "ddp", "zero_stage": 2},
                {"strategy": "fsdp"}, {"ema_decay": 1.0}, {"grad_accum_steps": 0}, {"schedule": "step"},
                {"strategy": "deepspeed", "compile": True}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)


def test_step_generator_depends_on_seed_step_and_micro_step_only():
    from densiray.train.engine import step_generator

    def draw(*key):
        return torch.rand(4, generator=step_generator(*key))

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0)) and not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


def test_deepspeed_ops_build_into_the_venv_with_its_own_ninja(monkeypatch):
    """Every process builds DeepSpeed's JIT ops in the venv with the venv's ninja, whatever PATH says
    (two ninja versions record a build differently and rebuilt it in turn, ~40 s each time)."""
    import shutil
    import sys

    from densiray.train.engine import jit_build_env

    venv_ninja = shutil.which("ninja", path=str(Path(sys.prefix) / "bin"))
    if venv_ninja is None:
        pytest.skip("no ninja in this environment's bin")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    jit_build_env()
    assert shutil.which("ninja") == venv_ninja
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]) == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # a user's choice wins
    jit_build_env()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


def test_the_progress_thread_ends_when_its_queue_is_gone(ray_cluster):
    """The driver thread drawing a run's live view stops once the queue is gone (it retried in a loop,
    a core's worth of Python against the export after training)."""
    from densiray.train.engine import _ProgressWatcher

    seen = []
    watcher = _ProgressWatcher(seen.append)
    watcher.queue.put({"epoch": 0})
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen == [{"epoch": 0}]
    watcher.queue.shutdown(force=True)  # what a lost node, or stop() giving up on the thread, leaves
    watcher._thread.join(timeout=10)
    assert not watcher._thread.is_alive()


def test_workers_find_this_rays_state_api_by_address_not_by_searching_the_machine(ray_cluster):
    """Ray Train's placement-group cleaner queries the state API from a worker. Left to find it, Ray
    greps `ps` for GCS servers, and a second Ray instance on the machine made it raise "Found multiple
    active Ray instances" (its thread died, a run hung). A worker must resolve this instance's dashboard
    from its environment, and the state API must answer there."""
    import ray

    @ray.remote(num_cpus=0)
    def resolve():
        from ray.dashboard.utils import get_address_for_submission_client
        from ray.util.state import list_actors

        list_actors(limit=1)  # raises when the state API cannot be reached
        return os.environ.get("RAY_API_SERVER_ADDRESS"), get_address_for_submission_client(None)

    env_url, resolved = ray.get(resolve.remote(), timeout=60)
    assert env_url == resolved == f"http://{ray._private.worker.get_dashboard_url()}"  # this instance's own
    # and only its processes: in the driver it would override the address of every state and job API call
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


# ---------------------------------------------------------------------------------------------------
# in-process runs (workers: 0), as a notebook makes them


@pytest.mark.slow
def test_training_twice_in_process_works_and_records_strategy_and_nodes(ray_cluster, store):
    """Two densiray.api.train calls in one Python process (the in-process world of one is rebuilt), the
    second with DeepSpeed, gradient accumulation, a cosine schedule with warmup and an EMA."""
    import ray

    from densiray.api import train

    model = {**SMALL, "integration_samples": 128}
    first = {"workers": 0, "epochs": 2, "patience": 0}
    second = {"workers": 0, "epochs": 3, "patience": 0, "strategy": "deepspeed", "zero_stage": 2,
              "grad_accum_steps": 2, "schedule": "cosine", "warmup_steps": 2, "ema_decay": 0.9, "batch_size": 128}
    manifests = []
    for i, settings in enumerate((first, second)):
        out = train("dnmm", "moons", config={"n": 800}, overrides={"train": settings, "model": model},
                    name=f"twice-{i}", store=store, plot=False)
        assert out["epochs_run"] == settings["epochs"]
        manifests.append(json.loads((Path(out["path"]) / "manifest.json").read_text()))
    node = ray.get_runtime_context().get_node_id()
    for manifest, strategy in zip(manifests, ("ddp", "deepspeed")):
        prov = manifest["provenance"]
        assert prov["strategy"] == strategy and prov["rank_nodes"] == [node]
        assert math.isfinite(manifest["metrics"]["test_log_lik"])
    history = manifests[1]["provenance"]["history"]
    lrs = [h["lr"] for h in history]  # 512 rows / 128 = 4 steps an epoch, 12 in all; lr after each epoch
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert manifests[1]["provenance"]["zero_stage"] == 2


@pytest.mark.slow
def test_an_in_process_run_starts_no_ray_and_shows_its_epochs(tmp_path):
    """`workers: 0` is Ray Train's local mode: a notebook's run trains, reports every epoch to its live
    view and exports without starting a local Ray (which cost ~10 s and a dozen processes)."""
    import subprocess
    import sys

    script = f"""
import ray
from densiray.api import train
out = train("dnmm", "moons", config={{"n": 600}}, overrides={{"train": {{"workers": 0, "epochs": 2, "patience": 0}},
            "model": {SMALL!r}}}, name="local", store={str(tmp_path / "models")!r}, plot=False)
assert out["epochs_run"] == 2, out
assert not ray.is_initialized(), "an in-process run started Ray"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    assert "epoch 2/2" in done.stdout + done.stderr  # the live view's lines, drawn without a Ray queue


def _dies_at_epoch_2(task):
    """A copy of the DNMM ``task`` whose epoch 2 raises "killed": a run that dies mid-way."""
    import copy

    from densiray.train.dnmm import DNMMTask

    class Dies(DNMMTask):
        def batches(self, epoch, rank, world, batch_size):
            if epoch == 2:
                raise RuntimeError("killed")
            return super().batches(epoch, rank, world, batch_size)

    dying = copy.copy(task)
    dying.__class__ = Dies
    return dying


@pytest.mark.slow
def test_an_interrupted_in_process_run_resumes_with_its_ema(ray_cluster, store):
    """A run that dies after epoch 2 resumes there on the next fit: the loop state, the EMA (not a fresh
    copy of the weights) and its update count come back from the newest complete checkpoint."""
    task = build_task("dnmm", RunSpec(dataset="moons", n=800, model=SMALL))
    dying = _dies_at_epoch_2(task)
    tc = TrainConfig(workers=0, epochs=4, patience=0, ema_decay=0.8, lr=1e-2, batch_size=128)
    with pytest.raises(Exception, match="killed"):
        fit(dying, tc, name="ema-resume", storage=runs_uri(store))
    result = fit(task, tc, name="ema-resume", storage=runs_uri(store))
    history = result.state["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["resumed_from_epoch"] == 2
    assert result.state["ema_updates"] == result.state["step"] == 16
    d = Path(result.checkpoint_path)
    ema = load_file(str(d / "ema.safetensors"))
    raw = load_file(str(d / "deepspeed" / "state" / "model.safetensors"))  # the DDP engine's own state
    # the engine's own state leaves frozen tensors out (a DNMM's fixed base Gaussians); the EMA holds them all
    assert set(raw) <= set(ema) and any(not torch.equal(ema[k], raw[k]) for k in raw)
    if result.state["best_epoch"] == 3:  # the best weights are the EMA's, not the raw ones
        assert all(torch.equal(result.best_weights[k], ema[k]) for k in ema)


def test_an_epoch_replaces_the_base_mixture_only_with_a_significant_validation_gain(ray_cluster, store):
    """DNMM selection on iris's 24 validation rows: an epoch is a candidate only when its paired gain over
    the untrained base mixture is at least ``min_gain_se`` standard errors; otherwise the base is kept."""
    model = {**SMALL, "components": 2}
    tc = TrainConfig(workers=0, epochs=8, patience=0, lr=1e-2, batch_size=32)
    for margin in (0.0, 1.0, 1e6):
        task = build_task("dnmm", RunSpec(dataset="iris", model={**model, "min_gain_se": margin}))
        state = fit(task, tc, name=f"gain-{margin}", storage=runs_uri(store)).state
        history = state["history"]
        assert all(math.isfinite(h["val_gain_z"]) for h in history)
        candidates = [h for h in history if h["val_gain_z"] >= margin]
        expected = max([state["initial"], *(h["val_log_lik"] for h in candidates)])
        assert state["best"] == pytest.approx(expected, abs=1e-9)
        if state["best_epoch"] >= 0:
            assert history[state["best_epoch"]]["val_gain_z"] >= margin
        if margin == 0.0:  # any gain counts: the best raw validation score wins
            assert state["best"] == pytest.approx(max([state["initial"], *(h["val_log_lik"] for h in history)]))
        if margin == 1e6:
            assert state["best_epoch"] == -1 and state["best"] == state["initial"]
        else:
            assert history[0]["val_gain"] != 0  # training moved the model


def test_an_elastic_zero3_run_resumes_resharded_at_another_world_size(ray_cluster, store):
    """Elastic training (``min_workers``) under ZeRO-3: a 2-worker run that dies after epoch 2 resumes from
    its checkpoint, partitioned over 2 ranks, with the one worker the cluster has room for (2 x 1.5 CPUs
    do not fit 2 CPUs): DeepSpeed's universal checkpoint reshards weights and Adam moments for 1. The
    global batch, hence every gradient, is the same at any world size, so the run ends where the same
    config trained in one process (a world of one throughout, plain PyTorch) does, up to float round-off."""
    task = build_task("dnmm", RunSpec(dataset="moons", n=800, model=SMALL))
    first = TrainConfig(workers=2, zero_stage=3, epochs=4, patience=0, lr=1e-2, batch_size=128, max_failures=0)
    with pytest.raises(Exception, match="killed"):
        fit(_dies_at_epoch_2(task), first, name="elastic", storage=runs_uri(store))
    elastic = TrainConfig(**first.model_dump() | {"min_workers": 1, "cpus_per_worker": 1.5})
    result = fit(task, elastic, name="elastic", storage=runs_uri(store))
    history = result.state["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert [h["world"] for h in history] == [2, 2, 1, 1]
    assert history[-1]["resumed_from_epoch"] == 2 and (result.strategy, result.zero_stage) == ("deepspeed", 3)
    assert result.state["step"] == 16  # 512 training rows, batch 128: 4 steps an epoch at either size

    alone = fit(task, TrainConfig(workers=0, epochs=4, patience=0, lr=1e-2, batch_size=128), name="alone",
                storage=runs_uri(store))
    assert alone.strategy == "ddp" and alone.state["step"] == 16
    for h, a in zip(history, alone.state["history"]):  # a wrong Adam state after the reshard would show here
        assert h["val_log_lik"] == pytest.approx(a["val_log_lik"], abs=1e-4), (history, alone.state["history"])
