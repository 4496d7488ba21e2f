"""Deep Neural Mixture Model (Trentin, Neural Processing Letters 2023, arXiv 2012.03391).

    p(x) = sum_i pi_i * phi_i(x) / Z_i

Hard constraints: ``pi`` on the simplex (softmax), every ``phi_i >= 0`` (built in log space), and
each component divided by its numerically estimated integral ``Z_i``. Soft constraint: the training
loss adds ``rho * sum_i (1 - Z_i)^2`` so that raw integrals stay near one.

Two variants of ``phi_i``, two classes sharing the mixture machinery of :class:`DNMM`
(``DNMM(cfg)`` builds the one ``cfg.variant`` names):

* ``bounded`` (:class:`BoundedDNMM`, paper-faithful): ``phi_i(x) = lambda_i * sigmoid(h_i(x))`` on a box around the training
  data (adaptive amplitude ``lambda_i``), zero outside it. ``Z_i`` by scrambled Sobol quasi-Monte
  Carlo over the box; its error grows quickly with the dimension, and points outside the box get
  ``log p = -inf``.
* ``proper`` (:class:`ProperDNMM`, default): ``phi_i(x) = q_i(x) * exp(g_i(x))`` with a learnable Gaussian ``q_i`` (full
  or diagonal covariance) and a bounded network ``g_i`` in ``[-B, U]`` (``B tanh(h_i / B)`` when ``U = B``). This is a density on
  all of R^d, so every point gets a finite log-density. ``Z_i = E_{q_i}[exp(g_i)]`` is estimated by
  importance sampling from ``q_i`` itself; since ``exp(g_i)`` lies in ``[e^-B, e^U]`` the estimator's
  relative variance is bounded whatever the dimension (it stays accurate at d = 64). Sampling is
  exact rejection sampling from ``q_i`` with acceptance ``exp(g_i - U)``. The bounds are asymmetric by
  default (B = 8 down, U = 4 up): a network must push its Gaussian far *down* off a thin structure, while
  a small U keeps rejection sampling efficient.

Training uses fresh Monte Carlo estimates of ``log Z`` each step (drawn from the step's generator, so
all ranks agree; reparameterised, so gradients reach the Gaussians when ``train_base``). By default the
Gaussians stay at the fitted GMM and only the networks and the weights learn: the GMM is already at
its likelihood optimum, and Adam's normalised steps move such parameters by noise. Inference uses normalisers frozen from a large sample
(:meth:`DNMM.freeze_normalizers`), so ``log_prob`` is deterministic and exactly reproducible.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

_ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}
_LOG_2PI = math.log(2 * math.pi)


class DNMMConfig(BaseModel):
    """Architecture and integration settings of a DNMM (validated; unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(0, ge=0, description="data dimension (set from the dataset)")
    components: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        "auto", description="number of mixture components c; auto: chosen with the base GMM by validation "
                            "(select_base), at most auto_max_components")
    auto_max_components: int = Field(
        8, ge=1, le=256, description="most components 'auto' may choose: a base mixture that already fits by "
                                     "itself leaves the networks nothing to learn (measured: 24 components on "
                                     "moons never improve on the GMM, 4-8 do)")
    hidden: int = Field(128, ge=1, le=4096, description="width of each component network (measured on moons: "
                                                        "128 generalises better than 64; notes/dnmm.md)")
    depth: int = Field(2, ge=1, le=8, description="hidden layers of each component network")
    activation: Literal["silu", "tanh", "relu", "gelu", "softplus"] = "silu"
    variant: Literal["proper", "bounded"] = "proper"
    covariance: Literal["full", "diag", "auto"] = Field(
        "auto", description="proper variant: base Gaussian covariance; auto: chosen with the base GMM")
    bound: float = Field(8.0, gt=0, le=20, description="proper variant: g_i >= -bound, how far a network can scale "
                         "its Gaussian down (thin structures need the range: measured on moons, 8 beats 4 by ~0.01 "
                         "nats)")
    upper_bound: float | None = Field(4.0, gt=0, le=20, description="proper variant: g_i <= upper_bound (None: = "
                                      "bound); rejection sampling accepts with probability exp(g_i - upper_bound), "
                                      "so a small upper bound keeps sampling efficient")
    rho: float = Field(0.1, ge=0, description="weight of the soft constraint rho * sum_i (1 - Z_i)^2")
    integration_samples: int = Field(512, ge=16, description="Monte Carlo samples per component per step")
    eval_integration_samples: int = Field(16384, ge=256, description="samples per component for evaluation "
                                          "(a fixed draw: every epoch is scored on the same points)")
    export_integration_samples: int = Field(131072, ge=1024, description="samples per component that freeze the "
                                            "trained model's normalisers, and draws of its recorded integral check "
                                            "(each); their cost grows with it, their noise shrinks as 1/sqrt")
    box_margin: float = Field(0.1, ge=0, description="bounded variant: box = data range widened by this fraction")
    init: Literal["gmm", "random"] = Field("gmm", description="start the base Gaussians from a fitted GMM")
    train_base: bool | None = Field(
        None, description="proper variant: train the base Gaussians too; default (None): only with init random. "
                          "From a fitted GMM they stay put and the networks (and weights) learn the correction "
                          "(measured: Adam moves near-optimal Gaussians by noise and lowers the likelihood)")
    min_gain_se: float = Field(
        1.0, ge=0, description="an epoch is selected over the untrained base mixture only when its paired gain "
                               "on the validation rows exceeds this many standard errors (0: any gain). Measured "
                               "on iris (24 validation rows): the best epoch's gain of +0.071 nats was 0.77 SE, "
                               "and on the test rows the trained model lost 0.244 nats to its base")
    warp: Literal["none", "maf", "nsf"] = Field(
        "none", description="proper variant: a normalizing flow u = T(x), fitted first and then frozen, under "
                            "which the mixture is built: p(x) = p_mixture(T(x)) |det dT/dx|")
    warp_transforms: int = Field(5, ge=1, le=32, description="flow transforms of the warp")
    warp_hidden: int = Field(128, ge=8, le=4096, description="width of the warp's 2 hidden layers")

    @model_validator(mode="after")
    def _consistent(self) -> DNMMConfig:
        if self.init == "random" and self.train_base is False and self.variant == "proper":
            raise ValueError("init: random needs train_base: true (random base Gaussians must be trained)")
        if self.warp != "none" and self.variant != "proper":
            raise ValueError("warp needs the proper variant")
        return self


