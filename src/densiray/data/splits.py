"""The fixed train/validation/test split and the per-column standardisation fitted on training rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from densiray.errors import DataError

__all__ = ["Splits", "Standardizer", "split"]

_MIN_STD = 1e-12
"""Columns whose training std is below this are treated as constant and get std 1."""


@dataclass(frozen=True, eq=False)
class Splits:
    """Raw (unstandardised) float64 rows of the three parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split(x: np.ndarray) -> Splits:
    """Split rows 64/16/20 into train/val/test, exactly as the published benchmarks do.

    ``rest, test = train_test_split(x, test_size=0.2, random_state=0)``, then
    ``train, val = train_test_split(rest, test_size=0.2, random_state=0)``; independent of any
    dataset seed.
    """
    from sklearn.model_selection import train_test_split

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise DataError(
            f"cannot split an array of shape {x.shape}: give a 2-D (rows, columns) array with at least 3 rows"
        )
    rest, test = train_test_split(x, test_size=0.2, random_state=0)
    train, val = train_test_split(rest, test_size=0.2, random_state=0)
    return Splits(train=train, val=val, test=test)


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-column affine map ``z = (x - mean) / std``, fitted on training rows only."""

    mean: np.ndarray
    std: np.ndarray

    @property
    def d(self) -> int:
        """Number of columns."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Fit on training rows; a (near-)constant column gets std 1 so it is only centred."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise DataError(
                f"cannot fit a standardizer on an array of shape {x.shape}: give a non-empty 2-D array"
            )
        std = x.std(axis=0)
        std[std < _MIN_STD] = 1.0
        return cls(mean=x.mean(axis=0), std=std)

    def _rows(self, x: np.ndarray) -> np.ndarray:
        """``x`` as float64, checking it has ``d`` columns (a single 1-D row is fine)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.shape[-1] != self.d:
            raise DataError(f"expected rows with {self.d} columns, got an array of shape {x.shape}")
        return x

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Raw rows to standardised rows."""
        return (self._rows(x) - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Standardised rows back to raw rows."""
        return self._rows(z) * self.std + self.mean

    def log_abs_det(self) -> float:
        """``log|dz/dx| = -sum(log std)``: add it to a log-density in z-space to get one in x-space."""
        return float(-np.sum(np.log(self.std)))

    def to_dict(self) -> dict:
        """JSON-serialisable form: ``{"type": "standardize", "mean": [...], "std": [...]}``."""
        return {"type": "standardize", "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        """Rebuild from :meth:`to_dict` output, validating it; DataError if it is malformed."""
        if not isinstance(d, dict) or d.get("type") != "standardize":
            raise DataError(
                'not a standardizer: expected {"type": "standardize", "mean": [...], "std": [...]}'
            )
        values = {}
        for key in ("mean", "std"):
            seq = d.get(key)
            if not isinstance(seq, (list, tuple)) or not seq or not all(map(_finite_number, seq)):
                raise DataError(f"standardizer {key!r} must be a non-empty list of finite numbers")
            values[key] = np.array(seq, dtype=np.float64)
        mean, std = values["mean"], values["std"]
        if len(mean) != len(std):
            raise DataError(f"standardizer mean has {len(mean)} values, std has {len(std)}: they must match")
        if (std <= 0).any():
            raise DataError("standardizer std values must all be > 0")
        return cls(mean=mean, std=std)


def _finite_number(value: object) -> bool:
    """True for a finite int or float (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
