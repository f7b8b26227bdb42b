"""Cluster configs in deploy/: valid for Ray's own checks, autoscaling, and locked down."""

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _pinned(package: str) -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in dependencies if re.match(rf"{package}\b", d))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_configs_pass_rays_checks(name):
    config = _load(name)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first

    types = config["available_node_types"]
    assert set(types) == {"head", "cpu", "gpu"} and config["head_node_type"] == "head"
    for worker in ("cpu", "gpu"):
        assert types[worker]["min_workers"] == 0 < types[worker]["max_workers"]
    for node_type in types.values():  # every node reaches the bucket with its own identity
        node = node_type["node_config"]
        assert node.get("IamInstanceProfile") or node["serviceAccounts"][0]["email"]
    gpu = types["gpu"]["node_config"]
    assert gpu.get("InstanceType", "g").startswith(("g", "p")) or gpu["guestAccelerators"]
    assert any(o.startswith("--shm-size=") for o in config["docker"]["run_options"])

    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "dashboard and job API must stay private"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command == "ray stop" or "RAY_AUTH_MODE=token" in command
    setup = " ".join(config["setup_commands"])
    for package in ("torch", "torchvision"):
        assert f'"{_pinned(package)}"' in setup


def test_the_schema_check_can_fail():
    config = prepare_config(_load("aws.yaml"))
    config["available_node_types"]["gpu"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_runtime_env_ships_code_not_data_with_the_pinned_torch():
    spec = _load("runtime_env.yaml")
    env = RuntimeEnv(**spec)  # Ray's own validation of every field
    assert {"data/", "runs/", ".venv/"} <= set(env["excludes"])
    assert {_pinned("torch"), _pinned("torchvision")} <= set(spec["pip"])


def test_rayjob_runs_a_valid_pretrain_command_on_an_autoscaling_private_cluster():
    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline", "pretrain"]
    config_path = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    load_config(ROOT / config_path, overrides)  # the job's config is valid as written
    locations = {key: value for key, value in (o.split("=", 1) for o in overrides)}
    for key in ("data.train", "data.eval_train", "data.eval_test", "run.root"):
        assert locations[key].startswith("s3://"), f"{key}: pods share no filesystem"

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "ray-ssl"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "ray-ssl"  # the bucket's credentials
        assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/dev/shm"
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