def fit_gmm(x: np.ndarray, components: int, covariance: str, seed: int = 0):
    """The scikit-learn Gaussian mixture the proper variant starts from."""
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(components, covariance_type=covariance, reg_covar=1e-4, random_state=seed,
                           max_iter=200).fit(x)


def make_warp(cfg: DNMMConfig) -> nn.Module | None:
    """The (untrained) zuko flow of ``cfg.warp``, or None."""
    if cfg.warp == "none":
        return None
    import zuko

    cls = {"maf": zuko.flows.MAF, "nsf": zuko.flows.NSF}[cfg.warp]
    return cls(features=cfg.dim, transforms=cfg.warp_transforms, hidden_features=[cfg.warp_hidden] * 2)


def fit_flow(flow: nn.Module, train: np.ndarray, val: np.ndarray, *, seed: int = 0, lr: float = 1e-3,
             max_epochs: int = 1000, patience: int = 30, batch_size: int = 256) -> dict:
    """Maximum likelihood for a zuko flow with Adam and early stopping on validation (in place).

    Returns ``{"epochs", "val_log_lik"}``; ``flow`` ends at its best validation epoch.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    xt, xv = torch.as_tensor(train, dtype=torch.float32), torch.as_tensor(val, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    best, best_state, bad, epoch = -math.inf, None, 0, 0
    for epoch in range(max_epochs):  # noqa: B007  (the count is returned)
        flow.train()
        for idx in np.array_split(rng.permutation(len(xt)), max(1, len(xt) // batch_size)):
            loss = -flow().log_prob(xt[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flow.eval()
        with torch.no_grad():
            v = float(flow().log_prob(xv).mean())
        if v > best:
            best, best_state, bad = v, {k: t.clone() for k, t in flow.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    flow.load_state_dict(best_state)
    flow.eval()
    return {"epochs": epoch + 1, "val_log_lik": best}


def select_base(train: np.ndarray, val: np.ndarray, components: int | str = "auto", covariance: str = "auto",
                seed: int = 0, max_components: int = 32):
    """Choose the number of components and the covariance type of the base mixture by validation.

    Fits a Gaussian mixture for every candidate (c in 1..32, full and diagonal covariance, at least
    ~8 training rows per component, at most ``max_components``) on ``train`` and keeps the best mean log-likelihood on ``val``,
    the way the reference GMM is selected. Settings that are not "auto" are kept as given. Returns
    ``(components, covariance, val_log_lik, gmm)``; pass ``gmm`` to :meth:`DNMM.init_from_data`.
    """
    cs = [components] if components != "auto" else [c for c in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
                                                      if c == 1 or (len(train) / c >= 8 and c <= max_components)]
    covs = [covariance] if covariance != "auto" else ["full", "diag"]
    best = (-math.inf, 1, "full", None)
    for cov in covs:
        for c in cs:
            gmm = fit_gmm(train, c, cov, seed)
            score = float(gmm.score(val))
            if score > best[0]:
                best = (score, c, cov, gmm)
    return best[1], best[2], best[0], best[3]


class ComponentMLPs(nn.Module):
    """``c`` independent MLPs R^d -> R evaluated together with batched matrix products."""

    def __init__(self, c: int, d: int, hidden: int, depth: int, activation: str):
        super().__init__()
        sizes = [d] + [hidden] * depth
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(c, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(c, 1, fan_out).uniform_(-bound, bound)))
        # The output layer starts at zero: h_i = 0, so the model starts at its base densities.
        self.out_weight = nn.Parameter(torch.zeros(c, hidden, 1))
        self.out_bias = nn.Parameter(torch.zeros(c, 1, 1))
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, d) shared by all components, or (c, N, d) one batch per component -> (c, N)."""
        if x.dim() == 2:
            h = torch.einsum("nd,cdh->cnh", x, self.weights[0]) + self.biases[0]
        else:
            h = torch.bmm(x, self.weights[0]) + self.biases[0]
        h = self.act(h)
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = self.act(torch.bmm(h, w) + b)
        return (torch.bmm(h, self.out_weight) + self.out_bias).squeeze(-1)

    def forward_one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Component ``i`` alone on ``x`` (N, d) -> (N,)."""
        h = self.act(x @ self.weights[0][i] + self.biases[0][i])
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = self.act(h @ w[i] + b[i])
        return (h @ self.out_weight[i] + self.out_bias[i]).squeeze(-1)


def _randn(shape: tuple, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws from ``generator`` (which may live on the CPU while ``like`` is on a GPU)."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _logmeanexp(v: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(v, dim=dim) - math.log(v.shape[dim])


class DNMM(nn.Module):
    """A mixture of deep-network component densities; see the module docstring.

    The mixture machinery lives here: weights ``pi``, the component networks, Monte Carlo
    normalisers (trained afresh each step, frozen for inference), the loss, the independent integral
    check and rejection sampling. What a component *is* lives in the two variants, which override a
    few hooks (:meth:`log_phi`, :meth:`_log_z_weights`, :meth:`_proposal`, :meth:`_propose`):
    :class:`ProperDNMM` (Gaussian base times a bounded network, on all of R^d) and
    :class:`BoundedDNMM` (the paper's sigmoid components on a box).

    ``DNMM(cfg)`` builds the variant named by ``cfg.variant`` (see :func:`build_dnmm`).
    """

    variant: ClassVar[str] = ""
    #: whether the components sit on Gaussians fitted to the data (select_base chooses their number)
    has_gaussian_base: ClassVar[bool] = False
    #: how :meth:`integral` draws its proposal (recorded with the exported metrics)
    integral_method: ClassVar[str] = ""

    def __new__(cls, cfg: DNMMConfig | None = None, *args, **kwargs):
        target = cls
        if cls is DNMM:  # the base class builds the variant the config names
            if cfg is None:
                raise TypeError("DNMM(cfg) needs a DNMMConfig")
            target = VARIANTS[cfg.variant]
        return super().__new__(target)

    def __init__(self, cfg: DNMMConfig):
        super().__init__()
        if cfg.dim < 1:
            raise ValueError("DNMMConfig.dim must be set to the data dimension")
        if cfg.components == "auto" or cfg.covariance == "auto":
            raise ValueError("resolve components/covariance 'auto' first (select_base)")
        if cfg.variant != self.variant:
            raise ValueError(f"{type(self).__name__} is the {self.variant!r} variant, the config asks for {cfg.variant!r}")
        self.cfg = cfg
        c, d = cfg.components, cfg.dim
        self.logits = nn.Parameter(torch.zeros(c))
        self.nets = ComponentMLPs(c, d, cfg.hidden, cfg.depth, cfg.activation)
        self.warp: nn.Module | None = None  # a frozen flow under the mixture (the proper variant's option)
        # Frozen normalisers for inference (see freeze_normalizers); 0 = not yet frozen.
        self.register_buffer("log_z", torch.zeros(c))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.int64))

    # ----------------------------------------------------------------- variant hooks
    def init_from_data(self, x: np.ndarray, seed: int = 0, gmm=None) -> None:
        """Data-dependent initialisation (see the variants)."""
        raise NotImplementedError

    def log_phi(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised log component densities log phi_i(x): (N, d) -> (c, N)."""
        raise NotImplementedError

    def _log_z_weights(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """(c, n) log importance weights whose mean (in exp) estimates each Z_i."""
        raise NotImplementedError

    def _proposal(self, m: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` draws of the integral check's proposal (mixture latent coordinates) and their log q."""
        raise NotImplementedError

    def _propose(self, i: int, m: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` rejection-sampling proposals for component ``i`` and their log acceptance probabilities."""
        raise NotImplementedError

    def to_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(u, log|det du/dx|)``: the coordinates the mixture lives in (x itself unless warped)."""
        return x, 0.0

    def from_latent(self, u: torch.Tensor) -> torch.Tensor:
        return u

    # ----------------------------------------------------------------- pieces
    def log_weights(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=0)

    def estimate_log_z(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Monte Carlo estimate of log Z_i with ``n`` samples per component.

        Returns ``(log_z, rel_se)``: the estimate (differentiable) and the relative standard error of
        ``Z_i`` (std of the importance weights / (sqrt(n) * mean)).
        """
        log_w = self._log_z_weights(n, generator)
        log_z = _logmeanexp(log_w, dim=1)
        with torch.no_grad():
            w = torch.exp(log_w - log_z.unsqueeze(1))
            rel_se = w.std(1) / math.sqrt(n)
        return log_z, rel_se

    # ----------------------------------------------------------------- densities
    def latent_log_prob(self, u: torch.Tensor, log_z: torch.Tensor | None = None) -> torch.Tensor:
        """log-density of the mixture itself, in its latent coordinates (= x without a warp)."""
        if log_z is None:
            if not int(self.frozen):
                raise RuntimeError("normalisers are not frozen: call freeze_normalizers() or pass log_z")
            log_z = self.log_z
        comp = self.log_weights().unsqueeze(1) + self.log_phi(u) - log_z.unsqueeze(1)
        return torch.logsumexp(comp, dim=0)

    def log_prob(self, x: torch.Tensor, log_z: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) for x of shape (N, d), with the frozen normalisers unless ``log_z`` is given."""
        u, ladj = self.to_latent(x)
        return self.latent_log_prob(u, log_z) + ladj

    def forward(self, x: torch.Tensor, n_mc: int | None = None, seed: int | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Log-densities of a batch (the engine's entry point, so ZeRO-3 can gather parameters).

        With ``n_mc`` the normalisers are estimated afresh from ``generator`` (or a new one seeded
        with ``seed``: a repeatable draw); without it the frozen ones are used. Returns ``log_prob``
        (N,), ``log_z`` (c,), ``rel_se`` (c,).
        """
        if n_mc is None:
            log_z, rel_se = self.log_z, torch.zeros_like(self.log_z)
        else:
            if generator is None and seed is not None:
                generator = torch.Generator(device=self.logits.device).manual_seed(seed)
            log_z, rel_se = self.estimate_log_z(n_mc, generator)
        return {"log_prob": self.log_prob(x, log_z), "log_z": log_z, "rel_se": rel_se}

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Negative log-likelihood plus the soft constraint ``rho * sum_i (1 - Z_i)^2``."""
        penalty = ((1 - torch.exp(out["log_z"])) ** 2).sum()
        return -out["log_prob"].mean() + self.cfg.rho * penalty

    @torch.no_grad()
    def freeze_normalizers(self, n: int = 131072, seed: int = 0, chunk: int = 16384) -> torch.Tensor:
        """Estimate every log Z_i from ``n`` samples and store it; returns the relative standard errors."""
        gen = torch.Generator(device=self.logits.device).manual_seed(seed)
        log_ws, rel = [], []
        for start in range(0, n, chunk):
            lz, rse = self.estimate_log_z(min(chunk, n - start), gen)
            log_ws.append(lz + math.log(min(chunk, n - start)))
            rel.append(rse)
        self.log_z.copy_(torch.logsumexp(torch.stack(log_ws), 0) - math.log(n))
        self.frozen.fill_(1)
        n_chunks = len(rel)
        return torch.stack(rel).pow(2).sum(0).sqrt() / n_chunks

    @torch.no_grad()
    def integral(self, n: int = 131072, seed: int = 1, chunk: int = 16384) -> tuple[float, float]:
        """An independent importance-sampling estimate of the integral of p and its standard error.

        Under a warp the integral is taken in its latent coordinates (a bijection preserves mass).
        The proposal is the variant's (:attr:`integral_method`), drawn with a seed different from
        the one used to freeze the normalisers.
        """
        gen = torch.Generator(device=self.logits.device).manual_seed(seed)
        ratios = []
        for start in range(0, n, chunk):
            x, log_q = self._proposal(min(chunk, n - start), gen)
            ratios.append(torch.exp(self.latent_log_prob(x) - log_q))
        r = torch.cat(ratios).double()
        return float(r.mean()), float(r.std() / math.sqrt(len(r)))

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, max_proposals: int = 50_000_000) -> tuple[torch.Tensor, float]:
        """Exact samples by rejection from each component's proposal; returns ``(samples, efficiency)``.

        Components are drawn by ``pi``; a proposal of component ``i`` (:meth:`_propose`) is kept with
        its acceptance probability. ``efficiency`` = accepted / proposed.
        """
        gen = torch.Generator(device=self.logits.device).manual_seed(seed)
        c, d = self.cfg.components, self.cfg.dim
        counts = torch.bincount(torch.multinomial(torch.exp(self.log_weights()), n, replacement=True, generator=gen),
                                minlength=c)
        out, proposed = [], 0
        for i in range(c):
            need, got = int(counts[i]), []
            rate = 0.5
            while need > 0:
                m = int(min(max(64, 1.2 * need / max(rate, 1e-3)), 1_000_000))
                x, log_acc = self._propose(i, m, gen)
                keep = torch.rand(m, generator=gen, device=x.device, dtype=x.dtype).log() < log_acc
                proposed += m
                rate = max(float(keep.float().mean()), 1e-4)
                got.append(x[keep][:need])
                need -= len(got[-1])
                if proposed > max_proposals:
                    raise RuntimeError(f"rejection sampling accepted too few proposals (rate {rate:.2e})")
            out.append(torch.cat(got) if got else torch.empty(0, d))
        samples = torch.cat(out)
        perm = torch.randperm(len(samples), generator=gen, device=samples.device)
        return self.from_latent(samples[perm]), n / max(proposed, 1)


class ProperDNMM(DNMM):
    """``phi_i(x) = q_i(x) exp(g_i(x))``: a Gaussian ``q_i`` times a bounded network, a density on R^d.

    ``g_i = squash(h_i(z_i))`` in ``[-B, U]`` is evaluated on the component's whitened coordinates
    ``z_i = L_i^-1 (x - mu_i)``, so ``Z_i = E_{z ~ N(0, I)}[exp(g_i(z))]`` needs only standard normal
    draws, and ``exp(g_i) in [e^-B, e^U]`` bounds the estimator's relative variance in any dimension.
    With ``train_base: false`` (default) the Gaussians stay where the fitted GMM put them and the
    networks (and weights ``pi``) learn the correction; optionally under a frozen flow warp.
    """

    variant = "proper"
    has_gaussian_base = True
    integral_method = "importance sampling from the base mixture"

    def __init__(self, cfg: DNMMConfig):
        super().__init__(cfg)
        c, d = cfg.components, cfg.dim
        self.loc = nn.Parameter(torch.randn(c, d) * 0.5)
        self.tril = nn.Parameter(torch.zeros(c, d, d))  # strictly lower part used (full covariance)
        self.log_diag = nn.Parameter(torch.zeros(c, d))
        self.warp = make_warp(cfg)
        self.train_base(cfg.train_base if cfg.train_base is not None else cfg.init == "random")

    def train_base(self, on: bool) -> None:
        """Whether the base Gaussians (means, covariances) receive gradients."""
        for p in (self.loc, self.tril, self.log_diag):
            p.requires_grad_(on)

    def init_from_data(self, x: np.ndarray, seed: int = 0, gmm=None) -> None:
        """Base Gaussians from a fitted GMM (``gmm``, e.g. from :func:`select_base`, else fitted to
        ``x``), or random data rows with the data's spread (``init: random``). The networks start
        at g = 0, so the initial model is exactly that mixture."""
        cfg = self.cfg
        with torch.no_grad():
            if cfg.init == "gmm":
                n_comp = gmm.n_components if gmm is not None else min(cfg.components, max(1, len(x) // 2))
                gmm = gmm if gmm is not None else fit_gmm(x, n_comp, cfg.covariance, seed)
                reps = int(math.ceil(cfg.components / n_comp))
                means = np.tile(gmm.means_, (reps, 1))[: cfg.components]
                covs = gmm.covariances_ if cfg.covariance == "full" else np.stack([np.diag(v) for v in gmm.covariances_])
                chol = np.linalg.cholesky(np.tile(covs, (reps, 1, 1))[: cfg.components])
                weights = np.tile(gmm.weights_, reps)[: cfg.components]
                self.loc.copy_(torch.as_tensor(means))
                self.tril.copy_(torch.as_tensor(np.tril(chol, -1)))
                self.log_diag.copy_(torch.as_tensor(np.log(np.diagonal(chol, axis1=1, axis2=2))))
                self.logits.copy_(torch.as_tensor(np.log(weights / weights.sum())))
            else:
                rng = np.random.default_rng(seed)
                idx = rng.choice(len(x), size=cfg.components, replace=len(x) < cfg.components)
                self.loc.copy_(torch.as_tensor(x[idx]))
                self.log_diag.copy_(torch.as_tensor(np.log(x.std(0) + 1e-3)).expand_as(self.log_diag))

    def scale_tril(self) -> torch.Tensor:
        diag = torch.diag_embed(torch.exp(self.log_diag))
        if self.cfg.covariance == "diag":
            return diag
        return torch.tril(self.tril, diagonal=-1) + diag

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Each component's whitened coordinates z_i = L_i^-1 (x - mu_i): (N, d) -> (c, N, d)."""
        diff = (x.unsqueeze(0) - self.loc.unsqueeze(1)).transpose(1, 2)  # (c, d, N)
        return torch.linalg.solve_triangular(self.scale_tril(), diff, upper=False).transpose(1, 2)

    def _base_log_prob_z(self, z: torch.Tensor) -> torch.Tensor:
        """log q_i from whitened coordinates (c, N, d) -> (c, N)."""
        return -0.5 * (z * z).sum(-1) - self.log_diag.sum(1, keepdim=True) - 0.5 * self.cfg.dim * _LOG_2PI

    def _base_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q_i(x) for all components: (N, d) -> (c, N)."""
        return self._base_log_prob_z(self._whiten(x))

    def _bounds(self) -> tuple[float, float]:
        """(lower, upper): g_i lies in [-lower, upper]."""
        lo = self.cfg.bound
        return lo, lo if self.cfg.upper_bound is None else self.cfg.upper_bound

    def _squash(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` mapped smoothly and monotonically onto ``(-lower, upper)`` with 0 -> 0, slope 1 at 0:
        ``g = m + r tanh(h / r + atanh(-m / r))`` with centre ``m = (upper - lower) / 2`` and radius
        ``r = (upper + lower) / 2`` (``B tanh(h / B)`` when both bounds are ``B``)."""
        lo, hi = self._bounds()
        m, r = (hi - lo) / 2, (hi + lo) / 2
        return m + r * torch.tanh(h / r + math.atanh(-m / r))

    def _g(self, z: torch.Tensor) -> torch.Tensor:
        """The bounded modulation g_i, evaluated on each component's whitened coordinates (c, N, d)."""
        return self._squash(self.nets(z))

    def log_phi(self, x: torch.Tensor) -> torch.Tensor:
        z = self._whiten(x)
        return self._base_log_prob_z(z) + self._g(z)

    def _log_z_weights(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        eps = _randn((self.cfg.components, n, self.cfg.dim), generator, self.logits)
        return self._g(eps)  # log phi/q at draws from q, in whitened coordinates

    def _sample_base(self, n: int, gen: torch.Generator | None) -> torch.Tensor:
        comp = torch.multinomial(torch.exp(self.log_weights()), n, replacement=True, generator=gen)
        eps = torch.randn(n, self.cfg.dim, generator=gen, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc[comp] + torch.einsum("nij,nj->ni", self.scale_tril()[comp], eps)

    def _proposal(self, m: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._sample_base(m, generator)
        return x, torch.logsumexp(self.log_weights().unsqueeze(1) + self._base_log_prob(x), 0)

    def _propose(self, i: int, m: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(m, self.cfg.dim, generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        x = self.loc[i] + eps @ self.scale_tril()[i].T
        return x, self._squash(self.nets.forward_one(i, eps)) - self._bounds()[1]

    # ----------------------------------------------------------------- the warp
    def set_warp(self, state: dict[str, torch.Tensor]) -> None:
        """Load a fitted warp and freeze it (the mixture is trained under a fixed warp)."""
        self.warp.load_state_dict(state)
        self.warp.requires_grad_(False)
        self.warp.eval()

    def to_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        if self.warp is None:
            return x, 0.0
        return self.warp.transform().call_and_ladj(x)

    def from_latent(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.warp is None else self.warp.transform().inv(u)


class BoundedDNMM(DNMM):
    """The paper's components: ``phi_i(x) = lambda_i sigmoid(h_i(x))`` on a box around the training
    data (adaptive amplitude ``lambda_i``), zero outside it; ``Z_i`` by scrambled Sobol quasi-Monte
    Carlo over the box. Points outside the box get ``log p = -inf``."""

    variant = "bounded"
    integral_method = "uniform Monte Carlo over the box"

    def __init__(self, cfg: DNMMConfig):
        super().__init__(cfg)
        d = cfg.dim
        self.log_amp = nn.Parameter(torch.zeros(cfg.components))
        self.register_buffer("lo", -3 * torch.ones(d))
        self.register_buffer("hi", 3 * torch.ones(d))

    def init_from_data(self, x: np.ndarray, seed: int = 0, gmm=None) -> None:
        """The box: the data range widened by ``box_margin``; every component starts uniform on it."""
        with torch.no_grad():
            lo, hi = x.min(0), x.max(0)
            pad = self.cfg.box_margin * (hi - lo) + 1e-3
            self.lo.copy_(torch.as_tensor(lo - pad))
            self.hi.copy_(torch.as_tensor(hi + pad))
            # sigmoid(0) = 1/2, so lambda = 2 / volume makes each component start uniform with Z = 1.
            self.log_amp.fill_(math.log(2.0) - self.log_volume().item())

    def log_volume(self) -> torch.Tensor:
        return torch.log(self.hi - self.lo).sum()

    def log_phi(self, x: torch.Tensor) -> torch.Tensor:
        inside = ((x >= self.lo) & (x <= self.hi)).all(1)
        log_phi = self.log_amp.unsqueeze(1) + nn.functional.logsigmoid(self.nets(x))
        return torch.where(inside.unsqueeze(0), log_phi, torch.full_like(log_phi, -math.inf))

    def _log_z_weights(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        c, d = self.cfg.components, self.cfg.dim
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                 device=generator.device if generator is not None else None))
        u = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(n * c)
        samples = self.lo + (self.hi - self.lo) * u.to(device=self.lo.device, dtype=self.lo.dtype).view(c, n, d)
        return (self.log_amp + self.log_volume()).unsqueeze(1) + nn.functional.logsigmoid(self.nets(samples))

    def _uniform(self, m: int, generator: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(m, self.cfg.dim, generator=generator, device=self.lo.device, dtype=self.lo.dtype)
        return self.lo + (self.hi - self.lo) * u

    def _proposal(self, m: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._uniform(m, generator), -self.log_volume().expand(m)

    def _propose(self, i: int, m: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._uniform(m, generator)
        return x, nn.functional.logsigmoid(self.nets.forward_one(i, x))


#: the DNMM class of each ``DNMMConfig.variant``
VARIANTS: dict[str, type[DNMM]] = {"proper": ProperDNMM, "bounded": BoundedDNMM}


def build_dnmm(cfg: DNMMConfig) -> DNMM:
    """The DNMM of ``cfg.variant`` (the same as ``DNMM(cfg)``)."""
    return VARIANTS[cfg.variant](cfg)


class DNMMEnsemble(nn.Module):
    """A mixture of trained DNMMs, ``p(x) = sum_k w_k p_k(x)``, itself a proper density with exact sampling.

    What a sweep exports with ``tune.ensemble: k`` (Caruana et al., "Ensemble selection from libraries of
    models", ICML 2004): the members are trials of one sweep, possibly of different architectures, and the
    weights ``w`` come from greedy selection on the validation rows (:func:`select_ensemble`). Each member
    keeps its own frozen normalisers, so ``log p`` is exact up to theirs; ``∫p = sum_k w_k ∫p_k``; a sample
    picks a member by ``w``, then samples it exactly.
    """

    def __init__(self, configs: list[DNMMConfig], weights: list[float]):
        super().__init__()
        if not configs or len(configs) != len(weights):
            raise ValueError("an ensemble needs one weight per member and at least one member")
        if len({c.dim for c in configs}) != 1:
            raise ValueError("the members of an ensemble must share the data dimension")
        w = torch.tensor(weights, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ValueError(f"ensemble weights must be positive, got {weights}")
        self.members = nn.ModuleList(DNMM(c) for c in configs)
        self.register_buffer("log_w", torch.log(w / w.sum()).float())
        self.integral_method = f"each member's ({self.members[0].integral_method}), weighted"

    @property
    def weights(self) -> list[float]:
        return [float(v) for v in self.log_w.exp()]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = logsumexp_k (log w_k + log p_k(x)), with every member's frozen normalisers."""
        return torch.logsumexp(torch.stack([lw + m.log_prob(x) for lw, m in zip(self.log_w, self.members)]), dim=0)

    @torch.no_grad()
    def integral(self, n: int = 131072, seed: int = 1, chunk: int = 16384) -> tuple[float, float]:
        """``sum_k w_k ∫p_k`` from each member's independent estimate, and its standard error."""
        est = [m.integral(n=n, seed=seed, chunk=chunk) for m in self.members]
        w = self.weights
        return (float(sum(wk * v for wk, (v, _) in zip(w, est))),
                float(math.sqrt(sum((wk * se) ** 2 for wk, (_, se) in zip(w, est)))))

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, max_proposals: int = 50_000_000) -> tuple[torch.Tensor, float]:
        """Exact samples: a member by ``w``, then its own exact sampler; returns ``(samples, efficiency)``."""
        gen = torch.Generator().manual_seed(seed)
        counts = torch.bincount(torch.multinomial(self.log_w.exp(), n, replacement=True, generator=gen),
                                minlength=len(self.members))
        out, proposed = [], 0.0
        for k, (m, c) in enumerate(zip(self.members, counts.tolist())):
            if c:
                x, eff = m.sample(c, seed=seed * 1000 + k + 1, max_proposals=max_proposals)
                out.append(x)
                proposed += c / max(eff, 1e-12)
        samples = torch.cat(out)
        return samples[torch.randperm(len(samples), generator=gen)], n / max(proposed, 1.0)


def select_ensemble(val_log_probs: list[np.ndarray], size: int) -> list[float]:
    """Weights of a mixture of at most ``size`` of the candidates, by greedy forward selection with
    replacement on their per-row validation log-densities (Caruana et al. 2004): start from the first
    (the sweep's winner), add the candidate that raises the mixture's mean validation log-likelihood most,
    stop when none does. Returns one weight per candidate (0 = left out); ``size`` 1 keeps the winner alone."""
    lp = np.stack([np.asarray(v, dtype=np.float64) for v in val_log_probs])  # (candidates, rows)

    def score(picks: list[int]) -> float:  # mean validation log-likelihood of the equal-weight mixture of picks
        return float(np.logaddexp.reduce(lp[picks], axis=0).mean() - math.log(len(picks)))

    picks = [0]
    for _ in range(4 * size):
        allowed = [j for j in range(len(lp)) if j in picks or len(set(picks)) < size]
        best = max(allowed, key=lambda j: score(picks + [j]))
        if score(picks + [best]) <= score(picks) + 1e-9:
            break
        picks.append(best)
    counts = np.bincount(picks, minlength=len(lp))
    return [float(c) / len(picks) for c in counts]
