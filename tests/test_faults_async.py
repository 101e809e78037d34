"""Faults in asynchronous mode (train.max_staleness_versions=1) with ONE engine, and the deaths of vLLM's
own processes under a live engine actor, on the real stack.

With one engine nothing else generates while it is gone: the loop itself must notice (a failed generate
call, or no group for a while), replace the engine and go on, and apply control requests meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster.metrics import read_metrics
from tests.helpers import REPO, SMALL_RUN, duet_cmd, running, steps_done, wait_for
from tests.helpers import start_train as start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASYNC = ["train.max_staleness_versions=1", "rollout.num_engines=1"]


def engine_pid(run: Path) -> int:
    return json.loads((run / "actors.json").read_text())["engines"][0]["pid"]


def descendants(pid: int) -> dict[int, str]:
    """Every process under `pid` (children, their children...) with its title (argv[0])."""
    parent_of, title = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces
        title[int(entry.name)] = argv0.strip()
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, parent in parent_of.items():
            if parent == p and child not in found:
                found[child] = title[child]
                todo.append(child)
    return found


def vllm_process(actor_pid: int, title: str) -> int:
    """The pid of the vLLM process titled `title` (`VLLM::Worker`, `VLLM::EngineCore`) under the engine
    actor `actor_pid`: vLLM sets its processes' titles."""
    found = [p for p, t in descendants(actor_pid).items() if t.startswith(title)]
    assert len(found) == 1, (title, descendants(actor_pid))
    return found[0]


def kill_leftovers(pids: list[int]) -> None:
    """Processes of ours that a SIGKILL orphaned (vLLM's children of a killed actor), if any lived on."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_async_one_engine_killed_then_silent_is_replaced_and_control_applies(
    tmp_path, model_cache, tiny_model
):
    """The only engine's actor SIGKILLed (its generate call fails), later the new one SIGSTOPped (nothing
    fails, nothing comes: the loop must notice by itself). Control requests are answered and applied
    while the only engine hangs; the run heals itself and finishes every step."""
    run = tmp_path / "run"
    steps, per_step = 8, 8
    p = start(
        run,
        f"train.steps={steps}",
        *ASYNC,
        f"rollout.prompts_per_step={per_step}",
        "run.progress=false",
        "train.check_weights_every_steps=1",
        model_cache=model_cache,
    )
    stopped: list[int] = []
    try:
        wait_for(running(p, lambda: steps_done(run) >= 1), what="one step")
        first = engine_pid(run)
        os.kill(first, signal.SIGKILL)
        wait_for(running(p, lambda: engine_pid(run) != first), what="the killed engine replaced")
        second = engine_pid(run)
        wait_for(running(p, lambda: steps_done(run) >= 3), what="three steps")
        control = json.loads((run / "control.json").read_text())
        auth = {"Authorization": f"Bearer {control['token']}"}
        # Paused, the loop waits between steps: the SIGSTOP cannot land inside a weight transfer (which
        # waits on the engines without a deadline).
        assert httpx.post(f"{control['url']}/pause", headers=auth).status_code == 200
        paused_at = steps_done(run)
        try:
            wait_for(lambda: steps_done(run) > paused_at, timeout_s=15, what="the step in flight")
        except AssertionError:
            pass  # no step was in flight: the loop already waits
        stopped = [second, *descendants(second)]
        os.kill(second, signal.SIGSTOP)
        assert httpx.post(f"{control['url']}/checkpoint", headers=auth).status_code == 200
        checkpoint = wait_for(
            lambda: (
                next((run / "checkpoints").glob("step_*/driver_state.json"), None)
                if (run / "checkpoints").exists()
                else None
            ),
            timeout_s=120,
            what="the checkpoint asked for while the only engine hangs",
        )
        assert httpx.post(f"{control['url']}/resume", headers=auth).status_code == 200
        assert engine_pid(run) == second, "the checkpoint came only after the engine was replaced"
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        kill_leftovers(stopped)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    events = [e for m in metrics for e in m["events"]]
    replaced = [e for e in events if e["event"] == "engine_replaced"]
    assert len(replaced) == 2, events
    assert "actor died" in replaced[0]["reason"] and "no answer" in replaced[1]["reason"], replaced
    asked = [e for e in events if e["event"] == "checkpoint"]
    assert len(asked) == 1 and Path(asked[0]["path"]) == checkpoint.parent, events
    for m in metrics:
        assert m["groups/trained"] == per_step
        assert all(int(age) <= 1 for age in m["staleness/histogram"])
        assert m["sync/checksum_match"] is True


def test_async_dead_learner_stops_with_hint_then_resumes(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    steps = 5
    p = start(
        run, f"train.steps={steps}", *ASYNC, "checkpoint.every_steps=1", *SMALL_RUN, model_cache=model_cache
    )
    wait_for(lambda: steps_done(run) >= 2, what="two steps")
    os.kill(json.loads((run / "actors.json").read_text())["learner"][0], signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-3000:]
    assert "learner rank died" in err and "last checkpoint:" in err and f"--resume {run}" in err
    assert steps_done(run) < steps  # the kill landed before the run was over
    r = subprocess.run(
        duet_cmd("train", "--resume", str(run)), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == list(range(1, steps + 1))


def test_dead_vllm_processes_under_a_live_actor_are_replaced(tmp_path, model_cache, tiny_model):
    """SIGKILL of the engine's `VLLM::Worker` (what a CUDA error or an OOM kill does), later of the new
    engine's `VLLM::EngineCore`: the actor lives on, every call on it fails with EngineDeadError. The
    engine is replaced each time and the run finishes every step."""
    run = tmp_path / "run"
    steps = 6
    p = start(
        run,
        f"train.steps={steps}",
        "rollout.num_engines=1",
        "rollout.prompts_per_step=8",
        "run.progress=false",
        "train.check_weights_every_steps=1",
        model_cache=model_cache,
    )
    orphans: list[int] = []
    try:
        wait_for(running(p, lambda: steps_done(run) >= 1), what="one step")
        first = engine_pid(run)
        orphans += descendants(first)
        os.kill(vllm_process(first, "VLLM::Worker"), signal.SIGKILL)
        wait_for(
            running(p, lambda: engine_pid(run) != first), what="the engine whose vLLM worker died replaced"
        )
        second = engine_pid(run)
        orphans += descendants(second)
        os.kill(vllm_process(second, "VLLM::EngineCore"), signal.SIGKILL)
        wait_for(
            running(p, lambda: engine_pid(run) != second),
            what="the engine whose vLLM engine core died replaced",
        )
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        kill_leftovers(orphans)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    replaced = [e for m in metrics for e in m["events"] if e["event"] == "engine_replaced"]
    assert len(replaced) == 2 and all("vLLM died" in e["reason"] for e in replaced), replaced
    assert all(m["sync/checksum_match"] is True for m in metrics)
