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


def token_tag_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Per-row mean cross-entropy of token tags (M,): logits (M, R, C), tags (M, R) with -100
    where no tag is taught (padding). A token-level reward model's loss (Wu et al. 2023 train
    each fine-grained reward model as a token classifier; here one head with BIO tags)."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), tags, ignore_index=-100,
                                            reduction="none")
    return nll.sum(-1) / (tags != -100).sum(-1).clamp(min=1)


def span_end_rewards(probs: torch.Tensor, label_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (M, R) from BIO tag probabilities (M, R, 1 + 2L): class 0 outside,
    1 + 2l beginning and 2 + 2l inside a span of label l. Token t earns
    sum_l w_l * P(t in a span of l) * (1 - P(t + 1 inside a span of l)): the expected reward of
    the spans that end at t, each span's reward at its last token (Wu et al. 2023, sec. 2.2,
    "Fine-Grained RLHF"; they place a segment's reward at its final token)."""
    p = probs * mask[..., None]
    inside = p[..., 1::2] + p[..., 2::2]                               # (M, R, L)
    continues = torch.zeros_like(inside)
    continues[:, :-1] = p[:, 1:, 2::2]
    return ((inside * (1 - continues)) * label_rewards.to(p)).sum(-1) * mask


# ---------------------------------------------------------------------------
# Policy optimisation (PPO on language models)
#
# Layout: (B, T) tensors whose columns are tokens; `mask` is 1 on the response
# tokens being optimised (right-padded), 0 elsewhere. The value in column t is
# the value of the state *before* token t, so it lines up with token t's log-prob.
# ---------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().clamp(min=2)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions; `shift_mean=False` keeps the mean (for rewards).

    Whitening advantages per batch is PPO practice (Huang et al. 2023, detail 4 of the
    LM-PPO list, following openai/lm-human-preferences); masked positions come out 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020, "Approximating KL").

    With log r = log pi_ref(y) - log pi(y):
    k1 = -log r (unbiased, can be negative per token); k2 = (log r)^2 / 2 (biased, low
    variance); k3 = (r - 1) - log r (unbiased and always >= 0).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def last_response_token(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the column of each row's last response token (mask (B, T), responses right-padded)."""
    return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)


def ppo_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards for a language model (Ziegler et al. 2019, sec. 2.2; Stiennon et al.
    2020, eq. 2): -kl_coef * KL_t on every response token (`kl` already masked), and each
    sequence's score (B,) added at its last response token. (B, T)."""
    rewards = -kl_coef * kl
    last = last_response_token(mask)
    rewards[torch.arange(len(last)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A beyond a response's last token taken as 0 (the episode ends there).
    Returns (advantages, returns = advantages + values), both (B, T), 0 where mask is 0.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        # a masked column passes nothing back: the response ended before it
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)),
    ratio_t = pi(y_t) / pi_old(y_t). Also returns the clip fraction and the approximate
    KL(pi_old || pi) ~ mean (log ratio)^2 / 2 (the k2 estimator, as in TRL).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approxkl": masked_mean(0.5 * log_ratio ** 2, mask).detach()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (as in openai/baselines ppo2 and lm-human-preferences):

    0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last dimension."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ppo_dense_token_rewards(token_scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                            kl_coef: float) -> torch.Tensor:
    """`ppo_token_rewards` with the score given per token (B, T) instead of per sequence: Fine-Grained
    RLHF (Wu et al. 2023, sec. 2.2) puts each segment's reward on the segment's last token beside the
    per-token penalty, r_t = R_t - kl_coef * KL_t. `token_scores` whose row has one nonzero entry, at
    the last response token, gives `ppo_token_rewards` exactly. (B, T), 0 outside `mask`."""
    return (token_scores - kl_coef * kl) * mask.to(kl.dtype)


# ---------------------------------------------------------------------------
# Direct and critic-free policy optimisation: DPO, IPO, REBEL, GRPO, RLOO
#
# Sequence log-probabilities (B,) are sums over a response's tokens of log pi(y_t | ...);
# `*_ref_*` are the frozen reference's, `old_*` those of the policy before this update.
# ---------------------------------------------------------------------------

