"""Completions → reward requests → scored groups: the one way, for the synchronous loop, the asynchronous
producer and evaluation.

    engine: one group of G completions per prompt ─► VerifyItem per completion ─► RewardPool
                                                                                     │ (in order)
                       ScoredGroup per prompt (final rewards, reasons) ◄─────────────┘

The rewards of a ScoredGroup are final: every adjustment the algorithm makes to a reward
(`algorithm.overlong=penalty`) is applied here, so "tied" (`ScoredGroup.tied`, which decides whether the
replay queue drops a group) is decided once, on the rewards the learner trains on.
"""

from __future__ import annotations

from typing import Any

from cluster.config import AlgorithmConfig
from cluster.records import Completion, Prompt, ScoredGroup, VerifyItem


class Scoring:
    """One chunk's completions on their way through the reward pool; scoring starts at construction.

    `algorithm`: the training algorithm, whose reward adjustments are applied to the results; None for
    evaluation, which reads the verifier's reasons and wants the raw rewards.
    """

    def __init__(
        self,
        pool: Any,
        prompts: list[Prompt],
        groups: list[list[Completion]],
        verifier: str,
        algorithm: AlgorithmConfig | None = None,
    ) -> None:
        self.prompts, self.groups = prompts, groups
        self._pool, self._algorithm = pool, algorithm
        items = [
            VerifyItem(completion=c.text, reference=p.answer, verifier=verifier, prompt=p.text)
            for p, group in zip(prompts, groups, strict=True)
            for c in group
        ]
        self._handle = pool.score_async(items)

    def done(self) -> bool:
        return self._handle.done()

    def result(self) -> list[ScoredGroup]:
        """Wait for the rewards; one ScoredGroup per prompt, in the prompts' order."""
        results = iter(self._pool.wait(self._handle))
        scored = []
        for p, group in zip(self.prompts, self.groups):
            res = [next(results) for _ in group]
            rewards = final_rewards([r.reward for r in res], group, self._algorithm)
            scored.append(ScoredGroup(p, group, rewards, [r.reason for r in res]))
        return scored


def final_rewards(
    rewards: list[float], group: list[Completion], algorithm: AlgorithmConfig | None
) -> list[float]:
    """The verifier's rewards after the algorithm's adjustments: with `overlong=penalty`, a completion cut
    at max_tokens loses `overlong_penalty` (learner/losses.py's `overlong_adjust`, the one formula)."""
    if algorithm is None or algorithm.overlong != "penalty":
        return rewards
    import torch  # only runs that penalise pay for the import (evaluation never does)

    from learner.losses import overlong_adjust

    adjusted, _ = overlong_adjust(
        torch.tensor(rewards, dtype=torch.float64),
        [c.finish_reason for c in group],
        "penalty",
        algorithm.overlong_penalty,
    )
    return adjusted.tolist()


def group_metrics(
    scored: list[ScoredGroup], batch: list[ScoredGroup], version: int, filter_tied: bool
) -> dict[str, Any]:
    """What a step generated (`scored`: every group as generated, extension rounds included) and trained
    on (`batch`), for metrics.jsonl. Rollouts, tokens and the verifier's reasons count everything
    generated; the reward, tie and completion statistics describe the first round, the step's prompts as
    the policy answered them (pair-aware sampling samples tied prompts again, which would bias them)."""
    completions = [c for s in scored for c in s.completions]
    first = [(c, r) for s in scored for c, r in list(zip(s.completions, s.rewards))[: s.first_round or None]]
    tied = sum(s.tied for s in scored)
    extended = [s for s in scored if s.first_round is not None]
    reasons: dict[str, int] = {}
    for s in scored:
        for why in s.reasons:
            kind = why.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
    tokens = sum(len(c.token_ids) for c in completions)
    first_tokens = sum(len(c.token_ids) for c, _ in first)
    with_signal = len(scored) - tied
    return {
        "rollouts": len(completions),
        "rollouts/extension": sum(s.extension_rollouts for s in extended),
        # All rollouts generated per group that carried a gradient (None: none did).
        "rollouts/per_signal_group": len(completions) / with_signal if with_signal else None,
        "tokens/generated": tokens,
        "reward/mean": sum(r for _, r in first) / max(len(first), 1),
        "reward/tied_fraction": sum(s.first_round_tied for s in scored) / max(len(scored), 1),
        "groups/total": len(scored),
        "groups/with_signal": with_signal,
        "groups/extended": len(extended),
        "groups/tied_at_cap": sum(s.tied for s in extended),
        "groups/dropped_tied": tied if filter_tied else 0,
        "groups/trained": len(batch),
        "completions/truncated_fraction": sum(c.finish_reason == "length" for c, _ in first)
        / max(len(first), 1),
        "completions/mean_length": first_tokens / max(len(first), 1),
        **{f"reward/reason/{k}": v for k, v in sorted(reasons.items())},
        "staleness/mean": sum(version - s.version for s in batch) / max(len(batch), 1),
        "data/prompts": [s.prompt.index for s in scored],
        "data/trained_prompts": [s.prompt.index for s in batch],
    }


def staleness_metrics(batch: list[ScoredGroup], version: int) -> dict[str, Any]:
    """How old an asynchronous batch is: groups per age in versions, and the most versions any completion
    spanned while it was generated (weights updated mid-completion)."""
    ages: dict[str, int] = {}
    for group in batch:
        age = str(version - group.version)
        ages[age] = ages.get(age, 0) + 1
    spans = (c.version_end - c.version_start for group in batch for c in group.completions)
    return {"staleness/histogram": ages, "staleness/max_in_flight_versions": max(spans, default=0)}
