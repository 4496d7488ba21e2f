"""densiray on Ray Serve: the model server.

    import densiray.serve as ds
    url = ds.start(store="./models")   # or: densiray serve --store ./models
    ...
    ds.shutdown()

Modules: ``settings`` (ServeSettings, the validated knobs), ``schemas`` (request/response bodies),
``validation`` (one-line input errors), ``endpoints`` (the FastAPI app), ``backends`` (model loading
and log_prob for the plain app), ``deployment`` (the Serve deployment and ``build_app``, the builder
``serve/config.yaml`` names), ``runner`` (start/shutdown), ``plain`` (the same API in plain uvicorn).
"""

from densiray.serve.runner import shutdown, start
from densiray.serve.settings import ServeSettings

__all__ = ["ServeSettings", "shutdown", "start"]
