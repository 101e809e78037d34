"""Pair-aware sampling's pure parts (cluster/extension.py, the metrics it feeds, the config that turns it
on): rounds, what the learner gets, the counts. The real stack runs it in tests/test_presets.py (sync,
with refill), tests/test_async.py and tests/test_crash_consistency.py (a resume retraces its decisions)."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config
from cluster.extension import extend_tied, for_learner, needs_more
from cluster.records import Completion, Prompt, ScoredGroup
from cluster.scoring import group_metrics


def _group(index: int, rewards: list[float], version: int = 0, tokens: int = 3) -> ScoredGroup:
    comps = [
        Completion(index, [1], [7] * tokens, [-0.1] * tokens, f"c{k}", "stop", version, version)
        for k in range(len(rewards))
    ]
    return ScoredGroup(Prompt(index, f"p{index}", "a"), comps, list(rewards), ["x"] * len(rewards))


class Scripted:
    """Makes the extension rounds' groups from a script: prompt index -> rewards of each round it is asked
    for, in order; records each call. Stands in for generate-and-score in these unit tests of the stage."""

    def __init__(self, script: dict[int, list[list[float]]], version: int = 0) -> None:
        self.script, self.version, self.calls = script, version, []

    def __call__(self, prompts: list[Prompt], n: int, round_: int) -> list[ScoredGroup]:
        self.calls.append(([p.index for p in prompts], n, round_))
        out = []
        for p in prompts:
            rewards = self.script[p.index].pop(0)
            assert len(rewards) == n
            out.append(_group(p.index, rewards, self.version))
        return out


def test_tied_groups_double_until_they_differ_or_reach_the_cap():
    first = [_group(0, [1, 0]), _group(1, [0, 0]), _group(2, [1, 1]), _group(3, [0, 0])]
    more = Scripted({1: [[0, 1]], 2: [[1, 1], [1, 1, 1, 1]], 3: [[0, 0], [0, 0, 1, 0]]})
    out = extend_tied(first, 8, more)
    # one call per round for every group still tied, each asking for as many as the group has
    assert more.calls == [([1, 2, 3], 2, 1), ([2, 3], 4, 2)]
    assert [len(g.completions) for g in out] == [2, 4, 8, 8]
    assert out[0] is first[0] and out[0].first_round is None  # untied at once: untouched
    assert [g.first_round for g in out[1:]] == [2, 2, 2]
    assert out[1].rewards == [0, 0, 0, 1] and not out[1].tied
    assert out[2].tied and not needs_more(out[2], 8)  # tied at the cap: done, to be dropped
    assert out[3].rewards == [0, 0, 0, 0, 0, 0, 1, 0]
    # generation order is kept: the first round's completions first
    assert [c.text for c in out[3].completions] == ["c0", "c1", "c0", "c1", "c0", "c1", "c2", "c3"]


def test_the_learner_gets_one_disagreeing_pair_of_an_extended_group():
    plain, extended = _group(0, [1, 0]), _group(3, [0, 0])
    [extended] = extend_tied([extended], 8, Scripted({3: [[0, 0], [0, 0, 1, 0]]}))
    assert for_learner(plain) is plain
    pair = for_learner(extended)
    # the first with the highest reward (position 6) and the first with the lowest (position 0)
    assert pair.rewards == [1, 0] and pair.completions == [extended.completions[6], extended.completions[0]]
    [at_cap] = extend_tied([_group(2, [1, 1])], 4, Scripted({2: [[1, 1]]}))
    assert for_learner(at_cap).tied and len(for_learner(at_cap).completions) == 2  # the queue drops it


def test_a_pair_keeps_the_whole_groups_oldest_version():
    """Asynchronous mode: the extension's rollouts carry their own (newer) versions; the pair drawn from
    the group answers to the first round's, the oldest, for the staleness bound."""
    [group] = extend_tied([_group(5, [0, 0], version=3)], 4, Scripted({5: [[1, 0]]}, version=5))
    assert [c.version_start for c in group.completions] == [3, 3, 5, 5]
    pair = for_learner(group)
    assert [c.version_start for c in pair.completions] == [5, 3]
    assert pair.version == 3 and group.version == 3
    # a pair made only of extension rollouts (rewards ½ ½ | ½ ½ | 1 0 ½ ½, an overlong penalty's values)
    [late] = extend_tied(
        [_group(7, [0.5, 0.5], 2)], 8, Scripted({7: [[0.5, 0.5], [1, 0, 0.5, 0.5]]}, version=4)
    )
    late_pair = for_learner(late)
    assert late_pair.rewards == [1, 0] and [c.version_start for c in late_pair.completions] == [4, 4]
    assert late_pair.version == 2


def test_step_metrics_count_every_rollout_and_describe_the_first_round():
    first = [_group(0, [1, 0]), _group(1, [0, 0]), _group(2, [1, 1]), _group(3, [0, 0])]
    scored = extend_tied(
        first, 8, Scripted({1: [[0, 1]], 2: [[1, 1], [1, 1, 1, 1]], 3: [[0, 0], [0, 0, 1, 0]]})
    )
    batch = [g for g in map(for_learner, scored) if not g.tied]
    m = group_metrics(scored, batch, 0, True)
    assert m["rollouts"] == 2 + 4 + 8 + 8 and m["tokens/generated"] == 3 * 22
    assert m["rollouts/extension"] == 2 + 6 + 6
    assert m["groups/extended"] == 3 and m["groups/tied_at_cap"] == 1
    assert m["groups/with_signal"] == 3 and m["groups/dropped_tied"] == 1 and m["groups/trained"] == 3
    assert m["rollouts/per_signal_group"] == pytest.approx(22 / 3)
    # the first round's: 3 of 4 groups tied, 3 of 8 rewards 1
    assert m["reward/tied_fraction"] == 0.75 and m["reward/mean"] == 3 / 8
    assert m["completions/mean_length"] == 3.0 and m["reward/reason/x"] == 22
    # without extension the new keys are there, and zero
    plain = group_metrics(first, [first[0]], 0, True)
    assert plain["rollouts/extension"] == plain["groups/extended"] == plain["groups/tied_at_cap"] == 0
    assert plain["rollouts/per_signal_group"] == 8.0 and plain["reward/tied_fraction"] == 0.75
    assert group_metrics(first[1:], [], 0, True)["rollouts/per_signal_group"] is None


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["algorithm.extend_tied_to=6"], ["algorithm.extend_tied_to=6", "power of two", "(4, 8, 16)"]),
        (["algorithm.extend_tied_to=2"], ["algorithm.extend_tied_to=2", "greater than 2"]),
        (["algorithm.extend_tied_to=32"], ["algorithm.extend_tied_to=32", "at most 16"]),
        (["rollout.group_size=4", "algorithm.extend_tied_to=12"], ["algorithm.extend_tied_to=12", "(8, 16)"]),
        (
            ["algorithm.extend_tied_to=8", "algorithm.filter_tied=false"],
            ["algorithm.extend_tied_to=8", "algorithm.filter_tied=true"],
        ),
        (["algorithm.extend_tied_to=-2"], ["algorithm.extend_tied_to", "greater than or equal to 0"]),
    ],
)
def test_extension_settings_are_refused_by_name(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_extension_settings_that_fit():
    assert load_config(overrides=["algorithm.extend_tied_to=8"]).algorithm.extend_tied_to == 8
    cfg = load_config(
        overrides=["rollout.group_size=4", "algorithm.extend_tied_to=16", "algorithm.refill=true"]
    )
    assert cfg.algorithm.extend_tied_to == 16
    assert load_config().algorithm.extend_tied_to == 0  # off by default
