"""Pair-aware sampling: a group whose rewards all tie gets more rollouts of its prompt before the queue
sees it (`algorithm.extend_tied_to`). It lives between scoring and the replay queue:

    scored groups ─► tied, below the cap? ─yes─► G·2^r more completions of the same prompts (round r) ─┐
         │                  ▲                                                                          │
         │                  └──────────────────── merged into their groups ◄───────────────────────────┘
         └─ done (untied, or tied at the cap) ─► for_learner: the group as it is, or the pair drawn from it
                                                 ─► ReplayQueue (drops groups still tied)

A group doubles from `rollout.group_size` (2 → 4 → 8 …) up to the cap, so every tied group of a round
asks for as many completions as it has. The stage does not know how completions are made: it asks a
`MoreRollouts` function for them (the synchronous loop's generate-and-score; the asynchronous producer
runs the same rounds as chunks of its own), so whatever produces a group's first completions (an engine
call, an episode runner) produces its extension too.

What an extended group trains on: one disagreeing pair, `learner.advantages.extended_pair` (the formula
and why in docs/algorithm.md). The group as generated stays with the caller for the step's metrics
(`cluster.scoring.group_metrics`: rollouts, rollouts/extension, groups/extended ...); only the pair goes
to the queue, so the extension's other completions never reach the learner.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.records import Prompt, ScoredGroup
from learner.advantages import extended_pair

# (prompts, completions per prompt, extension round 1, 2, …) → one scored group of that many completions
# per prompt, in the prompts' order.
MoreRollouts = Callable[[list[Prompt], int, int], list[ScoredGroup]]


def needs_more(group: ScoredGroup, cap: int) -> bool:
    """Whether the group gets another extension round: its rewards tie and it is below the cap."""
    return group.tied and len(group.completions) < cap


def merged(group: ScoredGroup, more: ScoredGroup) -> ScoredGroup:
    """The group with an extension round's completions appended (generation order kept)."""
    assert more.prompt.index == group.prompt.index, (more.prompt.index, group.prompt.index)
    return ScoredGroup(
        group.prompt,
        group.completions + more.completions,
        group.rewards + more.rewards,
        group.reasons + more.reasons,
        first_round=group.first_round or len(group.completions),
    )


def extend_tied(groups: list[ScoredGroup], cap: int, more: MoreRollouts) -> list[ScoredGroup]:
    """The groups with every tied one extended until its rewards differ or it holds `cap` completions:
    round r asks `more` once for all groups still tied (each doubles). Returns the groups in their order,
    as generated (for metrics); `for_learner` says what of each the queue gets."""
    out = list(groups)
    round_ = 0
    while True:
        tied = [k for k, g in enumerate(out) if needs_more(g, cap)]
        if not tied:
            return out
        round_ += 1
        # Groups start at one size and double together, so a round is one call; sizes are grouped in
        # case a caller hands in groups of different sizes.
        for size in sorted({len(out[k].completions) for k in tied}):
            these = [k for k in tied if len(out[k].completions) == size]
            extra = more([out[k].prompt for k in these], size, round_)
            if len(extra) != len(these):
                raise RuntimeError(
                    f"extension round {round_}: {len(extra)} groups back for {len(these)} prompts"
                )
            for k, e in zip(these, extra):
                out[k] = merged(out[k], e)


def for_learner(group: ScoredGroup) -> ScoredGroup:
    """What the queue gets of a finished group: a group never extended as it is; of an extended one, the
    disagreeing pair `extended_pair` draws (or, still tied at the cap, its first two completions, for the
    queue to drop and count). The pair keeps the whole group's oldest version for the staleness bound."""
    if group.first_round is None:
        return group
    pair = extended_pair(group.rewards) or (0, 1)
    return ScoredGroup(
        group.prompt,
        [group.completions[i] for i in pair],
        [group.rewards[i] for i in pair],
        [group.reasons[i] for i in pair],
        drawn_from_version=group.version,
    )
