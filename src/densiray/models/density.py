"""A loaded density model: a trained module plus the data transform it was trained under."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from densiray.data import Standardizer
from densiray.errors import DataError


class DensityModel:
    """``log_prob`` and ``sample`` in the data's own units; needs no Ray.

    The module works on standardised data z = (x - mean) / std; densities are mapped back with the
    Jacobian, log p_x(x) = log p_z(z) + log|dz/dx|.
    """

    def __init__(self, module: nn.Module, transform: Standardizer, manifest: dict):
        self.module = module.eval()
        self.transform = transform
        self.manifest = manifest
        self.name: str = manifest.get("name", "")
        self.kind: str = manifest.get("kind", "")
        self.metrics: dict = manifest.get("metrics", {})
        self.dim: int = transform.d

    def __repr__(self) -> str:
        return f"DensityModel(name={self.name!r}, kind={self.kind!r}, dim={self.dim})"

    def _rows(self, x) -> torch.Tensor:
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:  # strings, ragged rows, None
            reason = " ".join(str(e).split())[:120]
            raise DataError(f"expected rows of {self.dim} numbers, each row the same length: {reason}") from e
        if a.ndim == 1 and self.dim == 1:
            a = a[:, None]
        elif a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise DataError(f"expected rows of {self.dim} values, got an array of shape {a.shape}")
        if not np.isfinite(a).all():
            raise DataError("input contains NaN or inf")
        return torch.as_tensor(self.transform.transform(a), dtype=torch.float32)

    @torch.no_grad()
    def log_prob_standardized(self, z) -> np.ndarray:
        """log-density of already standardised rows (the units of the reference benchmarks)."""
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        return self.module.log_prob(z).double().numpy()

    @torch.no_grad()
    def log_prob(self, x) -> np.ndarray:
        """log-density of rows ``x`` (n, d) in the data's units (nats)."""
        return self.module.log_prob(self._rows(x)).double().numpy() + self.transform.log_abs_det()

    def threshold(self, percentile: float = 1.0) -> float:
        """The outlier threshold on :meth:`score`: the ``percentile``-th percentile of the log-densities
        of the rows the model was fitted and validated on, negated (data units). About ``percentile`` %
        of in-distribution rows score above it."""
        cal = self.metrics.get("calibration")
        if not cal:
            raise DataError(f"model {self.name!r} has no outlier calibration; export it again with this densiray")
        levels = [float(q) for q in cal["percentiles"]]
        try:
            q = float(percentile)
        except (TypeError, ValueError):
            q = float("nan")
        if q not in levels:
            raise DataError(f"percentile must be one of {', '.join(f'{v:g}' for v in levels)}, got {percentile!r}")
        return -(cal["log_prob"][levels.index(q)] + self.transform.log_abs_det())

    def score(self, x, percentile: float = 1.0) -> dict:
        """Anomaly scores ``-log p(x)`` (nats, data units), with outlier flags against :meth:`threshold`."""
        t = self.threshold(percentile)
        s = -self.log_prob(x)
        return {"score": s, "outlier": s > t, "threshold": t}

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` exact samples in the data's units (seeded, reproducible)."""
        if not isinstance(n, int) or n < 1:
            raise DataError(f"n must be a positive integer, got {n!r}")
        z, _ = self.module.sample(n, seed=seed)
        return self.transform.inverse(z.double().numpy())


def load_exported(stored) -> DensityModel:
    """A :class:`DensityModel` from an exported DNMM (``stored``: a verified StoredModel)."""
    from densiray.errors import StoreError
    from densiray.models.dnmm import DNMM, DNMMConfig, DNMMEnsemble

    manifest = stored.manifest
    try:
        ensemble = manifest["config"].get("ensemble")
        module = (DNMMEnsemble([DNMMConfig(**c) for c in ensemble["members"]], ensemble["weights"]) if ensemble
                  else DNMM(DNMMConfig(**manifest["config"]["model"])))
        module.load_state_dict(stored.tensors, strict=True)
        transform = Standardizer.from_dict(manifest["transform"])
    except Exception as e:  # a manifest that hashes fine but does not describe these weights
        msg = " ".join(str(e).split())[:300]
        raise StoreError(f"model {stored.name!r} does not match its manifest ({msg}); export it again") from e
    return DensityModel(module, transform, manifest)
