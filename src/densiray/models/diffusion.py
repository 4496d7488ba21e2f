"""Score-based diffusion priors of physical fields, conditioned zero-shot on coarse and sparse data.

Plain PyTorch (no Ray). The pieces, with the math:

**Denoiser and preconditioning** (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", EDM, github.com/NVlabs/edm). Fields are standardised per channel, so the data
scale is σ_d = 1. A U-Net F_θ is wrapped as the denoiser ::

    D_θ(x; σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x; c_noise(σ)),
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ,

and trained by denoising score matching, E_{σ, x, n} λ(σ) ‖D_θ(x + n; σ) − x‖², n ~ N(0, σ² I), with
ln σ ~ N(P_mean = −1.2, P_std = 1.2²) and λ(σ) = (σ² + σ_d²) / (σ σ_d)². Tweedie: the score is
∇ log p_σ(x) = (D(x; σ) − x) / σ².

**Samplers.** The probability-flow ODE of the variance-exploding process x_σ = x + σ n is
dx/dσ = (x − D(x; σ)) / σ. EDM's schedule σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
(ρ = 7) with Heun's second-order step solves it ("heun", deterministic); "stochastic" adds EDM's churn
(noise raised from σ_i to σ̂ = σ_i (1 + γ) before each step); "euler" is the first-order ODE step.

**Likelihood** (Song et al. 2021, score_sde). Along the ODE, d log p_σ(x(σ)) / dσ = −∇·f, so
log p_{σ_min}(x) = log N(x(σ_max); 0, (σ_max² + σ_d²) I) + ∫_{σ_min}^{σ_max} ∇·f(x(σ), σ) dσ, the
divergence estimated by Hutchinson's ε^T ∂f/∂x ε (Rademacher ε, fixed along a path), integrated with
Heun on a geometric σ grid. Reported in nats per dimension of the data's units.

**Zero-shot conditioning** on y = A(x) + η, η ~ N(0, σ_y² I), A a k×k block mean (coarse-graining),
point sensors, or both stacked. Two approximations of the likelihood score ∇_{x_σ} log p(y | x_σ),
both through Tweedie's x̂_0 = D(x_σ; σ):

* ``gaussian`` (score-based data assimilation, Rozet & Louppe 2023, github.com/francois-rozet/sda):
  p(y | x_σ) ≈ N(y; A(x̂_0), diag(σ_y² + γ σ² ‖a_i‖²)), added to the prior score inside the Heun
  sampler (D_post = D + σ² ∇ log p(y | x_σ)). ‖a_i‖² (1/k² for a k×k block mean, 1 for a point
  sensor) is the variance an isotropic error of x̂_0 leaves in observation i, so one γ serves both
  kinds (with γ alone, a γ small enough for block means makes point sensors diverge);
* ``dps`` (Chung et al. 2023, Diffusion Posterior Sampling): after each step,
  x ← x − ζ ∇_{x_σ} ‖y − A(x̂_0)‖² / ‖y − A(x̂_0)‖ (per field).

``n`` posterior samples give a per-pixel mean and standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from densiray.errors import DataError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusionConfig(BaseModel):
    """The ``model:`` section of ``densiray train diffusion`` (validated)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int | None = Field(None, ge=4, le=1024, description="field grid: the Kolmogorov output grid "
                                   "(default 64), or the grid user fields are block-averaged to")
    channels: int | None = Field(None, ge=1, description="set from the data")
    base: int = Field(32, ge=4, le=512, description="U-Net channels at full resolution")
    mults: list[int] = Field(default_factory=lambda: [1, 2, 2], description="channel multipliers per level")
    blocks: int = Field(1, ge=1, le=8, description="residual blocks per level")
    circular: bool = Field(True, description="circular padding (periodic fields)")
    symmetry: Literal["auto", "none", "translations", "kolmogorov"] = Field(
        "auto", description="symmetries of the fields' distribution that training samples at random (data "
        "augmentation): 'translations' periodic shifts in both axes; 'kolmogorov' the group of Kolmogorov flow "
        "forced by sin(k y) (shifts in x, and x -> -x with y -> y + half a forcing period and the vorticity's sign "
        "flipped); 'auto' 'kolmogorov' for the simulated dataset, 'none' for user fields")
    sigma_data: float = Field(1.0, gt=0)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights, exported (0: off)")
    simulation: dict = Field(default_factory=dict, description="Kolmogorov settings "
                             "(densiray.data.fields.KolmogorovConfig: trajectories, snapshots, fine, ...)")

    @field_validator("mults")
    @classmethod
    def _mults(cls, v: list[int]) -> list[int]:
        if not v or any(m < 1 for m in v) or len(v) > 6:
            raise ValueError("mults must be 1-6 positive integers")
        return v

    def check_grid(self, h: int, w: int) -> None:
        k = 2 ** (len(self.mults) - 1)
        if h % k or w % k:
            raise DataError(f"a {len(self.mults)}-level U-Net needs fields whose sides divide by {k}, got {h}x{w}")


