"""Crash consistency on the real stack: the driver SIGKILLs its own process group (its local Ray, engines
and learner with it) at deterministic fault points (cluster/faults.py), the learner rank is SIGKILLed
under a live driver, and `duet train --resume` picks up each time. Four kills chained in one run, then the
run finishes; after every kill and at the end: no half-written checkpoint is loaded, metrics.jsonl holds
one valid row per step, no step is trained twice, and the run equals one never interrupted, run alongside
(data order, rewards, losses, final weights). benchmarks/crash_sweep.py runs every fault point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from cluster.config import load_config
from cluster.data import PromptStream, load_prompts
from cluster.metrics import read_metrics
from tests.helpers import REPO, duet_cmd, kill_group, paused_after, running, start_train, steps_done, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4
RUN = [
    f"train.steps={STEPS}",
    "rollout.prompts_per_step=8",
    "checkpoint.every_steps=1",
    "run.progress=false",
    # Four launches: start-up is most of this test's time. Parts no fault point concerns stay off.
    "run.dashboard=false",
    "run.ray_metrics=false",
    "rewards.num_workers=1",
    # Pair-aware sampling (issue 23): a resumed run must make the same extension decisions.
    "algorithm.extend_tied_to=8",
]


def checkpoint_step(folder: Path) -> int | None:
    """N of a checkpoint folder step_N; None for anything else (a `.tmp-step_N` being written)."""
    name = folder.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints (driver_state.json is written last), by step number."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None] if root.exists() else []
    return sorted((p for p in found if (p / "driver_state.json").is_file()), key=checkpoint_step)


def start(*args: str, fault: str | None, model_cache: Path) -> subprocess.Popen:
    """`duet train` in its own session (the fault kills its process group, not the test)."""
    env = dict(os.environ)
    env.pop("DUET_FAULT_POINT", None)
    if fault is not None:
        env["DUET_FAULT_POINT"] = fault
    return subprocess.Popen(
        duet_cmd("train", *args, f"model.cache_dir={model_cache}"),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def launch(run_dir: Path, *args: str, fault: str | None, model_cache: Path, timeout_s: float = 300.0):
    """`duet train` in its own session, to its end. Returns (exit code, stderr)."""
    p = start(*args, fault=fault, model_cache=model_cache)
    try:
        _, err = p.communicate(timeout=timeout_s)
    finally:
        kill_group(p)
    return p.returncode, err


def metric_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def check_after_kill(run_dir: Path, rc: int, err: str, fault: str) -> None:
    """The kill landed where it was set (before the run finished), and left nothing that looks whole
    but is not: every `step_*` folder is complete, every metrics row but a cut last one is valid."""
    assert rc == -signal.SIGKILL, (rc, err[-3000:])
    assert f"crashing at {fault}" in err, err[-3000:]
    if fault.startswith("broadcast.mid"):  # inside the transfer, not after it
        assert "inside its weight update: bytes received and loaded, not finished" in err, err[-3000:]
    root = run_dir / "checkpoints"
    for folder in root.iterdir() if root.exists() else []:
        if checkpoint_step(folder) is not None:
            assert (folder / "driver_state.json").is_file() and (folder / "deepspeed").is_dir(), folder
    lines = metric_lines(run_dir)
    for line in lines[:-1]:
        json.loads(line)


def expected_prompts(overrides: list[str]) -> list[list[int]]:
    """The prompts an uninterrupted run takes, step by step (the driver's PromptStream, replayed)."""
    cfg = load_config(overrides=overrides)
    stream = PromptStream(load_prompts(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
    return [[p.index for p in stream.take(cfg.rollout.prompts_per_step)] for _ in range(cfg.train.steps)]


def learner_batches(checkpoint: Path) -> int:
    """How many batches the learner trained on, from the DeepSpeed checkpoint's client state."""
    import torch

    [states] = list((checkpoint / "deepspeed").rglob("mp_rank_00_model_states.pt"))
    return int(torch.load(states, map_location="cpu", weights_only=False)["learner_batches"])


def check_finished(run_dir: Path, overrides: list[str] = RUN) -> None:
    """The run's record after its last launch: one valid row per step, an uninterrupted run's prompts,
    every trained step trained once, the final checkpoint complete, TensorBoard without stale steps."""
    steps = load_config(overrides=overrides).train.steps
    lines = metric_lines(run_dir)
    rows = [json.loads(line) for line in lines]  # every line valid
    assert [m["step"] for m in rows] == list(range(1, steps + 1))  # one row per step
    expected = expected_prompts(overrides)
    version = 0
    trained: list[int] = []
    for m, want in zip(rows, expected):
        assert sorted(m["data/prompts"]) == sorted(want), m["step"]  # an uninterrupted run's order
        assert set(m["data/trained_prompts"]) <= set(want)
        version += 0 if m.get("train/skipped") else 1
        assert m["policy_version"] == version, m["step"]
        trained += m["data/trained_prompts"]
    assert len(trained) == len(set(trained))  # no prompt trained twice
    final = complete_checkpoints(run_dir)[-1]
    assert checkpoint_step(final) == steps and (final / "hf" / "model.safetensors").is_file()
    assert learner_batches(final) == version  # the learner stepped once per trained step, no more
    # TensorBoard: the events of steps a crashed launch wrote and a resumed one redid are superseded.
    from tests.test_run_safety import tensorboard_scalars

    tb = tensorboard_scalars(run_dir, "reward/mean")
    assert [s for s, _ in tb] == list(range(1, steps + 1))
    assert all(abs(v - m["reward/mean"]) < 1e-6 for (_, v), m in zip(tb, rows))


def check_equals_straight_run(run_dir: Path, straight: Path) -> None:
    """Step by step what the run never interrupted did: data, rewards, tokens, versions, losses; and its
    final weights."""
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x["data/prompts"] == y["data/prompts"]  # same data order
        for key in ("reward/mean", "groups/with_signal", "tokens/generated", "policy_version"):
            assert x[key] == y[key], (x["step"], key)
        # the same extension decisions: which groups grew, how far, and which pairs were trained
        for key in ("groups/extended", "groups/tied_at_cap", "rollouts/extension", "data/trained_prompts"):
            assert x[key] == y[key], (x["step"], key)
        # A step whose groups all tied trains nothing and has no loss: then in both runs.
        assert ("train/loss" in x) == ("train/loss" in y), (x["step"], "trained in one run only")
        if "train/loss" in x:
            assert abs(x["train/loss"] - y["train/loss"]) < 1e-6
            assert abs(x["train/grad_norm"] - y["train/grad_norm"]) < 1e-5
    assert any("train/loss" in x for x in a), "no step trained: nothing to compare"
    assert any(x["groups/extended"] for x in a), "no group was extended: no decision to compare"
    wa = load_file(complete_checkpoints(straight)[-1] / "hf" / "model.safetensors")
    wb = load_file(complete_checkpoints(run_dir)[-1] / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def launch_and_kill_the_learner(run: Path, model_cache: Path) -> tuple[int, str]:
    """A resumed launch whose learner rank is SIGKILLed before its first step: started paused
    (control.start_paused), so the kill lands mid-run whatever the machine's speed. (A pause asked once
    the launch is up comes between steps, and once came after the last one: two steps take 2 s here.)
    Returns (exit code, stderr)."""
    stale = (run / "control.json").read_text()  # the killed launch's, left behind
    p = start("--resume", str(run), "control.start_paused=true", fault=None, model_cache=model_cache)
    try:
        # control.json is written once the launch has started and loaded its checkpoint
        wait_for(running(p, lambda: (run / "control.json").read_text() != stale), what="the launch started")
        url, auth = paused_after(run, None, p)  # held before its first step
        os.kill(json.loads((run / "actors.json").read_text())["learner"][0], signal.SIGKILL)
        assert httpx.post(f"{url}/resume", headers=auth).status_code == 200  # the next step meets it
        _, err = p.communicate(timeout=300)
    finally:
        kill_group(p)
    return p.returncode, err


def test_four_kills_chained_then_the_run_equals_a_straight_one(tmp_path, model_cache, tiny_model):
    run, straight = tmp_path / "run", tmp_path / "straight"
    chain = [
        "broadcast.mid:2",  # mid-step: learned, the engine inside the weight update, no checkpoint of step 2
        "checkpoint.during_write:3",  # DeepSpeed's files of step 3 written, driver_state.json not yet
        "learner",  # the learner rank SIGKILLed while the driver lives
        "metrics.mid_write:4",  # half of step 4's metrics row on disk
    ]
    # The run never interrupted, alongside the first launch (each its own local Ray): start-up, most of a
    # launch, is not CPU-bound throughout, so two side by side take less than two in a row.
    ref = start_train(straight, *RUN, model_cache=model_cache)
    try:
        rc, err = launch(run, "--run-dir", str(run), *RUN, fault=chain[0], model_cache=model_cache)
        check_after_kill(run, rc, err, chain[0])
        for fault in [*chain[1:], None]:
            resume_from = complete_checkpoints(run)[-1]
            if fault == "learner":
                rc, err = launch_and_kill_the_learner(run, model_cache)
            else:
                rc, err = launch(run, "--resume", str(run), fault=fault, model_cache=model_cache)
            # The newest complete checkpoint, never a half-written one (.tmp-step_3 after the second kill).
            assert f"resuming from {resume_from} (step {checkpoint_step(resume_from)})" in err, err[-3000:]
            if fault == "learner":  # the driver lives: it stops the run, naming what continues it
                assert rc == 1, err[-3000:]
                assert "learner rank died" in err and "last checkpoint:" in err, err[-3000:]
                assert f"--resume {run}" in err, err[-3000:]
                assert steps_done(run) < STEPS  # the kill landed before the run was over
            elif fault is not None:
                check_after_kill(run, rc, err, fault)
                if fault.startswith("checkpoint.during_write"):
                    assert (run / "checkpoints" / ".tmp-step_000003" / "deepspeed").is_dir()
                    assert checkpoint_step(complete_checkpoints(run)[-1]) == 2
                if fault.startswith("metrics.mid_write"):
                    with pytest.raises(json.JSONDecodeError):
                        json.loads(metric_lines(run)[-1])  # the cut row the resume must drop
        assert rc == 0, err[-3000:]
        _, ref_err = ref.communicate(timeout=300)
        assert ref.returncode == 0, ref_err[-3000:]
    finally:
        kill_group(ref)
    check_finished(run)
    check_equals_straight_run(run, straight)
