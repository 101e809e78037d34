"""Advantage estimators against hand-computed tables (eps = 0 unless stated, so the numbers are exact)."""

import itertools
import math

import pytest
import torch

from learner.advantages import (
    compute_advantages,
    extended_pair,
    extended_pair_weight,
    filter_tied_groups,
    grpo_prompt_weight,
    pair_advantage_magnitude,
    tied_fraction_expected,
)

R3 = 1.7320508075688772  # √3
IR3 = 0.5773502691896258  # 1/√3
IR2 = 0.7071067811865476  # 1/√2


def adv(rewards, ids, estimator="grpo", std="population", scale="group", eps=0.0):
    r = torch.tensor(rewards, dtype=torch.float64)
    return compute_advantages(r, torch.tensor(ids), estimator, std, scale, eps)


# (rewards, group ids, estimator, std, scale, expected). One group per case here, so scale=batch = group.
SINGLE_GROUP_CASES = [
    # G=2 binary: r̄ = .5, r − r̄ = ±.5; population σ = .5; sample σ = √(.5/1) = .7071.
    ([1, 0], [0, 0], "grpo", "population", "group", [1.0, -1.0]),  # .5/.5
    ([0, 1], [0, 0], "grpo", "sample", "group", [-IR2, IR2]),  # .5/√.5 = √.5
    ([1, 0], [0, 0], "grpo", "population", "batch", [1.0, -1.0]),
    ([1, 0], [0, 0], "grpo", "sample", "none", [0.5, -0.5]),  # no division
    ([1, 0], [0, 0], "dr_grpo", "population", "group", [0.5, -0.5]),
    ([1, 0], [0, 0], "rloo", "population", "group", [1.0, -1.0]),  # 1 − 0, 0 − 1
    # G=4 binary, one correct: r̄ = .25, r − r̄ = [−.25, .75, −.25, −.25], Σ(r − r̄)² = .75.
    # population σ = √(.75/4) = √3/4 → .75/σ = √3, −.25/σ = −1/√3; sample σ = √(.75/3) = .5 → 1.5, −.5.
    ([0, 1, 0, 0], [5, 5, 5, 5], "grpo", "population", "group", [-IR3, R3, -IR3, -IR3]),
    ([0, 1, 0, 0], [5, 5, 5, 5], "grpo", "sample", "group", [-0.5, 1.5, -0.5, -0.5]),
    ([0, 1, 0, 0], [5, 5, 5, 5], "grpo", "sample", "batch", [-0.5, 1.5, -0.5, -0.5]),
    ([0, 1, 0, 0], [5, 5, 5, 5], "grpo", "population", "none", [-0.25, 0.75, -0.25, -0.25]),
    ([0, 1, 0, 0], [5, 5, 5, 5], "dr_grpo", "sample", "group", [-0.25, 0.75, -0.25, -0.25]),
    # rloo: correct 1 − 0 = 1; wrong 0 − 1/3 = −1/3.
    ([0, 1, 0, 0], [5, 5, 5, 5], "rloo", "population", "group", [-1 / 3, 1.0, -1 / 3, -1 / 3]),
    # G=4 real: r̄ = .375, r − r̄ = [.375, −.375, .125, −.125], Σ(r − r̄)² = 2·.140625 + 2·.015625 = 5/16.
    # population σ = √(5/64) = √5/8 → .375/σ = 3/√5 = 1.34164, .125/σ = 1/√5 = .44721;
    # sample σ = √(5/48) = .32275 → .375/σ = 1.16190, .125/σ = .38730.
    (
        [0.75, 0.0, 0.5, 0.25],
        [1, 1, 1, 1],
        "grpo",
        "population",
        "group",
        [1.3416407864998738, -1.3416407864998738, 0.4472135954999579, -0.4472135954999579],
    ),
    (
        [0.75, 0.0, 0.5, 0.25],
        [1, 1, 1, 1],
        "grpo",
        "sample",
        "group",
        [1.161895003862225, -1.161895003862225, 0.3872983346207417, -0.3872983346207417],
    ),
    ([0.75, 0.0, 0.5, 0.25], [1, 1, 1, 1], "dr_grpo", "population", "group", [0.375, -0.375, 0.125, -0.125]),
    # rloo: .75 − (0 + .5 + .25)/3 = .5;  0 − 1.5/3 = −.5;  .5 − 1/3 = 1/6;  .25 − 1.25/3 = −1/6.
    ([0.75, 0.0, 0.5, 0.25], [1, 1, 1, 1], "rloo", "population", "group", [0.5, -0.5, 1 / 6, -1 / 6]),
    # G=16 binary, 4 correct: p̂ = .25, r − r̄ = .75 / −.25; population σ = √(.25·.75) = √3/4 → √3, −1/√3;
    # sample σ = √(16·.1875/15) = √.2 → .75/√.2 = 1.67705, −.25/√.2 = −.55902;
    # rloo: 1 − 3/15 = .8; 0 − 4/15 = −.26667.
    ([1] * 4 + [0] * 12, [3] * 16, "grpo", "population", "group", [R3] * 4 + [-IR3] * 12),
    (
        [1] * 4 + [0] * 12,
        [3] * 16,
        "grpo",
        "sample",
        "group",
        [1.6770509831248424] * 4 + [-0.5590169943749475] * 12,
    ),
    ([1] * 4 + [0] * 12, [3] * 16, "dr_grpo", "population", "group", [0.75] * 4 + [-0.25] * 12),
    ([1] * 4 + [0] * 12, [3] * 16, "rloo", "population", "group", [0.8] * 4 + [-4 / 15] * 12),
]


