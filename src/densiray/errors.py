"""The one exception type users see: a single line saying what was wrong and how to fix it."""


class DensirayError(Exception):
    """A user-facing error. The command line prints ``densiray: error: <message>`` and exits 2."""


class DataError(DensirayError):
    """Bad or unknown data: a missing file, NaN/inf, non-numeric columns, too few rows."""


class ConfigError(DensirayError):
    """A configuration that does not validate."""


class StoreError(DensirayError):
    """A model store problem: unknown model, corrupt or tampered folder, bad name."""


class RequestError(DensirayError):
    """A request the model server refuses: answered with HTTP ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BudgetError(DataError):
    """A budget no sub-model of a nested model fits (HTTP 422)."""
