"""The DNMM in plain PyTorch: normalisation, integral estimates, sampling, both variants."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from densiray.models.dnmm import DNMM, BoundedDNMM, DNMMConfig, ProperDNMM, build_dnmm, select_base


def _grid(lim: float, n: int):
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    return torch.stack([xx.ravel(), yy.ravel()], 1).float(), (g[1] - g[0]).item() ** 2


def _quadrature(m: DNMM):
    """log p on a 801 x 801 grid over [-8, 8]^2, the grid and its cell area."""
    x, cell = _grid(8.0, 801)
    with torch.no_grad():
        return x, m.log_prob(x).double(), cell


WARPED = {"warp": "nsf", "warp_transforms": 2, "warp_hidden": 16}


def _perturbed(variant: str, dim: int, seed: int = 0, **kw) -> DNMM:
    """A DNMM whose component networks (and warp) are far from zero, so normalisation really matters.

    ``variant="warped"``: the proper variant under a (randomly perturbed) NSF warp.
    """
    torch.manual_seed(seed)
    if variant == "warped":
        variant, kw = "proper", {**WARPED, **kw}
    m = DNMM(DNMMConfig(dim=dim, components=3, covariance="full", hidden=16, variant=variant, **kw))
    rng = np.random.default_rng(seed)
    m.init_from_data(rng.normal(size=(500, dim)), seed=seed)
    with torch.no_grad():
        m.nets.out_weight.normal_(0, 1.0)
        m.nets.out_bias.normal_(0, 1.0)
        m.logits.copy_(torch.tensor([0.0, 0.5, -0.5]))
        if m.warp is not None:
            for p in m.warp.parameters():
                p.add_(0.3 * torch.randn_like(p))
            m.warp.requires_grad_(False)
    return m.eval()


@pytest.mark.parametrize("variant", ["proper", "bounded", "warped"])
def test_density_integrates_to_one_by_quadrature(variant):
    m = _perturbed(variant, 2)
    m.freeze_normalizers(n=262144, seed=0)
    _, lp, cell = _quadrature(m)
    mass = torch.exp(lp).sum().item() * cell
    assert abs(mass - 1) < 0.01
    est, se = m.integral(n=131072, seed=1)
    assert abs(est - mass) < 4 * se + 2e-3


def test_proper_variant_is_finite_everywhere_and_bounded_is_not():
    proper, bounded = _perturbed("proper", 2), _perturbed("bounded", 2)
    proper.freeze_normalizers(n=8192)
    bounded.freeze_normalizers(n=8192)
    far = torch.tensor([[1e3, -1e3], [50.0, 0.0]])
    assert torch.isfinite(proper.log_prob(far)).all()
    assert torch.isinf(bounded.log_prob(far)).all()


def test_integral_estimator_stays_accurate_in_64_dimensions():
    m = _perturbed("proper", 64)
    rel_se = m.freeze_normalizers(n=65536, seed=0)
    assert rel_se.max() < 0.02
    est, se = m.integral(n=65536, seed=1)
    assert se < 0.02
    assert abs(est - 1) < 4 * se + 1e-3


@pytest.mark.parametrize("variant", ["proper", "bounded", "warped"])
def test_samples_match_the_density(variant):
    """Moments and E[log p] of exact samples against the same quantities by quadrature."""
    m = _perturbed(variant, 2)
    m.freeze_normalizers(n=262144, seed=0)
    x, lp, cell = _quadrature(m)
    w = torch.exp(lp) * cell
    w = w / w.sum()
    xd = x.double()
    mean = (w[:, None] * xd).sum(0)
    var = (w[:, None] * (xd - mean) ** 2).sum(0)
    neg_entropy = (w * torch.where(w > 0, lp, torch.zeros_like(lp))).sum()

    samples, eff = m.sample(20000, seed=3)
    assert samples.shape == (20000, 2) and 0 < eff <= 1
    s = samples.double()
    n = len(s)
    assert torch.all((s.mean(0) - mean).abs() < 4 * torch.sqrt(var / n))
    assert torch.all((s.var(0) / var - 1).abs() < 0.05)
    with torch.no_grad():
        lps = m.log_prob(samples).double()
    assert abs(lps.mean() - neg_entropy) < 4 * lps.std() / math.sqrt(n)
    again, _ = m.sample(20000, seed=3)
    assert torch.equal(samples, again)


def test_training_steps_raise_the_likelihood():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.3, (400, 2)), rng.normal(2, 0.3, (400, 2))]).astype(np.float32)
    m = DNMM(DNMMConfig(dim=2, components=2, covariance="diag", init="random"))
    assert m.loc.requires_grad  # init random trains the base Gaussians
    m.init_from_data(x)
    xt = torch.from_numpy(x)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    with torch.no_grad():
        before = m(xt, n_mc=4096, seed=0)["log_prob"].mean().item()
    for _ in range(150):
        out = m(xt, n_mc=256)
        loss = m.loss(xt, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = m(xt, n_mc=4096, seed=0)["log_prob"].mean().item()
    assert after > before + 0.5


def test_unfrozen_model_refuses_log_prob_and_bad_config():
    m = DNMM(DNMMConfig(dim=2, components=2, covariance="full"))
    with pytest.raises(RuntimeError, match="freeze_normalizers"):
        m.log_prob(torch.zeros(1, 2))
    with pytest.raises(ValueError):
        DNMM(DNMMConfig())
    with pytest.raises(ValueError, match="auto"):
        DNMM(DNMMConfig(dim=2))
    with pytest.raises(ValidationError, match="componnts"):
        DNMMConfig(dim=2, componnts=3)
    with pytest.raises(ValidationError, match="warp needs the proper variant"):
        DNMMConfig(dim=2, variant="bounded", warp="nsf")
    with pytest.raises(ValidationError, match="train_base"):
        DNMMConfig(dim=2, init="random", train_base=False)


@pytest.mark.parametrize("variant, cls", [("proper", ProperDNMM), ("bounded", BoundedDNMM)])
def test_each_variant_is_its_own_class_and_round_trips_its_state(variant, cls):
    cfg = DNMMConfig(dim=2, components=2, covariance="full", hidden=8, variant=variant)
    m = DNMM(cfg)
    assert type(m) is cls and type(build_dnmm(cfg)) is cls and m.variant == variant
    m.init_from_data(np.random.default_rng(0).normal(size=(200, 2)))
    m.freeze_normalizers(n=4096)
    again = DNMM(DNMMConfig(**cfg.model_dump()))  # what the loader does with an exported config
    again.load_state_dict(m.state_dict(), strict=True)
    x = torch.tensor([[0.1, -0.2], [1.0, 0.5]])
    assert torch.equal(m.log_prob(x), again.log_prob(x))
    with pytest.raises(ValueError, match="variant"):
        cls(cfg.model_copy(update={"variant": "bounded" if variant == "proper" else "proper"}))


def test_proper_variant_keeps_the_fitted_gaussians_unless_asked():
    x = np.random.default_rng(0).normal(size=(300, 2))
    fixed = DNMM(DNMMConfig(dim=2, components=2, covariance="full"))
    trained = DNMM(DNMMConfig(dim=2, components=2, covariance="full", train_base=True))
    random_init = DNMM(DNMMConfig(dim=2, components=2, covariance="full", init="random"))
    assert not any(p.requires_grad for p in (fixed.loc, fixed.tril, fixed.log_diag))
    assert fixed.logits.requires_grad and all(p.requires_grad for p in fixed.nets.parameters())
    assert trained.loc.requires_grad and random_init.loc.requires_grad
    fixed.init_from_data(x)
    # the networks start at g = 0: the initial model is the fitted Gaussian mixture itself
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(2, covariance_type="full", reg_covar=1e-4, random_state=0, max_iter=200).fit(x)
    fixed.freeze_normalizers(n=4096)
    assert np.allclose(fixed.log_prob(torch.tensor(x[:50], dtype=torch.float32)).detach().numpy(),
                       gmm.score_samples(x[:50]), atol=1e-4)


def test_select_base_picks_the_number_of_clusters_by_validation():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 6, size=(5, 3))
    x = np.concatenate([c + rng.normal(size=(300, 3)) for c in centers])
    rng.shuffle(x)
    c, cov, score, gmm = select_base(x[:1000], x[1000:])
    assert gmm.n_components == c
    assert c in (4, 6) and cov in ("full", "diag") and np.isfinite(score)
    assert select_base(x[:1000], x[1000:], components=2, covariance="diag")[:2] == (2, "diag")
