"""The loop PPO, GRPO and RLOO share: pick prompts, roll out, score, optimise, log, checkpoint.

    for each iteration:
      prompts   `prompts_per_iteration` training prompts, drawn with the iteration's generator
      rollout   K responses per prompt (K = 1 for PPO) from the KV-cache sampler, their tokens'
                log-probs from that same pass, and one batched pass of the frozen reference
                (models.Reference: a copy of the policy as it started, or with LoRA the policy
                with its adapter switched off)
      score     reward models and/or rule rewards on the text; normalised with a gain and bias
                fitted on the first rollout (the SFT policy's) when `normalize_reward`; responses
                that never emit EOS lose `missing_eos_penalty`
      optimize  the algorithm's own update (heed/algos/ppo.py, heed/algos/grpo.py), in
                minibatches reshuffled every epoch through `Learner.step`

Each algorithm is a subclass naming its model (`build_model`), how many responses per prompt
(`group_size`), its epochs and its `optimize`; PPO adds its value estimates to the rollout.
The iteration's generator depends only on (seed, iteration, process), so a resumed run draws
the same prompts and samples; `monitor` rewards (the world's gold oracle, in the demo) are
logged as monitor/score and never optimised.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from heed.algos.common import (
    Learner,
    TrainConfig,
    global_mean,
    is_sharded,
    make_accelerator,
    micro_batches,
    prepare_model,
    weight_dtype,
)
from heed.config import option, save as save_config
from heed.generate import decode_response, sample_tokens, to_token_columns, trim_responses
from heed.models import (
    Batch,
    Reference,
    collate,
    encode_prompts,
    is_peft,
    load_policy,
    save_model,
    shared_token_logprobs,
    token_logprobs,
)
from heed.utils import HeedError, progress


@dataclass(kw_only=True)
class RolloutConfig(TrainConfig):
    """Fields of the online optimisers that sample from the policy and score it (PPO, GRPO, RLOO)."""

    policy: str = option(help="the SFT policy to fine-tune: a local Hugging Face causal-LM directory")
    prompts: str = option(help="training prompts: JSONL/Parquet rows with a 'prompt' field")
    reward: list[str] = option(help="reward terms, [WEIGHT*]TARGET: reward-model dirs, http://HOST:PORT (`heed rm "
                                    "serve`; token in $HEED_REWARD_TOKEN) and/or module:function rules")
    monitor: list[str] = option([], "reward terms logged as monitor/score each iteration, never optimised "
                                    "(heed.rules:gold on the embedded world)")
    reference: str | None = option(None, "frozen reference model for the KL (default: a copy of --policy; with "
                                         "--lora-r, the policy with its adapter switched off)")
    steps: int = option(60, "iterations (rollout + update)")
    prompts_per_iteration: int = option(16, "prompts per iteration, per process")
    mini_batch_size: int = option(16, "sequences per optimiser step, per process")
    max_new_tokens: int = option(48, "response length limit; responses that hit it never ended")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    temperature: float = option(1.0, "sampling temperature (log-probs use the same)")
    missing_eos_penalty: float = option(1.0, "subtracted from the (normalised) score of responses without EOS")
    normalize_reward: bool = option(True, "fit gain/bias on the first rollout so scores have mean 0, std 1")
    samples_every: int = option(10, "append sample responses to out/samples.jsonl every N iterations")
    save_every: int = option(10, "checkpoint every N iterations (a killed run resumes from the last)")


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of an iteration's generator (its prompts, samples and minibatch order):
    different for every iteration and process, and the same when a run resumes."""
    return seed * 100_003 + iteration * 101 + rank


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, norm: dict | None, cfg: RolloutConfig,
                 accelerator) -> tuple[torch.Tensor, dict | None]:
    """The score an update sees, and the normalisation used: the raw reward, normalised with a
    gain and bias fitted on the first rollout (the SFT policy's, gathered over processes) when
    `cfg.normalize_reward`, minus `cfg.missing_eos_penalty` for responses that never ended."""
    scores = raw.clone()
    if cfg.normalize_reward:
        if norm is None:
            everything = accelerator.gather(raw)
            norm = {"bias": float(everything.mean()), "gain": float(everything.std().clamp(min=1e-6))}
        scores = (raw - norm["bias"]) / norm["gain"]
    return scores - cfg.missing_eos_penalty * (~finished.to(scores.device)).float(), norm