# ---------------------------------------------------------------------------------------------------
# the network


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise, then a two-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), dim // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        a = c_noise[:, None] * self.freqs[None]
        return self.mlp(torch.cat([a.sin(), a.cos()], dim=1))


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, with the noise embedding as a scale and shift, twice; a residual."""

    def __init__(self, cin: int, cout: int, emb: int, pad: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, padding_mode=pad)
        self.emb = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode=pad)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(e)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net F_θ(x, c_noise): residual blocks per level, average-pool down, nearest up."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        c_in = config.channels or 1
        pad = "circular" if config.circular else "zeros"
        base, emb = config.base, 4 * config.base
        self.embed = NoiseEmbedding(emb)
        self.stem = nn.Conv2d(c_in, base, 3, padding=1, padding_mode=pad)
        widths = [base * m for m in config.mults]
        self.down = nn.ModuleList()
        skips, c = [base], base
        for level, w in enumerate(widths):
            for _ in range(config.blocks):
                self.down.append(ResBlock(c, w, emb, pad))
                c = w
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.AvgPool2d(2))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb, pad), ResBlock(c, c, emb, pad)])
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(config.blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb, pad))
                c = w
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c_in, 3, padding=1, padding_mode=pad))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        e = self.embed(c_noise)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, e) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), e)
            else:
                h = layer(h)
        return self.head(h)


class EDMDenoiser(nn.Module):
    """D_θ(x; σ) with EDM's preconditioning around a :class:`UNet` (σ: a tensor (B,) or a float)."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.sigma_data = config.sigma_data
        self.unet = UNet(config)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        s = sigma[:, None, None, None]
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        f = self.unet((c_in * x).to(x.dtype), (sigma.log() / 4).to(x.dtype))
        return c_skip * x + c_out * f.to(x.dtype)


def _ema_name(name: str) -> str:
    return "ema__" + name.replace(".", "__")


class DiffusionModule(nn.Module):
    """What the engine trains: the denoiser, plus an exponential moving average of its weights as
    buffers (so checkpoints carry it) when ``ema_decay`` > 0. ``forward`` uses the raw weights;
    :meth:`ema_state` gives the averaged ones (what is validated and exported)."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.denoiser = EDMDenoiser(config)
        self.ema_decay = config.ema_decay
        if self.ema_decay > 0:
            for name, p in self.denoiser.named_parameters():
                self.register_buffer(_ema_name(name), p.detach().clone())

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.denoiser(x, sigma)

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """ema ← β ema + (1 − β) θ, with β = min(decay, (1 + step) / (10 + step)) (a warm-up, so that short
        runs are not dominated by the initial weights). Skipped for partitioned (ZeRO-3) parameters."""
        if self.ema_decay <= 0:
            return
        beta = min(self.ema_decay, (1 + step) / (10 + step))
        for name, p in self.denoiser.named_parameters():
            e = getattr(self, _ema_name(name))
            if p.shape != e.shape:  # a ZeRO-3 partition: the engine gathers it only inside forward
                return
            e.lerp_(p.detach().to(e.dtype), 1 - beta)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The denoiser's state dict with the averaged weights (the raw ones when EMA is off)."""
        state = dict(self.denoiser.state_dict())
        if self.ema_decay > 0:
            for name, _ in self.denoiser.named_parameters():
                state[name] = getattr(self, _ema_name(name)).detach().clone()
        return state


