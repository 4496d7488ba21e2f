"""Diffusion priors: the Kolmogorov simulator, EDM sampling/likelihood against a known Gaussian prior,
zero-shot conditioning against the exact Gaussian posterior, input validation, and training/export/
loading/conditioning through the engine and the CLI on tiny fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densiray.capabilities import ConditionalSampler, capabilities
from densiray.data.fields import (
    KolmogorovConfig,
    Symmetry,
    field_statistics,
    kolmogorov,
    load_fields,
    simulate_kolmogorov,
    steady_state,
)
from densiray.errors import ConfigError, DataError
from densiray.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    EDMDenoiser,
    Observation,
    condition,
    log_likelihood,
    sample,
)

TINY_SIM = {"resolution": 16, "fine": 32, "trajectories": 4, "snapshots": 8, "spinup": 10.0, "interval": 1.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is much faster than several on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSIRAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser E[x0 | x] of a standard normal prior: x / (1 + σ²)."""
    return x / (1 + sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2)


# --- data ------------------------------------------------------------------------------------------


def test_kolmogorov_is_seeded_cached_and_statistically_steady(cache):
    f = kolmogorov(TINY_SIM, progress=False)
    assert f.x.shape == (32, 1, 16, 16) and f.x.dtype == np.float32 and np.isfinite(f.x).all()
    assert list(f.groups[:9]) == [0] * 8 + [1]
    assert len(list(cache.glob("fields/kolmogorov-*.npz"))) == 1
    again = kolmogorov(TINY_SIM, progress=False)  # from the cache
    np.testing.assert_array_equal(f.x, again.x)
    check = steady_state(f)
    assert check["steady"], check["relative_difference"]
    stats = field_statistics(f.x[:, 0])
    assert stats["enstrophy"] > 1 and stats["energy"] > 0.1
    assert np.argmax(stats["spectrum"][1:]) + 1 <= 5  # energy sits at the large (forcing) scales
    other = simulate_kolmogorov(KolmogorovConfig(**{**TINY_SIM, "seed": 1, "snapshots": 1}), progress=False)[0]
    assert not np.allclose(other[0], f.x[7])


