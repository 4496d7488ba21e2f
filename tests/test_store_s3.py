"""The store and the run checkpoints on object storage: ``s3://`` against an S3 server on 127.0.0.1.

moto's server mode plays S3. The endpoint and credentials reach pyarrow (the store) and Ray Train (the
checkpoints) only through the usual ``AWS_*`` environment variables; none of them may appear in a
manifest, in the run folder or in Ray's logs.

Ray workers inherit the environment of the raylet, which the session's ``ray_cluster`` fixture starts
from this process; so the variables are set when this module is imported (pytest imports every test
module before any fixture runs), and the server is started on that port by the first test that needs it.
"""

from __future__ import annotations

import logging
import os
import socket

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
SECRET = "densiray-test-secret-6f1d2c"  # must never be written anywhere
KEY_ID = "DENSIRAYTESTKEYID77"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}",  # pyarrow >= 15 and boto3 read it; http: no TLS
}
os.environ.update(S3_ENV)
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request

SMALL = {"components": 4, "hidden": 32, "integration_samples": 256, "eval_integration_samples": 4096,
         "export_integration_samples": 16384}


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3 server on 127.0.0.1 with an empty bucket; yields the bucket's boto3 client and name."""
    os.environ.update(S3_ENV)  # another module may have changed them
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=S3_ENV["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="densiray")
    yield client, "densiray"
    server.stop()


@pytest.fixture(scope="module")
def s3_model(s3_bucket):
    """A DNMM (initialised, not trained: no Ray needed) exported to s3://densiray/models/moons."""
    from densiray.api import RunSpec, build_task

    task = build_task("dnmm", RunSpec(dataset="moons", n=600, model=SMALL))
    model = task.trained_model(task.build_model().state_dict())
    stored = task.export(model, store="s3://densiray/models", name="moons", provenance={"run": "test"})
    return task, model, stored


@pytest.fixture(scope="module")
def s3_run(s3_bucket, ray_cluster):
    """A tiny 2-worker DNMM run whose checkpoints and exported model live in s3://densiray/models."""
    from densiray import api

    overrides = {"model": SMALL, "train": {"workers": 2, "zero_stage": 2, "epochs": 2, "patience": 0}}
    return api.train("dnmm", "moons", overrides=overrides, name="moons-s3", store="s3://densiray/models",
                     plot=False)


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_list_read_and_load_model_from_s3(s3_model):
    import densiray
    from densiray.store import Store

    task, model, stored = s3_model
    assert stored.path == "s3://densiray/models/moons"
    store = Store("s3://densiray/models")
    listed = {m["name"]: m for m in store.list()}
    assert listed["moons"]["kind"] == "dnmm" and listed["moons"]["path"] == "s3://densiray/models/moons"
    assert store.read("moons").manifest["files"] == stored.manifest["files"]
    loaded = densiray.load_model("moons", store="s3://densiray/models")
    import torch

    with torch.no_grad():
        expected = model.log_prob(torch.from_numpy(task.test_x)).double().numpy()
    assert np.array_equal(loaded.log_prob_standardized(task.test_x), expected)
    version = store.version("moons")
    assert version is not None


def test_a_tampered_object_fails_its_hash_check(s3_model, s3_bucket):
    from densiray.errors import StoreError
    from densiray.store import Store

    client, bucket = s3_bucket
    # a copy of the model, so the other tests keep a clean one whatever the order
    for key in _keys(client, bucket, "models/moons/"):
        client.copy_object(Bucket=bucket, Key=key.replace("/moons/", "/tampered/", 1),
                           CopySource={"Bucket": bucket, "Key": key})
    store = Store("s3://densiray/models")
    store.read("tampered")  # the intact copy reads fine
    key = "models/tampered/model.safetensors"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(StoreError, match="fails its sha256 check"):
        store.read("tampered")
    store.delete("tampered")
    assert not store.exists("tampered")


def test_no_credential_in_the_exported_model(s3_model, s3_bucket):
    client, bucket = s3_bucket
    _assert_no_secret_in_bucket(client, bucket)


def _assert_no_secret_in_bucket(client, bucket: str) -> None:
    for key in _keys(client, bucket):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for secret in (SECRET, KEY_ID, f"127.0.0.1:{PORT}"):
            assert secret.encode() not in body, f"{secret!r} written into s3://{bucket}/{key}"


@pytest.mark.slow
def test_train_with_checkpoints_and_export_on_s3(s3_run, s3_bucket):
    """Ray Train workers write their checkpoints to s3:// and the run exports there; nothing leaks."""

    import densiray
    from densiray.store import Store

    client, bucket = s3_bucket
    assert s3_run["path"] == "s3://densiray/models/moons-s3" and s3_run["epochs_run"] == 2
    keys = _keys(client, bucket)
    assert {"models/moons-s3/manifest.json", "models/moons-s3/model.safetensors"} <= set(keys)
    assert any(k.startswith("models/.runs/moons-s3/checkpoint_") and k.endswith("/state.json") for k in keys), keys
    assert not [k for k in keys if "/.tmp-" in k or "/.old-" in k]  # the atomic export left nothing behind
    manifest = Store("s3://densiray/models").read("moons-s3").manifest
    assert manifest["provenance"]["workers"] == 2
    assert ".runs/moons-s3" in manifest["provenance"]["run_path"]
    lp = densiray.load_model("moons-s3", store="s3://densiray/models").log_prob(np.zeros((4, 2)))
    assert np.all(np.isfinite(lp))
    _assert_no_secret_in_bucket(client, bucket)
    # Ray's own session logs are not checked: Ray Tune propagates AWS_* variables into its actors' runtime
    # environments (ray/tune/execution/class_cache.py) and Ray's runtime_env agent logs those, whatever
    # densiray does. On a cluster, give nodes credentials by instance role / service account instead.


def test_missing_bucket_is_a_one_line_store_error(s3_bucket):
    from densiray.errors import StoreError
    from densiray.store import Store

    with pytest.raises(StoreError) as e:
        Store("s3://no-such-bucket/models").export(
            "m", kind="dnmm", tensors={}, config={}, transform=None, metrics={}, provenance={})
    assert "\n" not in str(e.value) and SECRET not in str(e.value)
