"""cluster.yaml, checked the way `ray up` checks it, and sized against the model presets it is meant for.

`ray up` loads the YAML, looks the provider up, runs Ray's `prepare_config` (merge with the provider's
defaults.yaml, merge setup commands, docker checks, per-type worker bounds) and then `validate_config`
(the installed wheel's ray/autoscaler/ray-schema.json plus its cross-field rules). The same functions run
here, offline: the remaining steps of `ray up` (resource autodetection, IAM/subnet/key bootstrap) call AWS.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import validate_node_label_syntax
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.cluster import sizing

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
WORKLOAD_LABEL = "gsva/workload"


def load_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validate(config: dict) -> dict:
    """The offline part of `ray up`: provider lookup, prepare_config, validate_config. Returns the result."""
    if config["provider"]["type"] not in _NODE_PROVIDERS:
        raise ValueError(f"unknown provider type {config['provider']['type']!r}")
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def fit_problems(config: dict, shapes: dict[str, sizing.ModelShape]) -> list[str]:
    """Every way a node type fails the presets its workload label promises (empty when all fit)."""
    meta = config["metadata"]["gsva"]
    problems = []
    for name, node_type in config["available_node_types"].items():
        hardware = sizing.instance(node_type["node_config"]["InstanceType"])
        workload = node_type.get("labels", {}).get(WORKLOAD_LABEL)
        if workload == "inference":
            for preset in meta["inference_presets"]:
                if sizing.replicas_per_gpu(shapes[preset], hardware.gpu) < 1:
                    need = sizing.inference_memory_bytes(shapes[preset]) / sizing.GIB
                    problems.append(f"{name}: a {preset} replica needs {need:.1f} GiB, "
                                    f"one {hardware.gpu.name} has {hardware.gpu.memory_gib:.1f} GiB")
        elif workload == "training":
            for preset in meta["training_presets"]:
                if not sizing.training_fits(shapes[preset], hardware.gpu):
                    need = sizing.training_memory_bytes(shapes[preset]) / sizing.GIB
                    problems.append(f"{name}: a {preset} training worker needs {need:.1f} GiB, "
                                    f"one {hardware.gpu.name} has {hardware.gpu.memory_gib:.1f} GiB")
    return problems


@pytest.fixture(scope="module")
def shapes() -> dict[str, sizing.ModelShape]:
    meta = load_config()["metadata"]["gsva"]
    names = sorted(set(meta["inference_presets"]) | set(meta["training_presets"]))
    return {name: sizing.shape_from_preset(name) for name in names}


def test_cluster_yaml_passes_ray_up_validation():
    prepared = ray_up_validate(load_config())
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert types["head"]["resources"] == {"CPU": 0}, "pipeline work must not land on the head"
    workers = {k: v for k, v in types.items() if k != "head"}
    assert all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values()), "autoscale from 0"
    assert sum(v["max_workers"] for v in workers.values()) >= prepared["max_workers"] > 0
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    assert {v["labels"][WORKLOAD_LABEL] for v in workers.values()} == {"cpu", "inference", "training"}
    for node_type in types.values():
        validate_node_label_syntax(node_type.get("labels"))  # what `ray start` enforces on the node


def test_image_is_this_ray_and_installs_the_working_copy():
    config = ray_up_validate(load_config())
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert any(re.search(rf"pip install .*{re.escape(remote)}\s*$", c) for c in config["setup_commands"])
    assert config["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert "**/.venv" in config["rsync_exclude"] and ".gitignore" in config["rsync_filter"]


def test_no_credentials_in_config():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_session_token", text, re.IGNORECASE)
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text)
    config = load_config()
    assert "aws_credentials" not in config["provider"]
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} needs an instance profile for S3"
    # The token travels as a file from ~/.ray/auth_token; every process in the container runs in token mode.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]


def test_declared_resources_match_the_hardware():
    for name, node_type in load_config()["available_node_types"].items():
        hardware = sizing.instance(node_type["node_config"]["InstanceType"])
        resources = node_type["resources"]
        assert 0 <= resources["CPU"] <= hardware.vcpus, name
        assert resources.get("GPU", 0) == hardware.gpus, name
        if hardware.gpu is not None:
            assert resources[f"accelerator_type:{hardware.gpu.ray_accelerator_type}"] == 1, name


def test_every_gpu_node_type_fits_its_presets(shapes):
    config = load_config()
    assert fit_problems(config, shapes) == []
    # And the check has teeth: 13B training does not fit p4d's 40 GB A100s.
    config["available_node_types"]["gpu-train-a100"]["node_config"]["InstanceType"] = "p4d.24xlarge"
    assert any("gsva-13b training worker" in p for p in fit_problems(config, shapes))


def test_sizing_from_preset_parameter_counts(shapes):
    seven, thirteen = shapes["gsva-7b"], shapes["gsva-13b"]
    # Llama 6.74B / 13.0B + CLIP ViT-L 0.30B + SAM ViT-H 0.64B + heads.
    assert 7.6e9 < seven.total_params < 7.8e9 and 13.9e9 < thirteen.total_params < 14.1e9
    assert seven.trainable_params < 0.05 * seven.total_params
    weights_7b = seven.total_params * sizing.BF16_BYTES
    assert weights_7b < sizing.inference_memory_bytes(seven) < 1.6 * weights_7b
    l40s = sizing.instance("g6e.12xlarge")
    assert sizing.replicas_per_node(thirteen, l40s) == l40s.gpus  # one 13B replica per 48 GB GPU
    assert sizing.replicas_per_node(seven, sizing.instance("m6i.8xlarge")) == 0


def test_readme_sizing_numbers(shapes):
    """The README's sizing table quotes these estimates; a change to the model or the assumptions shows here."""
    gib = {name: (sizing.inference_memory_bytes(shape) / sizing.GIB, sizing.training_memory_bytes(shape) / sizing.GIB)
           for name, shape in shapes.items()}
    assert gib["gsva-7b"] == (pytest.approx(20.3, abs=0.05), pytest.approx(27.6, abs=0.05))
    assert gib["gsva-13b"] == (pytest.approx(33.6, abs=0.05), pytest.approx(43.9, abs=0.05))
    assert sizing.images_per_second_per_gpu(shapes["gsva-7b"], sizing.L40S) == pytest.approx(2.88, abs=0.01)


