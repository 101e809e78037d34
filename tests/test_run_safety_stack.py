"""Run safety on the real stack: the watchdog stops a run whose verifier only errs. (A synchronous step
whose groups outnumber the replay queue: tests/test_faults_engines.py, whose run passes every step's
groups through a queue a quarter their size.)"""

from __future__ import annotations

import pytest

from cluster.metrics import read_metrics
from tests.test_crash_consistency import launch

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def verifier_that_raises(prompt: str, completion: str, reference: str) -> float:
    """A custom verifier with a bug: every item scores 0 with reason `error: ...`."""
    raise RuntimeError("this verifier is broken")


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
