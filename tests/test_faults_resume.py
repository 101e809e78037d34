"""Long-run behaviour on the real stack (synchronous mode): a dead learner rank stops the run with a resume
hint and the resumed run matches a straight one; dead engines (their Ray actor, or vLLM's own processes
under a live actor) and a dead reward worker are replaced and the run finishes.

Each test runs `duet train` as a real subprocess (its own local Ray) and kills real processes. Start-up
(Ray, the learner, the engines) is most of a launch's time, so each test puts several faults into one run.
The driver killed from outside at an arbitrary point, and resumed: tests/test_crash_consistency.py.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from safetensors.torch import load_file

from cluster.metrics import read_metrics
from tests.helpers import (
    SMALL_RUN,
    descendants,
    engine_pid,
    kill_group,
    kill_leftovers,
    run_duet,
    running,
    start_train,
    steps_done,
    vllm_process,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = SMALL_RUN


def test_dead_learner_stops_with_checkpoint_then_resume_matches_straight_run(
    tmp_path, model_cache, tiny_model
):
    """The learner rank SIGKILLed mid-run: the run stops (exit 1) naming the last checkpoint and the
    command that continues it; `--resume` then gives what a run never interrupted gives (data order,
    rewards, losses, final weights)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The reference run alongside the one to be killed (each its own local Ray): start-up, most of a
    # launch, is not CPU-bound throughout, so two side by side take less than two in a row.
    ref = start_train(straight, "train.steps=4", *SMALL, model_cache=model_cache)
    p = start_train(killed, "train.steps=4", "checkpoint.every_steps=2", *SMALL, model_cache=model_cache)
    try:
        wait_for(
            lambda: (killed / "checkpoints" / "step_000002" / "driver_state.json").exists(),
            what="checkpoint 2",
            proc=p,
        )
        os.kill(json.loads((killed / "actors.json").read_text())["learner"][0], signal.SIGKILL)
        _, err = p.communicate(timeout=300)
        _, ref_err = ref.communicate(timeout=600)
        assert ref.returncode == 0, ref_err[-3000:]
    finally:
        kill_group(p)
        kill_group(ref)
    assert p.returncode == 1, err[-3000:]
    assert "learner rank died" in err and "last checkpoint:" in err and f"--resume {killed}" in err
    # The kill landed mid-run: before its last step.
    assert steps_done(killed) < 4 and not (killed / "checkpoints" / "step_000004").exists()
    r = run_duet("train", "--resume", str(killed))
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["data/prompts"] == y["data/prompts"]  # same data order
        for key in ("reward/mean", "groups/with_signal", "tokens/generated", "policy_version"):
            assert x[key] == y[key], (x["step"], key)
        assert abs(x["train/loss"] - y["train/loss"]) < 1e-6
        assert abs(x["train/grad_norm"] - y["train/grad_norm"]) < 1e-5
    wa = load_file(straight / "checkpoints" / "step_000004" / "hf" / "model.safetensors")
    wb = load_file(killed / "checkpoints" / "step_000004" / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_dead_engines_vllm_processes_and_reward_worker_are_replaced(tmp_path, model_cache, tiny_model):
    """One run, three engine deaths and a reward worker's: engine 1's `VLLM::Worker` (what a CUDA error or
    an OOM kill does), engine 0's Ray actor and a reward worker SIGKILLed together (both engines are
    replaced before the new transfer group opens, side by side when found dead together); then the new engine 0's `VLLM::EngineCore` (with vLLM's processes dead, the
    actor lives on and every call on it fails with EngineDeadError). Each dead engine is replaced and gets
    the learner's weights before it generates; the run finishes every step, no prompt lost or trained
    twice, the in-run evaluation included."""
    run = tmp_path / "run"
    steps, per_step = 12, 16
    p = start_train(
        run,
        f"train.steps={steps}",
        "rollout.num_engines=2",
        # vLLM's worker as a process of its own (what a tensor-parallel engine's workers are), so that it
        # can die while its engine core lives; with the default `uni` executor it runs inside the core.
        "rollout.cpu_executor=mp",
        "train.check_weights_every_steps=1",
        f"data.synthetic_problems={steps * per_step}",
        "algorithm.filter_tied=false",
        "eval.every_steps=3",  # in-run evaluation shares the fleet: it must survive the replacements too
        "eval.synthetic_problems=16",
        "eval.samples_per_prompt=2",
        *SMALL,
        model_cache=model_cache,
    )
    orphans: list[int] = []
    try:
        wait_for(running(p, lambda: steps_done(run) >= 2), what="two steps")
        first, other = engine_pid(run, 0), engine_pid(run, 1)
        orphans += [*descendants(first), *descendants(other)]
        os.kill(vllm_process(other, "VLLM::Worker"), signal.SIGKILL)
        os.kill(first, signal.SIGKILL)
        os.kill(json.loads((run / "actors.json").read_text())["reward_workers"][0], signal.SIGKILL)
        wait_for(
            running(
                p, lambda: engine_pid(run, 0) not in (None, first) and engine_pid(run, 1) not in (None, other)
            ),
            what="the killed engine actor and the engine whose vLLM worker died replaced",
        )
        second = engine_pid(run, 0)
        orphans += [*descendants(second), *descendants(engine_pid(run, 1))]
        os.kill(vllm_process(second, "VLLM::EngineCore"), signal.SIGKILL)
        wait_for(
            running(p, lambda: engine_pid(run, 0) not in (None, second)),
            what="the engine whose vLLM engine core died replaced",
        )
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    finally:
        kill_group(p)
        kill_leftovers(orphans)

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    events = [e for m in metrics for e in m["events"]]
    replaced = [e for e in events if e.get("event") == "engine_replaced"]
    assert len(replaced) == 3, events  # each death written once
    assert len([e for e in events if e.get("component") == "reward_worker"]) == 1, events
    first_two = sorted(replaced[:2], key=lambda e: e["old"])  # engines 0 and 1, replaced side by side
    assert [e["old"] for e in first_two] == [0, 1], replaced
    assert "actor died" in first_two[0]["reason"] and "vLLM died" in first_two[1]["reason"], replaced
    assert "vLLM died" in replaced[2]["reason"], replaced
    for m in metrics:  # every engine, the new ones included, holds the learner's weights before it generates
        assert m["sync/checksum_match"] is True
        assert m["sync/engine_versions"] == [m["policy_version"]] * 2
        assert m["rollouts"] == 2 * per_step
    trained = [i for m in metrics for i in m["data/trained_prompts"]]
    assert sorted(trained) == list(range(steps * per_step))  # no prompt lost, none trained twice
    evaluated = [m["step"] for m in metrics if "eval/avg@n" in m]
    assert evaluated == [3, 6, 9, 12] and all(
        0.0 <= m["eval/avg@n"] <= 1.0 for m in metrics if "eval/avg@n" in m
    )
