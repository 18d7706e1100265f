"""Stage 4: PPO on a language model, against a reward, with a per-token KL penalty to a frozen reference.

Each iteration (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022), in the loop
heed/algos/online.py shares with GRPO and RLOO (steps 1-2 and the minibatch loop live there):
 1. rollout   sample responses with the KV-cache sampler; the tokens' log-probs and the
              value head's estimates come from that same forward pass
 2. score     reward models and/or rule rewards on the text; normalised with a gain and
              bias fitted on the first rollout (the SFT policy's samples: mean 0, std 1);
              responses that never emit EOS lose `missing_eos_penalty`. With `--dense-rewards`
              the reward's (end, value) segments (heed/rules.py) go on the tokens that complete
              them, each divided by the gain, the rest of the shaping on the last token
 3. KL        one forward pass of the reference; per-token reward -beta * KL_t, the score
              added at the last real token (`--dense-rewards`: each segment's at its token,
              Wu et al. 2023, Fine-Grained RLHF)
 4. whiten    rewards optionally (scale only), advantages always
 5. GAE       gamma = 1, lambda = 0.95
 6. update    PPO epochs over reshuffled minibatches, micro-batches accumulated; clipped
              policy loss + vf_coef * clipped value loss; learning rate annealed to zero
 7. adapt     the KL coefficient, by Ziegler et al.'s proportional controller

The checklist of Huang et al. (2023), "The N Implementation Details of RLHF with PPO"
(docs/ppo.md has it as a table, with the test of each item):
- reward at the last real token: the reward model reads it (heed/reward_model.py), and
  the score is added at the last response token here                              done
- pad token distinct from EOS (heed/models.py)                                      done
- position ids right under left padding (models.position_ids)                       done
- log-probs from logits / sampling temperature (sampler and training)               done
- dropout off in policy, reference, value and reward models (models.disable_dropout) done
- reward normalisation: gain/bias on SFT samples (reward model, and again here on
  the first rollout so rule rewards are normalised too; `--no-normalize-reward`)    done
- per-token KL penalty, score at the final token (losses.ppo_token_rewards; with
  `--dense-rewards` each segment at its last token, losses.ppo_dense_token_rewards);
  k1 (default) and k3 estimators                                                    done
- adaptive KL controller (init coef, target, horizon, clipped error)                done
- EOS trick: `missing_eos_penalty` for responses that never end                      done
- gamma = 1, lambda = 0.95                                                           done
- advantage whitening: per rollout batch (a choice: the batch is one minibatch
  set; TRL does the same); reward whitening optional (`--whiten-rewards`)           done
- clipped policy loss and clipped value loss                                         done
- batch -> minibatch -> micro-batch loops, reshuffled every epoch                   done
- learning rate annealed to zero (cosine, heed/algos/common.py)                      done
- a different seed per process (common.make_accelerator)                            done
Departures: the value head reads the policy's trunk by default (one backbone, as in
Ziegler et al.'s shared variant); `--separate-critic` gives the critic its own copy of
the SFT trunk. The value head starts at zero (V = 0 everywhere) rather than from the reward model.
Sampling with top-k/top-p makes the stored log-probs those of the unfiltered tempered
policy (as in TRL); the defaults sample from the full distribution.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from heed.algos.common import already_trained
from heed.algos.online import OnlineTrainer, Rollout, RolloutConfig, Rows, iteration_seed
from heed.config import option
from heed.data import read_prompts
from heed.generate import response_char_ends
from heed.losses import (
    gae,
    kl_penalty,
    last_response_token,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_dense_token_rewards,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from heed.models import Batch, collate, encode_prompts, encode_responses, forward_hidden, token_logprobs, trunk_of
from heed.rules import Segments, load_reward, token_rewards
from heed.utils import HeedError


@dataclass(kw_only=True)
class PPOConfig(RolloutConfig):
    steps: int = option(40, "PPO iterations (rollout + update)")
    prompts_per_iteration: int = option(64, "prompts per iteration, per process (one response each)")
    mini_batch_size: int = option(16, "sequences per optimiser step, per process")
    micro_batch_size: int = option(16, "sequences per forward pass (at most), per process; a batch runs in "
                                                "micro-batches of similar length, gradients accumulated")
    ppo_epochs: int = option(4, "passes over each rollout batch")
    lr: float = option(5e-5, "peak learning rate (AdamW), annealed to zero")
    warmup_steps: int = option(0, "linear warm-up optimiser steps")
    cliprange: float = option(0.2, "PPO ratio clip epsilon")
    cliprange_value: float = option(0.2, "value clip epsilon")
    vf_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    kl_coef: float = option(0.05, "initial KL penalty coefficient beta")
    adaptive_kl: bool = option(True, "adapt beta towards --target-kl (Ziegler et al. 2019)")
    target_kl: float = option(4.0, "target KL per response (nats) for the adaptive controller")
    kl_horizon: int = option(2000, "adaptive controller horizon (episodes)")
    kl_estimator: str = option("k1", "per-token KL estimator in the penalty", choices=("k1", "k3"))
    whiten_rewards: bool = option(False, "whiten per-token rewards (scale only) before GAE")
    separate_critic: bool = option(False, "value head on its own copy of the trunk instead of the policy's")
    dense_rewards: bool = option(False, "each reward segment on the token that completes it (Wu et al. 2023; rules "
                                        "returning (end, value) segments, token-level reward models) instead of the "
                                        "whole score at the last token")


def segment_token_scores(tokenizer, batch: Batch, mask: torch.Tensor, segments: Sequence[Segments]) -> torch.Tensor:
    """(B, T) in token columns: each response's (end, value) segments on the response tokens that
    complete them (rules.token_rewards; one ending with the text on the last token, EOS included),
    so each row sums to its segments' values. The tokens are the ones sampled, so no re-encoding
    can split the text differently. Cost: generate.response_char_ends decodes every prefix of
    every response, O(R^2) per response of R tokens: fine up to a few hundred tokens."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    P = batch.prompt_len
    for i, row in enumerate(segments):
        n = int(mask[i].sum())
        ends = response_char_ends(tokenizer, batch.input_ids[i, P:P + n].tolist())
        out[i, P:P + n] = torch.tensor(token_rewards(row, ends), dtype=torch.float32)
    return out


