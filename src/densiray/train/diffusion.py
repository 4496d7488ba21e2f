"""The diffusion Task: a score model (EDM denoiser) of physical fields, selected by held-out denoising loss.

Data: ``kolmogorov`` (the simulator of :mod:`densiray.data.fields`, at ``model.resolution``, default
64) or a user ``.npy``/``.npz`` of fields (N, C, H, W). Splits are by trajectory for simulated fields
(held-out fields come from runs never trained on), else by field: 80 / 10 / 10 %. Fields are
standardised per channel with the training split's mean and std. Training fields are transformed by a
random element of the data's symmetry group every epoch (``model.symmetry``; Kolmogorov flow's by
default for the simulated dataset, none for user fields).

Validation metric ``val_loss`` (mode min): the EDM-weighted denoising loss of the validation fields at a
fixed set of noise levels (the 8 octiles of the training σ distribution) and fixed noise, so it is
deterministic and comparable across epochs. Validation and export use the EMA weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import torch

from densiray.data.fields import Fields, KolmogorovConfig, Symmetry, field_statistics, kolmogorov, load_fields
from densiray.errors import ConfigError, DataError
from densiray.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    DiffusionModule,
    EDMDenoiser,
    denoiser_from_training_state,
    edm_loss,
)
from densiray.store import Store, StoredModel
from densiray.train.task import StepContext, Task, rank_batches
from densiray.train.task import fmt as _fmt

DEFAULT_RESOLUTION = 64
DEFAULT_FIELDS = 1024


class DiffusionTask(Task):
    """Fields split into train/validation/test, standardised, and an EDM diffusion prior fitted to them."""

    kind = "diffusion"
    metric = "val_loss"
    mode = "min"

    def __init__(self, dataset: str, model: dict | None = None, *, data_seed: int = 0, n: int | None = None):
        self.requested_model = dict(model or {})
        config = DiffusionConfig(**self.requested_model)
        fields = self._load(dataset, config, data_seed, n)
        c, h, w = fields.shape
        if h != w:
            raise DataError(f"fields must be square, got {h}x{w}")
        config = config.model_copy(update={"channels": c, "resolution": h})
        config.check_grid(h, w)
        self.config = config
        train, val, test = self._split(fields, data_seed)
        x = fields.x
        mean = x[train].mean(axis=(0, 2, 3)).astype(np.float64)
        std = x[train].std(axis=(0, 2, 3)).astype(np.float64)
        if (std <= 0).any():
            raise DataError("a channel of the training fields is constant")
        self.mean, self.std = mean, std
        z = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
        self.train_x, self.val_x, self.test_x = z[train], z[val], z[test]
        self.dataset = {"name": fields.name, "source": fields.source, "n": int(len(x)), "shape": [c, h, w],
                        "d": int(c * h * w), "seed": data_seed,
                        "split": {"train": int(len(train)), "val": int(len(val)), "test": int(len(test))},
                        **({"simulation": fields.meta.get("config"), "fine": fields.meta.get("fine"),
                            "cache_key": fields.meta.get("cache_key")} if fields.meta else {})}
        self.symmetry = self._symmetry(config.symmetry, fields)
        self.dataset["symmetry"] = self.symmetry.kind
        self._val_noise = None

    def _symmetry(self, kind: str, fields: Fields) -> Symmetry:
        simulated = fields.name == "kolmogorov" and fields.meta
        k = int((fields.meta.get("config") or {}).get("wavenumber", 4)) if simulated else 4
        if kind == "auto":  # the flow's group where the grid has room for its half-period shift
            kind = "kolmogorov" if simulated and fields.shape[1] % (2 * k) == 0 else "none"
        try:
            return Symmetry(kind, fields.shape, zero=-self.mean / self.std, wavenumber=k)
        except DataError as e:
            raise ConfigError(f"model.symmetry: {e}") from None

    @staticmethod
    def _load(dataset: str, config: DiffusionConfig, data_seed: int, n: int | None) -> Fields:
        if dataset == "kolmogorov":
            sim = dict(config.simulation)
            sim.setdefault("resolution", config.resolution or DEFAULT_RESOLUTION)
            sim.setdefault("seed", data_seed)
            if n is not None:
                snaps = sim.get("snapshots", KolmogorovConfig.model_fields["snapshots"].default)
                sim["trajectories"] = max(4, math.ceil(n / snaps))
            elif "trajectories" not in sim:
                sim["trajectories"] = DEFAULT_FIELDS // sim.get("snapshots", KolmogorovConfig.model_fields["snapshots"].default)
            try:
                kc = KolmogorovConfig(**sim)
            except Exception as e:
                raise ConfigError(f"model.simulation: {' '.join(str(e).split())[:300]}") from None
            return kolmogorov(kc)
        if str(dataset).lower().endswith((".npy", ".npz")):
            return load_fields(dataset, config.resolution)
        raise DataError(f"unknown fields dataset {dataset!r}: use 'kolmogorov' or a .npy/.npz file of (N, C, H, W) fields")

    @staticmethod
    def _split(fields: Fields, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups = np.unique(fields.groups)
        rng = np.random.default_rng([seed, 11])
        order = rng.permutation(groups)
        k = len(order)
        n_test = max(1, round(0.1 * k))
        n_val = max(1, round(0.1 * k))
        if k - n_test - n_val < 1:
            raise DataError(f"need at least 3 fields (or trajectories) to split, got {k}")
        test_g, val_g = set(order[:n_test]), set(order[n_test:n_test + n_val])
        g = fields.groups
        test = np.flatnonzero(np.isin(g, list(test_g)))
        val = np.flatnonzero(np.isin(g, list(val_g)))
        train = np.flatnonzero(~np.isin(g, list(test_g | val_g)))
        return train, val, test

    # --- the Task interface -------------------------------------------------------------------------

    def describe(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "model": self.config.model_dump()}

    def with_model(self, overrides: dict) -> DiffusionTask:
        """The same fields under another architecture/loss config (data settings cannot change here)."""
        merged = {**self.requested_model, **overrides}
        for key in ("resolution", "simulation", "symmetry"):
            if merged.get(key) != self.requested_model.get(key):
                raise ConfigError(f"model.{key} changes the data; it cannot be part of a sweep")
        new = copy.copy(self)
        new.requested_model = merged
        new.config = DiffusionConfig(**merged).model_copy(update={"channels": self.config.channels,
                                                                  "resolution": self.config.resolution})
        new.config.check_grid(self.config.resolution, self.config.resolution)
        return new

    def build_model(self) -> DiffusionModule:
        return DiffusionModule(self.config)

    def batches(self, epoch: int, rank: int, world: int, batch_size: int) -> Iterator[torch.Tensor]:
        # one symmetry element per field and epoch, drawn for all fields: the run does not depend on the world size
        draws = self.symmetry.draws(len(self.train_x), [epoch, 17]) if self.symmetry else None
        for idx in rank_batches(len(self.train_x), epoch, 7, rank, world, batch_size):
            rows = idx.numpy()
            batch = torch.from_numpy(self.train_x[rows])
            yield self.symmetry.apply(batch, draws[rows]) if draws is not None else batch

    def loss(self, engine, batch: torch.Tensor, ctx: StepContext):
        module = engine.module
        if ctx.micro_step == 0:
            module.update_ema(ctx.step)
        # per-sample noise levels and noise from torch's RNG: they may differ across ranks (data noise)
        loss = edm_loss(engine, batch, self.config)
        return loss, {}

    def _validation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._val_noise is None:
            g = torch.Generator().manual_seed(12345)
            x = torch.from_numpy(self.val_x[:256])
            q = torch.tensor([(i + 0.5) / 8 for i in range(8)], dtype=torch.float64)
            ln = self.config.p_mean + self.config.p_std * math.sqrt(2) * torch.erfinv(2 * q - 1)
            sig = ln.exp().float()
            reps = x.repeat(len(sig), 1, 1, 1)
            sigma = sig.repeat_interleave(len(x))
            noise = torch.randn(reps.shape, generator=g)
            self._val_noise = (reps, sigma, noise)
        return self._val_noise

    def denoising_loss(self, denoise, device=None) -> float:
        """The EDM-weighted denoising loss on the validation fields at the 8 fixed σ octiles."""
        x, sigma, noise = self._validation()
        sd = self.config.sigma_data
        total, count = 0.0, 0
        for i in range(0, len(x), 128):
            xb, sb, nb = x[i:i + 128], sigma[i:i + 128], noise[i:i + 128]
            if device is not None:
                xb, sb, nb = xb.to(device), sb.to(device), nb.to(device)
            s = sb[:, None, None, None]
            d = denoise(xb + nb * s, sb).float()
            w = (s**2 + sd**2) / (s * sd) ** 2
            total += float((w * (d - xb) ** 2).mean(dim=(1, 2, 3)).sum())
            count += len(xb)
        return total / count

    def evaluate(self, engine) -> dict[str, float]:
        module = engine.module
        device = next(module.parameters()).device
        ema = EDMDenoiser(self.config).to(device)
        ema.load_state_dict({k: v.to(device).float() for k, v in module.ema_state().items()})
        ema.eval()
        dtype = next(module.parameters()).dtype
        ema.to(dtype)
        return {"val_loss": self.denoising_loss(lambda x, s: ema(x.to(dtype), s.to(dtype)), device),
                "val_loss_raw": self.denoising_loss(lambda x, s: engine(x.to(dtype), s.to(dtype)), device)}

    def trained_model(self, state: dict[str, torch.Tensor]) -> EDMDenoiser:
        """The inference denoiser (EMA weights) from the best epoch's training state."""
        return denoiser_from_training_state(self.config, state)

    def loaded(self, denoiser: EDMDenoiser) -> DiffusionModel:
        return DiffusionModel(denoiser, self.mean, self.std, {"kind": self.kind})

    @torch.no_grad()
    def metrics(self, model: EDMDenoiser) -> dict:
        """Held-out denoising loss, a probability-flow log-likelihood of a few test fields (nats per
        dimension, data units) and the energy-spectrum error of a few unconditional samples."""
        val = self.denoising_loss(model)
        saved = self.val_x
        self.val_x, self._val_noise = self.test_x, None
        test = self.denoising_loss(model)
        self.val_x, self._val_noise = saved, None
        dm = self.loaded(model)
        k = min(8, len(self.test_x))
        test_fields = self.test_x[:k] * self.std[None, :, None, None] + self.mean[None, :, None, None]
        ll = dm.log_likelihood(test_fields, steps=32, seed=0)
        out = {"val_loss": val, "test_loss": test, "test_log_lik": float(ll.mean()),
               "test_log_lik_se": float(ll.std(ddof=1) / math.sqrt(k)) if k > 1 else None,
               "log_lik_units": f"nats per dimension (data units), probability-flow ODE, 32 Heun steps, "
                                f"{k} test fields, 1 Hutchinson probe",
               "shape": list(dm.shape), "d": int(np.prod(dm.shape))}
        if dm.shape[0] == 1:
            samples = dm.sample(8, seed=0, steps=32)[:, 0]
            data = test_fields[:, 0]
            a, b = field_statistics(samples)["spectrum"][1:], field_statistics(data)["spectrum"][1:]
            out["spectrum_log_error"] = float(np.mean(np.abs(np.log(np.asarray(a) / np.asarray(b)))))
        return out

    def export(self, model: EDMDenoiser, *, store: str | None, name: str, provenance: dict,
               extra_files: dict[str, bytes] | None = None, train_config: dict | None = None) -> StoredModel:
        target = Store(store)
        target.export(
            name, kind=self.kind, tensors=model.state_dict(),
            config={"model": self.config.model_dump(), "train": train_config or {}, "dataset": self.dataset},
            transform={"mean": self.mean.tolist(), "std": self.std.tolist()}, metrics=self.metrics(model),
            provenance=provenance, extra_files=extra_files,
        )
        return target.read(name)

    def report_plot(self, model: EDMDenoiser, history: list[dict], title: str) -> bytes | None:
        """Loss curves, a few test fields and a few unconditional samples."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dm = self.loaded(model)
        samples = dm.sample(4, seed=0, steps=24)
        data = self.test_x[:4] * self.std[None, :, None, None] + self.mean[None, :, None, None]
        fig, axes = plt.subplots(1, 9, figsize=(20, 2.6))
        if history:
            ep = [h.get("epoch", i) for i, h in enumerate(history)]
            axes[0].plot(ep, [h.get("train_loss", np.nan) for h in history], label="train")
            axes[0].plot(ep, [h.get("val_loss", np.nan) for h in history], label="val (EMA)")
            axes[0].set_yscale("log")
            axes[0].legend(fontsize=7)
            axes[0].set_title("denoising loss", fontsize=8)
        lim = float(np.abs(data).max())
        for i in range(4):
            axes[1 + i].imshow(data[i, 0], cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[1 + i].set_title("test field", fontsize=8)
            axes[5 + i].imshow(samples[i, 0], cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[5 + i].set_title("sample", fontsize=8)
        for ax in axes[1:]:
            ax.set_axis_off()
        fig.suptitle(title, fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()


def default_space(task: DiffusionTask) -> dict:
    """The space ``densiray tune diffusion`` searches when none is given."""
    return {
        "model.base": {"choice": [16, 32, 64]},
        "model.mults": {"choice": [[1, 2], [1, 2, 2], [1, 2, 2, 2]]} if task.config.resolution % 8 == 0
        else {"choice": [[1, 2], [1, 2, 2]]},
        "model.blocks": {"choice": [1, 2]},
        "train.lr": {"loguniform": [1e-4, 3e-3]},
        "train.batch_size": {"choice": [16, 32, 64]},
    }


def summary_lines(m: dict) -> list[tuple[str, str]]:
    """What ``densiray train/tune diffusion`` prints about a trained model."""
    lines = [("held-out", f"denoising loss {_fmt(m.get('test_loss'))} (validation {_fmt(m.get('val_loss'))}; "
                          f"EDM-weighted, 8 fixed noise levels)")]
    if m.get("test_log_lik") is not None:
        lines.append(("likelihood", f"{_fmt(m['test_log_lik'])} ± {_fmt(m.get('test_log_lik_se'))} nats/dim "
                                    "(probability-flow ODE, data units)"))
    if m.get("spectrum_log_error") is not None:
        lines.append(("spectrum", f"mean |log E_sample(k)/E_data(k)| = {_fmt(m['spectrum_log_error'], 3)}"))
    return lines


def list_columns(m: dict) -> tuple[str, str]:
    """The two cells of ``densiray models``: held-out denoising loss and log-likelihood (nats/dim)."""
    return _fmt(m.get("test_loss")), _fmt(m.get("test_log_lik"), 3)
