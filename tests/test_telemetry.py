"""Telemetry through Ray's real metrics pipeline: record steps, scrape the node's Prometheus endpoint."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from cluster.telemetry import Telemetry
from tests.helpers import free_port

pytestmark = pytest.mark.integration


def _samples(text: str, run: str) -> dict[str, float]:
    """`name{tag=value}` -> value for this run's duet series, without Ray's own labels."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "duet_" not in line or f'run="{run}"' not in line or "_bucket" in line:
            continue
        key, value = line.rsplit(" ", 1)
        name = re.sub(r"^ray_", "", key.split("{")[0])
        tags = ",".join(f"{k}={v}" for k, v in re.findall(r'(reason|engine)="([^"]*)"', key))
        out[f"{name}{{{tags}}}" if tags else name] = float(value)
    return out


def test_telemetry_exports_to_prometheus():
    import ray

    port = free_port()
    ray.init(
        address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=port
    )
    try:
        run = "telemetry-test"
        tel = Telemetry(run)
        step = {
            "step": 1,
            "reward/mean": 0.25,
            "rollouts": 128,
            "tokens/generated": 1024,
            "time/step_s": 2.0,
            "time/broadcast_s": 0.05,
            "time/train_s": 1.0,
            "groups/dropped_tied": 10,
            "policy_version": 1,
        }
        queue = {"put": 64, "taken": 54, "dropped_tied": 10, "dropped_stale": 0, "depth": 0}
        tel.record_step(step, {0: 1, 1: 1}, queue)
        step2 = dict(step, step=2, **{"reward/mean": 0.75, "policy_version": 2, "staleness/mean": 0.5})
        step2.update({"episodes/turns_mean": 2.5, "tools/calls": 5, "tools/errors": 1})  # an env run's
        queue2 = dict(queue, dropped_tied=13, dropped_stale=2, depth=3)
        tel.record_step(step2, {0: 2, 1: 1}, queue2)
        assert tel.enabled

        want = {
            "duet_reward_mean": 0.75,
            "duet_step": 2,
            "duet_rollouts_per_second": 64.0,
            "duet_tokens_per_second": 512.0,
            "duet_rollouts_total": 256,
            "duet_tokens_generated_total": 2048,
            "duet_queue_depth": 3,
            "duet_groups_dropped_total{reason=tied}": 13,
            "duet_groups_dropped_total{reason=stale}": 2,
            "duet_staleness_versions": 0.5,
            "duet_learner_policy_version": 2,
            "duet_policy_version{engine=0}": 2,
            "duet_policy_version{engine=1}": 1,
            "duet_engines": 2,
            "duet_step_seconds_count": 2,
            "duet_broadcast_seconds_count": 2,
            "duet_last_broadcast_seconds": 0.05,
            "duet_last_step_seconds": 2.0,
            "duet_learner_step_seconds_count": 2,
            "duet_tool_calls_total": 5,
            "duet_tool_errors_total": 1,
            "duet_episode_turns": 2.5,
        }
        # Ray exports on a timer (seconds), and the agent drops a gauge whose refresh comes late (a
        # loaded machine), so a series can miss one scrape: keep the latest value seen of each.
        got: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                got.update(_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text, run))
            except httpx.HTTPError:
                pass
            if all(got.get(k) == pytest.approx(v) for k, v in want.items()):
                break
            time.sleep(1)
        missing = sorted(k for k in want if k not in got)
        assert not missing, f"not exported: {missing}; got {sorted(got)}"
        for key, value in want.items():
            assert got[key] == pytest.approx(value), key
    finally:
        ray.shutdown()


def test_telemetry_disabled_or_without_ray_never_raises():
    step = {"reward/mean": 1.0, "time/step_s": 1.0, "rollouts": 4}
    off = Telemetry("off", enabled=False)
    off.record_step(step, {0: 1}, {"depth": 1})
    assert not off.enabled
    Telemetry("no-ray").record_step(step, {0: 1}, {"depth": 1, "dropped_tied": 2})  # nothing exports it