def shape_token_scores(raw: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, norm: dict | None) -> torch.Tensor:
    """Per-token scores (B, T) from raw per-token rewards, shaped as `online.shape_scores` shaped their
    row sums into `scores` (B,): each token's reward divided by the gain, and the rest (-bias / gain,
    the missing-EOS penalty) at the last response token, where the scalar path puts the whole score;
    so each row sums to its score, and a reward whose segments all end with the text gives the scalar path's."""
    token_scores = raw / (norm["gain"] if norm else 1.0)
    token_scores[torch.arange(len(scores)), last_response_token(mask)] += scores - token_scores.sum(-1)
    return token_scores


def dense_share(raw: torch.Tensor, mask: torch.Tensor) -> float:
    """The fraction of the absolute reward placed before each response's last token (0: all at the end)."""
    before = raw * mask
    before[torch.arange(len(raw)), last_response_token(mask)] = 0
    return float(before.abs().sum() / (raw * mask).abs().sum().clamp(min=1e-12))


class ActorCritic(nn.Module):
    """The policy LM and a scalar value head, on the policy's trunk or on a separate critic trunk."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        d = policy.config.hidden_size
        self.value_head = nn.Linear(d, 1)
        # Zero, so every state starts at V = 0. A random head (std 1/sqrt(d)) gives each token
        # a value of about +-1.4 on these trunks, whose hidden states have norm ~sqrt(d) after
        # the final norm; GAE turns that into per-token advantage noise around the one score.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: Batch, temperature: float = 1.0):
        """(logprobs, entropy, values), each (B, T) in token columns: column t is about token t."""
        hidden = forward_hidden(self.policy, batch.input_ids, batch.attention_mask)
        logprobs, entropy = token_logprobs(self.policy, batch, temperature=temperature, hidden=hidden,
                                           with_entropy=True)
        if self.critic is not None:
            hidden = forward_hidden(self.critic, batch.input_ids, batch.attention_mask)
        # value of the state after token t (the head stays fp32 under --dtype bf16)
        v = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        values = torch.zeros_like(v)
        values[:, 1:] = v[:, :-1]  # ... is the value before token t + 1
        return logprobs, entropy, values


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019, sec. 2.2)."""

    def __init__(self, init: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, kl: float, n_episodes: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_episodes / self.horizon


class PPOTrainer(OnlineTrainer):
    """PPO for a causal LM. `train()` runs the whole loop from prompts and a reward function;
    `step(queries, responses, rewards)` updates on given triplets (the classic TRL API)."""

    name = "ppo"

    def __init__(self, cfg: PPOConfig, **kwargs):
        reward_fn = kwargs.get("reward_fn")
        if cfg.dense_rewards and reward_fn is not None and not callable(getattr(reward_fn, "dense", None)):
            raise HeedError("ppo --dense-rewards: the reward must give (end, value) segments through "
                            f"`.dense(prompts, responses)` (a heed.rules.RewardFunction: rules.load_reward); "
                            f"{type(reward_fn).__name__} gives one number per response")
        if cfg.dense_rewards and reward_fn is not None and not getattr(reward_fn, "is_dense", True):
            print("ppo --dense-rewards: no term of the reward gives rewards inside a response (no rule, no "
                  "token-level reward model), so every score still goes on the last token", file=sys.stderr)
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
        super().__init__(cfg, **kwargs)

    @property
    def epochs(self) -> int:
        return self.cfg.ppo_epochs

    def build_model(self, policy) -> ActorCritic:
        return ActorCritic(policy, copy.deepcopy(trunk_of(policy)) if self.cfg.separate_critic else None)

    @property
    def actor_critic(self) -> ActorCritic:
        return self.learner.unwrapped

    def state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value, **super().state()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)

    # -- 1. rollout: the sampler reads the values off its own forward pass ---------------------
    def sampler_value_head(self):
        return self.actor_critic.value_head if self.actor_critic.critic is None else None

    @torch.no_grad()
    def rollout(self, prompts: Sequence, generator: torch.Generator) -> Rollout:
        exp = super().rollout(prompts, generator)
        if exp.values is None:  # separate critic: one pass of the critic (a different model)
            exp.values = self.actor_critic(exp.batch, self.cfg.temperature)[2] * exp.mask
        return exp

    # -- 2. score: with --dense-rewards, per token ------------------------------------------------
    def score(self, exp: Rollout) -> tuple[torch.Tensor | None, dict]:
        """The shared scoring, and with `--dense-rewards` also `exp.token_scores` (B, T): the reward's
        segments on their tokens, shaped so each row sums to the score the scalar path gives (the
        gain and bias are fitted on, and the metrics read, the row sums)."""
        if not self.cfg.dense_rewards:
            return super().score(exp)
        segments = self.reward_fn.dense(exp.prompts, exp.texts)
        raw = segment_token_scores(self.tokenizer, exp.batch, exp.mask, segments)  # (B, T)
        scores, metrics = self.shape(raw.sum(-1), exp)
        if scores is not None:
            exp.token_scores = shape_token_scores(raw, scores, exp.mask, self.norm if self.cfg.normalize_reward
                                                  else None)
            metrics["reward/dense_share"] = dense_share(raw, exp.mask)
        return scores, metrics

    # -- 3.-7. KL penalty, whitening, GAE, PPO update, KL controller -----------------------------
    def optimize(self, exp: Rollout, generator: torch.Generator) -> dict:
        cfg, mask = self.cfg, exp.mask
        # 3. per-token KL penalty; the score joins at the last response token, or with dense
        # rewards each segment's at the token that completes it
        kl = kl_penalty(exp.logprobs, exp.ref_logprobs, cfg.kl_estimator) * mask
        if exp.token_scores is None:
            rewards = ppo_token_rewards(exp.scores, kl, mask, self.kl_ctl.value)
        else:
            rewards = ppo_dense_token_rewards(exp.token_scores, kl, mask, self.kl_ctl.value)
        # 4. whitening (rewards optional, scale only)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        # 5. GAE, then whiten the advantages
        advantages, returns = gae(rewards, exp.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        # 6. PPO epochs: minibatches reshuffled every epoch, micro-batches accumulated
        def loss(at: Rows, sub: Batch):
            logprobs, entropy, values = self.learner.model(sub, cfg.temperature)
            m = at(mask)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, at(exp.logprobs), at(advantages), m, cfg.cliprange)
            vf_loss, vf_stats = ppo_value_loss(values, at(exp.values), at(returns), m, cfg.cliprange_value)
            return pg_loss + cfg.vf_coef * vf_loss, {"loss/policy": pg_loss, "loss/value": vf_loss,
                                                    "policy/entropy": masked_mean(entropy, m), **pg_stats, **vf_stats}

        stats = self.minibatch_epochs(exp, generator, loss)

        acc = self.learner.accelerator
        seq_kl = (kl_penalty(exp.logprobs, exp.ref_logprobs, "k1") * mask).sum(-1)
        seq_kl3 = (kl_penalty(exp.logprobs, exp.ref_logprobs, "k3") * mask).sum(-1)
        mean_kl = float(acc.reduce(seq_kl.mean(), "mean"))
        explained_var = 1 - masked_var(returns - exp.values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update({"objective/kl": mean_kl, "objective/kl_k3": float(seq_kl3.mean()),
                        "objective/kl_coef": self.kl_ctl.value,
                        "objective/non_score_reward": float((-self.kl_ctl.value * kl).sum(-1).mean()),
                        "value/explained_variance": float(explained_var),
                        "value/mean": float(masked_mean(exp.values, mask)),
                        "response/length": float(mask.sum(-1).mean()),
                        "train/lr": self.learner.lr})
        # 7. adapt beta to the measured KL (averaged over processes so every rank agrees)
        self.kl_ctl.update(mean_kl, mask.shape[0] * acc.num_processes)
        return metrics

    # -- the classic API: optimise on given (query, response, reward) triplets -----------------------
    def step(self, queries: Sequence, responses: Sequence[str], rewards: Sequence[float | Segments], *,
             generator: torch.Generator | None = None) -> dict:
        """One PPO update on the given texts and rewards (responses are taken as ended), used as given
        (no normalisation). A reward is a number, added at the last token, or a list of (end, value)
        segments of the response's text, each on the token that completes it (as `--dense-rewards`).
        `generator` orders the minibatches (default: seeded by the seed, iteration and process)."""
        if not (len(queries) == len(responses) == len(rewards)) or not queries:
            raise ValueError("step() needs equally many (non-zero) queries, responses and rewards")
        cfg, tok, acc = self.cfg, self.tokenizer, self.learner.accelerator
        if generator is None:
            generator = torch.Generator().manual_seed(iteration_seed(cfg.seed, self.iteration, self.learner.rank))
        batch = collate(encode_prompts(tok, queries, cfg.max_prompt_len),
                        encode_responses(tok, responses, cfg.max_new_tokens), tok.pad_token_id).to(acc.device)
        mask = batch.response_mask.float()
        with torch.no_grad():
            self.learner.model.eval()
            logprobs, _, values = self.learner.model(batch, cfg.temperature)
            with self.reference() as reference:
                ref_logprobs = token_logprobs(reference, batch, temperature=cfg.temperature)
        exp = Rollout(list(queries), list(responses), batch, mask, logprobs * mask, ref_logprobs * mask,
                      torch.ones(len(queries), dtype=torch.bool), values=values * mask)
        if any(isinstance(r, (list, tuple)) for r in rewards):
            segments = [list(r) if isinstance(r, (list, tuple)) else [(len(text), float(r))]
                        for r, text in zip(rewards, responses)]
            exp.token_scores = segment_token_scores(tok, batch, mask, segments)
            exp.scores = exp.token_scores.sum(-1)
        else:
            exp.scores = torch.tensor(list(rewards), dtype=torch.float32, device=acc.device)
        metrics = self.optimize(exp, generator)
        self.iteration += 1
        return metrics

    def save_model(self, model: ActorCritic) -> None:
        super().save_model(model)
        torch.save(model.value_head.state_dict(), self.out / "value_head.pt")


def run(cfg: PPOConfig) -> dict:
    done = already_trained(cfg.out)
    if done is not None:
        return done
    trainer = PPOTrainer(cfg, reward_fn=load_reward(cfg.reward), prompts=read_prompts(cfg.prompts),
                         monitor=load_reward(cfg.monitor) if cfg.monitor else None)
    metrics = trainer.train()
    print(f"ppo: {cfg.steps} iterations; last score {metrics['reward/score']:.3f}, "
          f"KL {metrics['objective/kl']:.3f}, saved to {cfg.out}")
    return metrics
