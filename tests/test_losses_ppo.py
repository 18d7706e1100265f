"""PPO math against plain reference computations and hand-made numbers."""

from __future__ import annotations

import math

import torch

from heed.algos.ppo import AdaptiveKLController
from heed.losses import gae, kl_penalty, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE on one episode, as a plain Python loop."""
    T = len(rewards)
    advantages = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


def test_gae_matches_plain_loop_on_ragged_batch():
    torch.manual_seed(0)
    lengths = [5, 1, 3, 7]
    T = max(lengths)
    rewards, values = torch.randn(4, T, dtype=torch.float64), torch.randn(4, T, dtype=torch.float64)
    mask = torch.zeros(4, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for i, n in enumerate(lengths):
            ref = gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
            assert adv[i, :n].tolist() == ref  # exactly: same operations, same order
            assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)
            torch.testing.assert_close(ret[i, :n], adv[i, :n] + values[i, :n])


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.9]]))


def test_kl_estimators_match_their_definitions():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), -(ref - logp))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * torch.log(r) ** 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), (r - 1) - torch.log(r))
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    assert abs(float(kl_penalty(logp, logq, "k1").mean()) - true_kl) < 0.01
    assert abs(float(kl_penalty(logp, logq, "k3").mean()) - true_kl) < 0.01


def test_masked_whiten_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (vals - vals.mean()) / vals.std()
    torch.testing.assert_close(w[mask.bool()], expected, atol=1e-5, rtol=1e-5)
    assert float(w[0, 3]) == 0 and float(w[1, 2]) == 0
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask.bool()], expected + vals.mean(), atol=1e-5, rtol=1e-5)
    assert math.isclose(float(masked_mean(x, mask)), 3.0)


def test_clipped_policy_loss_on_hand_made_numbers():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 3), cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2.2
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 - 2.2) / 3))
    assert math.isclose(float(stats["clipfrac"]), 2 / 3, rel_tol=1e-6)
    # a masked token changes nothing
    loss2, _ = ppo_policy_loss(torch.cat([new, torch.tensor([[5.0]])], 1), torch.zeros(1, 4),
                               torch.cat([adv, torch.tensor([[9.0]])], 1), torch.tensor([[1, 1, 1, 0]]), 0.2)
    torch.testing.assert_close(loss, loss2)


def test_clipped_value_loss_on_hand_made_numbers():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = ppo_value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(0.81, 0.81) = 0.81
    torch.testing.assert_close(loss, torch.tensor(0.5 * (3.24 + 0.81) / 2))
    assert math.isclose(float(stats["vf_clipfrac"]), 0.5)


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 1000)  # KL above target: error clipped to +0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 0.1))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(5.4, 1000)  # 10% below target
    assert math.isclose(ctl.value, 0.1 * (1 - 0.1 * 0.1))
    fixed = AdaptiveKLController(0.1, target=6.0, horizon=10_000, adaptive=False)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
