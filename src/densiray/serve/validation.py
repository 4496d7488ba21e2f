"""Input checks of the HTTP API, each failure one line saying what was wrong and how to fix it.

The schemas (:mod:`densiray.serve.schemas`) check types; this module turns their errors into one
line and checks what depends on the model or the settings: dimensions, ragged rows, row, sample and
text limits.
"""

from __future__ import annotations

import math

import numpy as np

from densiray.errors import RequestError
from densiray.serve.settings import ServeSettings

UNPROCESSABLE = 422

# What a good body looks like, per endpoint (the last path segment).
EXAMPLES = {
    "log_prob": '{"x": [[0.5, 0.25], [1.0, -0.3]]}',
    "score": '{"x": [[0.5, 0.25]], "percentile": 1}',
    "sample": '{"n": 16, "seed": 0}',
    "classify": '{"texts": ["great product"]}',
    "condition": '{"coarse": [[0.1, 0.2], [0.3, 0.4]], "factor": 4, "noise": 0.1, "n": 8, "steps": 64, "seed": 0}',
}
ROWS_CLASSIFY = '{"x": [[0.5, 0.25], [1.0, -0.3]]}'  # classify of a rows model (x) instead of texts
ITEMS = {"x": ("rows", "row"), "texts": ("entries", "text"), "sensors": ("sensors", "sensor"),
         "coarse": ("rows", "row")}


