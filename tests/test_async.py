"""Asynchronous mode with bounded staleness, on the real stack; and the ReplayQueue's rules."""

from __future__ import annotations

import pytest

from cluster.metrics import read_metrics
from cluster.pipeline import admissible_groups, kept_fraction_estimate
from cluster.records import Completion, Prompt, ScoredGroup
from tests.helpers import run_duet


def _group(index: int, version: int, rewards: list[float]) -> ScoredGroup:
    comps = [Completion(index, [1], [5], [-0.1], "x", "stop", version, version) for _ in rewards]
    return ScoredGroup(Prompt(index, "p", "a"), comps, rewards, ["x"] * len(rewards))


def test_admission_submits_only_what_is_fresh_on_arrival():
    # k = 1, P = 16: the learner takes groups 1..16 (counted from the start of its version v) at v and
    # 17..32 at v + 1, so a group sampled under v may be at most the 32nd.
    assert admissible_groups(1, 16, taken_at_version=0, queued=0, in_flight=0) == 32
    # training on its batch (b = 16), 4 queued, 8 in flight: 32 - 16 - 4 - 8 = 4
    assert admissible_groups(1, 16, taken_at_version=16, queued=4, in_flight=8) == 4
    assert admissible_groups(1, 16, taken_at_version=16, queued=8, in_flight=8) == 0
    assert admissible_groups(1, 16, taken_at_version=16, queued=10, in_flight=8) == 0  # never negative
    # k = 2: one more version of room, 48 - 5 - 3 - 10 = 30
    assert admissible_groups(2, 16, taken_at_version=5, queued=3, in_flight=10) == 30
    # half the groups tie and are dropped: (32 - 16 - 4) / 0.5 - 8 = 16
    assert admissible_groups(1, 16, taken_at_version=16, queued=4, in_flight=8, kept_fraction=0.5) == 16
    # k = 0 (what the rule means for a synchronous bound): only the rest of the current version's batch
    assert admissible_groups(0, 8, taken_at_version=3, queued=2, in_flight=1) == 2
    assert kept_fraction_estimate(put=0, kept=0) == 1.0  # nothing seen yet: assume every group is kept
    assert kept_fraction_estimate(put=9, kept=4) == 0.5
    assert kept_fraction_estimate(put=99, kept=0) == 0.01  # never 0: admission stays finite
    with pytest.raises(ValueError, match="kept_fraction"):
        admissible_groups(1, 16, 0, 0, 0, kept_fraction=0.0)
    with pytest.raises(ValueError, match="prompts_per_step"):
        admissible_groups(1, 0, 0, 0, 0)


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
    # where the learner stands, for admission: 2 taken at version 3, 2 still queued, 1 of 7 put was tied
    assert ray.get(q.admission.remote()) == {"queued": 2, "taken_at_version": 2, "put": 7, "kept": 6}


@pytest.mark.integration
def test_async_run_bounded_staleness(tmp_path, model_cache, tiny_model):
    """With pair-aware sampling on (issue 23): tied pairs are extended to 4 rollouts in the producer."""
    run = tmp_path / "run"
    proc = run_duet(
        "train",
        "--run-dir",
        str(run),
        "train.steps=6",
        "train.max_staleness_versions=1",
        "algorithm.extend_tied_to=4",
        "train.check_weights_every_steps=1",
        "rollout.prompts_per_step=16",
        f"model.cache_dir={model_cache}",
        "run.progress=false",
        "run.dashboard=false",  # start-up time; nothing here concerns them
        "run.ray_metrics=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert m["groups/trained"] == 16
        # the group's oldest version (its first rollouts') is what the bound checks
        assert all(int(age) <= 1 for age in m["staleness/histogram"])  # never older than k versions
        assert m["sync/checksum_match"] is True
        # Extension: the counts add up, and only finished groups were queued (and reported): every group
        # whose first pair tied was extended, and those still tied have reached the cap.
        assert m["rollouts"] == 2 * m["groups/total"] + m["rollouts/extension"]
        assert m["rollouts/extension"] == 2 * m["groups/extended"]  # 2 → 4, one round each
        assert m["groups/extended"] == round(m["groups/total"] * m["reward/tied_fraction"])
        assert m["groups/with_signal"] == m["groups/total"] - m["groups/tied_at_cap"]
    assert sum(m["groups/extended"] for m in metrics) > 0, "no group was extended: nothing tested"
    assert (run / "timeline.jsonl").read_text().count('"component": "learner"') == 6
    # Generation overlapped training: some trained groups were made under an older policy than the one
    # that trained on them (age > 0), which a loop that waits for its own generation never shows.
    assert any(int(age) > 0 for m in metrics for age in m["staleness/histogram"]), [
        m["staleness/histogram"] for m in metrics
    ]
    # Admission knows the bound (cluster.pipeline.admissible_groups): at most 5% of what the engines
    # generated was thrown away as too stale (issue 13's goal for k = 1).
    queue = metrics[-1]["queue"]
    assert queue["dropped_stale"] <= 0.05 * queue["put"], queue
