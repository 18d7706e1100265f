"""The math of RLHF as pure torch functions: losses and estimators, each citing its source.

Only torch is imported, so every function can be tested against a plain
reference computation. Shapes are in comments: B examples, K responses.
Functions return per-example losses (B,) where the caller needs to weight
examples; the caller takes the (weighted) mean.

Reward-model losses (reward r = a scalar per (prompt, response)):
    bradley_terry_loss   pairs, with optional margins and ties
    ranking_loss         K-way rankings as all K(K-1)/2 pairs, each ranking counting once
    thumbs_loss          binary cross-entropy, the reward as the logit of "thumbs up"
    rating_loss          squared error against a (standardised) rating
    centering_loss       an auxiliary term pulling rewards towards zero

Departures, deliberate:
- Ties: Christiano et al. (2017) take a uniform target (0.5) for "equally good"; so
  do we. A tie's margin must be 0 (the data reader enforces it).
- Margins: Llama 2 subtracts a margin from the reward gap inside the sigmoid; we do
  the same for any pair that has one, whatever scale the user chose for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss (B,): -log sigmoid(r_chosen - r_rejected - margin); a tie's target is 0.5.

    Bradley & Terry (1952): P(chosen > rejected) = sigmoid(r_chosen - r_rejected).
    The negative log-likelihood of that model is InstructGPT's reward loss
    (Ouyang et al. 2022, eq. 1, with K = 2); the margin is Llama 2's (Touvron et
    al. 2023, eq. 2). For a tie (Christiano et al. 2017, sec. 2.2.3: "equally
    preferable" gives a uniform target) the loss is the cross-entropy against 0.5:
    -(log sigmoid(d) + log sigmoid(-d)) / 2, smallest when the rewards are equal.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if tie is not None:
        tie_loss = -0.5 * (F.logsigmoid(diff) + F.logsigmoid(-diff))
        loss = torch.where(tie.bool(), tie_loss, loss)
    return loss


def ranking_loss(rewards: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """Per-ranking loss (B,): the mean over its K(K-1)/2 pairs of -log sigmoid(r_better - r_worse).

    InstructGPT (Ouyang et al. 2022, eq. 1): loss = -1/C(K,2) E[log sigmoid(r(x, y_w) - r(x, y_l))]
    over every pair of a K-way ranking, all pairs of one ranking in the same batch
    element so that each ranking counts once (treating the pairs as separate
    examples overfits, their sec. 3.5).

    rewards: (B, K) one reward per response, in the order of the responses.
    ranking: (B, K) long, indices into the responses, best first; entries -1 pad
             rankings shorter than K (they are ignored).
    """
    valid = ranking >= 0                                            # (B, K)
    ordered = rewards.gather(1, ranking.clamp(min=0))               # (B, K) best first
    diff = ordered[:, :, None] - ordered[:, None, :]                # (B, K, K) r_i - r_j
    K = rewards.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu(1)  # i ranked above j
    pairs = upper & valid[:, :, None] & valid[:, None, :]           # (B, K, K)
    losses = -F.logsigmoid(diff) * pairs
    return losses.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


def thumbs_loss(rewards: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per-response loss (B,): binary cross-entropy with P(thumbs up) = sigmoid(r).

    Logistic regression on binary feedback: the single-response analogue of
    Bradley-Terry, comparing the response with a learned threshold (the head's
    bias). `up` is 1 for thumbs up, 0 for down.
    """
    return F.binary_cross_entropy_with_logits(rewards, up.to(rewards.dtype), reduction="none")


def rating_loss(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-response loss (B,): (r - target)^2.

    Regression on scalar ratings, as reward models trained on Likert-scale
    attributes are (Wang et al. 2023, HelpSteer: a regression head trained with mean squared error).
    Standardise the ratings first (mean 0, std 1) so the scale matches the others.
    """
    return (rewards - targets.to(rewards.dtype)) ** 2


def centering_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Per-example term (B,): (sum of the example's rewards)^2, pulling rewards towards zero.

    Eisenstein et al. (2023, "Helping or Herding?", the centering auxiliary loss) add eta * (r(x, y+) + r(x, y-))^2
    to the pairwise loss, so that rewards of different prompts share a zero and an
    ensemble's members are comparable. rewards: (B,) for single responses, or
    (B, K) for the K responses of an example (a pair: K = 2); padding must be 0.
    """
    if rewards.ndim == 1:
        return rewards ** 2
    return rewards.sum(-1) ** 2
