"""Search spaces: a small YAML vocabulary, validated before anything runs, turned into Ray Tune's.

A space maps ``model.<setting>`` or ``train.<setting>`` to a distribution or a fixed value::

    model.hidden: {choice: [32, 64, 128]}
    model.depth: {randint: [1, 3]}          # inclusive bounds
    train.lr: {loguniform: [0.0003, 0.01]}
    train.weight_decay: {uniform: [0, 0.01]}
    model.activation: silu                  # fixed
    model.density_weight: {grid: [0, 0.1, 1]}  # every value, once per trial count (searcher: random)

Every value a distribution can produce is checked against the family's config model (and
``TrainConfig``) up front, so a bad space fails with one line before Ray starts.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ValidationError

from densiray.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
# engine settings a sweep must not vary: they decide where and how trials run, not the model
FIXED_TRAIN = {"workers", "min_workers", "cpus_per_worker", "use_gpu", "max_failures", "checkpoint_every", "epochs",
               "patience", "strategy", "compile"}


def _values(spec: dict, key: str) -> list:
    """Representative values a distribution produces (its ends or every choice), for validation."""
    (dist, args), = spec.items()
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space {key}: choice needs a non-empty list, got {args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                              for a in args)):
        raise ConfigError(f"space {key}: {dist} needs [low, high] numbers, got {args!r}")
    lo, hi = args
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (dist != "randint" and lo == hi):
        raise ConfigError(f"space {key}: {dist} needs finite low < high, got [{lo}, {hi}]")
    if dist == "loguniform" and lo <= 0:
        raise ConfigError(f"space {key}: loguniform needs low > 0, got {lo}")
    if dist == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"space {key}: randint needs integer bounds, got [{lo}, {hi}]")
    return [int(lo), int(hi)] if dist == "randint" else [lo, hi]


def validate_space(space: object, model_cls: type[BaseModel], train_cls: type[BaseModel],
                   base_model: dict, base_train: dict) -> dict[str, Any]:
    """Check every entry of ``space`` (keys, distributions, every value it can produce); returns it."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"the search space must be a non-empty mapping of model.<setting>/train.<setting>, "
                          f"got {type(space).__name__}")
    for key, spec in space.items():
        section, _, field = str(key).partition(".")
        cls = {"model": model_cls, "train": train_cls}.get(section)
        if cls is None or not field:
            raise ConfigError(f"space key {key!r} must look like model.<setting> or train.<setting>")
        if field not in cls.model_fields or field == "dim":
            known = ", ".join(f for f in cls.model_fields if f != "dim")
            raise ConfigError(f"space {key}: unknown {section} setting {field!r}; known: {known}")
        if section == "train" and field in FIXED_TRAIN:
            raise ConfigError(f"space {key}: {field} is set for the whole sweep (flags or the 'tune' section), "
                              "not searched")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ConfigError(f"space {key}: expected one of {{{', '.join(DISTRIBUTIONS)}}}: [...], got {spec!r}")
            values = _values(spec, key)
        else:
            values = [spec]
        base = base_model if section == "model" else base_train
        for v in values:
            try:
                cls(**{**base, field: v})
            except ValidationError as e:
                msg = e.errors()[0]["msg"]
                raise ConfigError(f"space {key}: value {v!r} is invalid ({msg})") from e
    return space


def to_tune(space: dict[str, Any]) -> dict[str, dict]:
    """Ray Tune's param_space: ``{"model": {...}, "train": {...}}`` of tune.* distributions."""
    from ray import tune

    out: dict[str, dict] = {"model": {}, "train": {}}
    for key, spec in space.items():
        section, _, field = key.partition(".")
        if isinstance(spec, dict):
            (dist, args), = spec.items()
            value = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a), "uniform": lambda a: tune.uniform(*a),
                     "loguniform": lambda a: tune.loguniform(*a),
                     "randint": lambda a: tune.randint(int(a[0]), int(a[1]) + 1)}[dist](args)
        else:
            value = spec
        out[section][field] = value
    return out
