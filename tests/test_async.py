"""Asynchronous mode with bounded staleness, on the real stack; and the ReplayQueue's rules."""

from __future__ import annotations

import pytest

from cluster.metrics import read_metrics
from cluster.records import Completion, Prompt, ScoredGroup
from tests.helpers import run_duet


def _group(index: int, version: int, rewards: list[float]) -> ScoredGroup:
    comps = [Completion(index, [1], [5], [-0.1], "x", "stop", version, version) for _ in rewards]
    return ScoredGroup(Prompt(index, "p", "a"), comps, rewards, ["x"] * len(rewards))


@pytest.mark.integration
def test_replay_queue_staleness_ties_and_backpressure(local_ray):
    ray = local_ray
    from actors.replay_queue import ReplayQueue

    q = ReplayQueue.remote(3, 1, True)
    kept = ray.get(q.put.remote([_group(0, 0, [1, 0]), _group(1, 0, [1, 1]), _group(2, 2, [0, 1])]))
    assert kept == 2  # the tied group is dropped and counted
    # learner at version 2: the version-0 group is 2 versions old (> k = 1): discarded as stale
    assert [g.prompt.index for g in ray.get(q.take.remote(5, 2, None))] == [2]
    assert ray.get(q.stats.remote()) | {} == {
        "put": 3,
        "taken": 1,
        "dropped_tied": 1,
        "dropped_stale": 1,
        "depth": 0,
    }
    # backpressure: a put beyond capacity waits until the learner takes
    ray.get(q.put.remote([_group(i, 3, [0, 1]) for i in range(3)]))
    blocked = q.put.remote([_group(9, 3, [0, 1])])
    ready, _ = ray.wait([blocked], timeout=1.0)
    assert not ready
    assert len(ray.get(q.take.remote(2, 3, None))) == 2
    assert ray.get(blocked) == 1


@pytest.mark.integration
def test_async_run_bounded_staleness(tmp_path, model_cache, tiny_model):
    run = tmp_path / "run"
    proc = run_duet(
        "train",
        "--run-dir",
        str(run),
        "train.steps=6",
        "train.max_staleness_versions=1",
        "train.check_weights_every_steps=1",
        "rollout.prompts_per_step=16",
        f"model.cache_dir={model_cache}",
        "run.progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert m["groups/trained"] == 16
        assert all(int(age) <= 1 for age in m["staleness/histogram"])  # never older than k versions
        assert m["sync/checksum_match"] is True
    assert (run / "timeline.jsonl").read_text().count('"component": "learner"') == 6
    # Generation overlapped training: some trained groups were made under an older policy than the one
    # that trained on them (age > 0), which a loop that waits for its own generation never shows.
    assert any(int(age) > 0 for m in metrics for age in m["staleness/histogram"]), [
        m["staleness/histogram"] for m in metrics
    ]
