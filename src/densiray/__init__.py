"""densiray: deep density models on Ray (Train + DeepSpeed, Tune, Serve)."""

__version__ = "0.1.0"

from densiray.errors import DensirayError  # noqa: E402


def load_model(path_or_name: str, store: str | None = None):
    """Load an exported model from the store (or a model folder) without Ray; hashes are verified."""
    from densiray.store import load_model as _load

    return _load(path_or_name, store=store)


__all__ = ["DensirayError", "load_model", "__version__"]
