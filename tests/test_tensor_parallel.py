"""Tensor-parallel engines (issue 12, finding 1).

The plan used to make one bundle {"GPU": T} with an engine actor holding no GPU, so vLLM picked its
Ray executor inside the placement group, which refuses a bundle with more than one GPU. Now a
T-wide engine runs vLLM's `mp` executor with the actor holding its bundle's devices; on CPU the same
path runs with T worker processes, which is what the first test drives end to end.
"""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.placement import make_plan


def test_tensor_parallel_plan_names_the_mp_executor_and_the_actor_holds_the_gpus():
    cfg = load_config(overrides=["rollout.gpus_per_engine=4", "rollout.num_engines=2", "run.device=cuda"])
    plan = make_plan(cfg)
    assert plan.tensor_parallel_size == 4 and plan.engine_executor == "mp"
    assert plan.engine_bundles == [{"GPU": 4, "CPU": 1}] * 2
    assert plan.engine_gpus() == 4  # the actor, hence vLLM's workers, see exactly the bundle's GPUs
    single = make_plan(load_config(overrides=["run.device=cuda"]))
    assert single.engine_executor is None and single.engine_gpus() == 1
    cpu = make_plan(load_config(overrides=["rollout.gpus_per_engine=2", "run.device=cpu", "run.cpu_cores=4"]))
    assert cpu.engine_bundles == [{"CPU": 2}]
    assert cpu.engine_env[0]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"  # one core range per worker
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in cpu.engine_env[0]  # T worker processes: `mp`


def test_a_single_worker_cpu_engine_runs_its_worker_in_the_engine_core_unless_told():
    # vLLM's CPU platform turns `uni` into `mp` unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (cpu.py)
    uni = make_plan(load_config(overrides=["run.device=cpu", "rollout.num_engines=2"]))
    assert [e["VLLM_ENABLE_V1_MULTIPROCESSING"] for e in uni.engine_env] == ["0", "0"]
    mp = make_plan(load_config(overrides=["run.device=cpu", "rollout.cpu_executor=mp"]))
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in mp.engine_env[0]
    with pytest.raises(ValueError, match=r"rollout\.cpu_executor"):
        load_config(overrides=["rollout.cpu_executor=ray"])


def test_a_cpu_engine_runs_one_openmp_thread_per_core_it_is_bound_to():
    """Ray sets OMP_NUM_THREADS=1 (the bundle's CPU) in an actor that has none, and with the `uni` executor
    vLLM never sets it from the binding: the plan does (issue 24: the engine generated on one of its 2 cores)."""
    one = make_plan(load_config(overrides=["run.device=cpu", "run.cpu_cores=2"]))
    assert [(e["VLLM_CPU_OMP_THREADS_BIND"], e["OMP_NUM_THREADS"]) for e in one.engine_env] == [("0-1", "2")]
    two = make_plan(load_config(overrides=["run.device=cpu", "run.cpu_cores=4", "rollout.num_engines=2"]))
    assert [(e["VLLM_CPU_OMP_THREADS_BIND"], e["OMP_NUM_THREADS"]) for e in two.engine_env] == [
        ("0-1", "2"),
        ("2-3", "2"),
    ]
    # Asynchronous, bound automatically: the learner trains on those cores meanwhile, one thread stays.
    shared = make_plan(
        load_config(overrides=["run.device=cpu", "run.cpu_cores=2", "train.max_staleness_versions=1"])
    )
    assert shared.engine_env[0]["OMP_NUM_THREADS"] == "1"
    # Pinned by the user (the async benchmarks: engine on core 0, learner on core 1): what the pin says.
    pinned = make_plan(
        load_config(
            overrides=["run.device=cpu", "train.max_staleness_versions=1", "rollout.cpu_threads_bind='0,2-3'"]
        )
    )
    assert pinned.engine_env[0]["OMP_NUM_THREADS"] == "3"
    crowded = make_plan(load_config(overrides=["run.device=cpu", "run.cpu_cores=1", "rollout.num_engines=2"]))
    assert [e.get("OMP_NUM_THREADS") for e in crowded.engine_env] == [None, None]  # nobind: left to Ray


@pytest.mark.integration
@pytest.mark.slow
def test_two_engines_of_two_workers_receive_the_weights(local_ray, tiny_model):
    """2 engines × 2 vLLM workers (ranks 1-4 of the transfer group, after learner rank 0), started by
    the fleet from the plan: every worker gets the learner's bytes, and each engine then samples
    with the learner's weights (log-probs equal a transformers forward)."""
    ray = local_ray
    import torch
    from ray.util.placement_group import placement_group
    from transformers import AutoModelForCausalLM

    from cluster.fleet import RolloutFleet
    from learner.group import LearnerGroup
    from tests.helpers import assert_samples_from

    path = str(tiny_model)
    cfg = load_config(
        overrides=[
            "run.device=cpu",
            "rollout.num_engines=2",
            "rollout.gpus_per_engine=2",
            # one core per worker rank, both engines on the machine's two cores (ENVIRONMENT.md)
            "rollout.cpu_threads_bind=0|1",
            "learner.broadcast_bucket_mib=0.05",
        ]
    )
    plan = make_plan(cfg)
    assert plan.tensor_parallel_size == 2 and plan.engine_executor == "mp"
    fleet = RolloutFleet(cfg, plan, path)
    pg = placement_group(plan.learner_bundles)
    ray.get(pg.ready())
    learner = LearnerGroup(cfg, path, pg, "cpu", 1)
    try:
        fleet.start(2)
        assert fleet.workers_per_engine == 2
        learner.init_broadcast(fleet.engines, fleet.workers_per_engine, "duet_host")
        learner.perturb(0.05, seed=3)
        sent = learner.broadcast(5)
        assert sent["digest"] is not None
        assert fleet.received_digests() == [sent["digest"]] * 4  # 2 engines × 2 workers
        assert fleet.versions() == [5, 5]
        sums = fleet.checksums()
        assert len(sums[0]) == 2 and sums[0] == sums[1]  # one checksum table per TP worker
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(learner.full_state_dict())
        model.eval()
        for engine in fleet.engines:
            assert_samples_from(ray, engine, model, version=5, prompts=3)
    finally:
        fleet.shutdown()
        learner.shutdown()
