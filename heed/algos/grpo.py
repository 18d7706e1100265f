"""GRPO and RLOO: online, K samples per prompt, a baseline from the group instead of a critic.

The two differ only in the baseline and, by default, in where the KL lives:
    GRPO (Shao et al. 2024, DeepSeekMath)   A_i = (r_i - mean r) / std r;  KL to the reference
                                            as a loss term (k3 estimator, coefficient beta)
    RLOO (Ahmadian et al. 2024)             A_i = r_i - mean_{j != i} r_j; KL as a reward
                                            penalty, r_i = score_i - beta * sum_t KL_t (k1)

Each iteration, in the loop heed/algos/online.py shares with PPO:
 1. rollout   `prompts_per_iteration` prompts, each repeated K times, sampled with the
              KV-cache sampler; the tokens' log-probs come from that same pass
 2. score     reward models and/or rule rewards on the text (like PPO); responses that never
              emit EOS lose `missing_eos_penalty`. With `--normalize-reward` the scores are
              scaled with a gain and bias fitted on the first rollout (the SFT policy's).
 3. reference one batched pass of the frozen reference (in the rollout): per-token KL
 4. baseline  group-normalised (GRPO) or leave-one-out (RLOO) advantages per response,
              over the K responses of each prompt (heed/losses.py:group_advantages)
 5. update    `epochs` passes over reshuffled minibatches of the rollout: the clipped
              surrogate with each response's advantage on all its tokens, averaged per
              response (heed/losses.py:grpo_policy_loss), plus the KL term in "loss" mode.
              With one epoch and one minibatch (RLOO's default) the ratio is 1 and this is
              REINFORCE with the baseline. Learning rate annealed to zero.

Departures: RLOO's REINFORCE gradient is taken on the per-response token mean of the
log-probs (GRPO's weighting), not the sum: a response's gradient does not grow with its
length. GRPO's process supervision and iterative reward-model refits are not implemented.
With several processes each rank samples its own prompts and groups stay on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heed.algos.common import already_trained
from heed.algos.online import OnlineTrainer, Rollout, RolloutConfig, Rows
from heed.config import option
from heed.data import read_prompts
from heed.losses import group_advantages, grpo_policy_loss, kl_penalty
from heed.models import Batch, TokenLogprobs
from heed.rules import load_reward
from heed.utils import HeedError, seed_everything


@dataclass(kw_only=True)
class GRPOConfig(RolloutConfig):
    baseline: str = option("group", "group: (r - mean) / std (GRPO); loo: r - mean of the others (RLOO)",
                           choices=("group", "loo"))
    kl_mode: str = option("loss", "KL to the reference as a loss term (GRPO) or a reward penalty (RLOO)",
                          choices=("loss", "reward"))
    kl_coef: float = option(0.04, "beta: weight of the KL term or penalty")
    steps: int = option(60, "iterations (rollout + update)")
    prompts_per_iteration: int = option(16, "prompts per iteration, per process")
    n: int = option(4, "responses sampled per prompt (the group)")
    epochs: int = option(1, "passes over each rollout")
    mini_batch_size: int = option(32, "sequences per optimiser step, per process")
    micro_batch_size: int = option(32, "sequences per forward pass (at most), per process; a batch runs in "
                                                "micro-batches of similar length, gradients accumulated")
    lr: float = option(5e-5, "peak learning rate (AdamW), annealed to zero")
    warmup_steps: int = option(0, "linear warm-up optimiser steps")
    cliprange: float = option(0.2, "ratio clip epsilon")
    normalize_reward: bool = option(False, "fit gain/bias on the first rollout so scores have mean 0, std 1")


@dataclass(kw_only=True)
class RLOOConfig(GRPOConfig):
    baseline: str = option("loo", "group: (r - mean) / std (GRPO); loo: r - mean of the others (RLOO)",
                           choices=("group", "loo"))
    kl_mode: str = option("reward", "KL to the reference as a loss term (GRPO) or a reward penalty (RLOO)",
                          choices=("loss", "reward"))
    kl_coef: float = option(0.05, "beta: weight of the KL term or penalty")
    mini_batch_size: int = option(64, "sequences per optimiser step, per process")
    lr: float = option(1e-4, "peak learning rate (AdamW), annealed to zero")
    normalize_reward: bool = option(True, "fit gain/bias on the first rollout so scores have mean 0, std 1")


class GroupTrainer(OnlineTrainer):
    """GRPO or RLOO (by `cfg.baseline` and `cfg.kl_mode`) for a causal LM."""

    def __init__(self, cfg: GRPOConfig, **kwargs):
        if cfg.n < 2:
            raise HeedError("--n must be at least 2: the baseline comes from the other responses to the prompt")
        if cfg.mini_batch_size % cfg.n or cfg.micro_batch_size % cfg.n:
            raise HeedError(f"--mini-batch-size and --micro-batch-size must be multiples of --n ({cfg.n}): "
                            "a prompt's responses stay in one micro-batch")
        self.name = "grpo" if cfg.baseline == "group" else "rloo"
        self.group_size = cfg.n
        super().__init__(cfg, **kwargs)

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    def build_model(self, policy) -> TokenLogprobs:
        return TokenLogprobs(policy)

    # -- 3.-5. KL, baseline, update ------------------------------------------------------------
    def optimize(self, exp: Rollout, generator: torch.Generator) -> dict:
        cfg, mask = self.cfg, exp.mask
        seq_kl = (kl_penalty(exp.logprobs, exp.ref_logprobs, "k1") * mask).sum(-1)  # (B*K,)
        rewards = exp.scores - cfg.kl_coef * seq_kl if cfg.kl_mode == "reward" else exp.scores
        # 4. the group baseline: rows i*K .. i*K+K-1 are prompt i's responses
        advantages = group_advantages(rewards.view(-1, cfg.n), cfg.baseline).view(-1)
        loss_kl = cfg.kl_coef if cfg.kl_mode == "loss" else 0.0

        # 5. update
        def loss(at: Rows, sub: Batch):
            # each prompt of the minibatch runs once for its group (heed.models.forward_shared)
            logprobs = F.pad(self.learner.model(sub.share_prompts(cfg.n), cfg.temperature), (sub.prompt_len, 0))
            value, stats = grpo_policy_loss(logprobs, at(exp.logprobs), at(advantages), at(mask), cfg.cliprange,
                                            at(exp.ref_logprobs), loss_kl)
            return value, {"loss/policy": value, **stats}

        stats = self.minibatch_epochs(exp, generator, loss)
        groups = exp.scores.view(-1, cfg.n)
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update({"objective/kl": float(self.learner.accelerator.reduce(seq_kl.mean(), "mean")),
                        "objective/kl_coef": cfg.kl_coef,
                        "reward/group_std": float(groups.std(-1).mean()),
                        "reward/zero_std_groups": float((groups.std(-1) < 1e-6).float().mean()),
                        "advantage/abs_mean": float(advantages.abs().mean()),
                        "response/length": float(mask.sum(-1).mean()),
                        "train/lr": self.learner.lr})
        return metrics


def run_grpo(cfg: GRPOConfig) -> dict:
    """`heed grpo` (and, with RLOOConfig's defaults, `heed rloo`)."""
    done = already_trained(cfg.out)
    if done is not None:
        return done
    seed_everything(cfg.seed)
    trainer = GroupTrainer(cfg, reward_fn=load_reward(cfg.reward), prompts=read_prompts(cfg.prompts),
                           monitor=load_reward(cfg.monitor) if cfg.monitor else None)
    metrics = trainer.train()
    print(f"{trainer.name}: {cfg.steps} iterations; last score {metrics['reward/score']:.3f}, "
          f"KL {metrics['objective/kl']:.3f}, saved to {cfg.out}")
    return metrics


def run_rloo(cfg: RLOOConfig) -> dict:
    return run_grpo(cfg)