def test_user_fields_and_their_errors(tmp_path):
    a = np.random.default_rng(0).normal(size=(6, 2, 8, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", a)
    np.savez(tmp_path / "f.npz", fields=a)
    assert load_fields(tmp_path / "f.npy").shape == (2, 8, 8)
    g = load_fields(tmp_path / "f.npz", resolution=4)
    assert g.shape == (2, 4, 4)
    np.testing.assert_allclose(g.x[0, 0, 0, 0], a[0, 0, :2, :2].mean(), rtol=1e-5)
    bad = a.copy()
    bad[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "flat.npy", a[:, 0, 0])
    for path, msg in [(tmp_path / "nan.npy", "NaN"), (tmp_path / "flat.npy", "shape"),
                      (tmp_path / "none.npy", "no such file")]:
        with pytest.raises(DataError, match=msg):
            load_fields(path)
    with pytest.raises(DataError, match="divide"):
        load_fields(tmp_path / "f.npy", resolution=3)


def test_the_kolmogorov_symmetry_group_commutes_with_the_flow():
    """Every element the training samples maps solutions to solutions: the vorticity equation's explicit part
    (advection and the forcing -k cos(k y); its linear part is isotropic) commutes with it. A reflection in y
    and a shift in y by less than half a forcing period do not, which shows the check can fail."""
    from densiray.data.fields import _initial_vorticity, _Spectral

    n, k = 32, 4
    sp = _Spectral(n)
    w = _initial_vorticity(n, 1, seed=3)[0]
    y = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    f = (-k * torch.cos(k * y))[:, None].expand(n, n)

    def rhs(v):
        return torch.fft.irfft2(sp.advection(torch.fft.rfft2(v)), s=(n, n)) + f

    sym = Symmetry("kolmogorov", (1, n, n), wavenumber=k)
    elements = np.array([[1, 5], [3, 0], [2, 7], [7, 31], [0, 3]])
    assert set(sym.draws(4096, 0)[:, 0]) == set(range(2 * k))
    scale = float(rhs(w).abs().max())
    for e in elements:
        def t(v, e=e):
            return sym.apply(v[None, None], e[None])[0, 0]
        assert float((rhs(t(w)) - t(rhs(w))).abs().max()) < 1e-9 * scale
    for t in (lambda v: torch.flip(v, (0,)), lambda v: torch.roll(v, 1, 0), lambda v: -torch.roll(v, n // (2 * k), 0)):
        assert float((rhs(t(w)) - t(rhs(w))).abs().max()) > 1e-2 * scale


def test_training_fields_are_augmented_by_the_data_symmetry(cache, tmp_path):
    from densiray.train.diffusion import DiffusionTask
    from densiray.train.task import rank_batches

    sim = {k: v for k, v in TINY_SIM.items() if k != "resolution"}
    task = DiffusionTask("kolmogorov", {"resolution": 16, "base": 8, "mults": [1, 2], "simulation": sim})
    assert task.symmetry.kind == "kolmogorov" and task.dataset["symmetry"] == "kolmogorov"
    a = torch.cat(list(task.batches(0, 0, 1, 8)))
    assert torch.equal(a, torch.cat(list(task.batches(0, 0, 1, 8))))  # reproducible
    assert not torch.equal(a, torch.cat(list(task.batches(1, 0, 1, 8))))
    rows = next(rank_batches(len(task.train_x), 0, 7, 0, 1, 8))
    raw = torch.from_numpy(task.train_x[rows.numpy()])
    assert not torch.equal(a[:8], raw)
    # the same fields in another orientation: per-field sums of squares about data zero are kept
    zero = torch.as_tensor(-task.mean / task.std, dtype=torch.float32)[None, :, None, None]
    torch.testing.assert_close(((a[:8] - zero) ** 2).sum((1, 2, 3)), ((raw - zero) ** 2).sum((1, 2, 3)))
    plain = DiffusionTask("kolmogorov", {"resolution": 16, "base": 8, "mults": [1, 2], "symmetry": "none",
                                         "simulation": sim})
    assert torch.equal(torch.cat(list(plain.batches(0, 0, 1, 8)))[:8], raw)
    # a simulated grid without room for the half-period shift (12 is not a multiple of 2k = 8): auto means none
    odd = DiffusionTask("kolmogorov", {"resolution": 12, "base": 8, "mults": [1, 2],
                                       "simulation": {**sim, "fine": 24}})
    assert odd.symmetry.kind == "none"
    np.save(tmp_path / "f.npy", np.random.default_rng(0).normal(size=(12, 1, 12, 12)).astype(np.float32))
    assert DiffusionTask(str(tmp_path / "f.npy"), {"base": 8, "mults": [1, 2]}).symmetry.kind == "none"
    with pytest.raises(ConfigError, match="model.symmetry: .*divide by 2k = 8"):
        DiffusionTask(str(tmp_path / "f.npy"), {"base": 8, "mults": [1, 2], "symmetry": "kolmogorov"})


# --- sampling, likelihood and conditioning against a known prior -----------------------------------


def test_heun_sampler_and_likelihood_match_a_gaussian_prior():
    g = torch.Generator().manual_seed(0)
    for sampler in ("heun", "stochastic"):
        x = sample(gaussian_denoiser, (256, 1, 8, 8), steps=32, sampler=sampler, churn=5, generator=g)
        assert abs(float(x.std()) - 1) < 0.08 and abs(float(x.mean())) < 0.05
    z = torch.randn(32, 1, 8, 8, generator=g)
    ll = log_likelihood(gaussian_denoiser, z, steps=64, generator=g)
    exact = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    assert float((ll - exact).abs().mean()) < 0.05


def test_gaussian_conditioning_recovers_the_exact_posterior():
    """Prior N(0, I), sensors y = x[s] + N(0, σ_y²): the observed pixels' posterior is N(y/(1+σ_y²),
    σ_y²/(1+σ_y²)); the others keep N(0, 1). The Gaussian approximation (variance σ_y² + γσ² instead of
    the exact σ_y² + σ²/(1+σ²)) is close to it for γ = 0.1, not exact."""
    shape = (1, 8, 8)
    sensors = np.array([[0, 1, 1], [0, 4, 6], [0, 7, 2]])
    op = Observation(shape, sensors=sensors)
    y = torch.tensor([2.0, -1.0, 0.5])
    s_y = 0.5
    x = condition(gaussian_denoiser, op, y, s_y, 256, steps=32, method="gaussian", gamma=0.1,
                  generator=torch.Generator().manual_seed(1))
    obs = x[:, 0, sensors[:, 1], sensors[:, 2]]
    np.testing.assert_allclose(obs.mean(0).numpy(), (y / (1 + s_y**2)).numpy(), rtol=0.2)
    np.testing.assert_allclose(obs.std(0).numpy(), math.sqrt(s_y**2 / (1 + s_y**2)), rtol=0.5)
    free = x[:, 0, 3, 3]
    assert abs(float(free.mean())) < 0.12 and abs(float(free.std()) - 1) < 0.1
    # DPS pulls the samples towards the observations too
    d = condition(gaussian_denoiser, op, y, s_y, 64, steps=32, method="dps", zeta=0.3,
                  generator=torch.Generator().manual_seed(2))
    err_dps = (d[:, 0, sensors[:, 1], sensors[:, 2]].mean(0) - y).abs().mean()
    assert float(err_dps) < float(y.abs().mean())
    # coarse-graining: the posterior mean's block means follow the coarse field
    coarse = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    op = Observation(shape, factor=4)
    x = condition(gaussian_denoiser, op, coarse.flatten(), 0.05, 64, steps=32, gamma=0.1,
                  generator=torch.Generator().manual_seed(4))
    got = torch.nn.functional.avg_pool2d(x, 4).mean(0).flatten()
    exact = coarse.flatten() * 16 / (16 + 0.05**2 * 16 * 16)  # block mean of N(0, I) has variance 1/16
    # (γσ² over-states the σ²/16 noise of a block mean at mid σ, so the pull is weaker than exact)
    ratio = float((got * exact).sum() / (exact * exact).sum())
    assert 0.5 < ratio < 1.3 and np.corrcoef(got.numpy(), exact.numpy())[0, 1] > 0.95


def test_langevin_corrections_keep_prior_and_posterior():
    """Predictor-corrector sampling (Langevin steps with the same score after each Heun step) leaves the
    N(0, I) prior and the exact sensor posterior where they were (only the discretisation changes). The
    step δ = τ/mean(s²) is one for all pixels, so τ must be small where observations make some pixels'
    posterior much sharper than the rest (stability needs δ < 2 x their variance)."""
    g = torch.Generator().manual_seed(5)
    x = sample(gaussian_denoiser, (256, 1, 8, 8), steps=16, corrections=2, tau=0.3, generator=g)
    assert abs(float(x.std()) - 1) < 0.08 and abs(float(x.mean())) < 0.05
    shape = (1, 8, 8)
    sensors = np.array([[0, 1, 1], [0, 4, 6], [0, 7, 2]])
    y, s_y = torch.tensor([2.0, -1.0, 0.5]), 0.5
    x = condition(gaussian_denoiser, Observation(shape, sensors=sensors), y, s_y, 256, steps=16, gamma=0.1,
                  corrections=1, tau=0.1, generator=torch.Generator().manual_seed(6))
    obs = x[:, 0, sensors[:, 1], sensors[:, 2]]
    np.testing.assert_allclose(obs.mean(0).numpy(), (y / (1 + s_y**2)).numpy(), rtol=0.2)
    np.testing.assert_allclose(obs.std(0).numpy(), math.sqrt(s_y**2 / (1 + s_y**2)), rtol=0.5)
    free = x[:, 0, 3, 3]
    assert abs(float(free.mean())) < 0.15 and abs(float(free.std()) - 1) < 0.12


def _untrained_model(c: int = 1, r: int = 16) -> DiffusionModel:
    config = DiffusionConfig(resolution=r, channels=c, base=8, mults=[1, 2])
    torch.manual_seed(0)
    return DiffusionModel(EDMDenoiser(config), np.zeros(c), np.ones(c), {"name": "t", "metrics": {}})


def test_condition_validates_its_input():
    m = _untrained_model()
    assert isinstance(m, ConditionalSampler) and "conditional_sampler" in capabilities(m)
    out = m.condition(coarse=np.zeros((4, 4)), sensors=[[0, 0, 1.0], [15, 15, -1.0]], n=3, steps=4,
                      return_samples=True)
    assert out["mean"].shape == (16, 16) and out["std"].shape == (16, 16) and out["samples"].shape == (3, 16, 16)
    assert out["factor"] == 4 and out["sensors"] == 2
    # default gamma per row: block means 0.16, point sensors 4/steps (never above 0.16)
    assert out["gamma"] == {"coarse": 0.16, "sensors": 0.16}
    assert m.condition(sensors=[[0, 0, 1.0]], n=2, steps=64)["gamma"] == {"coarse": None, "sensors": 4 / 64}
    assert m.condition(coarse=np.zeros((4, 4)), n=2, steps=4, gamma=0.3)["gamma"] == {"coarse": 0.3, "sensors": None}
    assert m.sample(2, seed=0, steps=3).shape == (2, 1, 16, 16)
    cases = [
        (dict(coarse=np.zeros((5, 5))), "does not tile"),
        (dict(coarse=np.zeros((4, 4)), factor=3), "does not divide"),
        (dict(coarse=np.zeros((4, 4)), factor=2), "must be 8x8"),
        (dict(coarse=np.zeros((2, 4, 4))), "shape"),
        (dict(coarse=[[np.nan] * 4] * 4), "NaN"),
        (dict(sensors=[[16, 0, 1.0]]), "outside"),
        (dict(sensors=[[1.5, 0, 1.0]]), "integers"),
        (dict(sensors=[[1, 2]]), "rows of"),
        (dict(), "coarse field, sensors"),
        (dict(coarse=np.zeros((4, 4)), noise=0), "noise"),
        (dict(coarse=np.zeros((4, 4)), n=0), "n must"),
        (dict(coarse=np.zeros((4, 4)), method="x"), "method"),
        (dict(coarse=np.zeros((4, 4)), corrections=-1), "corrections must"),
        (dict(coarse=np.zeros((4, 4)), tau=0), "tau"),
        (dict(coarse=np.zeros((4, 4)), gamma=-0.1), "gamma must"),
        # a guidance too stiff for the step count blows the samples up without a NaN: refused, not returned
        (dict(sensors=[[i, j, 1.0] for i, j in zip(range(0, 16, 2), range(1, 16, 2))], gamma=1e-3, steps=16),
         "diverged .* raise steps"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(DataError, match=msg):
            m.condition(**{"n": 2, "steps": 2, **kwargs})


# --- the engine, the store and the CLI --------------------------------------------------------------


def _train(store, workers: int, name: str, **train):
    import densiray.api as dr

    return dr.train("diffusion", "kolmogorov", name=name, store=store, plot=workers == 0, overrides={
        "model": {"resolution": 16, "base": 8, "mults": [1, 2], "simulation": {k: v for k, v in TINY_SIM.items()
                                                                               if k != "resolution"}},
        "train": {"epochs": 2, "workers": workers, "batch_size": 8, "zero_stage": 1, "lr": 1e-3, **train}})


def test_tune_diffusion_exports_the_trial_with_the_lowest_validation_loss(ray_cluster, store, cache):
    from densiray.store import Store
    from densiray.tune.sweep import tune

    sim = {k: v for k, v in TINY_SIM.items() if k != "resolution"}
    s = tune("diffusion", "kolmogorov", overrides={"model": {"resolution": 16, "mults": [1, 2], "simulation": sim}},
             space={"model.base": {"choice": [8, 16]}, "train.lr": {"loguniform": [1e-4, 3e-3]}},
             settings={"trials": 2, "epochs": 2}, name="kolmo-tuned", store=store)
    assert s["trials"] == 2 and s["errored"] == 0
    m = Store(store).read("kolmo-tuned").manifest
    rows = m["provenance"]["trials"]
    best = min(rows, key=lambda r: r["best_val_loss"])  # diffusion minimises its metric
    assert s["trial_id"] == best["trial_id"] and m["config"]["model"]["base"] == best["model.base"]


def test_train_export_load_and_condition(ray_cluster, store, cache, tmp_path):
    from densiray.store import load_model

    summary = _train(store, 0, "kolmo")
    m = summary["metrics"]
    assert math.isfinite(m["test_loss"]) and math.isfinite(m["test_log_lik"]) and m["shape"] == [1, 16, 16]
    model = load_model("kolmo", store)
    assert isinstance(model, DiffusionModel) and "conditional_sampler" in capabilities(model)
    assert model.shape == (1, 16, 16) and model.metrics["test_loss"] == m["test_loss"]
    truth = kolmogorov(TINY_SIM, progress=False).x[-1, 0]
    coarse = truth.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    out = model.condition(coarse=coarse, noise=0.1, n=4, steps=8, seed=0)
    assert out["mean"].shape == (16, 16) and (out["std"] >= 0).all()
    again = model.condition(coarse=coarse, noise=0.1, n=4, steps=8, seed=0)
    np.testing.assert_allclose(out["mean"], again["mean"])  # seeded
    # the CLI: densiray condition NAME --coarse FILE --sensors FILE --out DIR
    import argparse

    from densiray import condition as cond_cli

    np.save(tmp_path / "coarse.npy", coarse)
    np.savetxt(tmp_path / "sensors.csv", [[0, 0, truth[0, 0]], [5, 9, truth[5, 9]]], delimiter=",")
    np.save(tmp_path / "truth.npy", truth)
    parser = argparse.ArgumentParser()
    cond_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["condition", "kolmo", "--coarse", str(tmp_path / "coarse.npy"), "--sensors",
                              str(tmp_path / "sensors.csv"), "--truth", str(tmp_path / "truth.npy"), "--n", "3",
                              "--steps", "16", "--store", store, "--out", str(tmp_path / "out")])
    assert cond_cli.run(args) == 0
    mean = np.load(tmp_path / "out" / "mean.npy")
    assert mean.shape == (16, 16) and np.load(tmp_path / "out" / "std.npy").shape == (16, 16)
    assert (tmp_path / "out" / "condition.png").stat().st_size > 1000


@pytest.mark.slow
def test_train_on_two_ray_workers(ray_cluster, store, cache):
    summary = _train(store, 2, "kolmo2", cpus_per_worker=1)
    assert summary["epochs_run"] == 2 and math.isfinite(summary["metrics"]["test_loss"])


def test_a_sensors_file_may_have_a_header_row(tmp_path):
    from densiray.condition import read_array

    with_header, plain = tmp_path / "a.csv", tmp_path / "b.csv"
    with_header.write_text("i,j,value\n1,2,0.5\n3,3,-0.1\n")
    plain.write_text("1,2,0.5\n3,3,-0.1\n")
    assert read_array(str(with_header), "sensors").tolist() == read_array(str(plain), "sensors").tolist() == \
        [[1, 2, 0.5], [3, 3, -0.1]]
    bad = tmp_path / "c.csv"
    bad.write_text("i,j,value\n1,x,0.5\n")
    with pytest.raises(DataError, match="cannot read sensors file"):
        read_array(str(bad), "sensors")