def test_unknown_instance_type_is_named():
    with pytest.raises(KeyError, match="g9.huge"):
        sizing.instance("g9.huge")


def _set(path: list, value):
    def mutate(config):
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path: list):
    def mutate(config):
        target = config
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


@pytest.mark.parametrize("mutate, error, message", [
    (_set(["idle_timeout_minute"], 5), jsonschema.ValidationError, "'idle_timeout_minute' was unexpected"),
    (_set(["available_node_types", "gpu-infer-l40s", "resources", "GPU"], 0.5), jsonschema.ValidationError,
     "0.5 is not of type 'integer'"),
    (_set(["available_node_types", "gpu-infer-l40s", "max_worker"], 4), jsonschema.ValidationError,
     "'max_worker' was unexpected"),
    (_delete(["available_node_types", "cpu-worker", "resources"]), jsonschema.ValidationError,
     "'resources' is a required property"),
    (_set(["available_node_types", "cpu-worker", "min_workers"], 99), ValueError, "sum of `min_workers`"),
    (_set(["head_node_type"], "no-such-type"), ValueError, "must be one of `available_node_types`"),
], ids=["misspelled-key", "fractional-gpu", "misspelled-node-field", "no-resources", "min-over-max",
        "unknown-head-type"])
def test_broken_config_is_rejected(mutate, error, message):
    config = load_config()
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        ray_up_validate(config)
