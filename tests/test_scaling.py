"""The rollout fleet scales 1 → 2 → 1 engines during a real run, through the control API."""

from __future__ import annotations

import json

import httpx
import pytest

from cluster.metrics import read_metrics
from tests.helpers import start_train, steps_done, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_scale_one_two_one_with_control_api(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    steps, per_step = 30, 16
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
        model_cache=model_cache,
    )
    control = wait_for(
        lambda: (run / "control.json").exists() and json.loads((run / "control.json").read_text()),
        what="control.json",
        proc=p,
    )
    url, auth = control["url"], {"Authorization": f"Bearer {control['token']}"}
    assert httpx.post(f"{url}/pause", timeout=10).status_code == 401  # state changes need the token
    assert httpx.post(f"{url}/pause", headers=auth, timeout=10).status_code == 200
    assert httpx.post(f"{url}/scale", json={"engines": 2}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(f"{url}/resume", headers=auth, timeout=10).status_code == 200
    wait_for(
        lambda: any(m["engines"] == 2 for m in read_metrics(run)) if steps_done(run) else False,
        what="2 engines",
        proc=p,
    )
    status = httpx.get(f"{url}/status", timeout=10).json()
    assert len(status["engines"]) == 2 and all(
        e["version"] == status["policy_version"] for e in status["engines"]
    )
    assert httpx.post(f"{url}/scale", json={"engines": 1}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(f"{url}/checkpoint", headers=auth, timeout=10).status_code == 200
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

    metrics = read_metrics(run)
    counts = [m["engines"] for m in metrics]
    assert counts[0] == 1 and 2 in counts and counts[-1] == 1
    two = [m for m in metrics if m["engines"] == 2]
    # the added engine reported the learner's version from its first step on: it got the weights first
    assert all(m["sync/engine_versions"] == [m["policy_version"]] * 2 for m in two)
    assert all(m["sync/checksum_match"] for m in metrics)
    events = [e for m in metrics for e in m["events"]]
    assert [e["to"] for e in events if e.get("event") == "fleet_resized"] == [2, 1]
    assert any(e.get("event") == "checkpoint" for e in events)
    trained = [i for m in metrics for i in m["data/trained_prompts"]]
    assert sorted(trained) == list(range(steps * per_step))  # every prompt of the epoch exactly once
