"""The GRPO-family policy loss: clipped surrogate, dual clip, truncated importance weights, KL, aggregation.

Shapes: per-token tensors are [B, T] (B sequences, T completion positions), `mask` is [B, T] (bool or 0/1)
marking real completion tokens, advantages are [B] (one per sequence) or [B, T]. Values outside the mask
never reach the loss: they are selected away with `where`, not multiplied by 0 (so NaN padding is harmless).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import Aggregation, KlEstimator, OverlongMode

AGGREGATIONS = get_args(Aggregation)
KL_ESTIMATORS = get_args(KlEstimator)
OVERLONG_MODES = get_args(OverlongMode)


def _upcast(x: Tensor) -> Tensor:
    # Log-softmax over a large vocabulary loses too much in bf16/fp16; float64 stays float64.
    return x if x.dtype == torch.float64 else x.float()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ_{mask} x / Σ mask over all elements; 0 when the mask is empty."""
    m = mask.bool()
    return torch.where(m, x, 0).sum() / m.sum().clamp_min(1)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    length_norm: int | None = None,
    *,
    denominator: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ℓ[B, T] to one number, with m[B, T] the mask and n_b = Σ_t m_bt.

    - token_mean:               Σ_b Σ_t m ℓ / Σ_b n_b
    - seq_mean_token_mean:      (1/B') Σ_b (Σ_t m ℓ / n_b)
    - seq_mean_token_sum_norm:  (1/B') Σ_b (Σ_t m ℓ / length_norm)   (Dr. GRPO; length_norm required)

    B' counts the sequences with n_b > 0: an empty sequence contributes 0 and is not counted, and an empty
    batch gives 0, never NaN. `denominator` replaces Σ_b n_b (token_mean) or B' (the others): pass the
    whole step's count when a step is split into micro-batches, so the summed micro-batch losses equal the
    full-batch loss.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    m = mask.bool()
    x = torch.where(m, per_token, 0)
    if mode == "token_mean":
        den = m.sum().clamp_min(1) if denominator is None else denominator
        return x.sum() / den
    n = m.sum(-1)
    if mode == "seq_mean_token_mean":
        per_seq = x.sum(-1) / n.clamp_min(1)
    else:
        if length_norm is None or length_norm <= 0:
            raise ValueError("seq_mean_token_sum_norm needs a positive length_norm")
        per_seq = x.sum(-1) / length_norm
    den = (n > 0).sum().clamp_min(1) if denominator is None else denominator
    return per_seq.sum() / den


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL divergence").

    With d = log π − log π_ref:   k1 = d,   k2 = ½ d²,   k3 = exp(−d) + d − 1  (= e^{log π_ref − log π}
    − (log π_ref − log π) − 1; unbiased like k1, and ≥ 0 like k2).
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    aggregation: str = "seq_mean_token_mean",
    length_norm: int | None = None,
    behaviour_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped-surrogate loss and its stats. Per token, with ρ = exp(log π − log π_old):

        pg = −min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A)
        pg = min(pg, −dual_clip·A)                     where A < 0, if dual_clip (caps the loss at ρ > c)
        pg = w·pg,  w = min(exp(log π_old − log μ), tis_cap), detached   if behaviour_logprobs μ and tis_cap
        ℓ  = pg + kl_coef·k(log π, log π_ref)          if kl_coef > 0 (k from `kl_penalty`)
        loss = aggregate(ℓ, mask, aggregation, length_norm)

    π_old is the learner's log-prob of the policy that sampled (the PPO anchor); μ is the engine's
    (vLLM's) log-prob of the same tokens, whose gap to π_old comes from kernels and precision, not from
    learning. Stats (floats, over valid tokens): loss, pg_loss, kl (when used), clip_frac/low (share with
    ρ < 1 − clip_low and A < 0), clip_frac/high (ρ > 1 + clip_high and A > 0), clip_frac/total (their sum; the
    tokens whose gradient the clip stops), clip_frac/dual (ρ > dual_clip and A < 0, when used), ratio/mean,
    logprob_gap = mean |log π_old − log μ| (when μ given), tis/mean_weight (when used).
    """
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs)")
    if tis_cap is not None and behaviour_logprobs is None:
        raise ValueError("tis_cap needs behaviour_logprobs (the rollout engine's log-probs)")
    m = mask.bool()
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    adv = adv.to(logprobs.dtype)

    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)

    stats: dict[str, float] = {}
    if behaviour_logprobs is not None:
        gap = (old_logprobs - behaviour_logprobs).detach()
        stats["logprob_gap"] = masked_mean(gap.abs(), m).item()
        if tis_cap is not None:
            w = torch.exp(gap).clamp(max=tis_cap)
            pg = pg * w
            stats["tis/mean_weight"] = masked_mean(w, m).item()

    pg_loss = aggregate(pg, m, aggregation, length_norm, denominator=denominator)
    loss = pg_loss
    if kl_coef > 0:
        kl_tok = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        kl = aggregate(kl_tok, m, aggregation, length_norm, denominator=denominator)
        loss = pg_loss + kl_coef * kl
        stats["kl"] = kl.item()

    with torch.no_grad():
        low = masked_mean(((ratio < 1.0 - clip_low) & (adv < 0)).to(ratio.dtype), m).item()
        high = masked_mean(((ratio > 1.0 + clip_high) & (adv > 0)).to(ratio.dtype), m).item()
        stats["loss"], stats["pg_loss"] = loss.item(), pg_loss.item()
        stats["clip_frac/low"], stats["clip_frac/high"], stats["clip_frac/total"] = low, high, low + high
        stats["ratio/mean"] = masked_mean(ratio, m).item()
        if dual_clip is not None:
            dual = ((ratio > dual_clip) & (adv < 0)).to(ratio.dtype)
            stats["clip_frac/dual"] = masked_mean(dual, m).item()
    return loss, stats


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log π(y_t) = z_t[y_t] − logsumexp(z_t), for logits z[..., V] and targets y[...] of the same positions.

    The caller aligns them (logits at position t score the token at t + 1 of the input). Upcast to
    float32 (float64 kept) so large vocabularies and large logits stay exact enough and finite.
    """
    z = _upcast(logits)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, in float32 (or float64)."""
    z = _upcast(logits)
    return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)


def overlong_adjust(
    rewards: Tensor, finish_reasons: Sequence[str], mode: str, penalty: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Handle completions cut at max_tokens (vLLM finish_reason "length"). Returns (rewards', keep[N]).

    - none:    rewards' = r, keep = all True.
    - mask:    rewards' = r, keep = False for cut ones: multiply their loss mask by keep (DAPO's overlong
               filtering: a truncated answer is not evidence that the reasoning was wrong).
    - penalty: rewards' = r − penalty for cut ones, keep = all True.
    """
    if mode not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {mode!r}")
    if len(finish_reasons) != rewards.numel():
        raise ValueError(f"{len(finish_reasons)} finish reasons for {rewards.numel()} rewards")
    cut = torch.tensor([f == "length" for f in finish_reasons], dtype=torch.bool, device=rewards.device)
    keep = torch.ones_like(cut)
    if mode == "mask":
        keep = ~cut
    elif mode == "penalty":
        rewards = rewards - penalty * cut.to(rewards.dtype)
    return rewards, keep
