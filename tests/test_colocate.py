"""One GPU for a whole run (cluster.colocate, issue 12): the engine and the learner rank share it.

On a one-GPU machine the plan used to ask for two GPUs (one engine, one learner rank) and preflight
refused it. Colocated, each takes half of the GPU in Ray's accounting and the weights go through host
memory (duet_host; NCCL refuses two ranks on one device). What a CPU can show is the plan, preflight and Ray's
placement: on a Ray node with one logical GPU both bundles are placed and both actors, started with the
plan's GPU shares, are given that GPU. vLLM and DeepSpeed on a real shared GPU: scripts/gpu-smoke.sh.
"""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config
from cluster.placement import make_plan
from cluster.preflight import Node, shortfalls

COLOCATE = ["run.device=cuda", "cluster.colocate=true", "rollout.gpu_memory_utilization=0.3"]
ONE_GPU = [Node("gpu", {"CPU": 8.0, "GPU": 1.0})]


def test_colocated_plan_halves_one_gpu_and_sends_weights_through_host_memory():
    plan = make_plan(load_config(overrides=COLOCATE))
    assert plan.colocated and plan.device == "cuda" and plan.weight_transfer == "duet_host"
    half = [{"GPU": 0.5, "CPU": 1}]
    assert plan.engine_bundles == half and plan.learner_bundles == half
    assert plan.engine_gpus() == 0.5 and plan.learner_gpus() == 0.5
    assert shortfalls(plan, ONE_GPU) == []
    # the same run without colocate needs a GPU each: one GPU is short by one
    apart = make_plan(load_config(overrides=["run.device=cuda"]))
    assert not apart.colocated and apart.weight_transfer == "duet_nccl"
    assert "missing {GPU: 1}" in shortfalls(apart, ONE_GPU)[0]
    # colocate means nothing on CPU
    assert not make_plan(load_config(overrides=[*COLOCATE[1:], "run.device=cpu"])).colocated


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rollout.num_engines=2", "rollout.num_engines"),
        ("rollout.max_engines=3", "rollout.max_engines"),
        ("rollout.gpus_per_engine=2", "rollout.gpus_per_engine"),
        ("learner.num_ranks=2", "learner.num_ranks"),
        ("rollout.gpu_memory_utilization=0.85", "rollout.gpu_memory_utilization"),
    ],
)
def test_a_colocated_run_that_cannot_share_one_gpu_is_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        load_config(overrides=[*COLOCATE, override])
    assert "cluster.colocate" in str(e.value)


@pytest.mark.integration
def test_both_actors_are_given_the_one_gpu():
    """A local Ray with one logical GPU: preflight passes, the learner's and the engine's placement groups
    are placed (within their deadline), and actors started as the fleet and the learner group start
    theirs (the plan's GPU share, in their bundle) are both given GPU 0."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.preflight import PreflightError, check_plan, wait_placed

    @ray.remote(num_cpus=0)
    class Probe:
        def gpus(self) -> tuple[list, str]:
            import os

            return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES", "")

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        # auto: the cluster has a GPU. A logical GPU answers no memory, so its size is given: the tiny model's
        # learner and engine fit 80 GiB, and the size check runs instead of warning that it could not.
        cfg = load_config(overrides=[*COLOCATE[1:], "run.device=auto", "cluster.gpu_memory_gib=80"])
        plan, warnings = check_plan(cfg)
        assert plan.colocated and plan.device == "cuda" and not warnings
        learner_pg = placement_group(plan.learner_bundles, strategy="PACK")
        wait_placed(learner_pg, 30, "learner")
        engine_pg = placement_group([plan.engine_bundles[0]])
        wait_placed(engine_pg, 30, "RolloutEngine 0")
        seen = []
        for pg, share in ((engine_pg, plan.engine_gpus()), (learner_pg, plan.learner_gpus())):
            probe = Probe.options(
                num_gpus=share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote()
            seen.append(ray.get(probe.gpus.remote(), timeout=60))
        assert seen == [(["0"], "0"), (["0"], "0")], seen
        # The GPU is full: a second engine (a `duet scale` past one) is refused at its deadline, not hung.
        with pytest.raises(PreflightError, match="RolloutEngine 1: placement group"):
            wait_placed(placement_group([plan.engine_bundles[0]]), 2, "RolloutEngine 1")
        # Not colocated, the same one-GPU cluster is refused before anything is placed.
        with pytest.raises(PreflightError, match=r"missing \{GPU: 1\}"):
            check_plan(load_config(overrides=["run.device=auto"]))
    finally:
        ray.shutdown()
