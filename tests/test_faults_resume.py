"""Long-run behaviour on the real stack: resume after a kill, dead workers replaced, a dead learner rank.

Each test runs `duet train` as a real subprocess (its own local Ray) and kills real processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from safetensors.torch import load_file

from cluster.metrics import read_metrics
from tests.helpers import SMALL_RUN, run_duet, start_train, steps_done, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = SMALL_RUN


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_resume_after_kill_matches_straight_run(tmp_path, model_cache, tiny_model):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = start_train(straight, "train.steps=4", *SMALL, model_cache=model_cache)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]

    p = start_train(killed, "train.steps=4", "checkpoint.every_steps=2", *SMALL, model_cache=model_cache)
    wait_for(
        lambda: (killed / "checkpoints" / "step_000002" / "driver_state.json").exists(),
        what="checkpoint 2",
        proc=p,
    )
    kill_group(p)  # SIGKILL: no clean shutdown, whatever step it was in
    # The kill landed mid-run: the process died by the signal, before its last step.
    assert p.returncode == -signal.SIGKILL, p.returncode
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


def test_dead_engine_and_reward_worker_are_replaced(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    steps, per_step = 12, 16
    p = start_train(
        run,
        f"train.steps={steps}",
        "rollout.num_engines=2",
        "train.check_weights_every_steps=1",
        f"data.synthetic_problems={steps * per_step}",
        "algorithm.filter_tied=false",
        "eval.every_steps=3",  # in-run evaluation shares the fleet: it must survive the replacement too
        "eval.synthetic_problems=16",
        "eval.samples_per_prompt=2",
        *SMALL,
        model_cache=model_cache,
    )
    wait_for(lambda: steps_done(run) >= 2, what="two steps", proc=p)
    actors = json.loads((run / "actors.json").read_text())
    os.kill(actors["engines"][0]["pid"], signal.SIGKILL)
    os.kill(actors["reward_workers"][0], signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    events = [e for m in metrics for e in m["events"]]
    assert any(e["event"] == "engine_replaced" for e in events), events
    assert any(e.get("component") == "reward_worker" for e in events), events
    for m in metrics:  # every engine, the new one included, holds the learner's weights before it generates
        assert m["sync/checksum_match"] is True
        assert m["sync/engine_versions"] == [m["policy_version"]] * 2
        assert m["rollouts"] == 2 * per_step
    trained = [i for m in metrics for i in m["data/trained_prompts"]]
    assert sorted(trained) == list(range(steps * per_step))  # no prompt lost, none trained twice
    evaluated = [m["step"] for m in metrics if "eval/avg@n" in m]
    assert evaluated == [3, 6, 9, 12] and all(
        0.0 <= m["eval/avg@n"] <= 1.0 for m in metrics if "eval/avg@n" in m
    )


def test_dead_learner_stops_with_checkpoint_then_resumes(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    p = start_train(run, "train.steps=8", "checkpoint.every_steps=1", *SMALL, model_cache=model_cache)
    wait_for(lambda: steps_done(run) >= 2, what="two steps", proc=p)
    os.kill(json.loads((run / "actors.json").read_text())["learner"][0], signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1
    assert "learner rank died" in err and "last checkpoint:" in err and f"--resume {run}" in err
    r = run_duet("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 9))
