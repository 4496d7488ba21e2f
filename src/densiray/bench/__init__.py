"""Benchmarks."""

from __future__ import annotations

import atexit
import shutil
import tempfile


def scratch_dir(prefix: str) -> str:
    """A temporary folder for a benchmark's working files (the models it trains and their runs), removed when
    the Python process exits. Results go to the benchmark's ``out`` folder; pass a store to keep the models."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path
