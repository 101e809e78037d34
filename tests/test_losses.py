"""Policy loss, aggregation, KL, TIS and the 2-GRPO contrastive identity, against hand-computed numbers."""

import math

import pytest
import torch

from learner.advantages import compute_advantages
from learner.losses import (
    aggregate,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    overlong_adjust,
    policy_loss,
    token_logprobs,
)

F64 = torch.float64
LN2 = 0.6931471805599453
CLIP = {"clip_low": 0.2, "clip_high": 0.28}  # ratio bounds [0.8, 1.28]


def t(x, **kw):
    return torch.tensor(x, dtype=F64, **kw)


# ---------------------------------------------------------------- the 2-GRPO contrastive identity


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).to(F64)


def lm_batch(model, completion_lens, prompt_len=3, seed=1):
    """Right-padded prompt+completion ids; returns (logprobs[B, L−1], completion mask[B, L−1])."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + max(completion_lens)
    ids = torch.randint(0, 16, (len(completion_lens), width), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, n in enumerate(completion_lens):
        mask[b, prompt_len : prompt_len + n] = True
    logits = model(ids).logits
    # logits at position t score the token at t + 1.
    return token_logprobs(logits[:, :-1], ids[:, 1:]), mask[:, 1:]


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_two_grpo_is_a_contrastive_pair_loss(tiny_lm):
    """Asserted: for a batch of P = 4 pairs (8 sequences, ragged), 3 informative and 1 tied, on-policy,
    population std, eps = 0, seq_mean_token_mean, β = 0:
        ∇ policy_loss = ∇ [ −(1/(2P)) · Σ_{3 informative pairs} (s(y⁺) − s(y⁻)) ],
    s(y) = mean over y's tokens of log π(y). The tied pair adds no term but counts in the 2P = 8."""
    lens = [5, 2, 4, 6, 1, 3, 5, 4]
    rewards = t([1, 0, 0, 1, 1, 0, 1, 1])  # pairs (0,1), (2,3), (4,5) informative; (6,7) tied
    pair = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    adv = compute_advantages(rewards, pair, "grpo", "population", "group", eps=0.0)
    assert adv.tolist() == [1, -1, -1, 1, 1, -1, 0, 0]

    lp, mask = lm_batch(tiny_lm, lens)
    loss, stats = policy_loss(lp, lp.detach(), adv, mask, **CLIP)
    assert loss.item() == 0.0  # ratio ≡ 1 and each pair's A sums to 0
    assert stats["clip_frac/total"] == 0.0 and stats["ratio/mean"] == 1.0
    g_loss = grads(tiny_lm, loss)

    lp, mask = lm_batch(tiny_lm, lens)
    s = (lp * mask).sum(-1) / mask.sum(-1)
    P = 4
    contrastive = -(1 / (2 * P)) * ((s[0] - s[1]) + (s[3] - s[2]) + (s[4] - s[5]))
    g_ref = grads(tiny_lm, contrastive)

    assert max(g.abs().max().item() for g in g_ref) > 1e-3  # the identity is not 0 = 0
    for a, b in zip(g_loss, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)

    # Dropping the tied pair leaves the gradient unchanged up to the count: 6 sequences instead of 8.
    lp, mask = lm_batch(tiny_lm, lens)
    loss6, _ = policy_loss(lp[:6], lp[:6].detach(), adv[:6], mask[:6], **CLIP)
    for a, b in zip(g_loss, grads(tiny_lm, loss6 * 6 / 8), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("G", "correct"), [(4, 1), (8, 3)])
