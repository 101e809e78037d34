"""Run safety on the real stack: a synchronous step with more signal than the replay queue holds, and
the watchdog stopping a run whose verifier only errs."""

from __future__ import annotations

import pytest

from cluster.metrics import read_metrics
from tests.test_crash_consistency import launch

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def verifier_that_raises(prompt: str, completion: str, reference: str) -> float:
    """A custom verifier with a bug: every item scores 0 with reason `error: ...`."""
    raise RuntimeError("this verifier is broken")


def test_sync_step_with_more_signal_than_the_queue_holds(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    rc, err = launch(
        run,
        "--run-dir",
        str(run),
        "train.steps=2",
        "rollout.prompts_per_step=6",
        "train.queue_capacity_groups=2",  # 6 groups with signal per step, 2 at a time
        "algorithm.filter_tied=false",  # every group goes to the queue: signal or not
        "checkpoint.final=false",
        "run.progress=false",
        "run.dashboard=false",  # start-up time; nothing here concerns them
        "run.ray_metrics=false",
        fault=None,
        model_cache=model_cache,
        timeout_s=240,  # before the fix `put` waited forever for a `take` that came after it
    )
    assert rc == 0, err[-3000:]
    assert [m["groups/trained"] for m in read_metrics(run)] == [6, 6]


def test_watchdog_stops_a_run_whose_verifier_only_errs(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    rc, err = launch(
        run,
        "--run-dir",
        str(run),
        "train.steps=6",
        "rollout.prompts_per_step=4",
        "rewards.verifier=custom",
        f"rewards.custom_function={__name__}:verifier_that_raises",
        "watchdog.error_steps=2",
        "run.progress=false",
        "run.dashboard=false",  # start-up time; nothing here concerns them
        "run.ray_metrics=false",
        fault=None,
        model_cache=model_cache,
    )
    assert rc == 1, err[-3000:]
    assert "watchdog:" in err and "verifier errors" in err and "rewards.custom_function" in err, err[-3000:]
    assert "Traceback" not in err
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["reward/reason/error"] == 8 for m in metrics)
    assert (run / "timeline.jsonl").exists()  # a stopped run still writes what it has