def denoiser_from_training_state(config: DiffusionConfig, state: dict[str, torch.Tensor]) -> EDMDenoiser:
    """The inference denoiser (EMA weights when present) from a :class:`DiffusionModule` state dict."""
    module = DiffusionModule(config)
    module.load_state_dict(state)
    den = EDMDenoiser(config)
    den.load_state_dict(module.ema_state())
    return den.eval().requires_grad_(False)


def edm_loss(module: Callable, x: torch.Tensor, config: DiffusionConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's denoising score-matching loss with log-normal σ (noise from ``generator`` or torch's RNG)."""
    b = x.shape[0]
    rnd = torch.randn(b, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    sigma = (rnd * config.p_std + config.p_mean).exp()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    s = sigma[:, None, None, None]
    weight = (s**2 + config.sigma_data**2) / (s * config.sigma_data) ** 2
    d = module(x + noise * s, sigma)
    return (weight * (d.float() - x.float()) ** 2).mean()


# ---------------------------------------------------------------------------------------------------
# samplers


def edm_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's σ_0 = σ_max > ... > σ_{N−1} = σ_min, then σ_N = 0 (float64)."""
    i = torch.arange(steps, dtype=torch.float64)
    if steps == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        s = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def sample(denoise: Denoiser, shape: tuple, *, steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0,
           rho: float = 7.0, sampler: str = "heun", churn: float = 0.0, generator: torch.Generator | None = None,
           after_step: Callable | None = None, progress: bool = False, corrections: int = 0,
           tau: float = 0.5) -> torch.Tensor:
    """Solve the probability-flow ODE from x ~ N(0, σ_max² I) down to σ = 0.

    ``sampler``: "heun" (EDM Algorithm 1, deterministic), "euler", or "stochastic" (EDM Algorithm 2:
    before each step raise σ to σ̂ = σ (1 + γ), γ = min(churn/steps, √2 − 1), adding fresh noise, then
    Heun). ``after_step(x_next, x, x0_hat, sigma, sigma_next)`` may return a corrected x_next (DPS).

    ``corrections`` > 0 adds that many Langevin corrector steps after each step (predictor–corrector,
    Song et al. 2021; the setting of score-based data assimilation): with the score
    s = (D(x; σ) − x) / σ² at the new level σ, x ← x + δ s + √(2δ(1 − τ/2)) ε, δ = τ / mean(s²) per
    field. The factor (1 − τ/2) makes the step leave a Gaussian N(m, v I) with v = 1/mean(s²) exactly
    invariant (x − m ← (1 − τ)(x − m) + √(1 − (1 − τ)²) √v ε); plain unadjusted Langevin (√(2δ))
    inflates its variance by 1/(1 − τ/2). With a posterior denoiser the steps pull the sample toward the
    posterior at that level, which an ODE solver with an approximate likelihood term alone does not.
    δ is one number per field, so it is stable only while δ < 2 v_i for the sharpest direction i: with
    precise point sensors (posterior variance of their pixels far below the rest) keep τ small (0.1).
    """
    if sampler not in ("heun", "euler", "stochastic"):
        raise DataError(f"sampler must be heun, euler or stochastic, got {sampler!r}")
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * sigmas[0]
    gamma = min(churn / steps, math.sqrt(2) - 1) if sampler == "stochastic" else 0.0
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", unit="step", leave=False, disable=None)  # None: off where stderr is not a terminal
    for i in it:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_hat = s * (1 + gamma) if gamma > 0 else s
        if s_hat > s:
            x = x + math.sqrt(s_hat**2 - s**2) * torch.randn(shape, generator=generator, dtype=torch.float64)
        x0 = denoise(x.float(), torch.full((shape[0],), s_hat)).double()
        d = (x - x0) / s_hat
        x_next = x + (s_next - s_hat) * d
        if sampler != "euler" and s_next > 0:
            x0b = denoise(x_next.float(), torch.full((shape[0],), s_next)).double()
            x_next = x + (s_next - s_hat) * 0.5 * (d + (x_next - x0b) / s_next)
        if after_step is not None:
            x_next = after_step(x_next, x, x0, s_hat, s_next)
        for _ in range(corrections if s_next > 0 else 0):
            score = (denoise(x_next.float(), torch.full((shape[0],), s_next)).double() - x_next) / s_next**2
            delta = tau / score.pow(2).flatten(1).mean(1).clamp(min=1e-12).reshape(-1, *([1] * (len(shape) - 1)))
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            x_next = x_next + delta * score + (2 * delta * (1 - tau / 2)).sqrt() * noise
        x = x_next
    return x.float()


