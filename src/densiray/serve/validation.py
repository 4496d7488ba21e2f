"""Input checks of the HTTP API, each failure one line saying what was wrong and how to fix it.

The schemas (:mod:`densiray.serve.schemas`) check types; this module turns their errors into one
line and checks what depends on the model or the settings: dimensions, ragged rows, row, sample and
text limits.
"""

from __future__ import annotations

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
}


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
    example = EXAMPLES.get(endpoint)
    like = f", e.g. {example}" if example else ""
    errors = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")  # a misspelt field first
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, where, value = first.get("type", ""), _where(tuple(first.get("loc", ()))), first.get("input")
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
    elif kind in ("greater_than_equal", "less_than_equal"):
        bound = ctx.get("ge", ctx.get("le"))
        side = "at least" if kind == "greater_than_equal" else "at most"
        msg = f"{where} must be {side} {bound}, got {_shown(value)}"
    else:
        msg = f"{where}: {first.get('msg', 'invalid')}{like}"
    more = len(errors) - 1
    return msg + (f" ({more} more problem{'s' if more > 1 else ''} in the body)" if more > 0 else "")


def _bad(msg: str) -> RequestError:
    return RequestError(UNPROCESSABLE, msg)


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
    return [v if v == v and abs(v) != float("inf") else None for v in np.asarray(values, dtype=float).tolist()]
