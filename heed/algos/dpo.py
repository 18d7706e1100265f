"""Direct preference optimisation: fit the policy to preference pairs, no reward model, no sampling.

 1. pairs      read any pairwise feedback file `heed rm train` reads (pairs, HH-RLHF
               transcripts, chat message lists; auto-detected); ties and both_bad rows are
               dropped, since they state no preference
 2. reference  one batched pass of the frozen reference over every pair: its sequence
               log-probs are computed once and cached (out/reference_logps.pt), never again
 3. update     for `epochs` passes over a seeded shuffle of the pairs, each step the policy's
               sequence log-probs of chosen and rejected (one forward pass of both) and the
               loss of heed/losses.py:
                 sigmoid  DPO (Rafailov et al. 2023, eq. 7), label smoothing = conservative DPO
                 ipo      IPO (Azar et al. 2023, eq. 17)
               learning rate warmed up then annealed to zero; checkpoints resume
 4. save       the policy, a Hugging Face causal-LM directory

Metrics: `rewards/chosen`, `rewards/rejected` are the implicit rewards beta * (log pi -
log pi_ref) (eq. 5), `rewards/accuracy` the share of pairs where chosen's is higher,
`rewards/margin` their mean difference, `logps/chosen`, `logps/rejected` the policy's.

Departures: sequence log-probs are sums over response tokens with logits at temperature 1
(the sampling temperature of evaluation); responses longer than `max_response_len` are
truncated (and lose their EOS). Margins in the data are ignored.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from heed.algos.common import Checkpointer, TrainConfig, global_batch, make_accelerator, make_optimizer
from heed.config import option, save as save_config
from heed.data import Pair, read_feedback
from heed.losses import dpo_implicit_reward, dpo_loss
from heed.models import Batch, load_policy, make_batch, save_model, token_logprobs
from heed.utils import HeedError, MetricsLogger, progress, seed_everything

PAIRWISE_FORMATS = ("auto", "pairs", "hh", "chat")


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    policy: str = option(help="the SFT policy to fine-tune: a local Hugging Face causal-LM directory")
    data: list[str] = option(help="pairwise feedback files (pairs, HH-RLHF, chat; JSONL/Parquet), comma-separated")
    format: str = option("auto", "feedback format of every file (auto: from the columns)", choices=PAIRWISE_FORMATS)
    reference: str | None = option(None, "frozen reference model (default: --policy before training)")
    loss_type: str = option("sigmoid", "sigmoid (DPO) or ipo (IPO)", choices=("sigmoid", "ipo"))
    beta: float = option(0.1, "beta: strength of the tether to the reference (IPO's tau)")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO; sigmoid only)")
    epochs: float = option(2.0, "passes over the pairs")
    lr: float = option(1e-4, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(5, "linear warm-up steps")
    batch_size: int = option(32, "pairs per optimiser step (all processes)")
    micro_batch_size: int = option(16, "pairs per forward pass (gradient accumulation below this)")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    max_response_len: int = option(64, "response tokens kept (EOS included)")
    eval_every: int = option(10, "log metrics averaged over N steps")
    save_every: int = option(100, "checkpoint every N steps (a killed run resumes from the last)")
    limit: int = option(0, "use only the first N pairs with a preference (0 = all)")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


class TokenLogprobs(nn.Module):
    """A policy whose forward gives token log-probs (B, T): the module the optimiser and
    accelerate wrap, so DDP sees (and syncs) the gradients of that one forward call."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        return token_logprobs(self.policy, batch, temperature=temperature)


