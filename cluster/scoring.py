"""Completions → reward requests → scored groups: the one way, for the synchronous loop, the asynchronous
producer and evaluation.

    engine: one group of G completions per prompt ─► VerifyItem per completion ─► RewardPool
                                                                                     │ (in order)
                       ScoredGroup per prompt (final rewards, reasons) ◄─────────────┘

An episode (env.name != none) is scored the same way on its last model turn (`Completion.answer`), unless its
environment scored it (`Completion.env_reward`): that reward is taken as it is, and reads `correct` when
positive (evaluation counts those).

The rewards of a ScoredGroup are final: every adjustment the algorithm makes to a reward
(`algorithm.overlong=penalty`) is applied here, so "tied" (`ScoredGroup.tied`, which decides whether the
replay queue drops a group) is decided once, on the rewards the learner trains on.
"""

from __future__ import annotations

from typing import Any

from cluster.config import AlgorithmConfig
from cluster.records import Completion, Prompt, ScoredGroup, VerifyItem, VerifyResult


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
            VerifyItem(completion=c.scored_text, reference=p.answer, verifier=verifier, prompt=p.text)
            for p, group in zip(prompts, groups, strict=True)
            for c in group
            if c.env_reward is None
        ]
        self._handle = pool.score_async(items)

    def done(self) -> bool:
        return self._handle.done()

    def result(self) -> list[ScoredGroup]:
        """Wait for the rewards; one ScoredGroup per prompt, in the prompts' order."""
        results = iter(self._pool.wait(self._handle))
        scored = []
        for p, group in zip(self.prompts, self.groups):
            res = [next(results) if c.env_reward is None else _env_result(c.env_reward) for c in group]
            rewards = final_rewards([r.reward for r in res], group, self._algorithm)
            scored.append(ScoredGroup(p, group, rewards, [r.reason for r in res]))
        return scored


def _env_result(reward: float) -> VerifyResult:
    return VerifyResult(float(reward), "correct" if reward > 0 else "wrong", 0.0, {"scored_by": "env"})


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
    tokens = sum(c.model_token_count for c in completions)  # an episode's observations are not generated
    first_tokens = sum(c.model_token_count for c, _ in first)
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


def episode_metrics(scored: list[ScoredGroup], generate_s: float | None = None) -> dict[str, Any]:
    """What a step's episodes did (none: no keys): turns, tool calls, tool errors, the tool workers' time,
    observation tokens, and how long an episode waited for its model turns and for its tools. With the
    step's generation time (synchronous mode) that time is split in the same proportion into model time
    and tool time (`time/generate_model_s`, `time/generate_tool_s`)."""
    episodes = [c for s in scored for c in s.completions if c.loss_mask is not None]
    if not episodes:
        return {}
    n = len(episodes)
    model_wait = sum(c.model_wait_s for c in episodes)
    tool_wait = sum(c.tool_wait_s for c in episodes)
    out: dict[str, Any] = {
        "episodes/turns_mean": sum(c.turns for c in episodes) / n,
        "tools/calls": sum(c.tool_calls for c in episodes),
        "tools/errors": sum(c.tool_errors for c in episodes),
        "tools/time_s": sum(c.tool_time_s for c in episodes),
        "tokens/observation": sum(len(c.token_ids) - c.model_token_count for c in episodes),
        "episodes/model_wait_s": model_wait / n,
        "episodes/tool_wait_s": tool_wait / n,
    }
    if generate_s is not None and model_wait + tool_wait > 0:
        out["time/generate_model_s"] = generate_s * model_wait / (model_wait + tool_wait)
        out["time/generate_tool_s"] = generate_s * tool_wait / (model_wait + tool_wait)
    return out
