"""Group-relative advantages: GRPO, Dr. GRPO and RLOO, for ragged groups.

A batch is a flat vector of N rewards plus `group_index[N]` naming each reward's prompt group. Groups may
have different sizes and their ids need not be contiguous or sorted; everything is a scatter over ids, so
no dense [groups, G] tensor is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

import torch
from torch import Tensor

from cluster.config import AdvantageEstimator, StdKind, StdScale

ESTIMATORS = get_args(AdvantageEstimator)
STDS = get_args(StdKind)
SCALES = get_args(StdScale)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def compute_advantages(
    rewards: Tensor,
    group_index: Tensor,
    estimator: str = "grpo",
    std: str = "population",
    scale: str = "group",
    eps: float = 1e-6,
) -> Tensor:
    """Per-completion advantages A[N] from rewards r[N] grouped by `group_index[N]`.

    With g = the group of i, n_g its size and r̄_g its mean:

    - grpo:     A_i = (r_i − r̄_g) / (σ + eps), where σ is
        scale=group: the std of group g,   scale=batch: the std of all N rewards,   scale=none: σ + eps := 1;
        std=population: σ² = Σ(r − r̄)² / n,   std=sample (Bessel, as veRL/TRL): σ² = Σ(r − r̄)² / (n − 1).
    - dr_grpo:  A_i = r_i − r̄_g.
    - rloo:     A_i = r_i − (Σ_{j∈g, j≠i} r_j) / (n_g − 1) = n_g / (n_g − 1) · (r_i − r̄_g).

    `std` and `scale` only affect grpo. A tied group (max r = min r) gets exactly 0.0 for every estimator
    and every eps, eps = 0 included: a tie carries no signal, and r − r̄ need not round to 0 in floating
    point. A group of size 1 is tied by definition, so it gets 0 too (it has no baseline to compare with).
    Computed in float64, returned in the rewards' floating dtype (float32 for integer rewards).
    """
    _check("estimator", estimator, ESTIMATORS)
    _check("std", std, STDS)
    _check("scale", scale, SCALES)
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be 1-D of the same length, got {tuple(rewards.shape)} "
            f"and {tuple(group_index.shape)}"
        )
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if rewards.numel() == 0:
        return torch.zeros_like(rewards, dtype=out_dtype)

    r = rewards.detach().to(torch.float64)
    _, g = torch.unique(group_index, return_inverse=True)  # dense ids 0..K-1, any input order
    k = int(g.max()) + 1
    zeros = r.new_zeros(k)
    count = zeros.index_add(0, g, torch.ones_like(r))
    mean = zeros.index_add(0, g, r) / count
    centered = r - mean[g]
    gmax = zeros.scatter_reduce(0, g, r, "amax", include_self=False)
    gmin = zeros.scatter_reduce(0, g, r, "amin", include_self=False)
    tied = (gmax == gmin)[g]

    if estimator == "dr_grpo":
        adv = centered
    elif estimator == "rloo":
        n = count[g]
        adv = centered * n / (n - 1).clamp_min(1)
    elif scale == "none":
        adv = centered
    else:
        ddof = 1 if std == "sample" else 0
        if scale == "group":
            ss = zeros.index_add(0, g, centered**2)
            sigma = (ss / (count - ddof).clamp_min(1)).sqrt()[g]
        else:
            sigma = r.std(correction=ddof) if r.numel() > ddof else r.new_zeros(())
        adv = centered / (sigma + eps)
    # where, not multiply: with eps = 0 a tied group's 0/0 is NaN, and NaN·0 is still NaN.
    return torch.where(tied, torch.zeros_like(adv), adv).to(out_dtype)


def filter_tied_groups(rewards_per_group: list[list[float]]) -> tuple[list[int], list[int]]:
    """Split group positions into (kept, dropped): group k is dropped when max(r_k) == min(r_k).

    Tied groups (size-1 groups included) have advantage 0 under every estimator, hence zero gradient;
    dropping them before the learner saves its compute and changes nothing else.
    """
    kept, dropped = [], []
    for k, rs in enumerate(rewards_per_group):
        (dropped if len(rs) == 0 or max(rs) == min(rs) else kept).append(k)
    return kept, dropped


def tied_fraction_expected(p: float, G: int) -> float:
    """Chance that a group of G binary rewards ties, if each is 1 with probability p: p^G + (1 − p)^G.

    For G = 2: p² + (1 − p)², at least ½ (at p = ½), so 2-GRPO drops half its pairs or more.
    """
    if not 0.0 <= p <= 1.0 or G < 1:
        raise ValueError(f"need 0 <= p <= 1 and G >= 1, got p={p}, G={G}")
    return p**G + (1.0 - p) ** G


def pair_advantage_magnitude(std: str) -> float:
    """|A| of an informative pair (G = 2, binary rewards {0, 1}) under grpo, ignoring eps.

    r − r̄ = ±½; population σ = ½ gives |A| = 1 (the paper's c = 1, equal to rloo's ±1); sample σ = 1/√2
    gives |A| = 1/√2 (veRL, TRL).
    """
    _check("std", std, STDS)
    return 1.0 if std == "population" else 1.0 / math.sqrt(2.0)


def extended_pair(rewards: Sequence[float]) -> tuple[int, int] | None:
    """The pair an extended group trains on: (i⁺, i⁻), the positions of the first completion with the
    group's highest reward and of the first with its lowest, in generation order; None for a tied group.

    Pair-aware sampling (`algorithm.extend_tied_to` = K) gives a group whose G first rewards all tie more
    rollouts of its prompt, doubling its size up to K, until its rewards differ. The learner then trains on
    this one disagreeing pair, with the usual pair advantages ±c (`compute_advantages` on the two rewards):
    the DPO form of 2-GRPO and its cost per group. With binary rewards the completions of a group are
    exchangeable, so the first correct one is a draw from π(·|correct) and the first wrong one from
    π(·|wrong), independent of where they fell: a uniform draw of one correct and one wrong completion.
    Its expected gradient for a prompt of success rate p is c(p)·∇p (`extended_pair_weight`).
    """
    if len(rewards) == 0:
        return None
    hi, lo = max(rewards), min(rewards)
    if hi == lo:
        return None
    return list(rewards).index(hi), list(rewards).index(lo)


def extended_pair_weight(p: float, cap: int) -> float:
    """A prompt's weight c(p) in the expected gradient c(p)·∇p of pair-aware 2-GRPO with binary rewards,
    the group extended up to `cap` = K completions (K = 2: plain 2-GRPO), for pair advantages ±1:

        c(p) = (1 − p^K − (1 − p)^K) / (p·(1 − p)).

    Why: the pair (y⁺, y⁻) contributes ∇log π(y⁺) − ∇log π(y⁻). Since ∇p = E[1{y correct}·∇log π(y)] and
    E[∇log π(y)] = 0, E[∇log π(y) | correct] = ∇p/p and E[∇log π(y) | wrong] = −∇p/(1 − p): a disagreeing
    pair gives ∇p/(p(1 − p)) in expectation. A group disagrees by its K-th completion unless all K agree,
    with probability 1 − p^K − (1 − p)^K. For K = 2 that is 2p(1 − p), so c = 2 for every p: plain
    2-GRPO weighs every prompt alike. For K = 8, relative to p = ½: 1.59 at p = 0.1 and 1.92 at p = 0.02
    (16-GRPO: 1.47 and 1.86, `grpo_prompt_weight`). Exact for sequence-level log-probs (the estimator's
    REINFORCE form); `seq_mean_token_mean` uses each completion's mean token log-prob instead.
    """
    if not 0.0 < p < 1.0 or cap < 2:
        raise ValueError(f"need 0 < p < 1 and cap >= 2, got p={p}, cap={cap}")
    return (1.0 - p**cap - (1.0 - p) ** cap) / (p * (1.0 - p))


def grpo_prompt_weight(p: float, G: int) -> float:
    """A prompt's weight c(p) in the expected gradient c(p)·∇p of G-GRPO (population std, eps = 0) with
    binary rewards, per completion of the group (the loss averages over the batch's sequences):

        c(p) = Σ_k Binom(k; G, p) · √(p̂_k (1 − p̂_k)) / (p·(1 − p)),   p̂_k = k / G.

    Why: with k of G correct, Σ_i A_i ∇log π(y_i) = G·√(p̂(1 − p̂))·(mean over the correct − mean over the
    wrong of ∇log π) (docs/algorithm.md, the general-G form), whose expectation given k is
    G·√(p̂(1 − p̂))·∇p/(p(1 − p)); divided by the G sequences it adds to the batch. For G = 2 this is ½ of
    `extended_pair_weight(p, 2)` (a pair's two sequences): the same for every p. For G = 16, relative to
    p = ½: 1.47 at p = 0.1, 1.86 at p = 0.02.
    """
    if not 0.0 < p < 1.0 or G < 2:
        raise ValueError(f"need 0 < p < 1 and G >= 2, got p={p}, G={G}")
    total = sum(
        math.comb(G, k) * p**k * (1.0 - p) ** (G - k) * math.sqrt(k / G * (1.0 - k / G)) for k in range(G + 1)
    )
    return total / (p * (1.0 - p))
