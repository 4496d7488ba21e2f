"""The model families in plain PyTorch (no Ray here), and the registry the store builds them from."""

from __future__ import annotations

from pydantic import BaseModel
from torch import nn

from densiray.models.dnmm import DNMM, DNMMConfig

# kind -> (config model, nn.Module class); the store rebuilds exported models from this table.
MODELS: dict[str, tuple[type[BaseModel], type[nn.Module]]] = {"dnmm": (DNMMConfig, DNMM)}


def build_model(kind: str, config: dict) -> nn.Module:
    """Build an (untrained) module of ``kind`` from its validated config dict."""
    if kind not in MODELS:
        raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODELS))}")
    config_cls, module_cls = MODELS[kind]
    return module_cls(config_cls(**config))


__all__ = ["DNMM", "DNMMConfig", "MODELS", "build_model"]
