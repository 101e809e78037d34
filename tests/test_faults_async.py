"""Faults in asynchronous mode (train.max_staleness_versions=1) with ONE engine, on the real stack: a dead
learner rank, then vLLM dead and vLLM hung under live engine actors. (Dead engine actors, a dead
`VLLM::Worker` and a dead reward worker in synchronous mode: tests/test_faults_engines.py.)

With one engine nothing else generates while it is gone: the loop itself must notice (every generate call
failing at once, or no group for a while), replace the engine and go on, and apply control requests
meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster.metrics import read_metrics
from tests.helpers import (
    REPO,
    descendants,
    duet_cmd,
    engine_pid,
    kill_group,
    kill_leftovers,
    paused_after,
    running,
    steps_done,
    vllm_process,
    wait_for,
)
from tests.helpers import start_train as start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A silent engine is looked for after 5 s without a group (20 s by default): steps here take about a second.
ASYNC = ["train.max_staleness_versions=1", "rollout.num_engines=1", "rollout.stall_check_s=5"]


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the run's complete checkpoints (driver_state.json is written last), ascending."""
    root = run / "checkpoints"
    done = root.glob("step_*/driver_state.json") if root.exists() else []
    return sorted(int(f.parent.name[5:]) for f in done)


def test_async_dead_learner_then_one_engine_killed_then_silent(tmp_path, model_cache, tiny_model):
    """Async mode, one engine, two launches of one run.

    First launch: a checkpoint asked through the control API, then the learner rank SIGKILLed: the run
    stops (exit 1) naming the checkpoint and the command that continues it.
    Resumed launch: the only engine's `VLLM::EngineCore` SIGKILLed (what a CUDA error or an out-of-memory
    kill does: the actor lives on and every generate call on it fails at once), later the new engine's
    `VLLM::EngineCore` SIGSTOPped (a core stuck in a GPU collective: nothing fails, nothing comes, the actor
    answers; the loop must notice by itself, by asking the core). Then, unpaused, the reward worker is
    SIGSTOPped, so a step waits for data for as long as the test holds it: a checkpoint asked meanwhile is
    applied inside that step (`Trainer.applied_midstep`, issue 22 finding 9) and is of the last step trained;
    the run goes on once the worker is let go, and finishes every step."""
    run = tmp_path / "run"
    # The first launch starts paused and runs one step, so its checkpoint is of step 1 however fast the
    # steps are; the resumed launch needs steps left for its own faults.
    steps, per_step = 12, 8
    p = start(
        run,
        f"train.steps={steps}",
        *ASYNC,
        f"rollout.prompts_per_step={per_step}",
        "run.progress=false",
        "train.check_weights_every_steps=1",
        "run.dashboard=false",  # start-up is much of this test's time; no fault here concerns these
        "run.ray_metrics=false",
        "rewards.num_workers=1",
        "control.start_paused=true",
        model_cache=model_cache,
    )
    try:
        url, auth = paused_after(run, None, p)
        assert httpx.post(f"{url}/resume", json={"steps": 1}, headers=auth).status_code == 200
        paused_after(run, 1, p)
        assert httpx.post(f"{url}/checkpoint", headers=auth).status_code == 200  # applied while paused
        [resume_step] = wait_for(running(p, lambda: checkpoint_steps(run)), what="the checkpoint asked for")
        assert resume_step == 1, resume_step
        dead_learner = json.loads((run / "actors.json").read_text())["learner"][0]
        os.kill(dead_learner, signal.SIGKILL)
        assert (
            httpx.post(f"{url}/resume", headers=auth).status_code == 200
        )  # the next step meets the dead rank
        _, err = p.communicate(timeout=300)
    finally:
        kill_group(p)
    assert p.returncode == 1, err[-3000:]
    assert "learner rank died" in err and "last checkpoint:" in err and f"--resume {run}" in err
    assert steps_done(run) < steps  # the kill landed before the run was over

    # Started paused too: each fault lands between two given steps, however fast the steps are.
    p = subprocess.Popen(
        duet_cmd("train", "--resume", str(run), "control.start_paused=true"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    leftovers: list[int] = []
    try:
        # actors.json is rewritten once the resumed launch has loaded its checkpoint (metrics cut back to it)
        wait_for(
            running(p, lambda: json.loads((run / "actors.json").read_text())["learner"][0] != dead_learner),
            what="the resumed launch started",
        )
        url, auth = paused_after(run, None, p)
        assert httpx.post(f"{url}/resume", json={"steps": 1}, headers=auth).status_code == 200
        paused_after(run, resume_step + 1, p)
        first = engine_pid(run)
        leftovers += [first, *descendants(first)]
        # The loop is paused; the producer generates ahead (up to the staleness bound) on its own.
        os.kill(vllm_process(first, "VLLM::EngineCore"), signal.SIGKILL)
        assert httpx.post(f"{url}/resume", json={"steps": 2}, headers=auth).status_code == 200
        wait_for(
            running(p, lambda: engine_pid(run) not in (None, first)),
            what="the engine whose vLLM engine core died replaced",
        )
        second = engine_pid(run)
        # Paused, the loop waits between steps: the SIGSTOP cannot land inside a weight transfer (which
        # waits on the engines without a deadline).
        paused_after(run, resume_step + 3, p)
        leftovers += [second, *descendants(second)]
        # Its vLLM engine core stopped, as one stuck in a GPU collective: the actor answers, nothing comes.
        os.kill(vllm_process(second, "VLLM::EngineCore"), signal.SIGSTOP)
        assert httpx.post(f"{url}/resume", json={"steps": 2}, headers=auth).status_code == 200
        held = resume_step + 5
        paused_after(run, held, p)
        assert engine_pid(run) != second, "the hung engine was not replaced"

        # A checkpoint asked while a step waits for data, unpaused (issue 22, finding 9). The reward worker
        # stopped, nothing the producer generates gets scored: the loop's next step short of data waits
        # (saying so in /status) for as long as the test holds the worker, and applies requests meanwhile.
        worker = json.loads((run / "actors.json").read_text())["reward_workers"][0]
        os.kill(worker, signal.SIGSTOP)
        try:
            assert httpx.post(f"{url}/resume", headers=auth).status_code == 200
            waiting = wait_for(
                running(p, lambda: httpx.get(f"{url}/status", timeout=10).json().get("waiting")),
                what="a step waiting for data",
            )
            waited_step = waiting["step"]
            assert waited_step > held and waiting["for"].startswith("data: "), waiting
            assert httpx.post(f"{url}/checkpoint", headers=auth).status_code == 200
            checkpoint_step = wait_for(
                running(p, lambda: [s for s in checkpoint_steps(run) if s > held]),
                what="the checkpoint asked for while a step waits for data",
            )[-1]
            assert steps_done(run) == waited_step - 1, "the step that waited ended before the worker went on"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    finally:
        kill_group(p)
        kill_leftovers(leftovers)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    events = [e for m in metrics for e in m["events"]]
    replaced = [e for e in events if e["event"] == "engine_replaced"]
    assert len(replaced) == 2, events
    assert "vLLM died" in replaced[0]["reason"] and "vLLM hung" in replaced[1]["reason"], replaced
    # The first launch's checkpoint event is in a row after its checkpoint: the resumed launch redid it.
    asked = [e for e in events if e["event"] == "checkpoint"]
    assert len(asked) == 1, events
    # Applied inside the step that waited, recorded in that step's row, and of the last step trained.
    assert asked[0].get("during_step") == waited_step, asked
    assert asked[0] in metrics[waited_step - 1]["events"], metrics[waited_step - 1]["events"]
    assert checkpoint_step == waited_step - 1, (checkpoint_step, waited_step)
    checkpoint = run / "checkpoints" / f"step_{checkpoint_step:06d}"
    assert Path(asked[0]["path"]) == checkpoint, asked
    state = json.loads((checkpoint / "driver_state.json").read_text())
    trained = metrics[checkpoint_step - 1]
    assert (state["step"], state["policy_version"]) == (trained["step"], trained["policy_version"]), state
    for m in metrics:
        assert m["groups/trained"] == per_step
        assert all(int(age) <= 1 for age in m["staleness/histogram"])
        assert m["sync/checksum_match"] is True
