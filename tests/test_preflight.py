"""Preflight (issue 12, finding 6): the plan against what the cluster has, failing in seconds.

Before: `run.device=auto` came from the driver's own torch (a head without GPUs chose CPU for a GPU
cluster), and a plan the cluster could not hold left `placement_group(...).ready()` waiting forever.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from cluster.config import load_config
from cluster.placement import make_plan
from cluster.preflight import Node, shortfalls
from tests.cluster_sim import netns_available, sim_cluster
from tests.helpers import REPO, duet_cmd

GPU_NODE = {"CPU": 32.0, "GPU": 8.0}


def _plan(*overrides: str):
    return make_plan(load_config(overrides=["run.device=cuda", *overrides]))


def test_a_plan_that_fits_has_no_shortfall():
    # the shipped 1.5B layout: 4 engines + 4 ranks on one 8-GPU node (head: no GPUs)
    plan = _plan("rollout.num_engines=4", "learner.num_ranks=4")
    assert shortfalls(plan, [Node("head", {"CPU": 8.0}), Node("gpu", GPU_NODE)]) == []


def test_an_engine_wider_than_any_node_is_named():
    # 16 GPUs in all, but a tensor-parallel engine's bundle is one node's: 2 × 8 GPUs cannot hold TP 16
    plan = _plan("rollout.gpus_per_engine=16", "learner.num_ranks=1")
    lines = shortfalls(plan, [Node("10.0.0.2", GPU_NODE), Node("10.0.0.3", GPU_NODE)])
    text = "\n".join(lines)
    assert "RolloutEngine 0 needs {CPU: 1, GPU: 16} on one node" in text
    assert "missing {GPU: 1}" in text and "10.0.0.2 {CPU: 32, GPU: 8}" in text


def test_gpus_short_in_all_and_custom_resources_are_named():
    plan = _plan("rollout.num_engines=8", "learner.num_ranks=8")  # 16 GPUs on an 8-GPU cluster
    assert "missing {GPU: 8}" in shortfalls(plan, [Node("gpu", GPU_NODE)])[0]
    steered = _plan("cluster.engine_resources={rollout_node: 1}")
    text = "\n".join(shortfalls(steered, [Node("gpu", GPU_NODE)]))
    assert "RolloutEngine 0 needs {CPU: 1, GPU: 1, rollout_node: 1}" in text


def test_device_auto_follows_the_cluster_not_the_driver():
    cfg = load_config()
    assert make_plan(cfg, cluster_gpus=8).device == "cuda"  # a GPU cluster seen from a GPU-less head
    assert make_plan(cfg, cluster_gpus=0).device == "cpu"


def test_steering_resources_are_validated():
    with pytest.raises(ValueError, match=r"cluster\.engine_resources"):
        load_config(overrides=["cluster.engine_resources={GPU: 1}"])
    with pytest.raises(ValueError, match="must be > 0"):
        load_config(overrides=["cluster.learner_resources={learner_node: 0}"])


@pytest.mark.integration
def test_train_on_cuda_without_gpus_fails_within_seconds(tmp_path, model_cache, tiny_model):
    t0 = time.monotonic()
    proc = subprocess.run(
        duet_cmd(
            "train", "--run-dir", str(tmp_path / "run"), f"model.cache_dir={model_cache}", "run.device=cuda",
            "control.enabled=false",
        ),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "cannot hold the placement plan (run.device=cuda)" in proc.stderr, proc.stderr[-3000:]
    assert "missing {GPU: 2}" in proc.stderr and "learner rank 0 needs {CPU: 1, GPU: 1}" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"


@pytest.mark.integration
@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
def test_dry_run_reads_the_cluster_a_gpu_less_head_gpu_workers(tmp_path):
    """Dry-run from the head (no GPUs, no CPUs) of a cluster whose workers have 2 logical GPUs each:
    `auto` is CUDA, and an engine of 4 GPUs is refused in seconds with each node's resources."""
    with sim_cluster([{}, {}], worker_gpus=[2, 2]) as cluster:
        env = dict(cluster.env, RAY_ADDRESS=f"{cluster.head.address}:6379")

        def dry(*overrides: str) -> subprocess.CompletedProcess:
            return cluster.exec(
                cluster.head, *duet_cmd("train", "--dry-run", *overrides),
                env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        ok = dry("rollout.num_engines=2", "learner.num_ranks=2")
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "device: cuda (weight transfer: duet_nccl)" in ok.stdout, ok.stdout

        t0 = time.monotonic()
        wide = dry("rollout.gpus_per_engine=4")
        assert wide.returncode == 1, wide.stdout + wide.stderr[-3000:]
        assert "RolloutEngine 0 needs {CPU: 1, GPU: 4} on one node" in wide.stderr, wide.stderr[-3000:]
        for worker in cluster.workers:
            assert f"{worker.address} {{CPU: 4, GPU: 2}}" in wide.stderr
        assert time.monotonic() - t0 < 60