@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_surrogate_is_scaled_mean_difference(G, correct, on_policy):
    """Binary rewards, population std, eps = 0, ratios inside the clip range:
        policy_loss = −√(p̂(1 − p̂)) · (mean_{correct} s_i − mean_{wrong} s_i),
    s_i = mean over tokens of the ratio (value and gradient); on-policy the gradient of s_i is that of
    the mean-token log π, which is what the gradient check there uses."""
    torch.manual_seed(G)
    T, V = 5, 7
    logits = torch.randn(G, T, V, dtype=F64, requires_grad=True)
    targets = torch.randint(0, V, (G, T))
    mask = torch.arange(T) < torch.randint(1, T + 1, (G, 1))  # ragged lengths 1..T
    rewards = t([1.0] * correct + [0.0] * (G - correct))
    adv = compute_advantages(rewards, torch.zeros(G, dtype=torch.long), eps=0.0)
    p = correct / G
    sigma = math.sqrt(p * (1 - p))

    lp = token_logprobs(logits, targets)
    shift = 0.0 if on_policy else 0.1 * (2 * torch.rand(G, T, dtype=F64) - 1)  # ratios in [.905, 1.105]
    old = lp.detach() + shift
    loss, stats = policy_loss(lp, old, adv, mask, **CLIP)
    assert stats["clip_frac/total"] == 0.0
    (g_loss,) = torch.autograd.grad(loss, logits)

    lp = token_logprobs(logits, targets)
    per_tok = lp if on_policy else torch.exp(lp - old)
    s = (per_tok * mask).sum(-1) / mask.sum(-1)
    ref = -sigma * (s[:correct].mean() - s[correct:].mean())
    (g_ref,) = torch.autograd.grad(ref, logits)

    if on_policy:
        assert loss.item() == pytest.approx(0.0, abs=1e-15)
    else:
        assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert g_ref.abs().max() > 1e-3
    assert torch.allclose(g_loss, g_ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- where the gradient stops


def test_tied_groups_give_exactly_zero_gradient():
    torch.manual_seed(0)
    adv = compute_advantages(t([1, 1, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 2, 2]), eps=0.0)
    assert adv.tolist() == [0, 0, -1, 1, 0, 0]
    lp = torch.randn(6, 4, dtype=F64, requires_grad=True)
    old = lp.detach() + 0.5 * torch.randn(6, 4, dtype=F64)  # some ratios clipped, some not
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[2, 3] = False
    loss, _ = policy_loss(lp, old, adv, mask, **CLIP, dual_clip=3.0)
    loss.backward()
    assert torch.equal(lp.grad[[0, 1, 4, 5]], torch.zeros(4, 4, dtype=F64))
    assert lp.grad[2, 3] == 0  # masked token
    assert (lp.grad[2:4] != 0).sum() > 0


def clip_case(ratios, advs, **kw):
    old = torch.full((len(ratios), len(ratios[0])), -1.0, dtype=F64)
    lp = (old + t(ratios).log()).requires_grad_()
    loss, stats = policy_loss(lp, old, t(advs), torch.ones_like(old, dtype=torch.bool), **CLIP, **kw)
    loss.backward()
    return loss.item(), lp.grad, stats


def test_clip_bounds_stop_gradient_exactly_where_they_should():
    # Bounds .8 and 1.28; 2 sequences × 4 tokens, seq_mean_token_mean → ∂/∂log π = −A·ρ/8 unless clipped.
    loss, grad, stats = clip_case([[0.79, 0.81, 1.27, 1.29]] * 2, [1.0, -1.0])
    # A = +1: only ρ = 1.29 > 1.28 is clipped.  −[.79, .81, 1.27]/8 = −[.09875, .10125, .15875].
    # A = −1: only ρ = .79 < .8 is clipped.    [.81, 1.27, 1.29]/8 = [.10125, .15875, .16125].
    expected = t([[-0.09875, -0.10125, -0.15875, 0.0], [0.0, 0.10125, 0.15875, 0.16125]])
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert grad[0, 3] == 0 and grad[1, 0] == 0
    # Per token: A=+1 → −[.79, .81, 1.27, 1.28], mean −1.0375; A=−1 → [.8, .81, 1.27, 1.29], mean 1.0425.
    assert loss == pytest.approx((-1.0375 + 1.0425) / 2, abs=1e-12)  # .0025
    assert stats["clip_frac/low"] == 1 / 8 and stats["clip_frac/high"] == 1 / 8
    assert stats["clip_frac/total"] == 0.25
    assert stats["ratio/mean"] == pytest.approx(1.04)  # 2·(.79 + .81 + 1.27 + 1.29)/8


def test_dual_clip_caps_negative_advantages_only():
    ratios = [[2.9, 3.1, 0.79, 1.0]] * 2
    loss, grad, stats = clip_case(ratios, [-1.0, 1.0], dual_clip=3.0)
    # A = −1: pg = max(ρ, clip ρ) = [2.9, 3.1, .8, 1], then min(·, 3) = [2.9, 3, .8, 1]: ρ = 3.1 and .79 stop.
    # A = +1: pg = [−1.28, −1.28, −.79, −1] (dual clip does not apply): 2.9 and 3.1 stop at 1.28.
    expected = t([[2.9 / 8, 0.0, 0.0, 1 / 8], [0.0, 0.0, -0.79 / 8, -1 / 8]])
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert loss == pytest.approx((7.7 / 4 - 4.35 / 4) / 2, abs=1e-12)  # (1.925 − 1.0875)/2
    assert stats["clip_frac/dual"] == 1 / 8
    # Without the dual clip ρ = 3.1 with A = −1 keeps its gradient 3.1/8.
    _, grad, _ = clip_case(ratios, [-1.0, 1.0])
    assert grad[0, 1].item() == pytest.approx(3.1 / 8, abs=1e-12)


# ---------------------------------------------------------------- aggregation


NAN = float("nan")
# Lengths 4, 2, 1, 0 (the last sequence is empty); NaN padding must never reach the loss.
LOSS_TOK = t([[1, 2, 3, 4], [5, 6, NAN, NAN], [7, NAN, 9, 9], [9, 9, 9, 9]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "length_norm", "expected"),
    [
        ("token_mean", None, 4.0),  # (1+2+3+4+5+6+7)/7 = 28/7
        ("seq_mean_token_mean", None, 5.0),  # (10/4 + 11/2 + 7/1)/3 = (2.5 + 5.5 + 7)/3
        ("seq_mean_token_sum_norm", 4, 7 / 3),  # (10/4 + 11/4 + 7/4)/3 = 7/3
        ("seq_mean_token_sum_norm", 8, 7 / 6),  # (10 + 11 + 7)/8/3
    ],
)
def test_aggregation_modes(mode, length_norm, expected):
    assert aggregate(LOSS_TOK, MASK, mode, length_norm).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregation_empty_and_micro_batches(mode):
    empty = aggregate(LOSS_TOK, torch.zeros(4, 4), mode, 4)
    assert empty.item() == 0.0
    # Two micro-batches with the whole batch's count add up to the full-batch loss.
    den = 7 if mode == "token_mean" else 3
    parts = [aggregate(LOSS_TOK[s], MASK[s], mode, 4, denominator=den) for s in (slice(0, 1), slice(1, 4))]
    assert (parts[0] + parts[1]).item() == pytest.approx(aggregate(LOSS_TOK, MASK, mode, 4).item(), abs=1e-12)


def test_aggregation_errors_and_masked_mean():
    with pytest.raises(ValueError, match="length_norm"):
        aggregate(LOSS_TOK, MASK, "seq_mean_token_sum_norm", None)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(LOSS_TOK, MASK, "sum", None)
    assert masked_mean(LOSS_TOK, MASK).item() == 4.0
    assert masked_mean(LOSS_TOK, torch.zeros(4, 4)).item() == 0.0


# ---------------------------------------------------------------- KL, TIS, logprob gap


def test_kl_estimators_hand_values():
    lp, ref = t([0.5, 0.25]).log(), t([0.25, 0.5]).log()  # d = log π − log π_ref = [ln 2, −ln 2]
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), t([LN2, -LN2]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), t([0.2402265069591007] * 2))  # ½ ln²2
    # k3 = e^{−d} + d − 1:  .5 + ln 2 − 1 = .19315;  2 − ln 2 − 1 = .30685.
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), t([0.1931471805599453, 0.3068528194400547]))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(lp, ref, "k4")