def sequence_logprobs(token_logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over each row's response tokens of log pi(y_t | x, y_<t): (B, T) -> (B,)."""
    return (token_logps * batch.response_mask).sum(-1)


@torch.no_grad()
def batched_sequence_logprobs(model, tokenizer, prompts: Sequence, responses: Sequence[str], *,
                              max_prompt_len: int, max_response_len: int, batch_size: int = 64,
                              device=None) -> torch.Tensor:
    """Sequence log-probs (N,) of many (prompt, response) rows, in batches, without gradients."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = make_batch(tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size],
                           max_prompt_len=max_prompt_len, max_response_len=max_response_len).to(device)
        out.append(sequence_logprobs(token_logprobs(model, batch), batch).cpu())
    model.train(was_training)
    return torch.cat(out)


def read_pairs(paths: Sequence[str], fmt: str = "auto", skip_invalid: bool = False) -> tuple[list[Pair], int]:
    """(pairs with a preference, ties dropped) from pairwise feedback files, any pairwise format."""
    if not paths:
        raise HeedError("no feedback files given (--data)")
    pairs, ties = [], 0
    for path in paths:
        feedback = read_feedback(path, format=fmt, skip_invalid=skip_invalid)
        if feedback.kind != "pairs":
            raise HeedError(f"{path}: DPO trains on pairs, and this file holds {feedback.format}; "
                            "convert it or train a reward model on it (`heed rm train`)")
        for row in feedback.rows:
            if row.tie:
                ties += 1
            else:
                pairs.append(row)
    if not pairs:
        raise HeedError(f"no pairs with a preference in {', '.join(paths)} ({ties} ties)")
    return pairs, ties


def run(cfg: DPOConfig) -> dict:
    out = Path(cfg.out)
    done_file = out / "dpo_state.json"
    if done_file.exists():
        print(f"{out}: already trained ({done_file.name} exists); delete the directory to train again")
        return json.loads(done_file.read_text())
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise HeedError("--label-smoothing applies to the sigmoid loss only")
    seed_everything(cfg.seed)
    accelerator = make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise HeedError(f"batch_size {cfg.batch_size} must divide evenly across {world} processes")

    # 1. pairs
    pairs, ties = read_pairs(cfg.data, cfg.format, cfg.skip_invalid)
    if cfg.limit:
        pairs = pairs[:cfg.limit]
    policy, tokenizer = load_policy(cfg.policy)
    print(f"dpo: {len(pairs)} pairs ({ties} ties dropped), {cfg.loss_type} loss, beta {cfg.beta}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    lengths = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)

    # 2. reference log-probs, once (every rank computes them: cheap, and no file race)
    cache = out / "reference_logps.pt"
    if cache.exists():
        ref = torch.load(cache)
    else:
        reference = load_policy(cfg.reference)[0] if cfg.reference else policy
        prompts = [p.prompt for p in pairs]
        ref = {"chosen": batched_sequence_logprobs(reference, tokenizer, prompts, [p.chosen for p in pairs], **lengths),
               "rejected": batched_sequence_logprobs(reference, tokenizer, prompts, [p.rejected for p in pairs],
                                                     **lengths)}
        del reference
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(ref, cache)

    # 3. update
    total_steps = max(1, math.ceil(cfg.epochs * len(pairs) / cfg.batch_size))
    model = TokenLogprobs(policy)
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    checkpointer = Checkpointer(accelerator, out)
    start = checkpointer.load()["step"]
    logger = MetricsLogger(out, enabled=accelerator.is_main_process)

    model.train()
    window: dict[str, list[float]] = {}
    metrics: dict = {}
    bar = progress(range(start, total_steps), desc="dpo", disable=not accelerator.is_main_process, unit="step")
    for step in bar:
        # indices, not rows: the cached reference log-probs are looked up by pair
        idx = global_batch(list(range(len(pairs))), step, cfg.batch_size, seed=cfg.seed * 1000)
        local = idx[rank::world]
        micro = [local[i:i + cfg.micro_batch_size] for i in range(0, len(local), cfg.micro_batch_size)]
        for j, chunk in enumerate(micro):
            rows = [pairs[i] for i in chunk]
            n = len(rows)
            # chosen and rejected in one forward pass: rows 0..n-1 chosen, n..2n-1 rejected
            batch = make_batch(tokenizer, [r.prompt for r in rows] * 2, [r.chosen for r in rows] +
                               [r.rejected for r in rows], **lengths).to(accelerator.device)
            sync = j == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    logps = sequence_logprobs(model(batch), batch)
                chosen, rejected = logps[:n], logps[n:]
                ref_chosen = ref["chosen"][chunk].to(chosen.device)
                ref_rejected = ref["rejected"][chunk].to(chosen.device)
                losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing)
                # DDP averages over ranks: scale so the gradient is that of the global pair mean
                accelerator.backward(losses.sum() * world / len(idx))
            r_chosen = dpo_implicit_reward(chosen.detach(), ref_chosen, cfg.beta)
            r_rejected = dpo_implicit_reward(rejected.detach(), ref_rejected, cfg.beta)
            for k, v in {"loss": losses.detach(), "rewards/chosen": r_chosen, "rewards/rejected": r_rejected,
                         "rewards/accuracy": (r_chosen > r_rejected).float(),
                         "rewards/margin": r_chosen - r_rejected, "logps/chosen": chosen.detach(),
                         "logps/rejected": rejected.detach()}.items():
                window.setdefault(k, []).extend(v.tolist())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) \
            if cfg.max_grad_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.eval_every == 0 or done == total_steps:
            metrics = {k: sum(v) / len(v) for k, v in window.items()}
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)})
            logger.log(done, **metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracy']:.2f}")
            window = {}
        if done % cfg.save_every == 0 and done < total_steps:
            checkpointer.save(done)
    bar.close()

    # 4. save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model).policy, tokenizer, out)
        done_file.write_text(json.dumps({"steps": total_steps, "pairs": len(pairs), "ties_dropped": ties,
                                         **metrics}))
        shutil.rmtree(checkpointer.dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.close()
    if metrics:
        print(f"dpo: {total_steps} steps; last loss {metrics['loss']:.3f}, implicit-reward accuracy "
              f"{metrics['rewards/accuracy']:.2f}, saved to {out}")
    return metrics
