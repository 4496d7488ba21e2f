"""The same HTTP API in one plain uvicorn process, without Ray: the benchmark's baseline.

    python -m densiray.serve.plain --store ./models --port 8001

Models load with ``densiray.load_model`` into a per-process LRU and every request is computed on
its own (no batching); validation and responses are the Serve app's (:mod:`densiray.serve.endpoints`).
"""

from __future__ import annotations

import argparse

from densiray.serve.settings import ServeSettings


def plain_app(settings: ServeSettings):
    from densiray.serve.backends import LocalBackend
    from densiray.serve.endpoints import make_api

    return make_api(LocalBackend(settings))


def main(argv: list[str] | None = None) -> None:
    import torch
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m densiray.serve.plain", description=__doc__.splitlines()[0])
    p.add_argument("--store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    settings = ServeSettings.parse({"store": args.store})
    torch.set_num_threads(settings.torch_threads)
    uvicorn.run(plain_app(settings), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
