"""Stage 4: PPO on a language model, against a reward, with a per-token KL penalty to a frozen reference.

Each iteration (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022):
 1. rollout   sample responses with the KV-cache sampler; the tokens' log-probs and the
              value head's estimates come from that same forward pass
 2. score     reward models and/or rule rewards on the text; normalised with a gain and
              bias fitted on the first rollout (the SFT policy's samples: mean 0, std 1);
              responses that never emit EOS lose `missing_eos_penalty`
 3. KL        one forward pass of the reference; per-token reward -beta * KL_t, the score
              added at the last real token
 4. whiten    rewards optionally (scale only), advantages always
 5. GAE       gamma = 1, lambda = 0.95
 6. update    PPO epochs over reshuffled minibatches, micro-batches accumulated; clipped
              policy loss + vf_coef * clipped value loss; learning rate annealed to zero
 7. adapt     the KL coefficient, by Ziegler et al.'s proportional controller

The checklist of Huang et al. (2023), "The N Implementation Details of RLHF with PPO":
- reward at the last real token: the reward model reads it (heed/reward_model.py), and
  the score is added at the last response token here                              done
- pad token distinct from EOS (heed/models.py)                                      done
- position ids right under left padding (models.position_ids)                       done
- log-probs from logits / sampling temperature (sampler and training)               done
- dropout off in policy, reference, value and reward models (models.disable_dropout) done
- reward normalisation: gain/bias on SFT samples (reward model, and again here on
  the first rollout so rule rewards are normalised too; `--no-normalize-reward`)    done
- per-token KL penalty, score at the final token; k1 (default) and k3 estimators    done
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
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from heed.algos.common import Checkpointer, RolloutConfig, gold_oracle, make_accelerator, make_optimizer, \
    shape_scores
from heed.config import option, save as save_config
from heed.data import read_prompts
from heed.generate import decode_response, sample_tokens, to_token_columns, trim_responses
from heed.losses import gae, kl_penalty, masked_mean, masked_var, masked_whiten, ppo_policy_loss, ppo_value_loss
from heed.models import Batch, collate, encode_prompts, encode_responses, forward_hidden, load_policy, \
    save_model, token_logprobs
from heed.utils import HeedError, MetricsLogger, progress


@dataclass(kw_only=True)
class PPOConfig(RolloutConfig):
    steps: int = option(40, "PPO iterations (rollout + update)")
    batch_size: int = option(64, "prompts per iteration, per process (one response each)")
    mini_batch_size: int = option(16, "sequences per optimiser step")
    micro_batch_size: int = option(16, "sequences per forward pass (gradient accumulation below this)")
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
        v = self.value_head(hidden).squeeze(-1).float()  # value of the state after token t
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


@dataclass
class Rollout:
    """One batch of experience, (B, T) tensors in token columns, response tokens under `mask`."""

    batch: Batch
    mask: torch.Tensor         # response tokens (EOS included)
    logprobs: torch.Tensor     # old policy, from the rollout
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor       # (B,) final scores (normalised, EOS penalty applied)


class PPOTrainer:
    """PPO for a causal LM. `step(queries, responses, rewards)` updates on given triplets (the
    classic TRL API); `train()` runs the whole loop from prompts and a reward function."""

    def __init__(self, cfg: PPOConfig, *, policy=None, tokenizer=None, reward_fn: Callable | None = None,
                 reference=None, prompts: Sequence | None = None):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        if policy is None:
            policy, tokenizer = load_policy(cfg.policy)
        if reference is None:
            reference = load_policy(cfg.reference)[0] if cfg.reference else copy.deepcopy(policy)
        reference.eval().requires_grad_(False)
        critic = copy.deepcopy(policy.base_model) if cfg.separate_critic else None
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.prompts = list(prompts) if prompts is not None else None
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
        self.norm: dict | None = None  # {"bias", "gain"} of the score, fitted on the first rollout
        updates_per_iter = cfg.ppo_epochs * math.ceil(cfg.batch_size / cfg.mini_batch_size)
        model = ActorCritic(policy, critic)
        optimizer, scheduler = make_optimizer(model, cfg, cfg.steps * updates_per_iter)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.reference = reference.to(self.accelerator.device)
        self.iteration = 0
        self.out = Path(cfg.out)
        self.logger = MetricsLogger(self.out, enabled=self.accelerator.is_main_process)
        self.checkpointer = Checkpointer(self.accelerator, self.out)
        self._gold = None  # the world's oracle, for logging only, when the prompts come from it

    @property
    def actor_critic(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    # -- 1. rollout ------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence) -> tuple[Rollout, list[str], torch.Tensor]:
        """Sample one response per prompt; returns the experience (scores still empty),
        the response texts, and which responses ended with EOS."""
        cfg, tok, ac = self.cfg, self.tokenizer, self.actor_critic
        prompt_ids = encode_prompts(tok, prompts, cfg.max_prompt_len)
        value_head = ac.value_head if ac.critic is None else None
        ac.eval()
        tokens, logprobs, finished, values = sample_tokens(
            ac.policy, prompt_ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, value_head=value_head,
            generator=self.generator)
        response_ids = trim_responses(tokens, finished, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        batch = collate(prompt_ids, response_ids, tok.pad_token_id).to(self.accelerator.device)
        place = partial(to_token_columns, prompt_len=batch.prompt_len, total_len=batch.input_ids.shape[1])
        mask = batch.response_mask.float()
        old_logprobs = place(logprobs) * mask
        if value_head is not None:
            old_values = place(values) * mask
        else:  # separate critic: one pass of the critic (a different model)
            old_values = ac(batch, cfg.temperature)[2] * mask
        # 3. (first half) the reference's log-probs, one batched pass
        ref_logprobs = token_logprobs(self.reference, batch, temperature=cfg.temperature) * mask
        texts = [decode_response(tok, ids) for ids in response_ids]
        exp = Rollout(batch, mask, old_logprobs, ref_logprobs, old_values, torch.zeros(len(prompts)))
        return exp, texts, finished

    # -- 2. score --------------------------------------------------------------------------
    def score(self, prompts: Sequence, responses: Sequence[str], finished: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raw = torch.tensor(self.reward_fn(prompts, responses), dtype=torch.float32, device=self.accelerator.device)
        scores, self.norm = shape_scores(raw, finished, self.norm, self.cfg, self.accelerator)
        return scores, {"reward/raw": float(raw.mean()), "reward/score": float(scores.mean()),
                        "reward/score_std": float(scores.std()) if len(scores) > 1 else 0.0}

    # -- 3.-6. KL penalty, whitening, GAE, PPO update ----------------------------------------
    def optimise(self, exp: Rollout) -> dict:
        cfg, mask = self.cfg, exp.mask
        # 3. per-token KL penalty; the score joins at the last response token
        kl = kl_penalty(exp.logprobs, exp.ref_logprobs, cfg.kl_estimator) * mask
        rewards = -self.kl_ctl.value * kl
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        rewards[torch.arange(len(last)), last] += exp.scores
        # 4. whitening (rewards optional, scale only)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        # 5. GAE, then whiten the advantages
        advantages, returns = gae(rewards, exp.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        # 6. PPO epochs: minibatches reshuffled every epoch, micro-batches accumulated
        B = mask.shape[0]
        stats: dict[str, list[float]] = {}
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.generator).tolist()
            for mb_start in range(0, B, cfg.mini_batch_size):
                mb = order[mb_start:mb_start + cfg.mini_batch_size]
                micro = [mb[i:i + cfg.micro_batch_size] for i in range(0, len(mb), cfg.micro_batch_size)]
                for j, idx in enumerate(micro):
                    idx_t = torch.tensor(idx, device=mask.device)
                    sub = Batch(exp.batch.input_ids[idx_t], exp.batch.attention_mask[idx_t],
                                exp.batch.response_mask[idx_t], exp.batch.prompt_len)
                    m = mask[idx_t]
                    sync = j == len(micro) - 1
                    with nullcontext() if sync else self.accelerator.no_sync(self.model):
                        with self.accelerator.autocast():
                            logprobs, entropy, values = self.model(sub, cfg.temperature)
                        pg_loss, pg_stats = ppo_policy_loss(logprobs, exp.logprobs[idx_t], advantages[idx_t], m,
                                                            cfg.cliprange)
                        vf_loss, vf_stats = ppo_value_loss(values, exp.values[idx_t], returns[idx_t], m,
                                                           cfg.cliprange_value)
                        loss = (pg_loss + cfg.vf_coef * vf_loss) * len(idx) / len(mb)
                        self.accelerator.backward(loss)
                    for k, v in {"loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy":
                                 masked_mean(entropy, m), **pg_stats, **vf_stats}.items():
                        stats.setdefault(k, []).append(float(v.detach()))
                if cfg.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)

        seq_kl = (kl_penalty(exp.logprobs, exp.ref_logprobs, "k1") * mask).sum(-1)
        seq_kl3 = (kl_penalty(exp.logprobs, exp.ref_logprobs, "k3") * mask).sum(-1)
        mean_kl = float(self.accelerator.reduce(seq_kl.mean(), "mean"))
        explained_var = 1 - masked_var(returns - exp.values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update({"objective/kl": mean_kl, "objective/kl_k3": float(seq_kl3.mean()),
                        "objective/kl_coef": self.kl_ctl.value,
                        "objective/non_score_reward": float((-self.kl_ctl.value * kl).sum(-1).mean()),
                        "value/explained_variance": float(explained_var),
                        "value/mean": float(masked_mean(exp.values, mask)),
                        "response/length": float(mask.sum(-1).mean()),
                        "train/lr": self.scheduler.get_last_lr()[0]})
        # 7. adapt beta to the measured KL (averaged over processes so every rank agrees)
        self.kl_ctl.update(mean_kl, B * self.accelerator.num_processes)
        return metrics

    # -- the classic API: optimise on given (query, response, reward) triplets -----------------------
    def step(self, queries: Sequence, responses: Sequence[str], rewards: Sequence[float]) -> dict:
        """One PPO update on the given texts and scalar rewards (responses are taken as ended)."""
        if not (len(queries) == len(responses) == len(rewards)) or not queries:
            raise ValueError("step() needs equally many (non-zero) queries, responses and rewards")
        cfg, tok = self.cfg, self.tokenizer
        if not hasattr(self, "generator"):
            self.generator = torch.Generator().manual_seed(cfg.seed + self.accelerator.process_index)
        batch = collate(encode_prompts(tok, queries, cfg.max_prompt_len),
                        encode_responses(tok, responses, cfg.max_new_tokens), tok.pad_token_id)
        batch = batch.to(self.accelerator.device)
        mask = batch.response_mask.float()
        with torch.no_grad():
            self.model.eval()
            logprobs, _, values = self.model(batch, cfg.temperature)
            ref_logprobs = token_logprobs(self.reference, batch, temperature=cfg.temperature)
        exp = Rollout(batch, mask, logprobs * mask, ref_logprobs * mask, values * mask,
                      torch.tensor(list(rewards), dtype=torch.float32, device=self.accelerator.device))
        metrics = self.optimise(exp)
        self.iteration += 1
        return metrics

    # -- the whole loop ------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if self.reward_fn is None or self.prompts is None:
            raise HeedError("train() needs prompts and a reward function")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        state = self.checkpointer.load()
        self.iteration = state["step"]
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)
        self.norm = state.get("norm", self.norm)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
        self._gold = gold_oracle(self.prompts)
        metrics: dict = {}
        bar = progress(range(self.iteration, cfg.steps), desc="ppo", disable=not acc.is_main_process, unit="iter")
        for it in bar:
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + it * 101 + acc.process_index)
            pick = torch.randint(len(self.prompts), (cfg.batch_size,), generator=gen).tolist()
            prompts = [self.prompts[i] for i in pick]
            self.generator = gen
            exp, texts, finished = self.rollout(prompts)                 # 1. (and 3.'s reference pass)
            t_rollout = time.time() - t0
            exp.scores, score_metrics = self.score(prompts, texts, finished)  # 2.
            metrics = self.optimise(exp)                                  # 3.-7.
            metrics.update(score_metrics)
            metrics["response/ended"] = float(finished.float().mean())
            n_tokens = float(exp.mask.sum())
            metrics["perf/rollout_tokens_per_s"] = n_tokens / max(t_rollout, 1e-9)
            metrics["perf/iteration_s"] = time.time() - t0
            if self._gold is not None:  # for the record only: the trainer never sees it
                metrics["gold/score"] = sum(self._gold(prompts, texts)) / len(texts)
            self.iteration = it + 1
            self.logger.log(self.iteration, **metrics)
            if acc.is_main_process and (self.iteration % cfg.eval_every == 0 or self.iteration == cfg.steps):
                with open(self.out / "samples.jsonl", "a") as f:
                    for p, r, s in list(zip(prompts, texts, exp.scores.tolist()))[:8]:
                        f.write(json.dumps({"iteration": self.iteration, "prompt": p, "response": r,
                                            "score": s}) + "\n")
            bar.set_postfix(score=f"{metrics['reward/score']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            if self.iteration % cfg.save_every == 0 and self.iteration < cfg.steps:
                self.checkpointer.save(self.iteration, kl_coef=self.kl_ctl.value, norm=self.norm)
        bar.close()
        self.save()
        return metrics

    def save(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            ac = self.actor_critic
            save_model(ac.policy, self.tokenizer, self.out)
            torch.save(ac.value_head.state_dict(), self.out / "value_head.pt")
            (self.out / "ppo_state.json").write_text(json.dumps(
                {"iterations": self.iteration, "kl_coef": self.kl_ctl.value, "norm": self.norm}))
            shutil.rmtree(self.checkpointer.dir, ignore_errors=True)
        acc.wait_for_everyone()
        self.logger.close()


def run(cfg: PPOConfig) -> dict:
    from heed.rules import load_reward

    if (Path(cfg.out) / "ppo_state.json").exists():
        print(f"{cfg.out}: already trained (ppo_state.json exists); delete the directory to train again")
        return json.loads((Path(cfg.out) / "ppo_state.json").read_text())
    prompts = read_prompts(cfg.prompts)
    reward = load_reward(cfg.reward)
    trainer = PPOTrainer(cfg, reward_fn=reward, prompts=prompts)
    metrics = trainer.train()
    print(f"ppo: {cfg.steps} iterations; last score {metrics['reward/score']:.3f}, "
          f"KL {metrics['objective/kl']:.3f}, saved to {cfg.out}")
    return metrics
