"""The deployment files (deploy/): they parse, name what exists, and every lvdkit command they run is one that
``lvdkit`` accepts (its config resolved with ``--print-config``, every key checked, nothing run)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import ray
import yaml

from lvdkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Where the image and the shared volume put files, and where they are in this checkout.
IN_CHECKOUT = {"/data/curate.yaml": str(DEPLOY / "curate.yaml"), "/opt/lvdkit/configs/": str(ROOT / "configs") + "/"}


def _resolved(command: str) -> dict[str, Any]:
    """``lvdkit ARGS --print-config`` in this process: the resolved config, or an assertion naming the command."""
    for image_path, here in IN_CHECKOUT.items():
        command = command.replace(image_path, here)
    argv = shlex.split(command)
    assert argv[0] == "lvdkit", command
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main([*argv[1:], "--print-config"])
    assert status == 0, command
    return dict(yaml.safe_load(printed.getvalue()))


def test_rayjob_entrypoint_is_lvdkit_commands_that_lvdkit_accepts() -> None:
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    commands = [c.strip() for c in job["spec"]["entrypoint"].split("&&")]
    assert [shlex.split(c)[1] for c in commands] == ["curate", "pretrain"]
    curate, pretrain = (_resolved(c) for c in commands)
    assert curate["ray"]["address"] == "auto" and curate["out"] == "/data/out"
    assert pretrain["ray"]["address"] == "auto" and pretrain["data"] == "/data/out/curated"
    assert pretrain["use_gpu"] is True and pretrain["num_workers"] == 2


def test_rayjob_cluster_matches_the_image_and_the_tested_ray() -> None:
    spec = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in groups.values())]
    for pod in pods:  # every pod runs the lvdkit image and mounts the shared OUT where the entrypoint writes it
        container = pod["spec"]["containers"][0]
        assert container["image"] == "lvdkit:gpu"
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]


def test_dockerfile_builds_on_the_tested_ray_with_gpu_faiss_only() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert base is not None and base.group(1).startswith(ray.__version__ + "-")
    for line in re.findall(r"^COPY .*$", text, re.M):  # what it copies exists in the repository
        for source in line.split()[1:-1]:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), line
    install = re.search(r"pip install [^\n]*'\.\[([a-z,]+)\]'", text)
    assert install is not None and "gpu" in install.group(1).split(",") and "cpu" not in install.group(1)


def test_cluster_launcher_yaml_names_its_node_types() -> None:
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert max(t.get("max_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert cluster["docker"]["image"].endswith("lvdkit:gpu")
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])


def test_cluster_curate_config_resolves() -> None:
    cfg = _resolved(f"lvdkit curate --config {DEPLOY / 'curate.yaml'}")
    assert cfg["out"] == "/data/out" and cfg["ingest"]["inputs"] == ["/data/raw"]
