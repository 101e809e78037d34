"""The rollout fleet scales 1 → 2 → 1 engines during a real run, through the control API."""

from __future__ import annotations

import httpx
import pytest

from cluster.metrics import read_metrics
from tests.helpers import paused_after, start_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_scale_one_two_one_with_control_api(tmp_path, model_cache, tiny_model):
    """Step 1 on one engine, steps 2-3 on two, the rest on one again: the run is resumed a few steps at a
    time (`POST /resume {"steps": N}`), so each request lands between two given steps."""
    run = tmp_path / "run"
    steps, per_step = 6, 16
    p = start_train(
        run,
        f"train.steps={steps}",
        "train.check_weights_every_steps=1",
        f"data.synthetic_problems={steps * per_step}",
        "algorithm.filter_tied=false",
        "rollout.prompts_per_step=16",
        "run.progress=false",
        "run.dashboard=false",  # start-up time; the control API is what this test drives
        "run.ray_metrics=false",
        "control.start_paused=true",
        model_cache=model_cache,
    )
    url, auth = paused_after(run, None, p)
    assert httpx.post(f"{url}/resume", timeout=10).status_code == 401  # state changes need the token
    assert httpx.post(f"{url}/resume", json={"steps": 1}, headers=auth, timeout=10).status_code == 200
    paused_after(run, 1, p)
    assert httpx.post(f"{url}/scale", json={"engines": 2}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(f"{url}/resume", json={"steps": 2}, headers=auth, timeout=10).status_code == 200
    paused_after(run, 3, p)
    status = httpx.get(f"{url}/status", timeout=10).json()
    assert len(status["engines"]) == 2 and all(
        e["version"] == status["policy_version"] for e in status["engines"]
    )
    assert httpx.post(f"{url}/scale", json={"engines": 1}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(f"{url}/checkpoint", headers=auth, timeout=10).status_code == 200
    assert httpx.post(f"{url}/resume", headers=auth, timeout=10).status_code == 200
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

    metrics = read_metrics(run)
    assert [m["engines"] for m in metrics] == [1, 2, 2, 1, 1, 1]
    two = [m for m in metrics if m["engines"] == 2]
    # the added engine reported the learner's version from its first step on: it got the weights first
    assert all(m["sync/engine_versions"] == [m["policy_version"]] * 2 for m in two)
    assert all(m["sync/checksum_match"] for m in metrics)
    events = [e for m in metrics for e in m["events"]]
    assert [e["to"] for e in events if e.get("event") == "fleet_resized"] == [2, 1]
    assert any(e.get("event") == "checkpoint" for e in events)
    trained = [i for m in metrics for i in m["data/trained_prompts"]]
    assert sorted(trained) == list(range(steps * per_step))  # every prompt of the epoch exactly once
