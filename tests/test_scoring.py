"""Scoring: completions become scored groups with final rewards, and "tied" is decided on those.

The reward pool here is a stand-in that returns fixed results (the pool itself is tested on real actors
in test_reward_pool.py): what is under test is the pure path from verifier results to ScoredGroups and
on to the learner's rows.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from cluster.config import load_config
from cluster.records import Completion, Prompt, VerifyItem, VerifyResult
from cluster.scoring import Scoring, group_metrics
from learner.group import build_rows


class FixedPool:
    """score_async/wait with the reward given per completion text; records what it was asked."""

    def __init__(self, rewards: dict[str, float]) -> None:
        self.rewards = rewards
        self.items: list[VerifyItem] = []

    def score_async(self, items: list[VerifyItem]) -> Future:
        self.items += items
        done: Future = Future()
        reason = {1.0: "correct", 0.0: "wrong"}
        done.set_result(
            [VerifyResult(self.rewards[i.completion], reason[self.rewards[i.completion]], 0.0) for i in items]
        )
        return done

    def wait(self, handle: Future) -> list[VerifyResult]:
        return handle.result()


def _completion(index: int, text: str, finish_reason: str) -> Completion:
    return Completion(index, [1, 2], [5, 6, 7], [-0.5, -0.5, -0.5], text, finish_reason, 0, 0)


# Both completions are correct (raw rewards tie); the second ran out of tokens.
PAIR = [_completion(0, "\\boxed{7}", "stop"), _completion(0, "\\boxed{7} and then", "length")]
POOL_REWARDS = {"\\boxed{7}": 1.0, "\\boxed{7} and then": 1.0}


def _score(*overrides: str):
    cfg = load_config(overrides=list(overrides))
    pool = FixedPool(POOL_REWARDS)
    scoring = Scoring(pool, [Prompt(0, "3+4=", "7")], [PAIR], cfg.rewards.verifier, cfg.algorithm)
    assert scoring.done()
    return cfg, pool, scoring.result()


def test_reward_requests_carry_prompt_reference_and_verifier():
    _, pool, _ = _score("rewards.verifier=custom", "rewards.custom_function=m:f")
    assert [(i.completion, i.reference, i.verifier, i.prompt) for i in pool.items] == [
        ("\\boxed{7}", "7", "custom", "3+4="),
        ("\\boxed{7} and then", "7", "custom", "3+4="),
    ]


def test_overlong_penalty_separates_a_pair_that_is_then_not_tied():
    cfg, _, (group,) = _score("algorithm.overlong=penalty", "algorithm.overlong_penalty=0.5")
    assert group.rewards == [1.0, 0.5]  # final: the cut completion lost the penalty
    assert not group.tied  # so the replay queue keeps it (it drops `tied` groups)
    assert group_metrics([group], [group], 0, True)["groups/dropped_tied"] == 0
    # The learner trains on these rewards as they are; the penalty is not applied a second time.
    # dr_grpo (A = r − mean) shows the difference: once → ±0.25, twice → ±0.5.
    cfg = load_config(
        overrides=[
            "algorithm.overlong=penalty",
            "algorithm.overlong_penalty=0.5",
            "algorithm.advantage=dr_grpo",
        ]
    )
    rows, _ = build_rows([group], cfg)
    assert [r["advantage"] for r in rows] == pytest.approx([0.25, -0.25])
    assert all(r["keep"] for r in rows)


def test_without_the_penalty_the_pair_ties():
    _, _, (group,) = _score()
    assert group.rewards == [1.0, 1.0] and group.tied
    assert group_metrics([group], [], 0, True)["groups/dropped_tied"] == 1


def test_overlong_mask_keeps_rewards_and_masks_the_cut_completion():
    cfg, _, (group,) = _score("algorithm.overlong=mask")
    assert group.rewards == [1.0, 1.0] and group.tied
    rows, _ = build_rows([group], cfg)
    assert [r["keep"] for r in rows] == [True, False]


def test_evaluation_scoring_keeps_raw_rewards():
    pool = FixedPool(POOL_REWARDS)
    (group,) = Scoring(pool, [Prompt(0, "3+4=", "7")], [PAIR], "math").result()
    assert group.rewards == [1.0, 1.0] and group.reasons == ["correct", "correct"]
