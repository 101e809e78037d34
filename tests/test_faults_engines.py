"""Dead engines and reward workers on the real stack (synchronous mode): an engine's Ray actor and another
engine's vLLM worker process (under its live actor) SIGKILLed together with a reward worker; each is
replaced and the run finishes every step.

The test runs `duet train` as a real subprocess (its own local Ray) and kills real processes. Start-up
(Ray, the learner, the engines) and each engine's replacement are most of its time, so the faults land
together. Elsewhere: vLLM's engine core killed, then another's stopped (hung), under live actors, in
asynchronous mode with one engine (tests/test_faults_async.py); a synchronous step's wait on an engine that
hangs (tests/test_liveness.py); the learner rank killed and the driver killed at fault points, each resumed
(tests/test_crash_consistency.py); whole nodes (tests/test_cluster_sim.py).
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from cluster.metrics import read_metrics
from tests.helpers import (
    descendants,
    engine_pid,
    kill_group,
    kill_leftovers,
    paused_after,
    running,
    start_train,
    steps_done,
    vllm_process,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_dead_engine_actor_vllm_worker_and_reward_worker_are_replaced(tmp_path, model_cache, tiny_model):
    """Engine 1's `VLLM::Worker` (what a CUDA error or an OOM kill does: the actor lives on and every call
    on it fails with EngineDeadError), engine 0's Ray actor and a reward worker SIGKILLed together. Both
    engines are replaced, side by side, before the new weight-transfer group opens, and get the learner's
    weights before they generate; the run finishes every step, no prompt lost or trained twice, the in-run
    evaluation (which shares the fleet) included. Every step's groups pass through a replay queue that
    holds a quarter of them."""
    run = tmp_path / "run"
    steps, per_step = 9, 16
    p = start_train(
        run,
        f"train.steps={steps}",
        f"rollout.prompts_per_step={per_step}",
        f"data.synthetic_problems={steps * per_step}",
        "rollout.num_engines=2",
        # vLLM's worker as a process of its own (what a tensor-parallel engine's workers are), so that it
        # can die while its engine core lives; with the default `uni` executor it runs inside the core.
        "rollout.cpu_executor=mp",
        # Every group goes to the replay queue, 16 a step through a queue of 4: a synchronous step whose
        # groups outnumber the queue must not wait on itself (`put` blocking before `take` is called).
        "algorithm.filter_tied=false",
        "train.queue_capacity_groups=4",
        "eval.every_steps=3",  # in-run evaluation shares the fleet: it must survive the replacements too
        "eval.synthetic_problems=16",
        "eval.samples_per_prompt=2",
        "train.check_weights_every_steps=1",
        "run.progress=false",
        "run.dashboard=false",  # start-up is most of this test's time; no fault here concerns these two
        "run.ray_metrics=false",
        "control.start_paused=true",
        model_cache=model_cache,
    )
    orphans: list[int] = []
    try:
        # Three steps, then the loop holds again: the kills land in step 3 or just after it, never after the
        # run's last step, however fast the steps are.
        url, auth = paused_after(run, None, p)
        assert httpx.post(f"{url}/resume", json={"steps": 3}, headers=auth).status_code == 200
        wait_for(running(p, lambda: steps_done(run) >= 2), what="two steps")
        first, other = engine_pid(run, 0), engine_pid(run, 1)
        orphans += [*descendants(first), *descendants(other)]
        os.kill(vllm_process(other, "VLLM::Worker"), signal.SIGKILL)
        os.kill(first, signal.SIGKILL)
        os.kill(json.loads((run / "actors.json").read_text())["reward_workers"][0], signal.SIGKILL)
        assert httpx.post(f"{url}/resume", headers=auth).status_code == 200
        wait_for(
            running(
                p, lambda: engine_pid(run, 0) not in (None, first) and engine_pid(run, 1) not in (None, other)
            ),
            what="the killed engine actor and the engine whose vLLM worker died replaced",
        )
        orphans += [*descendants(engine_pid(run, 0)), *descendants(engine_pid(run, 1))]
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    finally:
        kill_group(p)
        kill_leftovers(orphans)

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    events = [e for m in metrics for e in m["events"]]
    replaced = [e for e in events if e.get("event") == "engine_replaced"]
    assert len(replaced) == 2, events  # each death written once
    assert len([e for e in events if e.get("component") == "reward_worker"]) == 1, events
    replaced.sort(key=lambda e: e["old"])
    assert [e["old"] for e in replaced] == [0, 1], replaced
    assert "actor died" in replaced[0]["reason"] and "vLLM died" in replaced[1]["reason"], replaced
    for m in metrics:  # every engine, the new ones included, holds the learner's weights before it generates
        assert m["sync/checksum_match"] is True
        assert m["sync/engine_versions"] == [m["policy_version"]] * 2
        assert m["rollouts"] == 2 * per_step and m["groups/trained"] == per_step
    trained = [i for m in metrics for i in m["data/trained_prompts"]]
    assert sorted(trained) == list(range(steps * per_step))  # no prompt lost, none trained twice
    evaluated = [m["step"] for m in metrics if "eval/avg@n" in m]
    assert evaluated == [3, 6, 9] and all(0.0 <= m["eval/avg@n"] <= 1.0 for m in metrics if "eval/avg@n" in m)