@dataclass
class Rollout:
    """One batch of experience: (B, T) tensors in token columns (column t is about token t),
    response tokens (EOS included) under `mask`; B = prompts x group size, a prompt's K rows together."""

    prompts: list              # one per row
    texts: list[str]           # the decoded responses
    batch: Batch
    mask: torch.Tensor
    logprobs: torch.Tensor     # the policy's when it sampled
    ref_logprobs: torch.Tensor
    finished: torch.Tensor     # (B,) ended with EOS
    values: torch.Tensor | None = None   # PPO's value estimates
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (B,) after `score`
    token_scores: torch.Tensor | None = None  # (B, T) PPO --dense-rewards: the scores spread over their tokens


@dataclass
class Rows:
    """A micro-batch of an update: its rows of the rollout, and the token columns they use (the
    padding every one of them has, left of the prompts and right of the responses, cut off)."""

    rows: torch.Tensor  # (n,) row indices
    cols: slice

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A rollout tensor's entries for these rows: (B,) per row, or (B, T) per token column."""
        x = x[self.rows]
        return x[:, self.cols] if x.dim() > 1 else x

    def batch(self, batch: Batch) -> Batch:
        """The rows of `batch` in the kept columns."""
        return Batch(self(batch.input_ids), self(batch.attention_mask), self(batch.response_mask),
                     batch.prompt_len - self.cols.start)

    @classmethod
    def of(cls, rows: list[int], batch: Batch) -> "Rows":
        idx = torch.tensor(rows, device=batch.input_ids.device)
        used = batch.attention_mask[idx].any(0).nonzero().flatten()  # prompts end at column P, responses start there
        start, stop = (int(used[0]), int(used[-1]) + 1) if len(used) else (batch.prompt_len, batch.prompt_len + 1)
        return cls(idx, slice(min(start, batch.prompt_len), max(stop, batch.prompt_len + 1)))


