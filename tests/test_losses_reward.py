"""Reward losses against plain reference computations (Python floats and loops)."""

from __future__ import annotations

import itertools
import math
import random

import torch

from heed.losses import bradley_terry_loss, centering_loss, ranking_loss, rating_loss, thumbs_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_matches_reference():
    rng = random.Random(0)
    c = [rng.uniform(-3, 3) for _ in range(20)]
    r = [rng.uniform(-3, 3) for _ in range(20)]
    m = [rng.choice([0.0, 0.5, 2.0]) for _ in range(20)]
    tie = [i % 4 == 0 for i in range(20)]
    m = [0.0 if t else x for x, t in zip(m, tie)]
    got = bradley_terry_loss(torch.tensor(c), torch.tensor(r), torch.tensor(m), torch.tensor(tie))
    for i in range(20):
        d = c[i] - r[i] - m[i]
        ref = -(0.5 * math.log(sig(d)) + 0.5 * math.log(1 - sig(d))) if tie[i] else -math.log(sig(d))
        assert abs(float(got[i]) - ref) < 1e-5
    plain = bradley_terry_loss(torch.tensor(c), torch.tensor(r))
    assert torch.allclose(plain, torch.tensor([-math.log(sig(a - b)) for a, b in zip(c, r)]), atol=1e-5)


def test_bradley_terry_margin_and_tie_behaviour():
    # A margin asks for a bigger gap: the same gap costs more.
    gap = torch.tensor([1.0])
    assert bradley_terry_loss(gap, torch.zeros(1), torch.tensor([1.0])) > bradley_terry_loss(gap, torch.zeros(1))
    # A tie's loss is smallest at equal rewards, and symmetric.
    xs = torch.linspace(-2, 2, 41)
    tie_loss = bradley_terry_loss(xs, torch.zeros(41), tie=torch.ones(41, dtype=torch.bool))
    assert int(tie_loss.argmin()) == 20 and torch.allclose(tie_loss, tie_loss.flip(0))
    assert abs(float(tie_loss[20]) - math.log(2)) < 1e-6
    # Stable for large gaps (no inf/nan).
    big = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.zeros(2))
    assert torch.isfinite(big).all() and abs(float(big[0]) - 200) < 1e-3


def test_ranking_loss_all_pairs_each_ranking_once():
    rng = random.Random(1)
    K, B = 4, 6
    rewards = [[rng.uniform(-2, 2) for _ in range(K)] for _ in range(B)]
    rankings = [rng.sample(range(K), K) for _ in range(B)]
    got = ranking_loss(torch.tensor(rewards), torch.tensor(rankings))
    for b in range(B):
        pairs = list(itertools.combinations(rankings[b], 2))  # (better, worse) in ranking order
        assert len(pairs) == K * (K - 1) // 2
        ref = sum(-math.log(sig(rewards[b][w] - rewards[b][l])) for w, l in pairs) / len(pairs)
        assert abs(float(got[b]) - ref) < 1e-5


def test_ranking_loss_padding_and_pairs_equivalence():
    # K = 2 rankings are Bradley-Terry pairs.
    r = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    ranking = torch.tensor([[1, 0], [0, 1]])
    assert torch.allclose(ranking_loss(r, ranking),
                          bradley_terry_loss(torch.tensor([-1.2, 2.0]), torch.tensor([0.3, 0.5])))
    # A ranking of 3 padded to 5 equals the same ranking unpadded.
    r3 = torch.tensor([[0.1, 0.9, -0.4]])
    padded = torch.cat([r3, torch.tensor([[7.0, -7.0]])], 1)
    assert torch.allclose(ranking_loss(padded, torch.tensor([[1, 0, 2, -1, -1]])),
                          ranking_loss(r3, torch.tensor([[1, 0, 2]])))


def test_thumbs_and_rating_losses():
    r = [0.5, -1.0, 3.0, 0.0]
    up = [1, 0, 0, 1]
    got = thumbs_loss(torch.tensor(r), torch.tensor(up))
    for x, y, g in zip(r, up, got.tolist()):
        assert abs(g - -(y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)))) < 1e-6
    t = [1.0, -1.0, 0.25, 0.0]
    got = rating_loss(torch.tensor(r), torch.tensor(t))
    assert got.tolist() == [(a - b) ** 2 for a, b in zip(r, t)]


def test_centering_loss():
    pairs = torch.tensor([[1.0, -1.0], [2.0, 1.0]])
    assert centering_loss(pairs).tolist() == [0.0, 9.0]
    assert centering_loss(torch.tensor([2.0, -3.0])).tolist() == [4.0, 9.0]


def test_losses_have_gradients_towards_the_labels():
    c = torch.zeros(3, requires_grad=True)
    bradley_terry_loss(c, torch.zeros(3)).sum().backward()
    assert (c.grad < 0).all()  # descending the loss raises the chosen reward
