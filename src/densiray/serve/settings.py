"""The model server's settings: one validated object for the Serve app, the plain app and the CLI."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from densiray.errors import ConfigError


class ServeSettings(BaseModel):
    """Everything the server can be told (the ``args`` of ``serve/config.yaml``); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    store: str | None = Field(None, description="model store path or URI (default $DENSIRAY_STORE or ./models)")
    # Replicas: fractional CPUs so serving fits beside other work on a small machine.
    replicas: int = Field(1, ge=1, le=64, description="replicas of the deployment")
    replica_cpus: float = Field(0.5, gt=0, le=64, description="Ray CPUs reserved per replica")
    max_replicas_per_node: int | None = Field(None, ge=1, le=64, description="spread the replicas: at most this "
                                              "many on one node (1: a lost node takes one replica with it)")
    max_ongoing_requests: int = Field(64, ge=1, le=10_000, description="requests a replica takes at once")
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads per replica")
    max_models_per_replica: int = Field(4, ge=1, le=1024, description="models kept loaded per replica (LRU)")
    model_refresh_s: float = Field(5.0, ge=0, le=3600, description="how often a replica checks whether a "
                                                                "loaded model was exported again")
    # Batching of log_prob (and score) requests across clients, and the size of one log_prob call.
    max_rows_per_call: int = Field(1024, ge=1, le=1_000_000, description="rows per log_prob call: bigger "
                                   "requests and batches are computed in slices (the cost per row grows beyond ~1k)")
    batching: bool = Field(True, description="batch log_prob/score requests with serve.batch (on by default: "
                           "measured faster than without at 64, 256 and 1024 rows per request; jobs/results/serve.md)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="requests per batch")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1, description="how long a batch waits to fill (0: it takes "
                                        "what queued while the previous batch ran)")
    # Limits on one request.
    max_rows: int = Field(10_000, ge=1, le=10_000_000, description="rows of x per request")
    max_samples: int = Field(10_000, ge=1, le=10_000_000, description="n per sample request")
    max_texts: int = Field(256, ge=1, le=100_000, description="texts per classify request")
    max_text_chars: int = Field(10_000, ge=1, le=10_000_000, description="characters per text")
    max_condition_work: int = Field(4096, ge=1, le=100_000_000, description="n x steps per condition (or "
                                    "stepped sample) request: bounds the sampler work one request asks for")
    max_body_bytes: int = Field(16 << 20, ge=1024, le=1 << 31, description="request body size (bytes)")
    access_log: bool = Field(False, description="log every request in the replica logs")

    @classmethod
    def parse(cls, args: dict | ServeSettings | None) -> ServeSettings:
        """Settings from a dict (e.g. a config file's ``args``), raising ConfigError with one line."""
        if isinstance(args, ServeSettings):
            return args
        from densiray.api import validation_message

        try:
            return cls(**(args or {}))
        except ValidationError as e:
            raise ConfigError(validation_message(e, "serve")) from e
        except TypeError as e:  # args that are not a mapping
            raise ConfigError(f"serve settings must be a mapping of setting: value, got {args!r}") from e
