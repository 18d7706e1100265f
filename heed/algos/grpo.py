"""GRPO and RLOO: online, K samples per prompt, a baseline from the group instead of a critic.

The two differ only in the baseline and, by default, in where the KL lives:
    GRPO (Shao et al. 2024, DeepSeekMath)   A_i = (r_i - mean r) / std r;  KL to the reference
                                            as a loss term (k3 estimator, coefficient beta)
    RLOO (Ahmadian et al. 2024)             A_i = r_i - mean_{j != i} r_j; KL as a reward
                                            penalty, r_i = score_i - beta * sum_t KL_t (k1)

Each iteration:
 1. rollout   `prompts_per_iteration` prompts, each repeated K times, sampled with the
              KV-cache sampler; the tokens' log-probs come from that same pass
 2. score     reward models and/or rule rewards on the text (like PPO); responses that never
              emit EOS lose `missing_eos_penalty`. With `--normalize-reward` the scores are
              scaled with a gain and bias fitted on the first rollout (the SFT policy's).
 3. reference one batched pass of the frozen reference: per-token KL
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

import copy
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from heed.algos.common import Checkpointer, RolloutConfig, gold_oracle, make_accelerator, make_optimizer, \
    shape_scores
from heed.algos.dpo import TokenLogprobs
from heed.config import option, save as save_config
from heed.data import read_prompts
from heed.generate import decode_response, sample_tokens, to_token_columns, trim_responses
from heed.losses import group_advantages, grpo_policy_loss, kl_penalty
from heed.models import Batch, collate, encode_prompts, load_policy, save_model, token_logprobs
from heed.utils import HeedError, MetricsLogger, progress, seed_everything


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
    mini_batch_size: int = option(32, "sequences per optimiser step")
    micro_batch_size: int = option(32, "sequences per forward pass (gradient accumulation below this)")
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
    mini_batch_size: int = option(64, "sequences per optimiser step")
    lr: float = option(1e-4, "peak learning rate (AdamW), annealed to zero")
    normalize_reward: bool = option(True, "fit gain/bias on the first rollout so scores have mean 0, std 1")


class GroupTrainer:
    """GRPO or RLOO (by `cfg.baseline` and `cfg.kl_mode`) for a causal LM."""

    def __init__(self, cfg: GRPOConfig, *, reward_fn: Callable, prompts: Sequence, policy=None, tokenizer=None):
        self.cfg = cfg
        self.name = "grpo" if cfg.baseline == "group" else "rloo"
        self.accelerator = make_accelerator(cfg)
        if policy is None:
            policy, tokenizer = load_policy(cfg.policy)
        reference = load_policy(cfg.reference)[0] if cfg.reference else copy.deepcopy(policy)
        self.reference = reference.eval().requires_grad_(False).to(self.accelerator.device)
        self.tokenizer, self.reward_fn, self.prompts = tokenizer, reward_fn, list(prompts)
        batch = cfg.prompts_per_iteration * cfg.n
        updates = cfg.steps * cfg.epochs * -(-batch // cfg.mini_batch_size)
        model = TokenLogprobs(policy)
        optimizer, scheduler = make_optimizer(model, cfg, updates)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.norm: dict | None = None
        self.out = Path(cfg.out)
        self.logger = MetricsLogger(self.out, enabled=self.accelerator.is_main_process)
        self.checkpointer = Checkpointer(self.accelerator, self.out)
        self.iteration = 0

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    # -- 1. rollout ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence, generator: torch.Generator):
        """K responses per prompt (rows grouped: prompt 0's K first). Returns (batch, mask,
        logprobs, texts, finished), (B*K, T) tensors in token columns."""
        cfg, tok = self.cfg, self.tokenizer
        repeated = [p for p in prompts for _ in range(cfg.n)]
        prompt_ids = encode_prompts(tok, repeated, cfg.max_prompt_len)
        self.model.eval()
        tokens, logprobs, finished, _ = sample_tokens(
            self.policy, prompt_ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator)
        response_ids = trim_responses(tokens, finished, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        batch = collate(prompt_ids, response_ids, tok.pad_token_id).to(self.accelerator.device)
        old = to_token_columns(logprobs, batch.prompt_len, batch.input_ids.shape[1]).to(self.accelerator.device)
        mask = batch.response_mask.float()
        texts = [decode_response(tok, ids) for ids in response_ids]
        return batch, mask, old * mask, repeated, texts, finished

    # -- 2. score ------------------------------------------------------------------------------
    def score(self, prompts: Sequence, texts: Sequence[str], finished: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raw = torch.tensor(self.reward_fn(prompts, texts), dtype=torch.float32, device=self.accelerator.device)
        scores, self.norm = shape_scores(raw, finished, self.norm, self.cfg, self.accelerator)
        return scores, {"reward/raw": float(raw.mean()), "reward/score": float(scores.mean())}

    # -- 3.-5. reference, baseline, update -------------------------------------------------------
    def optimise(self, batch: Batch, mask: torch.Tensor, old_logprobs: torch.Tensor, scores: torch.Tensor,
                 generator: torch.Generator) -> dict:
        cfg = self.cfg
        with torch.no_grad():  # 3. the reference, one batched pass
            ref_logprobs = token_logprobs(self.reference, batch, temperature=cfg.temperature) * mask
        seq_kl = (kl_penalty(old_logprobs, ref_logprobs, "k1") * mask).sum(-1)  # (B*K,)
        rewards = scores - cfg.kl_coef * seq_kl if cfg.kl_mode == "reward" else scores
        # 4. the group baseline: rows i*K .. i*K+K-1 are prompt i's responses
        advantages = group_advantages(rewards.view(-1, cfg.n), cfg.baseline).view(-1)
        loss_kl = cfg.kl_coef if cfg.kl_mode == "loss" else 0.0
        # 5. update
        B = mask.shape[0]
        stats: dict[str, list[float]] = {}
        self.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=generator).tolist()
            for mb_start in range(0, B, cfg.mini_batch_size):
                mb = order[mb_start:mb_start + cfg.mini_batch_size]
                micro = [mb[i:i + cfg.micro_batch_size] for i in range(0, len(mb), cfg.micro_batch_size)]
                for j, idx in enumerate(micro):
                    idx_t = torch.tensor(idx, device=mask.device)
                    sub = Batch(batch.input_ids[idx_t], batch.attention_mask[idx_t], batch.response_mask[idx_t],
                                batch.prompt_len)
                    sync = j == len(micro) - 1
                    with nullcontext() if sync else self.accelerator.no_sync(self.model):
                        with self.accelerator.autocast():
                            logprobs = self.model(sub, cfg.temperature)
                        loss, loss_stats = grpo_policy_loss(logprobs, old_logprobs[idx_t], advantages[idx_t],
                                                            mask[idx_t], cfg.cliprange, ref_logprobs[idx_t], loss_kl)
                        self.accelerator.backward(loss * len(idx) / len(mb))
                    for k, v in {"loss/policy": loss.detach(), **loss_stats}.items():
                        stats.setdefault(k, []).append(float(v))
                if cfg.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        groups = scores.view(-1, cfg.n)
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update({"objective/kl": float(self.accelerator.reduce(seq_kl.mean(), "mean")),
                        "objective/kl_coef": cfg.kl_coef,
                        "reward/group_std": float(groups.std(-1).mean()),
                        "reward/zero_std_groups": float((groups.std(-1) < 1e-6).float().mean()),
                        "advantage/abs_mean": float(advantages.abs().mean()),
                        "response/length": float(mask.sum(-1).mean()),
                        "train/lr": self.scheduler.get_last_lr()[0]})
        return metrics

    # -- the whole loop --------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        state = self.checkpointer.load()
        self.iteration, self.norm = state["step"], state.get("norm", self.norm)
        gold = gold_oracle(self.prompts)
        metrics: dict = {}
        bar = progress(range(self.iteration, cfg.steps), desc=self.name, disable=not acc.is_main_process, unit="iter")
        for it in bar:
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + it * 101 + acc.process_index)
            pick = torch.randint(len(self.prompts), (cfg.prompts_per_iteration,), generator=gen).tolist()
            prompts = [self.prompts[i] for i in pick]
            batch, mask, old_logprobs, repeated, texts, finished = self.rollout(prompts, gen)  # 1.
            scores, score_metrics = self.score(repeated, texts, finished)                      # 2.
            metrics = self.optimise(batch, mask, old_logprobs, scores, gen)                    # 3.-5.
            metrics.update(score_metrics)
            metrics["response/ended"] = float(finished.float().mean())
            metrics["perf/iteration_s"] = time.time() - t0
            if gold is not None:  # for the record only: the trainer never sees it
                metrics["gold/score"] = sum(gold(repeated, texts)) / len(texts)
            self.iteration = it + 1
            self.logger.log(self.iteration, **metrics)
            if acc.is_main_process and (self.iteration % cfg.eval_every == 0 or self.iteration == cfg.steps):
                with open(self.out / "samples.jsonl", "a") as f:
                    for p, r, s in list(zip(repeated, texts, scores.tolist()))[:2 * cfg.n]:
                        f.write(json.dumps({"iteration": self.iteration, "prompt": p, "response": r,
                                            "score": s}) + "\n")
            bar.set_postfix(score=f"{metrics['reward/score']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            if self.iteration % cfg.save_every == 0 and self.iteration < cfg.steps:
                self.checkpointer.save(self.iteration, norm=self.norm)
        bar.close()
        self.save()
        return metrics

    def save(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_model(self.policy, self.tokenizer, self.out)
            (self.out / f"{self.name}_state.json").write_text(json.dumps({"iterations": self.iteration,
                                                                         "norm": self.norm}))
            shutil.rmtree(self.checkpointer.dir, ignore_errors=True)
        acc.wait_for_everyone()
        self.logger.close()


def run_grpo(cfg: GRPOConfig) -> dict:
    """`heed grpo` (and, with RLOOConfig's defaults, `heed rloo`)."""
    from heed.rules import load_reward

    name = "grpo" if cfg.baseline == "group" else "rloo"
    state = Path(cfg.out) / f"{name}_state.json"
    if state.exists():
        print(f"{cfg.out}: already trained ({state.name} exists); delete the directory to train again")
        return json.loads(state.read_text())
    if cfg.n < 2:
        raise HeedError("--n must be at least 2: the baseline comes from the other responses to the prompt")
    seed_everything(cfg.seed)
    trainer = GroupTrainer(cfg, reward_fn=load_reward(cfg.reward), prompts=read_prompts(cfg.prompts))
    metrics = trainer.train()
    print(f"{name}: {cfg.steps} iterations; last score {metrics['reward/score']:.3f}, "
          f"KL {metrics['objective/kl']:.3f}, saved to {cfg.out}")
    return metrics


def run_rloo(cfg: RLOOConfig) -> dict:
    return run_grpo(cfg)
