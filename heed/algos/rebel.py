"""REBEL (Gao et al. 2024, "Reinforcement Learning via Regressing Relative Rewards") as plain stages.

One iteration t, each stage a command that reads and writes files:
 1. sample   `heed sample --n K`       K responses per prompt from pi_t
 2. score    `heed rm score`           a reward column: reward models, rules, or both
 3. filter   `heed filter`             (heed/filter.py) drop over-long prompts and responses (and, by default,
                                       responses that never ended), remove duplicate responses,
                                       keep one pair per prompt: the best and the worst by reward
                                       (`--select best-random` or `random-pair` for others)
 4. update   `heed rebel --data F`     regress each pair's reward difference onto the difference
                                       of its log-ratios against pi_t (heed/losses.py:rebel_loss):
                                       pi_t's log-probs come from one batched pass before the update,
                                       then `epochs` passes of minibatches on the squared loss

`heed rebel --iterations N --prompts P --reward R` chains the four stages in memory,
N times, each on `prompts_per_iteration` fresh prompts, and keeps every iteration's files
in out/iter_NN/ (samples.jsonl, scored.jsonl, pairs.jsonl); the policy is saved in out/.
The pairs files are pairwise feedback with rewards: `heed dpo` and `heed rm train` read them.

Departures: pi_t is the policy at the start of the iteration (the paper's), and one
AdamW state and one cosine schedule span all iterations rather than a fresh regression
solver per iteration. There is no KL term: the regression itself keeps pi_{t+1} near pi_t
(eta sets how near), as in the paper. Rewards are used as given (a reward model's are
normalised already). With several processes every rank samples the same responses and the
update's pairs are split between ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from heed.algos.common import (
    Learner,
    TrainConfig,
    already_trained,
    global_mean,
    mean_stats,
    micro_batches,
    prepare_model,
    shape_multiple,
    weight_dtype,
)
from heed.config import option, save as save_config
from heed.data import read_prompts, read_reward_pairs, write_jsonl
from heed.filter import SELECTIONS, filter_rows, token_length
from heed.generate import generate
from heed.losses import rebel_loss
from heed.models import (
    TokenLogprobs,
    batched_pair_logprobs,
    device_of,
    load_policy,
    save_model,
    shared_batch,
    shared_width,
)
from heed.rules import load_reward
from heed.utils import HeedError, progress, seed_everything


@dataclass(kw_only=True)
class REBELConfig(TrainConfig):
    policy: str = option(help="the policy to improve (the SFT policy): a local Hugging Face causal-LM directory")
    data: str | None = option(None, "one update on this pairs file (from `heed filter`); else iterate")
    prompts: str | None = option(None, "training prompts for --iterations (JSONL/Parquet rows with 'prompt')")
    reward: list[str] = option([], "reward terms for --iterations, [WEIGHT*]TARGET: reward-model dirs, "
                                   "http://HOST:PORT (`heed rm serve`), rules")
    monitor: list[str] = option([], "reward terms logged as monitor/score each iteration, never optimised "
                                    "(heed.rules:gold on the embedded world)")
    iterations: int = option(16, "sample -> score -> filter -> update rounds (without --data)")
    prompts_per_iteration: int = option(64, "fresh prompts sampled each iteration")
    n: int = option(4, "responses sampled per prompt")
    eta: float = option(1.0, "eta: 1/eta scales the log-ratio difference regressed onto the reward difference")
    epochs: int = option(2, "passes over each iteration's pairs")
    lr: float = option(1e-4, "peak learning rate (AdamW), annealed to zero over all iterations")
    warmup_steps: int = option(0, "linear warm-up optimiser steps")
    batch_size: int = option(32, "global batch size (pairs per optimiser step, all processes together)")
    micro_batch_size: int = option(16, "pairs per forward pass (at most), per process; a batch runs in "
                                                "micro-batches of similar length, gradients accumulated")
    max_new_tokens: int = option(48, "response length limit when sampling")
    max_prompt_len: int = option(96, "prompt tokens kept; longer prompts are filtered out")
    max_response_len: int = option(48, "longer responses are filtered out")
    temperature: float = option(1.0, "sampling temperature")
    drop_unfinished: bool = option(True, "filter out responses that never emitted EOS")
    select: str = option("best-worst", "which pair to keep per prompt", choices=SELECTIONS)
    save_every: int = option(1, "checkpoint every N iterations (a killed run resumes from the last)")


class REBELTrainer:
    """The update (stage 4) on pairs with rewards, and the in-memory loop over all four stages."""

    def __init__(self, cfg: REBELConfig, *, reward_fn: Callable | None = None, prompts: Sequence | None = None,
                 monitor: Callable | None = None, n_pairs_hint: int | None = None):
        self.cfg = cfg
        policy, self.tokenizer = load_policy(cfg.policy, dtype=weight_dtype(cfg))
        policy = prepare_model(policy, cfg)
        self.reward_fn, self.monitor = reward_fn, monitor
        self.prompts = list(prompts) if prompts is not None else None
        iterations = 1 if cfg.data else cfg.iterations
        pairs_per_iter = n_pairs_hint or cfg.prompts_per_iteration
        total = iterations * cfg.epochs * max(1, math.ceil(pairs_per_iter / cfg.batch_size))
        self.learner = Learner(TokenLogprobs(policy), cfg, total)
        self.out = Path(cfg.out)
        self.iteration = 0

    @property
    def policy(self):
        return self.learner.unwrapped.policy

    def update(self, pairs: Sequence[dict], generator: torch.Generator) -> dict:
        """4. REBEL's regression on pairs {prompt, chosen, rejected, chosen_reward, rejected_reward}."""
        cfg, tok, learner = self.cfg, self.tokenizer, self.learner
        lengths = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)
        prompts = [p["prompt"] for p in pairs]
        # log pi_t of every response, one batched pass before the update
        old_a, old_b = batched_pair_logprobs(self.policy, tok, prompts, [p["chosen"] for p in pairs],
                                             [p["rejected"] for p in pairs], **lengths)
        reward_a = torch.tensor([float(p["chosen_reward"]) for p in pairs])
        reward_b = torch.tensor([float(p["rejected_reward"]) for p in pairs])
        stats: dict[str, list[float]] = {"train/grad_norm": []}

        def loss(chunk: list[int], n_global: int) -> torch.Tensor:
            batch = shared_batch(tok, [prompts[i] for i in chunk],
                                 [[pairs[i]["chosen"], pairs[i]["rejected"]] for i in chunk], **lengths,
                                 pad_to_multiple_of=shape_multiple(cfg))
            batch = batch.to(device_of(learner.model))
            logps = (learner.model(batch) * batch.response_mask).sum(-1)  # pair i: chosen 2i, rejected 2i + 1
            a, b, dev = logps[0::2], logps[1::2], logps.device
            losses = rebel_loss(a, b, old_a[chunk].to(dev), old_b[chunk].to(dev),
                                reward_a[chunk].to(dev), reward_b[chunk].to(dev), cfg.eta)
            ratio_diff = ((a - old_a[chunk].to(dev)) - (b - old_b[chunk].to(dev))).detach()
            stats.setdefault("train/loss", []).extend(losses.detach().tolist())
            stats.setdefault("rebel/logratio_diff", []).extend(ratio_diff.tolist())
            return global_mean(losses.sum(), n_global, learner.world)

        learner.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            for start in range(0, len(pairs), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                share = idx[learner.rank::learner.world]
                chunks = micro_batches(share, cfg.micro_batch_size, [
                    shared_width(prompts[i], [pairs[i]["chosen"], pairs[i]["rejected"]]) for i in share])
                grad_norm = learner.step(chunks, lambda chunk: loss(chunk, len(idx)),
                                         where=f"rebel iteration {self.iteration + 1}",
                                         prompts=[prompts[i] for i in share])
                if grad_norm is not None:  # None: skipped for a NaN or inf (--skip-nonfinite)
                    stats["train/grad_norm"].append(grad_norm)
        metrics = mean_stats(stats)
        metrics.update({"rebel/reward_diff": float((reward_a - reward_b).mean()), "rebel/pairs": len(pairs),
                        "train/lr": learner.lr})
        return metrics

    def sample_score_filter(self, prompts: Sequence, it_dir: Path, seed: int) -> tuple[list[dict], dict]:
        """1.-3. in memory, writing each stage's file into `it_dir`."""
        cfg = self.cfg
        samples = generate(self.policy, self.tokenizer, prompts, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, max_prompt_len=cfg.max_prompt_len, seed=seed)
        rows = [{"prompt": s.prompt, "response": s.response, "finished": s.finished,
                 "n_tokens": len(s.response_ids), "sample": s.index} for s in samples]
        texts = ([r["prompt"] for r in rows], [r["response"] for r in rows])
        rewards = self.reward_fn(*texts)
        bad = [r["prompt"] for r, x in zip(rows, rewards) if not math.isfinite(float(x))]
        if not self.learner.finite("the reward", torch.tensor([float(x) for x in rewards]),
                                   where=f"rebel iteration {self.iteration + 1}", prompts=bad):
            return [], {"reward/mean": math.nan, "train/nonfinite_skipped": self.learner.nonfinite}
        scored = [{**r, "reward": float(x)} for r, x in zip(rows, rewards)]
        pairs, stats = filter_rows(scored, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                                   length=token_length(self.tokenizer), drop_unfinished=cfg.drop_unfinished,
                                   select=cfg.select, seed=seed)
        if self.learner.is_main:
            write_jsonl(it_dir / "samples.jsonl", rows)
            write_jsonl(it_dir / "scored.jsonl", scored)
            write_jsonl(it_dir / "pairs.jsonl", pairs)
        metrics = {"reward/mean": sum(rewards) / len(rewards),
                   "reward/best": sum(p["chosen_reward"] for p in pairs) / max(1, len(pairs)),
                   "reward/worst": sum(p["rejected_reward"] for p in pairs) / max(1, len(pairs)),
                   "response/ended": sum(r["finished"] for r in rows) / len(rows),
                   "response/length": sum(r["n_tokens"] for r in rows) / len(rows),
                   "filter/pairs": len(pairs), "filter/duplicates": stats["duplicate"]}
        if self.monitor is not None:  # for the record only: the trainer never optimises it
            metrics["monitor/score"] = sum(self.monitor(*texts)) / len(rows)
        return pairs, metrics

    def train(self) -> dict:
        cfg, learner = self.cfg, self.learner
        if self.reward_fn is None or self.prompts is None:
            raise HeedError("REBEL iterations need --prompts and --reward (or give --data for one update)")
        self.iteration = learner.resume()["step"]
        metrics: dict = {}
        bar = progress(range(self.iteration, cfg.iterations), desc="rebel", disable=not learner.is_main, unit="iter")
        for it in bar:
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + it)  # the same on every process
            pick = torch.randperm(len(self.prompts), generator=gen)[:cfg.prompts_per_iteration].tolist()
            prompts = [self.prompts[i] for i in pick]
            it_dir = self.out / f"iter_{it + 1:02d}"
            pairs, metrics = self.sample_score_filter(prompts, it_dir, cfg.seed * 1000 + it)  # 1.-3.
            pairs = [p for p in pairs if not p.get("tie")] or pairs  # equal rewards teach nothing here
            if pairs:  # a round whose responses all tie, end unfinished or run long has nothing to learn
                metrics.update(self.update(pairs, gen))                                     # 4.
            metrics["perf/iteration_s"] = time.time() - t0
            self.iteration = it + 1
            learner.logger.log(self.iteration, **metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", loss=f"{metrics.get('train/loss', math.nan):.3f}")
            if self.iteration % cfg.save_every == 0 and self.iteration < cfg.iterations:
                learner.checkpointer.save(self.iteration)
        bar.close()
        return metrics

    def save(self, **state) -> None:
        self.learner.finish(lambda m: save_model(m.policy, self.tokenizer, self.out),
                            {"iterations": self.iteration, **state})


def run(cfg: REBELConfig) -> dict:
    out = Path(cfg.out)
    done = already_trained(out)
    if done is not None:
        return done
    seed_everything(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.data:  # stage 4 alone, on a pairs file
        pairs = read_reward_pairs(cfg.data)
        trainer = REBELTrainer(cfg, n_pairs_hint=len(pairs))
        metrics = trainer.update(pairs, torch.Generator().manual_seed(cfg.seed))
        trainer.iteration = 1
        trainer.learner.logger.log(1, **metrics)
        trainer.save(data=cfg.data, **metrics)
        print(f"rebel: one update on {len(pairs)} pairs; loss {metrics['train/loss']:.3f}, saved to {out}")
        return metrics
    if not cfg.prompts or not cfg.reward:
        raise HeedError("give --data (a pairs file from `heed filter`) or --prompts and --reward to iterate")
    trainer = REBELTrainer(cfg, reward_fn=load_reward(cfg.reward), prompts=read_prompts(cfg.prompts),
                           monitor=load_reward(cfg.monitor) if cfg.monitor else None)
    metrics = trainer.train()
    trainer.save(**metrics)
    print(f"rebel: {cfg.iterations} iterations; last mean reward {metrics['reward/mean']:.3f}, saved to {out}")
    return metrics
