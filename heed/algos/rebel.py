"""REBEL (Gao et al. 2024, "Reinforcement Learning via Regressing Relative Rewards") as plain stages.

One iteration t, each stage a command that reads and writes files:
 1. sample   `heed sample --n K`       K responses per prompt from pi_t
 2. score    `heed rm score`           a reward column: reward models, rules, or both
 3. filter   `heed filter`             drop over-long prompts and responses (and, by default,
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

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from heed.algos.common import Checkpointer, TrainConfig, make_accelerator, make_optimizer
from heed.algos.dpo import TokenLogprobs, batched_sequence_logprobs, sequence_logprobs
from heed.config import option, save as save_config
from heed.data import FieldError, _number, get_messages, get_str, read_prompts, read_rows, write_jsonl
from heed.losses import rebel_loss
from heed.models import load_policy, make_batch, save_model
from heed.template import prompt_key
from heed.utils import HeedError, MetricsLogger, progress, seed_everything

SELECTIONS = ("best-worst", "best-random", "random-pair")


# ---------------------------------------------------------------------------
# 3. `heed filter`
# ---------------------------------------------------------------------------

@dataclass
class FilterConfig:
    data: str = option(help="scored rows (JSONL/Parquet): prompt, response, a reward column, optional finished")
    out: str = option(help="output JSONL of pairs: prompt, chosen, rejected, chosen_reward, rejected_reward")
    column: str = option("reward", "the reward column to select by")
    model: str | None = option(None, "a model directory whose tokenizer measures lengths (default: words)")
    max_prompt_len: int = option(96, "drop prompts longer than this (tokens with --model, else words)")
    max_response_len: int = option(48, "drop responses longer than this (tokens with --model, else words)")
    drop_unfinished: bool = option(True, "drop responses whose row says finished: false (they hit the length limit)")
    select: str = option("best-worst", "which pair to keep per prompt", choices=SELECTIONS)
    seed: int = option(0, "seed of the random selections")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def filter_rows(rows: Sequence[dict], *, column: str = "reward", max_prompt_len: int = 96,
                max_response_len: int = 48, length: Callable[[object], int] | None = None,
                drop_unfinished: bool = True, select: str = "best-worst", seed: int = 0) -> tuple[list[dict], dict]:
    """Scored rows -> (one pair per prompt, counts of what was dropped).

    `length(text_or_messages)` measures prompts and responses (default: whitespace words).
    A pair's `chosen` is the response with the higher reward; equal rewards make a tie.
    """
    if select not in SELECTIONS:
        raise HeedError(f"unknown selection {select!r} (choose from {', '.join(SELECTIONS)})")
    length = length or (lambda x: len((x if isinstance(x, str) else " ".join(m["content"] for m in x)).split()))
    rng = random.Random(seed)
    stats = {"rows": len(rows), "long_prompt": 0, "long_response": 0, "unfinished": 0, "duplicate": 0,
             "single": 0, "pairs": 0, "ties": 0}
    groups: dict[str, tuple[object, list[dict]]] = {}
    prompt_ok: dict[str, bool] = {}
    for row in rows:
        key = prompt_key(row["prompt"])
        if key not in prompt_ok:
            prompt_ok[key] = length(row["prompt"]) <= max_prompt_len
        if not prompt_ok[key]:
            stats["long_prompt"] += 1
            continue
        if drop_unfinished and row.get("finished") is False:
            stats["unfinished"] += 1
            continue
        if length(row["response"]) > max_response_len:
            stats["long_response"] += 1
            continue
        group = groups.setdefault(key, (row["prompt"], []))[1]
        if any(r["response"].strip() == row["response"].strip() for r in group):
            stats["duplicate"] += 1
            continue
        group.append(row)
    pairs = []
    for prompt, group in groups.values():
        if len(group) < 2:
            stats["single"] += 1
            continue
        ranked = sorted(group, key=lambda r: r[column], reverse=True)  # stable: ties keep file order
        if select == "best-worst":
            a, b = ranked[0], ranked[-1]
        elif select == "best-random":
            a, b = ranked[0], rng.choice(ranked[1:])
        else:
            a, b = rng.sample(ranked, 2)
            if b[column] > a[column]:
                a, b = b, a
        pair = {"prompt": prompt, "chosen": a["response"], "rejected": b["response"],
                "chosen_reward": float(a[column]), "rejected_reward": float(b[column])}
        if a[column] == b[column]:
            pair["tie"] = True
            stats["ties"] += 1
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    return pairs, stats


def read_scored(path: str | Path, column: str, skip_invalid: bool = False) -> list[dict]:
    def parse(row: dict) -> dict:
        if isinstance(row.get("prompt"), list):
            get_messages(row, "prompt")
        else:
            get_str(row, "prompt")
        get_str(row, "response", allow_empty=True)
        if column not in row:
            raise FieldError(column, "missing (score the rows first: `heed rm score`)")
        _number(row, column)
        if "finished" in row and not isinstance(row["finished"], bool):
            raise FieldError("finished", f"expected true or false, got {row['finished']!r}")
        return row
    return read_rows(path, parse, skip_invalid=skip_invalid, what="scored rows")


def token_length(tokenizer) -> Callable[[object], int]:
    from heed.template import format_prompt

    def length(x) -> int:
        return len(tokenizer(format_prompt(x) if not isinstance(x, str) else x, add_special_tokens=False)["input_ids"])
    return length


def filter_stage(cfg: FilterConfig) -> list[dict]:
    rows = read_scored(cfg.data, cfg.column, cfg.skip_invalid)
    length = None
    if cfg.model:
        from heed.models import load_tokenizer

        length = token_length(load_tokenizer(cfg.model))
    pairs, stats = filter_rows(rows, column=cfg.column, max_prompt_len=cfg.max_prompt_len,
                               max_response_len=cfg.max_response_len, length=length,
                               drop_unfinished=cfg.drop_unfinished, select=cfg.select, seed=cfg.seed)
    if not pairs:
        raise HeedError(f"{cfg.data}: no prompt kept two distinct responses ({describe(stats)})")
    write_jsonl(cfg.out, pairs)
    print(f"filter: {describe(stats)}; wrote {len(pairs)} pairs to {cfg.out}")
    return pairs


def describe(stats: dict) -> str:
    return (f"{stats['rows']} rows; dropped {stats['long_prompt']} with over-long prompts, {stats['unfinished']} "
            f"unfinished, {stats['long_response']} over-long, {stats['duplicate']} duplicates; "
            f"{stats['single']} prompts left with one response; {stats['pairs']} pairs ({stats['ties']} ties)")


# ---------------------------------------------------------------------------
# 4. `heed rebel`
# ---------------------------------------------------------------------------

@dataclass(kw_only=True)
class REBELConfig(TrainConfig):
    policy: str = option(help="the policy to improve (the SFT policy): a local Hugging Face causal-LM directory")
    data: str | None = option(None, "one update on this pairs file (from `heed filter`); else iterate")
    prompts: str | None = option(None, "training prompts for --iterations (JSONL/Parquet rows with 'prompt')")
    reward: list[str] = option([], "reward terms for --iterations, [WEIGHT*]TARGET: reward-model dirs, rules")
    iterations: int = option(16, "sample -> score -> filter -> update rounds (without --data)")
    prompts_per_iteration: int = option(64, "fresh prompts sampled each iteration")
    n: int = option(4, "responses sampled per prompt")
    eta: float = option(1.0, "eta: 1/eta scales the log-ratio difference regressed onto the reward difference")
    epochs: int = option(2, "passes over each iteration's pairs")
    lr: float = option(1e-4, "peak learning rate (AdamW), annealed to zero over all iterations")
    warmup_steps: int = option(0, "linear warm-up optimiser steps")
    batch_size: int = option(32, "pairs per optimiser step (all processes)")
    micro_batch_size: int = option(16, "pairs per forward pass (gradient accumulation below this)")
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
                 n_pairs_hint: int | None = None):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        policy, self.tokenizer = load_policy(cfg.policy)
        self.reward_fn, self.prompts = reward_fn, list(prompts) if prompts is not None else None
        iterations = 1 if cfg.data else cfg.iterations
        pairs_per_iter = n_pairs_hint or cfg.prompts_per_iteration
        total = iterations * cfg.epochs * max(1, math.ceil(pairs_per_iter / cfg.batch_size))
        model = TokenLogprobs(policy)
        optimizer, scheduler = make_optimizer(model, cfg, total)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.out = Path(cfg.out)
        self.logger = MetricsLogger(self.out, enabled=self.accelerator.is_main_process)
        self.checkpointer = Checkpointer(self.accelerator, self.out)
        self.iteration = 0

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    def update(self, pairs: Sequence[dict], generator: torch.Generator) -> dict:
        """4. REBEL's regression on pairs {prompt, chosen, rejected, chosen_reward, rejected_reward}."""
        cfg, acc, tok = self.cfg, self.accelerator, self.tokenizer
        world, rank = acc.num_processes, acc.process_index
        lengths = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)
        prompts = [p["prompt"] for p in pairs]
        # log pi_t of every response, one batched pass before the update
        old_a = batched_sequence_logprobs(self.policy, tok, prompts, [p["chosen"] for p in pairs], **lengths)
        old_b = batched_sequence_logprobs(self.policy, tok, prompts, [p["rejected"] for p in pairs], **lengths)
        reward_a = torch.tensor([float(p["chosen_reward"]) for p in pairs])
        reward_b = torch.tensor([float(p["rejected_reward"]) for p in pairs])
        stats: dict[str, list[float]] = {}
        self.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            for start in range(0, len(pairs), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                local = idx[rank::world]
                micro = [local[i:i + cfg.micro_batch_size] for i in range(0, len(local), cfg.micro_batch_size)]
                for j, chunk in enumerate(micro):
                    n = len(chunk)
                    batch = make_batch(tok, [prompts[i] for i in chunk] * 2,
                                       [pairs[i]["chosen"] for i in chunk] + [pairs[i]["rejected"] for i in chunk],
                                       **lengths).to(acc.device)
                    sync = j == len(micro) - 1
                    with nullcontext() if sync else acc.no_sync(self.model):
                        with acc.autocast():
                            logps = sequence_logprobs(self.model(batch), batch)
                        dev = logps.device
                        losses = rebel_loss(logps[:n], logps[n:], old_a[chunk].to(dev), old_b[chunk].to(dev),
                                            reward_a[chunk].to(dev), reward_b[chunk].to(dev), cfg.eta)
                        acc.backward(losses.sum() * world / len(idx))
                    ratio_diff = ((logps[:n] - old_a[chunk].to(dev)) - (logps[n:] - old_b[chunk].to(dev))).detach()
                    stats.setdefault("loss", []).extend(losses.detach().tolist())
                    stats.setdefault("rebel/logratio_diff", []).extend(ratio_diff.tolist())
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update({"rebel/reward_diff": float((reward_a - reward_b).mean()), "rebel/pairs": len(pairs),
                        "train/lr": self.scheduler.get_last_lr()[0]})
        return metrics

    def sample_score_filter(self, prompts: Sequence, it_dir: Path, seed: int) -> tuple[list[dict], dict]:
        """1.-3. in memory, writing each stage's file into `it_dir`."""
        from heed.generate import generate

        cfg = self.cfg
        samples = generate(self.policy, self.tokenizer, prompts, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, max_prompt_len=cfg.max_prompt_len, seed=seed)
        rows = [{"prompt": s.prompt, "response": s.response, "finished": s.finished,
                 "n_tokens": len(s.response_ids), "sample": s.index} for s in samples]
        rewards = self.reward_fn([r["prompt"] for r in rows], [r["response"] for r in rows])
        scored = [{**r, "reward": float(x)} for r, x in zip(rows, rewards)]
        pairs, stats = filter_rows(scored, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                                   length=token_length(self.tokenizer), drop_unfinished=cfg.drop_unfinished,
                                   select=cfg.select, seed=seed)
        if self.accelerator.is_main_process:
            write_jsonl(it_dir / "samples.jsonl", rows)
            write_jsonl(it_dir / "scored.jsonl", scored)
            write_jsonl(it_dir / "pairs.jsonl", pairs)
        metrics = {"reward/mean": sum(rewards) / len(rewards),
                   "reward/best": sum(p["chosen_reward"] for p in pairs) / max(1, len(pairs)),
                   "reward/worst": sum(p["rejected_reward"] for p in pairs) / max(1, len(pairs)),
                   "response/ended": sum(r["finished"] for r in rows) / len(rows),
                   "response/length": sum(r["n_tokens"] for r in rows) / len(rows),
                   "filter/pairs": len(pairs), "filter/duplicates": stats["duplicate"]}
        if _is_world_prompt(prompts[0]):  # for the record only: the trainer never sees it
            from heed.evaluate import gold_scores

            gold = gold_scores([r["prompt"] for r in rows], [r["response"] for r in rows])
            metrics["gold/score"] = sum(gold) / len(gold)
        return pairs, metrics

    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if self.reward_fn is None or self.prompts is None:
            raise HeedError("REBEL iterations need --prompts and --reward (or give --data for one update)")
        state = self.checkpointer.load()
        self.iteration = state["step"]
        metrics: dict = {}
        bar = progress(range(self.iteration, cfg.iterations), desc="rebel", disable=not acc.is_main_process,
                       unit="iter")
        for it in bar:
            t0 = time.time()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + it)
            pick = torch.randperm(len(self.prompts), generator=gen)[:cfg.prompts_per_iteration].tolist()
            prompts = [self.prompts[i] for i in pick]
            it_dir = self.out / f"iter_{it + 1:02d}"
            pairs, metrics = self.sample_score_filter(prompts, it_dir, cfg.seed * 1000 + it)  # 1.-3.
            pairs = [p for p in pairs if not p.get("tie")] or pairs  # equal rewards teach nothing here
            metrics.update(self.update(pairs, gen))                                         # 4.
            metrics["perf/iteration_s"] = time.time() - t0
            self.iteration = it + 1
            self.logger.log(self.iteration, **metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", loss=f"{metrics['loss']:.3f}")
            if self.iteration % cfg.save_every == 0 and self.iteration < cfg.iterations:
                self.checkpointer.save(self.iteration)
        bar.close()
        return metrics

    def save(self, **state) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_model(self.policy, self.tokenizer, self.out)
            (self.out / "rebel_state.json").write_text(json.dumps({"iterations": self.iteration, **state}))
            shutil.rmtree(self.checkpointer.dir, ignore_errors=True)
        acc.wait_for_everyone()
        self.logger.close()


def _is_world_prompt(prompt) -> bool:
    try:
        from heed.world import score

        score(prompt, "x")
        return True
    except (ImportError, ValueError):
        return False


def read_reward_pairs(path: str | Path, skip_invalid: bool = False) -> list[dict]:
    """Pairs with both rewards (the output of `heed filter`); ties are kept (their target is 0)."""
    def parse(row: dict) -> dict:
        if isinstance(row.get("prompt"), list):
            get_messages(row, "prompt")
        else:
            get_str(row, "prompt")
        for name in ("chosen", "rejected"):
            get_str(row, name, allow_empty=True)
        for name in ("chosen_reward", "rejected_reward"):
            if name not in row:
                raise FieldError(name, "missing (REBEL needs both rewards: run `heed rm score` and `heed filter`)")
            _number(row, name)
        return row
    return read_rows(path, parse, skip_invalid=skip_invalid, what="pairs")


def run(cfg: REBELConfig) -> dict:
    from heed.rules import load_reward

    out = Path(cfg.out)
    if (out / "rebel_state.json").exists():
        print(f"{out}: already trained (rebel_state.json exists); delete the directory to train again")
        return json.loads((out / "rebel_state.json").read_text())
    seed_everything(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.data:  # stage 4 alone, on a pairs file
        pairs = read_reward_pairs(cfg.data)
        trainer = REBELTrainer(cfg, n_pairs_hint=len(pairs))
        metrics = trainer.update(pairs, torch.Generator().manual_seed(cfg.seed))
        trainer.iteration = 1
        trainer.logger.log(1, **metrics)
        trainer.save(data=cfg.data, **metrics)
        print(f"rebel: one update on {len(pairs)} pairs; loss {metrics['loss']:.3f}, saved to {out}")
        return metrics
    if not cfg.prompts or not cfg.reward:
        raise HeedError("give --data (a pairs file from `heed filter`) or --prompts and --reward to iterate")
    trainer = REBELTrainer(cfg, reward_fn=load_reward(cfg.reward), prompts=read_prompts(cfg.prompts))
    metrics = trainer.train()
    trainer.save(**metrics)
    print(f"rebel: {cfg.iterations} iterations; last mean reward {metrics['reward/mean']:.3f}, saved to {out}")
    return metrics
