"""Physical fields for diffusion priors: a seeded 2-D Kolmogorov-flow simulator and user arrays.

The simulator integrates the 2-D incompressible Navier–Stokes equations in vorticity form on the
periodic square [0, 2π)², pseudo-spectrally::

    ∂ω/∂t + u·∇ω = ν ∇²ω − μ ω + f,     u = (∂ψ/∂y, −∂ψ/∂x),   ∇²ψ = −ω,

with viscosity ν = 1/Re (Re = 1000), linear drag μ = 0.1 and the Kolmogorov forcing of the body force
F = (sin(4y), 0), whose curl is f = −∂F_x/∂y = −4 cos(4y) (the setting of score-based data
assimilation, Rozet & Louppe 2023, github.com/francois-rozet/sda, which runs jax-cfd at 256² and
coarsens to 64²). Time stepping is IMEX: the low-storage third-order Runge–Kutta / Crank–Nicolson
scheme of Spalart, Moser & Rogers (1991, J. Comput. Phys. 96), implicit in the stiff linear part
L = −νk² − μ and explicit in advection and forcing N; each of its three sub-steps is::

    ω̂' = [(1 + α_i Δt L) ω̂ + Δt (γ_i N̂(ω̂) + ζ_i N̂_prev)] / (1 − β_i Δt L),

(its explicit part is stable on the imaginary axis, unlike Adams–Bashforth 2, which blows up on
advection-dominated modes), with the advection product de-aliased by the 2/3 rule. Several trajectories from random initial
vorticity (energy at wavenumbers near 4) run as one batch on a fine grid; after a spin-up a snapshot
is taken every ``interval`` time units and coarsened by block means to the output resolution.
Results are cached on disk (``$DENSIRAY_CACHE`` or ``~/.cache/densiray``, folder ``fields``) under a
hash of every setting, so a dataset is simulated once.

:func:`field_statistics` gives the radial energy spectrum E(k) and the enstrophy of fields, and
:func:`steady_state` compares them over the two halves of a run (a statistically steady flow has the
same statistics in both).

Users bring their own fields as ``.npy`` (an array ``(N, C, H, W)`` or ``(N, H, W)``) or ``.npz``
(key ``fields``/``x``/``data`` or its only array).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from densiray.errors import DataError

__all__ = ["Fields", "KolmogorovConfig", "simulate_kolmogorov", "kolmogorov", "load_fields", "field_statistics",
           "steady_state", "coarsen", "cache_dir", "Symmetry"]


class KolmogorovConfig(BaseModel):
    """Settings of a Kolmogorov-flow dataset (all of them enter the cache key)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(64, ge=4, le=1024, description="output grid (fields are resolution x resolution)")
    fine: int | None = Field(None, description="simulation grid; default: 4 x resolution, at least 64, at most 256")
    trajectories: int = Field(16, ge=1, le=4096, description="independent runs (held-out fields come from others)")
    snapshots: int = Field(32, ge=1, description="snapshots kept per trajectory")
    spinup: float = Field(40.0, ge=0, description="time units before the first snapshot")
    interval: float = Field(2.0, gt=0, description="time units between snapshots")
    reynolds: float = Field(1000.0, gt=0)
    drag: float = Field(0.1, ge=0)
    wavenumber: int = Field(4, ge=1, description="forcing sin(k y)")
    max_velocity: float = Field(5.0, gt=0, description="for the CFL time step")
    cfl: float = Field(0.8, gt=0, le=1.5)
    seed: int = 0

    def fine_grid(self) -> int:
        if self.fine is not None:
            return self.fine
        return max(64, min(256, 4 * self.resolution))

    def key(self) -> str:
        blob = json.dumps({**self.model_dump(), "fine": self.fine_grid(), "version": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Fields:
    """Fields ``x`` (N, C, H, W) float32 with their trajectory ids (for leak-free splits)."""

    name: str
    x: np.ndarray
    groups: np.ndarray
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]


def cache_dir() -> Path:
    """``$DENSIRAY_CACHE/fields`` or ``~/.cache/densiray/fields``."""
    root = os.environ.get("DENSIRAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "densiray")
    return Path(root) / "fields"


# ---------------------------------------------------------------------------------------------------
# the solver


class _Spectral:
    """Wavenumbers, the de-aliasing mask and the operators of an n x n periodic grid on [0, 2π)²."""

    def __init__(self, n: int, dtype=torch.float64):
        k = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype)
        kr = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype)
        self.ky, self.kx = torch.meshgrid(k, kr, indexing="ij")  # arrays are indexed [y, x]
        self.k2 = self.kx**2 + self.ky**2
        self.inv_k2 = torch.where(self.k2 > 0, 1.0 / self.k2.clamp(min=1e-30), torch.zeros_like(self.k2))
        cut = n / 3.0  # the 2/3 rule: keep |k| < n/3 in each direction
        self.mask = ((self.kx.abs() < cut) & (self.ky.abs() < cut)).to(dtype)
        self.n = n

    def velocity(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        psi = w_hat * self.inv_k2  # -k² ψ̂ = -ω̂
        u = torch.fft.irfft2(1j * self.ky * psi, s=(self.n, self.n))
        v = torch.fft.irfft2(-1j * self.kx * psi, s=(self.n, self.n))
        return u, v

    def advection(self, w_hat: torch.Tensor) -> torch.Tensor:
        """The spectrum of −u·∇ω, de-aliased."""
        w_hat = w_hat * self.mask
        u, v = self.velocity(w_hat)
        wx = torch.fft.irfft2(1j * self.kx * w_hat, s=(self.n, self.n))
        wy = torch.fft.irfft2(1j * self.ky * w_hat, s=(self.n, self.n))
        return -torch.fft.rfft2(u * wx + v * wy) * self.mask


# (alpha, beta, gamma, zeta) of the three sub-steps (Spalart, Moser & Rogers 1991, Appendix A)
_RK3_CN = ((29 / 96, 37 / 160, 8 / 15, 0.0), (-3 / 40, 5 / 24, 5 / 12, -17 / 60), (1 / 6, 1 / 6, 3 / 4, -5 / 12))


def _initial_vorticity(n: int, batch: int, seed: int, peak: float = 4.0, max_velocity: float = 3.0) -> torch.Tensor:
    """Random smooth vorticity with energy at wavenumbers near ``peak``, scaled to ``max_velocity``."""
    sp = _Spectral(n)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    k = sp.k2.sqrt()
    amp = k * torch.exp(-((k - peak) ** 2) / 2.0)
    w_hat = torch.fft.rfft2(noise) * amp
    w_hat[..., 0, 0] = 0
    u, v = sp.velocity(w_hat)
    speed = torch.sqrt(u**2 + v**2).amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    return torch.fft.irfft2(w_hat, s=(n, n)) * (max_velocity / speed)


def simulate_kolmogorov(config: KolmogorovConfig, progress: bool = True):
    """Run the flow; returns (fields (T*S, 1, r, r) float32, trajectory ids, info dict).

    Snapshots are ordered trajectory-major. ``info`` holds the time step, the steps taken and the
    enstrophy/energy time series of the fine grid (one value per snapshot, averaged over trajectories).
    """
    n, r = config.fine_grid(), config.resolution
    threads = torch.get_num_threads()
    if config.trajectories * n * n <= 2**18:  # small FFTs: thread overhead outweighs the work
        torch.set_num_threads(1)
    try:
        return _simulate(config, n, r, progress)
    finally:
        torch.set_num_threads(threads)


def _simulate(config: KolmogorovConfig, n: int, r: int, progress: bool):
    if n % r:
        raise DataError(f"the simulation grid {n} is not a multiple of the resolution {r}")
    sp = _Spectral(n, dtype=torch.float32)  # float32 FFTs: twice as fast, ample for a statistical dataset
    nu, mu = 1.0 / config.reynolds, config.drag
    dx = 2 * math.pi / n
    dt_cfl = config.cfl * dx / config.max_velocity
    sub = max(1, math.ceil(config.interval / dt_cfl))
    dt = config.interval / sub
    spin = math.ceil(config.spinup / dt)
    y = torch.arange(n, dtype=torch.float32) * dx
    forcing = (-config.wavenumber * torch.cos(config.wavenumber * y))[:, None].expand(n, n)
    f_hat = torch.fft.rfft2(forcing) * sp.mask
    lin = -nu * sp.k2 - mu
    stages = [(alpha, dt * gamma, dt * zeta, 1.0 / (1.0 - beta * dt * lin), 1.0 + alpha * dt * lin)
              for alpha, beta, gamma, zeta in _RK3_CN]

    w_hat = torch.fft.rfft2(_initial_vorticity(n, config.trajectories, config.seed).float()) * sp.mask
    out, enstrophy, energy = [], [], []
    total = spin + sub * config.snapshots
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"kolmogorov {n}² -> {r}²", unit="step", mininterval=1.0, leave=False, disable=None)
    step = 0
    with torch.no_grad():
        while step < total:
            prev = None
            for _, g_dt, z_dt, lhs, rhs in stages:
                nl = sp.advection(w_hat) + f_hat
                explicit = g_dt * nl if prev is None else g_dt * nl + z_dt * prev
                w_hat = (rhs * w_hat + explicit) * lhs
                prev = nl
            step += 1
            if bar is not None:
                bar.update(1)
            if step > spin and (step - spin) % sub == 0:
                w = torch.fft.irfft2(w_hat, s=(n, n))
                if not torch.isfinite(w).all():
                    raise DataError("the Kolmogorov simulation blew up; lower cfl or max_velocity settings")
                out.append(coarsen(w, n // r).float())
                u, v = sp.velocity(w_hat)
                enstrophy.append(float(0.5 * (w**2).mean()))
                energy.append(float(0.5 * (u**2 + v**2).mean()))
    if bar is not None:
        bar.close()
    fields = torch.stack(out, dim=1)  # (T, S, r, r)
    x = fields.reshape(-1, 1, r, r).numpy()
    groups = np.repeat(np.arange(config.trajectories), config.snapshots)
    info = {"dt": dt, "steps": total, "spinup_steps": spin, "fine": n,
            "enstrophy": enstrophy, "energy": energy}
    return x, groups, info


def coarsen(x, factor: int):
    """Block means over ``factor`` x ``factor`` tiles of the last two axes (torch or numpy)."""
    if factor == 1:
        return x
    *batch, h, w = x.shape
    y = x.reshape(*batch, h // factor, factor, w // factor, factor)
    return y.mean(axis=(-3, -1)) if isinstance(y, np.ndarray) else y.mean(dim=(-3, -1))


def kolmogorov(config: KolmogorovConfig | dict | None = None, *, cache: bool = True, progress: bool = True) -> Fields:
    """The Kolmogorov-flow dataset of ``config``, from the disk cache or simulated (then cached)."""
    if not isinstance(config, KolmogorovConfig):
        config = KolmogorovConfig(**(config or {}))
    path = cache_dir() / f"kolmogorov-{config.key()}.npz"
    meta = {"simulator": "densiray.data.fields.simulate_kolmogorov", "config": config.model_dump(),
            "fine": config.fine_grid(), "cache_key": config.key()}
    if cache and path.is_file():
        with np.load(path) as z:
            x, groups = z["x"], z["groups"]
            info = json.loads(str(z["info"]))
    else:
        x, groups, info = simulate_kolmogorov(config, progress=progress)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez_compressed(tmp, x=x, groups=groups, info=json.dumps(info))
            os.replace(tmp, path)
    return Fields(name="kolmogorov", x=np.ascontiguousarray(x, dtype=np.float32), groups=groups,
                  source=f"Kolmogorov flow simulation, cache {path.name}", meta={**meta, "info": info})


def load_fields(path: str | os.PathLike, resolution: int | None = None) -> Fields:
    """User fields from a ``.npy`` or ``.npz`` file: (N, C, H, W) or (N, H, W) finite numbers.

    ``resolution`` (optional) block-averages the fields down to it (it must divide H and W).
    """
    p = Path(path)
    if p.suffix.lower() not in (".npy", ".npz"):
        raise DataError(f"fields must be a .npy or .npz file, got {str(path)!r}")
    if not p.is_file():
        raise DataError(f"no such file: {path}")
    try:
        if p.suffix.lower() == ".npy":
            a = np.load(p, allow_pickle=False)
        else:
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("fields", "x", "data") if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"{path}: an .npz needs a 'fields' (or 'x') array or exactly one array; "
                                    f"it has {', '.join(keys)}")
                a = z[key]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {' '.join(str(e).split())}") from e
    if a.dtype.kind not in "fiu":
        raise DataError(f"{path}: fields must be numbers, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise DataError(f"{path}: fields must have shape (N, C, H, W) or (N, H, W), got {a.shape}")
    if a.shape[0] < 4:
        raise DataError(f"{path}: need at least 4 fields, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise DataError(f"{path}: fields contain NaN or inf")
    h, w = a.shape[-2:]
    if resolution is not None and resolution != h:
        if h != w or h % resolution:
            raise DataError(f"{path}: cannot coarsen {h}x{w} fields to {resolution}x{resolution} "
                            "(it must divide the grid)")
        a = coarsen(a, h // resolution)
    if min(a.shape[-2:]) < 4:
        raise DataError(f"{path}: fields must be at least 4x4, got {a.shape[-2:]}")
    return Fields(name=str(path), x=np.ascontiguousarray(a, dtype=np.float32), groups=np.arange(len(a)),
                  source=f"file {p.absolute()}")


# ---------------------------------------------------------------------------------------------------
# statistics


def field_statistics(w: np.ndarray) -> dict:
    """Radial energy spectrum and enstrophy of vorticity fields ``w`` (..., H, W) on [0, 2π)².

    With û the velocity's Fourier coefficients from the stream function ψ̂ = ω̂/k², the energy at
    integer shell k is E(k) = Σ_{k ≤ |κ| < k+1} ½|û(κ)|² (mean over fields), so Σ_k E(k) is the mean
    kinetic energy ½⟨|u|²⟩; enstrophy Z = ½⟨ω²⟩. Returns {"k", "spectrum", "energy", "enstrophy"}.
    """
    a = np.asarray(w, dtype=np.float64)
    h, wd = a.shape[-2:]
    a = a.reshape(-1, h, wd)
    w_hat = np.fft.fft2(a) / (h * wd)
    ky = np.fft.fftfreq(h, 1.0 / h)[:, None]
    kx = np.fft.fftfreq(wd, 1.0 / wd)[None, :]
    k2 = kx**2 + ky**2
    e_density = 0.5 * np.abs(w_hat) ** 2 / np.where(k2 > 0, k2, np.inf)  # ½|û|² = ½|ω̂|²/k²
    shells = np.floor(np.sqrt(k2)).astype(int)
    kmax = min(h, wd) // 2
    spectrum = np.array([e_density[:, shells == k].sum(axis=1).mean() for k in range(kmax + 1)])
    return {"k": list(range(kmax + 1)), "spectrum": spectrum.tolist(), "energy": float(e_density.sum(axis=(1, 2)).mean()),
            "enstrophy": float(0.5 * (a**2).mean())}


def steady_state(fields: Fields | np.ndarray, groups: np.ndarray | None = None, tolerance: float = 0.25) -> dict:
    """Compare the statistics of the first and second half of every trajectory's snapshots.

    A statistically steady flow has the same enstrophy, energy and spectrum (over the resolved
    shells up to k = 8) in both halves, up to sampling noise: ``steady`` is True when every relative
    difference is below ``tolerance``. Returns the numbers too.
    """
    x = fields.x if isinstance(fields, Fields) else np.asarray(fields)
    g = fields.groups if isinstance(fields, Fields) else (groups if groups is not None else np.zeros(len(x), int))
    first, second = [], []
    for gid in np.unique(g):
        idx = np.flatnonzero(g == gid)
        half = len(idx) // 2
        first.extend(idx[:half])
        second.extend(idx[half:2 * half])
    if not first:
        raise DataError("steady_state needs at least two snapshots per trajectory")
    a, b = field_statistics(x[first, 0]), field_statistics(x[second, 0])
    ka = min(9, len(a["spectrum"]))
    sa, sb = np.array(a["spectrum"][1:ka]), np.array(b["spectrum"][1:ka])
    rel = {"enstrophy": abs(a["enstrophy"] - b["enstrophy"]) / a["enstrophy"],
           "energy": abs(a["energy"] - b["energy"]) / a["energy"],
           "spectrum": float(np.abs(np.log(sa / sb)).mean())}
    return {"steady": bool(all(v < tolerance for v in rel.values())), "relative_difference": rel,
            "first_half": a, "second_half": b}


class Symmetry:
    """A group of transformations that leaves the fields' distribution unchanged, sampled per field to
    augment training data (a prior trained on every transformed copy learns the symmetric score it should).

    * ``translations``: periodic shifts by any number of pixels in both axes (statistically homogeneous
      fields in a periodic box).
    * ``kolmogorov``: Kolmogorov flow forced by sin(k y) along the first grid axis (y). Its vorticity's law is
      invariant under shifts in x and under the shift-reflect S: ω(x, y) -> −ω(−x, y + π/k), half a forcing
      period (S² is a shift by one period); 2k · W elements on a W-wide grid. Needs H divisible by 2k.
      A reflection in y is a symmetry only about the forcing's extrema, which a block-averaged grid does not
      map onto itself, so it is left out.

    Transforms act on standardised fields; ``zero`` is the standardised value of 0 in data units per channel
    (negating the vorticity is about 0, not about the training mean).
    """

    KINDS = ("none", "translations", "kolmogorov")

    def __init__(self, kind: str, shape: tuple[int, int, int], zero=None, wavenumber: int = 4):
        if kind not in self.KINDS:
            raise DataError(f"unknown symmetry {kind!r}: one of {', '.join(self.KINDS)}")
        c, h, w = shape
        if kind == "kolmogorov" and h % (2 * wavenumber):
            raise DataError(f"the kolmogorov symmetry shifts y by half a forcing period: the grid height {h} "
                            f"must divide by 2k = {2 * wavenumber}")
        self.kind, self.h, self.w, self.k = kind, h, w, wavenumber
        self.zero = torch.zeros(c) if zero is None else torch.as_tensor(zero, dtype=torch.float32)

    def __bool__(self) -> bool:
        return self.kind != "none"

    def draws(self, n: int, seed) -> np.ndarray:
        """One group element per field, (n, 2) integers, reproducible from ``seed``."""
        high = [self.h, self.w] if self.kind == "translations" else [2 * self.k, self.w]
        return np.random.default_rng(seed).integers(0, high, size=(n, 2))

    def apply(self, x: torch.Tensor, draws: np.ndarray) -> torch.Tensor:
        """Fields (B, C, H, W) transformed by the elements ``draws`` (B, 2) of :meth:`draws`."""
        if not self:
            return x
        out = torch.empty_like(x)
        zero = self.zero.to(x)[:, None, None]
        for i, (a, b) in enumerate(draws.tolist()):
            f = x[i]
            if self.kind == "translations":
                f = torch.roll(f, (a, b), (-2, -1))
            else:
                if a % 2:
                    f = 2 * zero - torch.flip(f, (-1,))
                f = torch.roll(f, (a * self.h // (2 * self.k), b), (-2, -1))
            out[i] = f
        return out