@torch.no_grad()
def _no_grad(fn, *a):
    return fn(*a)


def log_likelihood(denoise: Denoiser, x: torch.Tensor, *, steps: int = 32, sigma_min: float = 0.002,
                   sigma_max: float = 80.0, sigma_data: float = 1.0, hutchinson: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x) in nats per dimension (in the units ``x`` is in) by the probability-flow ODE.

    Heun on ``steps`` geometric σ intervals from σ_min to σ_max, Hutchinson estimate of ∇·f with
    ``hutchinson`` Rademacher probes (fixed along each path). Returns a (B,) tensor.
    """
    b = x.shape[0]
    dims = x[0].numel()
    sig = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), steps + 1, dtype=torch.float64))
    eps = [(torch.randint(0, 2, x.shape, generator=generator).float() * 2 - 1) for _ in range(hutchinson)]

    def f_div(z: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            z = z.detach().float().requires_grad_(True)
            f = (z - denoise(z, torch.full((b,), s))) / s
            div = torch.zeros(b, dtype=torch.float64)
            for k, e in enumerate(eps):
                (g,) = torch.autograd.grad((f * e).sum(), z, retain_graph=k < len(eps) - 1)
                div += (g * e).flatten(1).sum(1).double() / len(eps)
        return f.detach().double(), div

    z = x.double()
    integral = torch.zeros(b, dtype=torch.float64)
    for i in range(steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        h = s_next - s
        f1, d1 = f_div(z, s)
        z_pred = z + h * f1
        f2, d2 = f_div(z_pred, s_next)
        z = z + 0.5 * h * (f1 + f2)
        integral += 0.5 * h * (d1 + d2)
    var = sigma_max**2 + sigma_data**2
    log_pt = -0.5 * (z.flatten(1) ** 2).sum(1) / var - 0.5 * dims * math.log(2 * math.pi * var)
    return ((log_pt + integral) / dims).float()


# ---------------------------------------------------------------------------------------------------
# observations and conditioning


class Observation:
    """A linear observation operator A on fields (B, C, H, W) -> (B, m): block means of ``factor`` x
    ``factor`` tiles (all channels), point ``sensors`` (k, 3) rows (channel, i, j), or both stacked."""

    def __init__(self, shape: tuple[int, int, int], factor: int | None = None, sensors: np.ndarray | None = None):
        self.shape, self.factor = shape, factor
        self.sensors = None if sensors is None else torch.as_tensor(np.asarray(sensors, dtype=np.int64))
        if factor is None and self.sensors is None:
            raise DataError("give a coarse field, sensors, or both")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.factor is not None:
            parts.append(F.avg_pool2d(x, self.factor).flatten(1))
        if self.sensors is not None:
            c, i, j = self.sensors.unbind(1)
            parts.append(x[:, c, i, j])
        return torch.cat(parts, dim=1)

    def per_row(self, block: float, point: float) -> torch.Tensor:
        """One value per row of A: ``block`` for the block means, ``point`` for the point sensors."""
        c, h, w = self.shape
        parts = []
        if self.factor is not None:
            parts.append(torch.full((c * (h // self.factor) * (w // self.factor),), float(block)))
        if self.sensors is not None:
            parts.append(torch.full((len(self.sensors),), float(point)))
        return torch.cat(parts)

    def weights(self) -> torch.Tensor:
        """‖a_i‖² of every row of A: 1/k² for block means, 1 for point sensors."""
        return self.per_row(1.0 / self.factor**2 if self.factor else 0.0, 1.0)

    @property
    def size(self) -> int:
        c, h, w = self.shape
        m = 0 if self.factor is None else c * (h // self.factor) * (w // self.factor)
        return m + (0 if self.sensors is None else len(self.sensors))


def condition(denoise: Denoiser, op: Observation, y: torch.Tensor, sigma_y: float | torch.Tensor, n: int, *,
              steps: int = 64, method: str = "gaussian", gamma: float | torch.Tensor = 0.16, zeta: float = 0.5,
              sampler: str = "heun", churn: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0, generator: torch.Generator | None = None, progress: bool = False,
              corrections: int = 0, tau: float = 0.5) -> torch.Tensor:
    """``n`` posterior samples (n, C, H, W) given y = A(x) + N(0, σ_y²) (``y``: (m,), units of x).

    ``gamma``: the variance term of the Gaussian approximation, Var[x₀ | x_σ] ≈ γ σ² I (one value, or one per
    row of A); ``corrections``/``tau``: Langevin corrector steps with the posterior score after each step
    (``gaussian`` only; see :func:`sample`)."""
    y = y.float().reshape(1, -1)
    sigma_y = torch.as_tensor(sigma_y, dtype=torch.float32)
    shape = (n, *op.shape)
    if method == "gaussian":
        a2 = op.weights()

        def posterior(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            sigma = float(s[0])
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                x0 = denoise(x, s)
                r = y - op(x0)
                log_p = -0.5 * (r**2 / (sigma_y**2 + gamma * sigma**2 * a2)).sum()
                (g,) = torch.autograd.grad(log_p, x)
            return x0.detach() + sigma**2 * g

        return sample(posterior, shape, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                      sampler=sampler, churn=churn, generator=generator, progress=progress,
                      corrections=corrections, tau=tau)
    if method == "dps":
        def step(x_next, x, x0, s, s_next):
            with torch.enable_grad():
                xi = x.detach().float().requires_grad_(True)
                r = y - op(denoise(xi, torch.full((n,), s)))
                norm = r.norm(dim=1)
                (g,) = torch.autograd.grad((norm**2 / norm.detach().clamp(min=1e-12)).sum(), xi)
            return x_next - zeta * g.double()

        den = lambda x, s: _no_grad(denoise, x, s)  # noqa: E731
        return sample(den, shape, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                      sampler="euler" if sampler == "heun" else sampler, churn=churn, generator=generator,
                      after_step=step, progress=progress)
    raise DataError(f"method must be 'gaussian' or 'dps', got {method!r}")


# ---------------------------------------------------------------------------------------------------
# the loaded model


MAX_N, MAX_STEPS = 512, 2000
DEFAULT_GAMMA, DEFAULT_CORRECTIONS, DEFAULT_TAU = 0.16, 0, 0.5
# Point sensors want a smaller gamma than block means, and how small it may be scales with 1/steps: on
# 64x64 validation fields with 5 % sensors at 64 steps, gamma 0.16 gave 1.12x RBF's RMSE, 0.08 1.00x and
# 0.05 0.93x, while 0.02 diverged at 64 steps and 0.04 at 32 (notes/diffusion.md). Default for point rows:
# POINT_GAMMA_STEPS / steps (0.0625 at 64 steps), about twice the stability edge; never above DEFAULT_GAMMA.
POINT_GAMMA_STEPS = 4.0
DIVERGED = 10.0  # standardised units: a posterior sample's RMS, or its RMS miss of the observations


def default_gamma(steps: int) -> tuple[float, float]:
    """The default (block-mean rows, point-sensor rows) gamma for ``steps`` sampler steps."""
    return DEFAULT_GAMMA, min(DEFAULT_GAMMA, POINT_GAMMA_STEPS / steps)


def _float(value) -> float:
    """``value`` as a float, NaN when it is not a number (the caller's range check then refuses it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise DataError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return int(value)


def _finite_array(value, name: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be an array of numbers") from None
    if not np.isfinite(a).all():
        raise DataError(f"{name} contains NaN or inf")
    return a


class DiffusionModel:
    """An exported diffusion prior: unconditional samples and zero-shot posterior samples (data units).

    ``shape`` is (C, H, W); fields are standardised per channel by the training data's ``mean`` and
    ``std`` inside. Satisfies :class:`densiray.capabilities.ConditionalSampler`.
    """

    def __init__(self, denoiser: EDMDenoiser, mean: np.ndarray, std: np.ndarray, manifest: dict | None = None):
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.config: DiffusionConfig = denoiser.config
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        manifest = manifest or {}
        self.manifest = manifest
        self.name: str = manifest.get("name", "")
        self.kind: str = manifest.get("kind", "diffusion")
        self.metrics: dict = manifest.get("metrics", {})
        c = self.config.channels or 1
        r = self.config.resolution
        self.shape: tuple[int, int, int] = (c, r, r)

    def __repr__(self) -> str:
        return f"DiffusionModel(name={self.name!r}, shape={self.shape})"

    def _norm(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def _denorm(self, z: np.ndarray) -> np.ndarray:
        return z * self.std[:, None, None] + self.mean[:, None, None]

    def _den(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, s)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, steps: int = 32, sampler: str = "heun", churn: float = 0.0) -> np.ndarray:
        """``n`` unconditional fields (n, C, H, W) in data units."""
        n = _int(n, "n", 1, MAX_N)
        steps = _int(steps, "steps", 1, MAX_STEPS)
        g = torch.Generator().manual_seed(int(seed))
        c = self.config
        z = sample(self._den, (n, *self.shape), steps=steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                   rho=c.rho, sampler=sampler, churn=churn, generator=g)
        return self._denorm(z.double().numpy())

    def log_likelihood(self, x, steps: int = 32, seed: int = 0, hutchinson: int = 1) -> np.ndarray:
        """log p(x) per field in nats per dimension of the data's units (probability-flow ODE)."""
        a = self._fields(x, "x")
        z = torch.as_tensor(self._norm(a), dtype=torch.float32)
        g = torch.Generator().manual_seed(int(seed))
        c = self.config
        ll = log_likelihood(self._den, z, steps=steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                            sigma_data=c.sigma_data, hutchinson=hutchinson, generator=g).double().numpy()
        return ll - float(np.mean(np.log(self.std)))  # the standardisation's Jacobian, per dimension

    def _fields(self, x, name: str) -> np.ndarray:
        a = _finite_array(x, name)
        if a.ndim == 2 and self.shape[0] == 1:
            a = a[None, None]
        elif a.ndim == 3 and a.shape == self.shape:
            a = a[None]
        elif a.ndim == 3 and self.shape[0] == 1:
            a = a[:, None]
        if a.ndim != 4 or tuple(a.shape[1:]) != self.shape:
            raise DataError(f"{name} must be fields of shape {self.shape} (or a batch of them), got {np.shape(x)}")
        return a

    def observations(self, coarse=None, factor=None, sensors=None) -> tuple[Observation, np.ndarray]:
        """The operator A and the observation vector y (data units) of a request (validated)."""
        c, h, w = self.shape
        parts, f, idx = [], None, None
        if coarse is None and factor is not None:
            raise DataError("factor needs a coarse field")
        if coarse is not None:
            a = _finite_array(coarse, "coarse")
            if a.ndim == 2 and c == 1:
                a = a[None]
            if a.ndim != 3 or a.shape[0] != c or a.shape[1] < 1 or a.shape[2] < 1:
                raise DataError(f"coarse must have shape (h, w){' or ' if c == 1 else ''}(C={c}, h, w), got {np.shape(coarse)}")
            if factor is None:
                if h % a.shape[1] or w % a.shape[2] or h // a.shape[1] != w // a.shape[2]:
                    raise DataError(f"a coarse field of {a.shape[1]}x{a.shape[2]} does not tile the {h}x{w} grid")
                f = h // a.shape[1]
            else:
                f = _int(factor, "factor", 1, max(h, w))
                if h % f or w % f:
                    raise DataError(f"factor {f} does not divide the {h}x{w} grid")
                if a.shape[1:] != (h // f, w // f):
                    raise DataError(f"with factor {f} the coarse field must be {h // f}x{w // f}, got {a.shape[1]}x{a.shape[2]}")
            parts.append(a.reshape(-1))
        if sensors is not None:
            s = _finite_array(sensors, "sensors")
            if s.ndim == 1 and s.size in (3, 4):
                s = s[None]
            if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] not in ((3, 4) if c == 1 else (4,)):
                form = "[i, j, value]" if c == 1 else "[channel, i, j, value]"
                raise DataError(f"sensors must be rows of {form}, got an array of shape {s.shape}")
            if s.shape[1] == 3:
                s = np.concatenate([np.zeros((len(s), 1)), s], axis=1)
            pos = s[:, :3]
            if (pos != np.round(pos)).any():
                raise DataError("sensor positions must be integers")
            pos = pos.astype(np.int64)
            bad = (pos[:, 0] < 0) | (pos[:, 0] >= c) | (pos[:, 1] < 0) | (pos[:, 1] >= h) | (pos[:, 2] < 0) | (pos[:, 2] >= w)
            if bad.any():
                r = s[np.argmax(bad)]
                raise DataError(f"sensor at {[int(v) for v in r[:3]]} is outside the {c}x{h}x{w} grid")
            idx = pos
            parts.append(s[:, 3])
        if not parts:
            raise DataError("give a coarse field, sensors, or both")
        return Observation(self.shape, f, idx), np.concatenate(parts)

    def condition(self, coarse=None, factor=None, sensors=None, noise: float = 0.1, n: int = 8, steps: int = 64,
                  seed: int = 0, return_samples: bool = False, method: str = "gaussian", gamma: float | None = None,
                  zeta: float | None = None, sampler: str = "heun", churn: float = 0.0,
                  corrections: int | None = None, tau: float | None = None) -> dict:
        """Posterior mean and per-pixel std of the field given observations (data units).

        ``coarse``: the k×k block means of the field, (h, w) (or (C, h, w)); ``factor`` k (inferred from
        the shapes when omitted); ``sensors``: rows [i, j, value] (or [channel, i, j, value]); ``noise``:
        the observation noise σ_y (data units, > 0). Returns {"mean", "std"} arrays (H, W) for one
        channel (else (C, H, W)), "samples" (n, ...) on request, and the settings used.
        """
        n = _int(n, "n", 1, MAX_N)
        steps = _int(steps, "steps", 1, MAX_STEPS)
        noise = _float(noise)
        if not math.isfinite(noise) or noise <= 0:
            raise DataError(f"noise must be a positive number, got {noise!r}")
        if method not in ("gaussian", "dps"):
            raise DataError(f"method must be 'gaussian' or 'dps', got {method!r}")
        op, y = self.observations(coarse, factor, sensors)
        # A commutes with the per-channel standardisation (block means and point reads keep constants)
        ch = np.concatenate(([np.repeat(np.arange(self.shape[0]), (self.shape[1] // op.factor) * (self.shape[2] // op.factor))]
                             if op.factor else []) + ([op.sensors[:, 0].numpy()] if op.sensors is not None else []))
        ch = ch.astype(np.int64)
        y_norm = (y - self.mean[ch]) / self.std[ch]
        sigma_y = torch.as_tensor(noise / self.std[ch], dtype=torch.float32)
        if gamma is None:  # per row: block means and point sensors (see default_gamma)
            g_block, g_point = default_gamma(steps)
        else:
            g_block = g_point = _float(gamma)
            if not math.isfinite(g_block) or g_block <= 0:
                raise DataError(f"gamma must be a positive number, got {gamma!r}")
        zeta = 0.5 if zeta is None else float(zeta)
        g = torch.Generator().manual_seed(int(seed))
        c = self.config
        corrections = DEFAULT_CORRECTIONS if corrections is None else _int(corrections, "corrections", 0, 8)
        tau = DEFAULT_TAU if tau is None else _float(tau)
        if not 0 < tau <= 2:
            raise DataError(f"tau must be in (0, 2], got {tau!r}")
        z = condition(self._den, op, torch.as_tensor(y_norm), sigma_y, n, steps=steps, method=method, gamma=op.per_row(g_block, g_point),
                      zeta=zeta, sampler=sampler, churn=churn, sigma_min=c.sigma_min, sigma_max=c.sigma_max, rho=c.rho,
                      generator=g, corrections=corrections, tau=tau)
        x = self._denorm(z.double().numpy())
        if not np.isfinite(x).all():
            raise DataError("posterior sampling diverged (NaN); lower zeta or raise gamma")
        # A too stiff guidance (gamma small for the step count) blows the samples up without a NaN: fields at
        # many times the data's scale, or missing the observations by many of the data's standard deviations
        # beyond their own noise (both in standardised units, where the data has std 1)
        scale = float(z.double().pow(2).mean().sqrt())
        miss = float((op(z.float()) - torch.as_tensor(y_norm, dtype=torch.float32)).pow(2).mean().sqrt())
        if scale > DIVERGED or miss > DIVERGED + 3 * float(sigma_y.max()):
            raise DataError(f"posterior sampling diverged (samples at {scale:.3g}x the data's scale, missing the "
                            f"observations by {miss:.3g} data stds): raise steps (now {steps}) or gamma, or lower zeta")
        squeeze = (lambda a: a[..., 0, :, :]) if self.shape[0] == 1 else (lambda a: a)  # noqa: E731
        out = {"mean": squeeze(x.mean(0)), "std": squeeze(x.std(0, ddof=1) if n > 1 else np.zeros(self.shape)),
               "n": n, "steps": steps, "method": method, "noise": noise, "factor": op.factor,
               "gamma": {"coarse": g_block if op.factor else None, "sensors": g_point if op.sensors is not None else None},
               "sensors": 0 if op.sensors is None else len(op.sensors)}
        if return_samples:
            out["samples"] = squeeze(x)
        return out


def load_exported(stored) -> DiffusionModel:
    """A :class:`DiffusionModel` from an exported diffusion prior (a verified StoredModel)."""
    from densiray.errors import StoreError

    manifest = stored.manifest
    try:
        config = DiffusionConfig(**manifest["config"]["model"])
        den = EDMDenoiser(config)
        den.load_state_dict(stored.tensors, strict=True)
        t = manifest["transform"]
        mean, std = np.asarray(t["mean"], dtype=np.float64), np.asarray(t["std"], dtype=np.float64)
        if mean.shape != (config.channels,) or std.shape != (config.channels,) or (std <= 0).any():
            raise ValueError("transform mean/std do not match the channels")
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise StoreError(f"model {stored.name!r} does not match its manifest ({msg}); export it again") from e
    return DiffusionModel(den, mean, std, manifest)