def _where(loc: tuple) -> str:
    """``("body", "x", 3, 1)`` -> ``x[3][1]``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the body"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validation_error_message(errors: list[dict], endpoint: str) -> str:
    """One line from FastAPI/pydantic request validation errors (the first error; how many more)."""
    errors = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")  # a misspelt field first
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, where, value = first.get("type", ""), _where(tuple(first.get("loc", ()))), first.get("input")
    example = ROWS_CLASSIFY if endpoint == "classify" and where.startswith("x") else EXAMPLES.get(endpoint)
    like = f", e.g. {example}" if example else ""
    ctx = first.get("ctx") or {}
    if kind == "json_invalid":
        msg = f"the body is not valid JSON ({ctx.get('error', 'decode error')}); send a JSON object{like}"
    elif kind == "missing" and where == "the body":
        msg = f"the request has no JSON body; send one with Content-Type: application/json{like}"
    elif kind == "missing":
        msg = f"the body lacks {where!r}; send{like[1:]}" if like else f"the body lacks {where!r}"
    elif kind in ("model_attributes_type", "model_type", "dict_type") and isinstance(value, (bytes, str)):
        msg = f"the body was not read as JSON; send it with Content-Type: application/json{like}"
    elif kind in ("model_attributes_type", "model_type", "dict_type"):
        msg = f"the body must be a JSON object, got {type(value).__name__}{like}"
    elif kind == "extra_forbidden":
        msg = f"unknown field {where!r} in the body; send only the documented fields{like}"
    elif kind == "finite_number":
        msg = (f"{where} is {value}: NaN and infinity are not allowed; send finite numbers "
               "(drop or impute rows with missing values)")
    elif kind == "float_type" and isinstance(value, str):
        msg = f"{where} is the string {_shown(value)}, not a number; send JSON numbers (finite, unquoted)"
    elif kind == "float_type":
        msg = f"{where} is {_shown(value)}, not a number; send finite JSON numbers"
    elif kind == "list_type" and where == "x":
        msg = f"x must be a list of rows, got {_shown(value)}{like}"
    elif kind == "list_type" and where.startswith("x["):
        msg = f"{where} must be a row (a list of numbers), got {_shown(value)}; x is a list of rows{like}"
    elif kind == "list_type":
        msg = f"{where} must be a list, got {_shown(value)}{like}"
    elif kind == "int_type":
        msg = f"{where} must be a whole JSON number, got {_shown(value)}{like}"
    elif kind == "string_type":
        msg = f"{where} must be a string, got {_shown(value)}{like}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = next(ctx[k] for k in ("ge", "le", "gt", "lt") if k in ctx)
        side = {"greater_than_equal": "at least", "less_than_equal": "at most", "greater_than": "more than",
                "less_than": "less than"}[kind]
        msg = f"{where} must be {side} {bound}, got {_shown(value)}"
    elif kind == "too_short" and ctx.get("actual_length") == 0:
        msg = f"{where} is empty; send at least one {ITEMS.get(where, ('', 'item'))[1]}{like}"
    elif kind in ("too_short", "too_long"):
        many, _ = ITEMS.get(where, ("items", "item"))
        limit = (f"fewer than the {ctx.get('min_length')} needed" if kind == "too_short"
                 else f"more than the {ctx.get('max_length')} allowed per request; split it into smaller requests")
        msg = f"{where} has {ctx.get('actual_length')} {many}, {limit}"
    elif kind == "string_too_long":
        msg = (f"{where} has {len(value) if isinstance(value, str) else '?'} characters, more than the "
               f"{ctx.get('max_length')} allowed; shorten or split it")
    elif kind == "value_error":
        msg = f"{where}: {str(first.get('msg', 'invalid')).removeprefix('Value error, ')}"
    else:
        msg = f"{where}: {first.get('msg', 'invalid')}{like}"
    more = len(errors) - 1
    return msg + (f" ({more} more problem{'s' if more > 1 else ''} in the body)" if more > 0 else "")


def _bad(msg: str) -> RequestError:
    return RequestError(UNPROCESSABLE, msg)


def check_grid(rows: list[list[float]], where: str) -> np.ndarray:
    """``rows`` as a float64 2-D array, or a RequestError naming the first row of another length."""
    width = len(rows[0]) if rows else 0
    for i, row in enumerate(rows):
        if len(row) != width:
            raise _bad(f"{where}[{i}] has {len(row)} values but {where}[0] has {width}; send rows of equal length")
    return np.asarray(rows, dtype=np.float64)


def to_json(value: object) -> object:
    """``value`` (arrays, numpy scalars, dicts, lists) as plain JSON values; null where a float is not finite."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            out = value.astype(object)
            out[~np.isfinite(value)] = None
            return out.tolist()
        return to_json(value.tolist())
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return to_json(value.detach().cpu().numpy())
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_rows(x: list[list[float]], dim: int, name: str, settings: ServeSettings) -> np.ndarray:
    """``x`` as a float64 (n, dim) array, or a RequestError: empty, too many rows, ragged or wrong width."""
    if not x:
        row = ", ".join(["0.0"] * min(dim, 3)) + (", ..." if dim > 3 else "")
        raise _bad(f'x is empty; send at least one row of {dim} numbers, e.g. {{"x": [[{row}]]}}')
    if len(x) > settings.max_rows:
        raise _bad(f"x has {len(x)} rows, more than the {settings.max_rows} allowed per request; "
                   "split it into smaller requests")
    for i, row in enumerate(x):
        if len(row) != dim:
            values = f"{len(row)} value{'' if len(row) == 1 else 's'}"
            raise _bad(f"x[{i}] has {values} but model {name!r} takes rows of {dim} (d={dim}); "
                       f"send every row with {dim} numbers")
    return np.asarray(x, dtype=np.float64)


def check_samples(n: int, settings: ServeSettings) -> int:
    if n < 1 or n > settings.max_samples:
        raise _bad(f"n must be between 1 and {settings.max_samples}, got {n}; "
                   "ask for more samples over several requests (with different seeds)")
    return n


def check_texts(texts: list[str], settings: ServeSettings) -> list[str]:
    if not texts:
        raise _bad('texts is empty; send at least one text, e.g. {"texts": ["great product"]}')
    if len(texts) > settings.max_texts:
        raise _bad(f"texts has {len(texts)} entries, more than the {settings.max_texts} allowed per request; "
                   "split it into smaller requests")
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise _bad(f"texts[{i}] has {len(text)} characters, more than the {settings.max_text_chars} allowed; "
                       "shorten or split it")
    return texts


def finite_or_none(values: np.ndarray) -> list[float | None]:
    """Floats for JSON, with None where a value is not finite (JSON has no NaN or infinity)."""
    isfinite = math.isfinite
    return [v if isfinite(v) else None for v in np.asarray(values, dtype=float).tolist()]