@pytest.mark.parametrize(("rewards", "ids", "estimator", "std", "scale", "expected"), SINGLE_GROUP_CASES)
def test_single_group_table(rewards, ids, estimator, std, scale, expected):
    got = adv(rewards, ids, estimator, std, scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# Ragged batch, shuffled non-contiguous ids: group 7 (size 2) at 0,4; group 3 (size 4) at 1,3,6,8;
# group 11 (size 3) at 2,5,7.
MIXED_R = [1, 0, 1.0, 1, 0, 0.0, 1, 0.5, 1]
MIXED_IDS = [7, 3, 11, 3, 7, 11, 3, 11, 3]
# Means: g7 .5, g3 .75, g11 .5 → r − r̄ = [.5, −.75, .5, .25, −.5, −.5, .25, 0, .25].
CENTERED = [0.5, -0.75, 0.5, 0.25, -0.5, -0.5, 0.25, 0.0, 0.25]
# Whole batch: Σr = 5.5, Σr² = 5.25 → Σ(r − r̄)² = 5.25 − 5.5²/9 = 17/9;
# population σ = √(17/81) = √17/9 → 1/σ = 2.18282; sample σ = √(17/72) → 1/σ = √(72/17) = 2.05798.
MIXED_CASES = [
    # g7 σ = .5 → ±1; g3 σ = √3/4 → −√3, 1/√3; g11 σ = √(.5/3) → ±.5/σ = ±√1.5 = ±1.22474, 0.
    (
        "grpo",
        "population",
        "group",
        [1.0, -R3, 1.224744871391589, IR3, -1.0, -1.224744871391589, IR3, 0.0, IR3],
    ),
    # g7 σ = √.5 → ±√.5; g3 σ = √(.75/3) = .5 → −1.5, .5; g11 σ = √(.5/2) = .5 → ±1, 0.
    ("grpo", "sample", "group", [IR2, -1.5, 1.0, 0.5, -IR2, -1.0, 0.5, 0.0, 0.5]),
    # (r − r̄_g)·2.18282: .5 → 1.09141, −.75 → −1.63712, .25 → .54571.
    (
        "grpo",
        "population",
        "batch",
        [
            1.0914103126634984,
            -1.6371154689952476,
            1.0914103126634984,
            0.5457051563317492,
            -1.0914103126634984,
            -1.0914103126634984,
            0.5457051563317492,
            0.0,
            0.5457051563317492,
        ],
    ),
    # (r − r̄_g)·2.05798: .5 → 1.02899, −.75 → −1.54349, .25 → .51450.
    (
        "grpo",
        "sample",
        "batch",
        [
            1.0289915108550531,
            -1.5434872662825798,
            1.0289915108550531,
            0.5144957554275266,
            -1.0289915108550531,
            -1.0289915108550531,
            0.5144957554275266,
            0.0,
            0.5144957554275266,
        ],
    ),
    ("grpo", "sample", "none", CENTERED),
    ("dr_grpo", "population", "group", CENTERED),
    # rloo = n/(n−1)·(r − r̄): g7 ×2 → ±1; g3 ×4/3 → −1, 1/3; g11 ×3/2 → ±.75, 0.
    ("rloo", "sample", "batch", [1.0, -1.0, 0.75, 1 / 3, -1.0, -0.75, 1 / 3, 0.0, 1 / 3]),
]


@pytest.mark.parametrize(("estimator", "std", "scale", "expected"), MIXED_CASES)
def test_mixed_ragged_batch_table(estimator, std, scale, expected):
    got = adv(MIXED_R, MIXED_IDS, estimator, std, scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_group_ids_are_labels_not_positions():
    # Relabelling and permuting the batch permutes the advantages and changes nothing else.
    perm = torch.tensor([8, 2, 5, 0, 7, 1, 4, 6, 3])
    relabel = {7: 0, 3: 100, 11: -4}
    base = adv(MIXED_R, MIXED_IDS, "grpo", "sample", "group")
    moved = adv([MIXED_R[i] for i in perm], [relabel[MIXED_IDS[i]] for i in perm], "grpo", "sample", "group")
    assert torch.equal(moved, base[perm])


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("std", ["population", "sample"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_tied_and_singleton_groups_are_exactly_zero(estimator, std, scale, eps):
    # Tied group of 0.1s (Σ/3 is not exactly 0.1 in floating point), a size-1 group, one informative pair.
    rewards = torch.tensor([0.1, 1.0, 0.1, 0.7, 0.1, 0.0], dtype=torch.float32)
    ids = torch.tensor([4, 2, 4, 9, 4, 2])
    got = compute_advantages(rewards, ids, estimator, std, scale, eps)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert got[[0, 2, 4, 3]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert got[1] > 0 > got[5]


def test_all_tied_batch_with_eps_zero_has_no_nan():
    # Batch std is 0 here: the where() keeps 0/0 out.
    got = adv([0.3, 0.3, 1, 1], [0, 0, 1, 1], "grpo", "population", "batch", eps=0.0)
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_eps_shrinks_grpo():
    # Pair: .5/(.5 + .5) = .5 with eps = .5.
    assert adv([1, 0], [0, 0], eps=0.5).tolist() == [0.5, -0.5]


def test_integer_rewards_give_float32():
    got = compute_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), eps=0.0)
    assert got.dtype == torch.float32 and got.tolist() == [1.0, -1.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="estimator"):
        adv([1, 0], [0, 0], estimator="ppo")
    with pytest.raises(ValueError, match="scale"):
        adv([1, 0], [0, 0], scale="global")
    with pytest.raises(ValueError, match="same length"):
        compute_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("flip", [False, True])
def test_two_grpo_pair_is_plus_minus_one(flip):
    # G = 2, binary: population grpo = rloo = ±1 exactly; sample grpo = ±1/√2.
    r = [0, 1] if flip else [1, 0]
    sign = torch.tensor([-1.0, 1.0] if flip else [1.0, -1.0], dtype=torch.float64)
    pop = adv(r * 3, [0, 0, 1, 1, 2, 2])
    assert torch.equal(pop, sign.repeat(3))
    assert torch.equal(adv(r, [0, 0], "rloo"), sign)
    torch.testing.assert_close(adv(r, [0, 0], std="sample"), sign * IR2, rtol=0, atol=1e-15)
    assert pair_advantage_magnitude("population") == 1.0
    assert pair_advantage_magnitude("sample") == pytest.approx(IR2, abs=1e-15)
    # The default eps = 1e-6 shrinks the pair to .5/(.5 + 1e-6) = 1 − 2e-6 + O(1e-12).
    torch.testing.assert_close(adv(r, [0, 0], eps=1e-6), sign * (1 - 2e-6), rtol=0, atol=1e-11)


def test_filter_tied_groups():
    kept, dropped = filter_tied_groups([[1, 0], [1, 1], [0.0, 0.0, 0.0], [0.5], [0, 0, 1], []])
    assert kept == [0, 4]
    assert dropped == [1, 2, 3, 5]


def test_tied_fraction_expected():
    assert tied_fraction_expected(0.5, 2) == 0.5  # .25 + .25
    assert tied_fraction_expected(0.25, 2) == 0.625  # .0625 + .5625
    assert tied_fraction_expected(0.5, 16) == 2 / 65536  # 2·(1/2)^16
    assert tied_fraction_expected(0.0, 4) == 1.0
    assert math.isclose(tied_fraction_expected(0.9, 3), 0.729 + 0.001)
    with pytest.raises(ValueError):
        tied_fraction_expected(1.5, 2)


def test_extended_pair_is_the_first_highest_and_the_first_lowest():
    # generation order: the first round's two, then the extension rounds' (2, then 4)
    assert extended_pair([0, 0, 0, 0, 1, 0, 1, 0]) == (4, 0)
    assert extended_pair([1, 1, 1, 0]) == (0, 3)
    assert extended_pair([0.5, -1.0, 1.0, -1.0]) == (2, 1)  # not binary (overlong penalty): extremes
    assert extended_pair([1, 1, 1, 1]) is None and extended_pair([]) is None
    # the drawn pair trains with the usual pair advantages: ±1 (population std), ±1/√2 (sample)
    rewards = [0, 0, 0, 0, 1, 0, 1, 0]
    i, j = extended_pair(rewards)
    assert adv([rewards[i], rewards[j]], [0, 0]).tolist() == [1.0, -1.0]
    torch.testing.assert_close(
        adv([rewards[i], rewards[j]], [0, 0], std="sample"), torch.tensor([IR2, -IR2], dtype=torch.float64)
    )


def test_extended_pair_weight_by_hand():
    # K = 8, p = ½: (1 − 2/256)/(1/4) = 3.96875
    assert extended_pair_weight(0.5, 8) == pytest.approx(3.96875, abs=1e-12)
    # p = 0.1: 0.9^8 = 0.43046721, 0.1^8 = 1e-8 → (1 − 0.43046722)/0.09 = 6.328141...; / 3.96875 = 1.5945
    assert extended_pair_weight(0.1, 8) == pytest.approx(0.56953278 / 0.09, abs=1e-9)
    assert extended_pair_weight(0.1, 8) / extended_pair_weight(0.5, 8) == pytest.approx(1.5945, abs=1e-4)
    # p = 0.02: 0.98^8 = 0.8507630226 → 0.1492369774/0.0196 = 7.614131; / 3.96875 = 1.9185
    assert extended_pair_weight(0.02, 8) / extended_pair_weight(0.5, 8) == pytest.approx(1.9185, abs=1e-4)
    # K = 4 helps far less: (1 − 0.6561 − 0.0001)/0.09 = 3.82 vs (1 − 2/16)/(1/4) = 3.5 at ½ → 1.0914
    assert extended_pair_weight(0.1, 4) / extended_pair_weight(0.5, 4) == pytest.approx(3.82 / 3.5, abs=1e-12)
    # K = 2 is plain 2-GRPO: 2p(1 − p)/(p(1 − p)) = 2 for every prompt
    for p in (0.02, 0.1, 0.5, 0.9):
        assert extended_pair_weight(p, 2) == pytest.approx(2.0, abs=1e-12)
    # 16-GRPO, for comparison (the 1.47 and 1.86); 2-GRPO per sequence is half a pair's 2
    assert grpo_prompt_weight(0.1, 16) / grpo_prompt_weight(0.5, 16) == pytest.approx(1.4724, abs=1e-4)
    assert grpo_prompt_weight(0.02, 16) / grpo_prompt_weight(0.5, 16) == pytest.approx(1.8629, abs=1e-4)
    assert grpo_prompt_weight(0.3, 2) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        extended_pair_weight(0.0, 8)


def test_extended_pair_gradient_is_its_formula_exactly():
    """The expected gradient of the pair drawn from a group extended 2 → 4 → 8, enumerated exactly over
    every way the rollouts can fall, equals c(p)·∇p. The policy: a softmax over four one-token answers,
    two of them correct (so the pair is a draw within each class, not a fixed answer)."""
    torch.manual_seed(0)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(theta, 0)
    probs = pi.detach().tolist()
    correct = {0, 1}
    cap = 8
    weight = [0.0] * 4  # E[1{y⁺ = o} − 1{y⁻ = o}]

    def draw(prefix: tuple[int, ...], prob: float) -> None:
        pair = extended_pair([float(o in correct) for o in prefix])
        if pair is not None:
            weight[prefix[pair[0]]] += prob
            weight[prefix[pair[1]]] -= prob
        elif len(prefix) < cap:  # tied: as many more as it has
            for more in itertools.product(range(4), repeat=len(prefix)):
                draw(prefix + more, prob * math.prod(probs[o] for o in more))

    for first in itertools.product(range(4), repeat=2):
        draw(first, math.prod(probs[o] for o in first))
    objective = (torch.tensor(weight, dtype=torch.float64) * pi.log()).sum()
    (pair_grad,) = torch.autograd.grad(objective, theta, retain_graph=True)
    p = pi[0] + pi[1]
    (grad_p,) = torch.autograd.grad(p, theta)
    expected = extended_pair_weight(float(p.detach()), cap) * grad_p
    torch.testing.assert_close(pair_grad, expected, rtol=1e-12, atol=1e-14)