def dpo_implicit_reward(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The reward a DPO policy implies (Rafailov et al. 2023, eq. 5, less the partition term):
    beta * (log pi(y|x) - log pi_ref(y|x)), (B,)."""
    return beta * (logps - ref_logps)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss (B,) of the direct preference objectives on sequence log-probs (B,).

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the log-ratio margin.
    - "sigmoid": DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h). With label
      smoothing eps (the "conservative DPO" of Mitchell 2023: each label is flipped with
      probability eps) it is -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h).
    - "ipo": IPO (Azar et al. 2023, eq. 17, with tau = beta): (h - 1 / (2 beta))^2, a squared
      loss that pulls the margin to a finite target instead of pushing it to infinity.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label smoothing applies to the sigmoid loss only")
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r} (sigmoid, ipo)")


def dense_dpo_logps(token_logps: torch.Tensor, mask: torch.Tensor, changed: torch.Tensor,
                    gamma: float = 5.0) -> torch.Tensor:
    """The sequence score (B,) of Dense DPO (Yu et al. 2024, RLHF-V, sec. 3.1, eq. 5), which takes
    the place of log pi(y|x) in dpo_loss, for policy and reference alike:

        (sum_{t in y_u} log p(y_t) + gamma * sum_{t in y_c} log p(y_t)) / N,   N = |y_u| + gamma |y_c|

    y_c the response tokens a correction changed (`changed` 1, within `mask`), y_u the others, so
    the changed segments count gamma times (RLHF-V: gamma = 5) and N keeps the score a weighted
    mean per token. token_logps, mask, changed: (B, T); a row with no changed token scores its
    mean token log-prob; a row with no token, 0. Note that gamma = 1 gives the mean, not
    DPO's sum (eq. 4): the caller keeps the sum where it means plain DPO.
    """
    weights = mask.to(token_logps.dtype) * (1 + (gamma - 1) * changed.to(token_logps.dtype))  # (B, T)
    total = weights.sum(-1)
    return (token_logps * weights).sum(-1) / torch.where(total > 0, total, torch.ones_like(total))


def rebel_loss(logps_a: torch.Tensor, logps_b: torch.Tensor, old_logps_a: torch.Tensor,
               old_logps_b: torch.Tensor, rewards_a: torch.Tensor, rewards_b: torch.Tensor,
               eta: float) -> torch.Tensor:
    """Per-pair loss (B,) of REBEL (Gao et al. 2024, "Regressing Relative Rewards", Algorithm 1):

        ( 1/eta * [ log pi(y_a|x)/pi_t(y_a|x) - log pi(y_b|x)/pi_t(y_b|x) ] - (r(x, y_a) - r(x, y_b)) )^2

    a least-squares regression of the reward difference onto the difference of the two
    responses' log-ratios against pi_t, the policy of the previous iteration (`old_*`).
    """
    prediction = ((logps_a - old_logps_a) - (logps_b - old_logps_b)) / eta
    return (prediction - (rewards_a - rewards_b)) ** 2


def group_advantages(rewards: torch.Tensor, baseline: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Per-response advantages (B, K) of K responses to each of B prompts, from their scores (B, K).

    - "group": GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1.2, outcome supervision):
      A_i = (r_i - mean(r)) / (std(r) + eps), the group's sample std (Bessel-corrected).
    - "loo": RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019):
      A_i = r_i - 1/(K-1) sum_{j != i} r_j, the mean of the *other* responses as baseline,
      which equals K/(K-1) * (r_i - mean(r)).
    """
    K = rewards.shape[-1]
    if K < 2:
        raise ValueError("group baselines need at least 2 responses per prompt")
    mean = rewards.mean(-1, keepdim=True)
    if baseline == "group":
        return (rewards - mean) / (rewards.std(-1, keepdim=True) + eps)
    if baseline == "loo":
        return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (K - 1)
    raise ValueError(f"unknown baseline {baseline!r} (group, loo)")


def grpo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, cliprange: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                     kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The GRPO objective as a loss (Shao et al. 2024, DeepSeekMath, eq. 3), logprobs (B, T).

    Each response's advantage (B,) applies to all its tokens; per token the clipped
    surrogate min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A) less kl_coef times the k3
    estimate of KL(pi || pi_ref) (their eq. 4: pi_ref/pi - log(pi_ref/pi) - 1), averaged
    over each response's tokens (1/|o_i|) and then over responses. With kl_coef = 0 the
    KL lives in the reward instead (RLOO's choice) and ref_logprobs may be None.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * adv)
    stats = {"clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask).detach()}
    if kl_coef:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + kl_coef * kl
        stats["kl_k3"] = masked_mean(kl, mask).detach()
    per_response = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    return per_response.mean(), stats
