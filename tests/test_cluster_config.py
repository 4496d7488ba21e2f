"""The cluster configs users deploy with are checked: cluster.yaml against Ray's own cluster-config
schema, and the KubeRay manifests in k8s/ for structure (API version, kinds, required fields, images,
entry points and Serve settings that exist in this repository)."""

from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster_yaml):
    """The raw file against ray-schema.json, then the launcher's own fill-in-defaults + validation."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster_yaml, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(cluster_yaml)))


def test_the_schema_check_catches_mistakes(cluster_yaml):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster_yaml)
    bad["available_node_types"]["cpu_worker"]["min_wokers"] = 1  # a typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = copy.deepcopy(cluster_yaml)
    bad["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


def test_cluster_yaml_points_at_this_repository(cluster_yaml):
    """Setup runs scripts that exist, syncs this checkout, starts Ray on head and workers."""
    assert any("scripts/setup.sh" in c for c in cluster_yaml["setup_commands"])
    assert (ROOT / "scripts" / "setup.sh").is_file()
    assert "." in cluster_yaml["file_mounts"].values()
    assert any("ray start --head" in c for c in cluster_yaml["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster_yaml["worker_start_ray_commands"])
    # the dashboard (job submission API) is not exposed on the internet: reach it with `ray dashboard`
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster_yaml["head_start_ray_commands"])


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, "the image's Ray must match the project's"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0", "the head runs no training"
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in _pod_specs(spec):
        assert pod["containers"], "a pod without containers"
        for c in pod["containers"]:
            assert c["name"] and c["image"].startswith("densiray:"), c
            assert {"requests", "limits"} <= set(c["resources"])
            # credentials only from the Secret, never literally in the manifest
            assert {"secretRef": {"name": "densiray-s3", "optional": True}} in c.get("envFrom", [])
            assert not any(e["name"].startswith("AWS_") for e in c.get("env", []))


def test_kuberay_raycluster():
    (doc,) = _docs("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_this_repositorys_training_entry_point():
    (doc,) = _docs("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    yaml.safe_load(spec["runtimeEnvYAML"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == "/home/ray/densiray/jobs/train.py"
    assert (ROOT / "jobs" / "train.py").is_file()
    # the arguments parse with the real command line (what the job would run)
    from densiray.cli import build_parser

    args = build_parser().parse_args(["train", *argv[2:]])
    assert args.workers == 2 and args.zero_stage == 3 and args.store.startswith("s3://")


def test_kuberay_rayservice_runs_this_repositorys_serve_app():
    (doc,) = _docs("rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService" and doc["metadata"]["name"]
    spec = doc["spec"]
    _check_ray_cluster_spec(spec["rayClusterConfig"])
    serve = yaml.safe_load(spec["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(serve)
    (app,) = serve["applications"]
    module, attr = app["import_path"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    from densiray.serve.settings import ServeSettings

    settings = ServeSettings.parse(app["args"])
    assert settings.store.startswith("s3://")


def test_dockerfile_copies_what_the_manifests_run():
    text = (K8S / "Dockerfile").read_text()
    import ray

    assert f"rayproject/ray:{ray.__version__}-" in text
    for path in ("src", "jobs", "serve", "pyproject.toml"):
        assert f"COPY --chown=ray:users {path}" in text and os.path.exists(ROOT / path)
