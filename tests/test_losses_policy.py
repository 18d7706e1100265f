"""DPO, IPO, REBEL and the group baselines against hand-made numbers and plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from heed.losses import dpo_implicit_reward, dpo_loss, group_advantages, grpo_policy_loss, rebel_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# policy and reference sequence log-probs of two pairs, by hand
CHOSEN, REJECTED = [-3.0, -10.0], [-5.0, -4.0]
REF_CHOSEN, REF_REJECTED = [-4.0, -9.0], [-4.5, -6.0]
# log-ratio margins h = (c - rc) - (r - rr): (1 - (-0.5)) = 1.5 and (-1 - 2) = -3
MARGINS = [1.5, -3.0]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_dpo_implicit_reward_is_beta_times_log_ratio():
    r = dpo_implicit_reward(t(CHOSEN), t(REF_CHOSEN), beta=0.5)
    assert r.tolist() == [0.5, -0.5]


def test_dpo_sigmoid_loss_by_hand():
    beta = 0.1
    loss = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta)
    expected = [-math.log(sigmoid(beta * h)) for h in MARGINS]
    torch.testing.assert_close(loss, t(expected))
    # the loss is the Bradley-Terry loss on the implicit rewards (Rafailov et al. 2023, eq. 5 -> 7)
    diff = (dpo_implicit_reward(t(CHOSEN), t(REF_CHOSEN), beta)
            - dpo_implicit_reward(t(REJECTED), t(REF_REJECTED), beta))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(diff))


def test_dpo_label_smoothing_mixes_the_flipped_label():
    beta, eps = 0.2, 0.1
    loss = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, label_smoothing=eps)
    expected = [-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)) for h in MARGINS]
    torch.testing.assert_close(loss, t(expected))
    # smoothing 0.5 is indifferent to the order: the same loss with chosen and rejected swapped
    a = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, label_smoothing=0.5)
    b = dpo_loss(t(REJECTED), t(CHOSEN), t(REF_REJECTED), t(REF_CHOSEN), beta, label_smoothing=0.5)
    torch.testing.assert_close(a, b)


def test_ipo_is_the_squared_distance_to_one_over_two_beta():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    loss = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, loss_type="ipo")
    assert loss.tolist() == [(1.5 - 2) ** 2, (-3.0 - 2) ** 2]
    # minimal (zero) exactly at the target margin, unlike DPO's loss which keeps falling
    at_target = dpo_loss(t([0.0]), t([-2.0]), t([0.0]), t([0.0]), beta, loss_type="ipo")
    assert at_target.item() == 0.0
    with pytest.raises(ValueError):
        dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, loss_type="hinge")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t([-3.0]).requires_grad_(), t([-5.0]).requires_grad_()
    dpo_loss(chosen, rejected, t([-4.0]), t([-4.5]), 0.1).sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_rebel_regression_target_by_hand():
    eta = 2.0
    logps_a, logps_b = t([-3.0, -7.0]), t([-4.0, -2.0])
    old_a, old_b = t([-3.5, -6.0]), t([-4.0, -2.5])
    r_a, r_b = t([1.0, 0.2]), t([0.0, 0.7])
    loss = rebel_loss(logps_a, logps_b, old_a, old_b, r_a, r_b, eta)
    # pair 0: log-ratios 0.5 and 0.0 -> prediction 0.25, target 1.0; pair 1: -1.0 and 0.5 -> -0.75, target -0.5
    assert loss.tolist() == pytest.approx([(0.25 - 1.0) ** 2, (-0.75 - (-0.5)) ** 2])


def test_rebel_loss_is_zero_when_the_log_ratio_gap_is_eta_times_the_reward_gap():
    eta = 0.5
    old = t([-2.0, -2.0])
    r_a, r_b = t([3.0, -1.0]), t([1.0, 1.0])
    logps_a = old + eta * (r_a - r_b)  # each response's log-ratio carries the whole gap
    loss = rebel_loss(logps_a, old, old, old, r_a, r_b, eta)
    assert loss.tolist() == [0.0, 0.0]
    # and swapping the pair's order gives the same loss (the regression is antisymmetric)
    torch.testing.assert_close(rebel_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), t([0.3]), t([0.9]), 1.0),
                               rebel_loss(t([-3.0]), t([-1.0]), t([-2.5]), t([-2.0]), t([0.9]), t([0.3]), 1.0))


def test_group_baselines_against_plain_loops():
    rewards = t([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, -1.0, 2.0]])
    for baseline in ("group", "loo"):
        adv = group_advantages(rewards, baseline)
        for i, row in enumerate(rewards.tolist()):
            K = len(row)
            mean = sum(row) / K
            std = math.sqrt(sum((r - mean) ** 2 for r in row) / (K - 1))
            for k, r in enumerate(row):
                if baseline == "group":
                    expected = (r - mean) / (std + 1e-4)
                else:
                    expected = r - sum(row[j] for j in range(K) if j != k) / (K - 1)
                assert adv[i, k].item() == pytest.approx(expected, abs=1e-12)
    # hand-made: leave-one-out of [1, 2, 3, 6] -> 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2
    assert group_advantages(rewards, "loo")[0].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    # equal rewards in a group teach nothing: zero advantages, no division by zero
    assert group_advantages(t([[2.0, 2.0, 2.0]]), "group").abs().max().item() == 0.0
    with pytest.raises(ValueError):
        group_advantages(t([[1.0]]), "loo")


def test_grpo_policy_loss_by_hand_and_its_gradient():
    # two responses of lengths 2 and 1 in a (2, 3) token layout; on-policy (ratio 1)
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logprobs = t([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]).requires_grad_()
    advantages = t([1.0, -2.0])
    loss, stats = grpo_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    # per response: mean over its tokens of -A * ratio = -A; then mean over responses
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2)
    loss.backward()
    # d/dlogp of -A * exp(logp - old) / |o_i| / B at ratio 1: -A / |o_i| / 2
    torch.testing.assert_close(logprobs.grad, t([[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]]))
    assert stats["clipfrac"].item() == 0.0
    # clipping: a ratio of e^1 with a positive advantage is capped at 1 + eps
    loss, stats = grpo_policy_loss(t([[0.0]]), t([[-1.0]]), t([1.0]), t([[1.0]]), cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    # the KL term is the k3 estimator (Shao et al. 2024, eq. 4), weighted and averaged per response
    lp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    loss, stats = grpo_policy_loss(lp, lp, t([0.0]), t([[1.0, 1.0]]), ref_logprobs=ref, kl_coef=0.1)
    k3 = [math.exp(r - p) - (r - p) - 1 for p, r in [(-1.0, -1.5), (-2.0, -1.0)]]
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2)