class OnlineTrainer:
    """The shared skeleton; subclasses give `build_model`, `group_size`, `epochs`, `optimize`."""

    name = "online"

    def __init__(self, cfg: RolloutConfig, *, reward_fn: Callable | None = None, prompts: Sequence | None = None,
                 policy=None, tokenizer=None, reference=None, monitor: Callable | None = None):
        self.cfg = cfg
        accelerator = make_accelerator(cfg)
        if is_sharded(accelerator):  # each process samples its own rollout, of its own length
            raise HeedError(f"{self.name}: FSDP and DeepSpeed ZeRO-3 shard the weights, so every forward pass "
                            "is a collective, and rollouts of different lengths on each process would "
                            "deadlock; use DDP or ZeRO-2 (docs/distributed.md)")
        if policy is None:
            policy, tokenizer = load_policy(cfg.policy, dtype=weight_dtype(cfg))
        if not is_peft(policy):
            policy = prepare_model(policy, cfg)
        # a given model, --reference, or the policy as it starts (with LoRA: its adapter switched off)
        self.reference = Reference(policy, cfg.reference, model=reference).to(accelerator.device)
        self.tokenizer, self.reward_fn, self.monitor = tokenizer, reward_fn, monitor
        self.prompts = list(prompts) if prompts is not None else None
        self.norm: dict | None = None  # {"bias", "gain"} of the score, fitted on the first rollout
        rows = cfg.prompts_per_iteration * self.group_size
        updates = cfg.steps * self.epochs * -(-rows // cfg.mini_batch_size)
        self.learner = Learner(self.build_model(policy), cfg, updates, accelerator=accelerator)
        self.out = Path(cfg.out)
        self.iteration = 0

    # -- per algorithm -------------------------------------------------------------------------
    group_size = 1  # responses per prompt

    @property
    def epochs(self) -> int:
        return 1

    def build_model(self, policy) -> torch.nn.Module:
        raise NotImplementedError

    def optimize(self, exp: Rollout, generator: torch.Generator) -> dict:
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint and the finished run record besides the weights."""
        return {"norm": self.norm}

    def load_state(self, state: dict) -> None:
        self.norm = state.get("norm", self.norm)

    def sampler_value_head(self):
        """A value head the sampler reads off the policy's own forward pass (PPO), or None."""
        return None

    @property
    def policy(self):
        return self.learner.unwrapped.policy

    # -- 1. rollout ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence, generator: torch.Generator) -> Rollout:
        cfg, tok, device = self.cfg, self.tokenizer, self.learner.accelerator.device
        repeated = [p for p in prompts for _ in range(self.group_size)]
        prompt_ids = encode_prompts(tok, repeated, cfg.max_prompt_len)
        self.learner.model.eval()
        tokens, logprobs, finished, values = sample_tokens(
            self.policy, prompt_ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, value_head=self.sampler_value_head(),
            generator=generator)
        response_ids = trim_responses(tokens, finished, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        batch = collate(prompt_ids, response_ids, tok.pad_token_id).to(device)
        mask = batch.response_mask.float()

        def columns(x: torch.Tensor) -> torch.Tensor:  # (B, R) sampler order -> (B, T) token columns, masked
            return to_token_columns(x, batch.prompt_len, batch.input_ids.shape[1]).to(device) * mask

        with self.reference() as reference:
            ref_logprobs = self.logprobs(reference, batch) * mask
        return Rollout(repeated, [decode_response(tok, ids) for ids in response_ids], batch, mask, columns(logprobs),
                       ref_logprobs, finished, values=None if values is None else columns(values))

    def logprobs(self, model, batch: Batch) -> torch.Tensor:
        """Token log-probs (B, T) of `batch`'s responses under `model` (a causal LM); with groups of
        several responses per prompt, each prompt runs once for its group (models.forward_shared)."""
        if self.group_size == 1:
            return token_logprobs(model, batch, temperature=self.cfg.temperature)
        shared = shared_token_logprobs(model, batch.share_prompts(self.group_size), temperature=self.cfg.temperature)
        return F.pad(shared, (batch.prompt_len, 0))

    # -- 2. score ------------------------------------------------------------------------------
    def score(self, exp: Rollout) -> tuple[torch.Tensor | None, dict]:
        """(shaped scores, metrics); (None, {}) when a reward is NaN or inf and the iteration is
        skipped (--skip-nonfinite; otherwise the stage stops, naming the prompts)."""
        raw = torch.tensor(self.reward_fn(exp.prompts, exp.texts), dtype=torch.float32,
                           device=self.learner.accelerator.device)
        return self.shape(raw, exp)

    def shape(self, raw: torch.Tensor, exp: Rollout) -> tuple[torch.Tensor | None, dict]:
        """`score`'s second half, on the raw rewards (B,): the finite check, `shape_scores` and the
        metrics (PPO's dense rewards come here with their row sums)."""
        acc = self.learner.accelerator
        bad = [p for p, r in zip(exp.prompts, raw.tolist()) if not math.isfinite(r)]
        if not self.learner.finite("the reward", raw, where=f"{self.name} iteration {self.iteration + 1}",
                                   prompts=bad):
            return None, {}
        scores, self.norm = shape_scores(raw, exp.finished, self.norm, self.cfg, acc)
        return scores, {"reward/raw": float(raw.mean()), "reward/score": float(scores.mean()),
                        "reward/score_std": float(scores.std()) if len(scores) > 1 else 0.0}

    # -- the update's minibatch loop -----------------------------------------------------------
    def minibatch_epochs(self, exp: Rollout, generator: torch.Generator,
                         loss: Callable[[Rows, Batch], tuple[torch.Tensor, dict]]) -> dict[str, list[float]]:
        """`self.epochs` passes over the rollout in minibatches of `mini_batch_size` rows,
        reshuffled every pass, one optimiser step each; a prompt's group of responses stays
        together, so its prompt runs once. Each minibatch runs in micro-batches of rows of similar
        length, each cut to the columns its rows use (common.micro_batches, `Rows`).
        `loss(at, sub_batch)` gives the mean loss of the micro-batch's rows (`at(x)` picks their
        entries of a rollout tensor) and statistics; returns the statistics' lists."""
        cfg, learner, K = self.cfg, self.learner, self.group_size
        stats: dict[str, list[float]] = {}
        width = exp.batch.attention_mask.sum(-1).view(-1, K).amax(-1).tolist()  # per group of K rows

        def micro_loss(rows: list[int], minibatch: int) -> torch.Tensor:
            at = Rows.of(rows, exp.batch)
            value, step_stats = loss(at, at.batch(exp.batch))
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(float(v.detach()))
            return global_mean(value * len(rows), minibatch, 1)  # each process's own rollout: DDP averages

        learner.model.train()
        for _ in range(self.epochs):
            groups = torch.randperm(len(width), generator=generator).tolist()
            for mb in micro_batches(groups, max(1, cfg.mini_batch_size // K)):
                chunks = [[g * K + k for g in part for k in range(K)]
                          for part in micro_batches(mb, max(1, cfg.micro_batch_size // K), [width[g] for g in mb])]
                grad_norm = learner.step(chunks, lambda rows: micro_loss(rows, len(mb) * K),
                                         where=f"{self.name} iteration {self.iteration + 1}",
                                         prompts=[exp.prompts[g * K] for g in mb])
                if grad_norm is not None:  # None: skipped for a NaN or inf (--skip-nonfinite)
                    stats.setdefault("train/grad_norm", []).append(grad_norm)
        return stats

    # -- the whole loop ------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, learner = self.cfg, self.learner
        if self.reward_fn is None or self.prompts is None:
            raise HeedError("train() needs prompts and a reward function")
        if learner.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        state = learner.resume()
        self.iteration = state["step"]
        self.load_state(state)
        metrics: dict = {}
        bar = progress(range(self.iteration, cfg.steps), desc=self.name, disable=not learner.is_main, unit="iter")
        for it in bar:
            t0 = time.time()
            generator = torch.Generator().manual_seed(iteration_seed(cfg.seed, it, learner.rank))
            pick = torch.randint(len(self.prompts), (cfg.prompts_per_iteration,), generator=generator).tolist()
            exp = self.rollout([self.prompts[i] for i in pick], generator)       # 1.
            t_rollout = time.time() - t0
            exp.scores, score_metrics = self.score(exp)                           # 2.
            if exp.scores is None:  # a NaN or inf reward, skipped: no update this iteration
                self.iteration = it + 1
                learner.logger.log(self.iteration, **{"train/nonfinite_skipped": learner.nonfinite})
                continue
            metrics = self.optimize(exp, generator)                               # 3.
            metrics.update(score_metrics)
            metrics["response/ended"] = float(exp.finished.float().mean())
            metrics["perf/rollout_tokens_per_s"] = float(exp.mask.sum()) / max(t_rollout, 1e-9)
            metrics["perf/iteration_s"] = time.time() - t0
            if learner.nonfinite:
                metrics["train/nonfinite_skipped"] = learner.nonfinite
            if self.monitor is not None:  # for the record only: the trainer never optimises it
                metrics["monitor/score"] = sum(self.monitor(exp.prompts, exp.texts)) / len(exp.texts)
            self.iteration = it + 1
            learner.logger.log(self.iteration, **metrics)
            if learner.is_main and (self.iteration % cfg.samples_every == 0 or self.iteration == cfg.steps):
                with open(self.out / "samples.jsonl", "a") as f:
                    shown = list(zip(exp.prompts, exp.texts, exp.scores.tolist()))[:max(8, 2 * self.group_size)]
                    for p, r, s in shown:
                        f.write(json.dumps({"iteration": self.iteration, "prompt": p, "response": r,
                                            "score": s}) + "\n")
            bar.set_postfix(score=f"{metrics['reward/score']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            if self.iteration % cfg.save_every == 0 and self.iteration < cfg.steps:
                learner.checkpointer.save(self.iteration, **self.state())
        bar.close()
        self.save()
        return metrics

    def save_model(self, model: torch.nn.Module) -> None:
        save_model(model.policy, self.tokenizer, self.out)

    def save(self) -> None:
        self.learner.finish(self.save_model, {"iterations": self.iteration, **self.state()})