def test_kl_term_in_policy_loss():
    lp = t([[0.5, 0.25]]).log().requires_grad_()
    ref = t([[0.25, 0.5]]).log()
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(
        lp, lp.detach(), t([0.0]), mask, **CLIP, aggregation="token_mean", ref_logprobs=ref, kl_coef=0.1
    )
    # A = 0, so loss = .1 · mean k3 = .1 · (.19315 + .30685)/2 = .1 · .25.
    assert stats["kl"] == pytest.approx(0.25, abs=1e-15)
    assert loss.item() == pytest.approx(0.025, abs=1e-15) and stats["pg_loss"] == 0.0
    loss.backward()
    # ∂k3/∂log π = 1 − e^{−d} = [1 − .5, 1 − 2]; × .1/2.
    torch.testing.assert_close(lp.grad, t([[0.025, -0.05]]), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp.detach(), t([0.0]), mask, **CLIP, kl_coef=0.1)


def test_truncated_importance_weights_and_logprob_gap():
    old = t([[0.6, 0.3, 0.5]]).log()
    behaviour = t([[0.3, 0.6, 0.5]]).log()  # π_old/μ = [2, .5, 1] → capped at 1.5: w = [1.5, .5, 1]
    lp = old.clone().requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(lp, old, t([1.0]), mask, **CLIP, behaviour_logprobs=behaviour, tis_cap=1.5)
    assert loss.item() == pytest.approx(-1.0, abs=1e-12)  # −(1.5 + .5 + 1)/3
    assert stats["tis/mean_weight"] == pytest.approx(1.0, abs=1e-12)
    assert stats["logprob_gap"] == pytest.approx(2 * LN2 / 3, abs=1e-12)  # (ln 2 + ln 2 + 0)/3
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-0.5, -1 / 6, -1 / 3]]), rtol=0, atol=1e-12)  # −w/3

    # Behaviour log-probs without a cap: the gap is logged, the loss is not reweighted.
    loss, stats = policy_loss(lp, old, t([1.0]), mask, **CLIP, behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx(-1.0, abs=1e-12) and "tis/mean_weight" not in stats
    assert stats["logprob_gap"] == pytest.approx(2 * LN2 / 3, abs=1e-12)
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        policy_loss(lp, old, t([1.0]), mask, **CLIP, tis_cap=2.0)


# ---------------------------------------------------------------- logits helpers, overlong


def test_token_logprobs_and_entropy():
    logits = t([[[0.0, math.log(3)]]])  # softmax = [.25, .75]
    torch.testing.assert_close(
        token_logprobs(logits, torch.tensor([[0]])), t([[-1.3862943611198906]])
    )  # ln .25
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[1]])), t([[-0.2876820724517809]]))
    # H = .25·ln 4 + .75·ln(4/3) = .34657 + .21576.
    torch.testing.assert_close(entropy_from_logits(logits), t([[0.5623351446188083]]))
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 4, dtype=F64)), t([1.3862943611198906] * 2))

    big = torch.tensor([[1000.0, 0.0]], dtype=torch.bfloat16)  # upcast to float32, computed stably
    lp = token_logprobs(big, torch.tensor([1]))
    assert lp.dtype == torch.float32 and lp.item() == -1000.0
    assert entropy_from_logits(big).item() == 0.0


def test_overlong_adjust():
    r = t([1.0, 0.0, 1.0])
    reasons = ["stop", "length", "length"]
    r2, keep = overlong_adjust(r, reasons, "none", 0.5)
    assert torch.equal(r2, r) and keep.tolist() == [True, True, True]
    r2, keep = overlong_adjust(r, reasons, "mask", 0.5)
    assert torch.equal(r2, r) and keep.tolist() == [True, False, False]
    r2, keep = overlong_adjust(r, reasons, "penalty", 0.5)
    assert r2.tolist() == [1.0, -0.5, 0.5] and keep.tolist() == [True, True, True]
    with pytest.raises(ValueError, match="overlong"):
        overlong_adjust(r, reasons, "drop", 0.5)
