"""Direct preference optimisation: fit the policy to preference pairs, no reward model, no sampling.

 1. pairs      read any pairwise feedback file `heed rm train` reads (pairs, HH-RLHF
               transcripts, chat message lists; auto-detected); ties and both_bad rows are
               dropped, since they state no preference
 2. reference  one batched pass of the frozen reference over every pair: its sequence
               log-probs are computed once and cached (out/reference_logps.pt), never again;
               the reference is --reference, or the policy before training (with --lora-r,
               the policy with its adapter switched off: no second copy of the weights)
 3. update     for `epochs` passes over a seeded shuffle of the pairs, each step the policy's
               sequence log-probs of chosen and rejected (one forward pass of both) and the
               loss of heed/losses.py:
                 sigmoid  DPO (Rafailov et al. 2023, eq. 7), label smoothing = conservative DPO
                 ipo      IPO (Azar et al. 2023, eq. 17)
               learning rate warmed up then annealed to zero; checkpoints resume
               (the loop of heed/algos/common.py:train_offline); with --eval-data, the loss
               and implicit-reward accuracy on held-out pairs every --eval-every steps
 4. save       the policy, a Hugging Face causal-LM directory

Metrics: `rewards/chosen`, `rewards/rejected` are the implicit rewards beta * (log pi -
log pi_ref) (eq. 5), `rewards/accuracy` the share of pairs where chosen's is higher,
`rewards/margin` their mean difference, `logps/chosen`, `logps/rejected` the policy's.

Departures: sequence log-probs are sums over response tokens with logits at temperature 1
(the sampling temperature of evaluation); responses longer than `max_response_len` are
truncated (and lose their EOS). Margins in the data are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from heed.algos.common import (
    OfflineConfig,
    already_trained,
    make_accelerator,
    prepare_model,
    shape_multiple,
    train_offline,
    weight_dtype,
)
from heed.config import option
from heed.data import Pair, read_preference_pairs
from heed.losses import dpo_implicit_reward, dpo_loss
from heed.models import (
    Reference,
    TokenLogprobs,
    batched_pair_logprobs,
    device_of,
    load_policy,
    save_model,
    shared_batch,
    shared_width,
)
from heed.utils import HeedError, seed_everything

PAIRWISE_FORMATS = ("auto", "pairs", "hh", "chat")


@dataclass(kw_only=True)
class DPOConfig(OfflineConfig):
    policy: str = option(help="the SFT policy to fine-tune: a local Hugging Face causal-LM directory")
    data: list[str] = option(help="pairwise feedback files (pairs, HH-RLHF, chat; JSONL/Parquet), comma-separated")
    eval_data: list[str] = option([], "held-out pairwise feedback: loss and implicit-reward accuracy every "
                                      "--eval-every steps")
    format: str = option("auto", "feedback format of every file (auto: from the columns)", choices=PAIRWISE_FORMATS)
    reference: str | None = option(None, "frozen reference model (default: --policy before training)")
    loss_type: str = option("sigmoid", "sigmoid (DPO) or ipo (IPO)", choices=("sigmoid", "ipo"))
    beta: float = option(0.1, "beta: strength of the tether to the reference (IPO's tau)")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO; sigmoid only)")
    epochs: float = option(2.0, "passes over the pairs")
    lr: float = option(1e-4, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(5, "linear warm-up steps")
    batch_size: int = option(32, "global batch size (pairs per optimiser step, all processes together)")
    micro_batch_size: int = option(16, "pairs per forward pass (at most), per process; a batch runs in "
                                                "micro-batches of similar length, gradients accumulated")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    max_response_len: int = option(64, "response tokens kept (EOS included)")
    log_every: int = option(10, "log training metrics, averaged over N steps, every N steps")
    eval_every: int = option(50, "evaluate on --eval-data every N steps (and at the end)")
    limit: int = option(0, "use only the first N pairs with a preference (0 = all)")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def pair_logprobs(model, tokenizer, pairs: Sequence[Pair], **lengths) -> dict[str, torch.Tensor]:
    """{"chosen", "rejected"}: sequence log-probs (N,) of every pair's two responses, no gradients."""
    chosen, rejected = batched_pair_logprobs(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                             [p.rejected for p in pairs], **lengths)
    return {"chosen": chosen, "rejected": rejected}


def pair_stats(chosen, rejected, ref_chosen, ref_rejected, cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """Per-pair losses, and the implicit rewards beta * (log pi - log pi_ref) (Rafailov et al., eq. 5)."""
    losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    r_chosen = dpo_implicit_reward(chosen.detach(), ref_chosen, cfg.beta)
    r_rejected = dpo_implicit_reward(rejected.detach(), ref_rejected, cfg.beta)
    return losses, {"rewards/chosen": r_chosen, "rewards/rejected": r_rejected,
                    "rewards/accuracy": (r_chosen > r_rejected).float(), "rewards/margin": r_chosen - r_rejected,
                    "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


def run(cfg: DPOConfig) -> dict:
    out = Path(cfg.out)
    done = already_trained(out)
    if done is not None:
        return done
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise HeedError("--label-smoothing applies to the sigmoid loss only")
    seed_everything(cfg.seed)
    accelerator = make_accelerator(cfg)  # first: on a CPU, multi-process runs are set up here

    # 1. pairs
    pairs, ties = read_preference_pairs(cfg.data, cfg.format, cfg.skip_invalid)
    if cfg.limit:
        pairs = pairs[:cfg.limit]
    heldout = read_preference_pairs(cfg.eval_data, cfg.format, cfg.skip_invalid)[0] if cfg.eval_data else []
    policy, tokenizer = load_policy(cfg.policy, dtype=weight_dtype(cfg))
    policy = prepare_model(policy, cfg)
    print(f"dpo: {len(pairs)} pairs ({ties} ties dropped), {cfg.loss_type} loss, beta {cfg.beta}"
          + (f"; {len(heldout)} held-out pairs" if heldout else ""))
    out.mkdir(parents=True, exist_ok=True)
    lengths = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)

    # 2. reference log-probs, once (every process computes them: cheap, and no file race)
    cache = out / "reference_logps.pt"
    if cache.exists():
        ref = torch.load(cache)
    else:
        # --reference, or the policy before training (with LoRA: its adapter switched off)
        reference = Reference(policy, cfg.reference, snapshot=False)
        with reference() as model:
            ref = pair_logprobs(model, tokenizer, pairs, **lengths)
            if heldout:
                ref["heldout"] = pair_logprobs(model, tokenizer, heldout, **lengths)
        del reference, model
        if accelerator.is_main_process:
            torch.save(ref, cache)

    # 3. update: rows are pair indices, so the cached reference log-probs are looked up by pair
    def loss(model, chunk: list[int]):
        # chosen and rejected in one forward pass, their prompt run once
        rows = [pairs[i] for i in chunk]
        batch = shared_batch(tokenizer, [r.prompt for r in rows], [[r.chosen, r.rejected] for r in rows], **lengths,
                             pad_to_multiple_of=shape_multiple(cfg))
        batch = batch.to(device_of(model))
        logps = (model(batch) * batch.response_mask).sum(-1)  # (2n,): pair i's chosen at 2i, rejected at 2i + 1
        losses, stats = pair_stats(logps[0::2], logps[1::2], ref["chosen"][chunk].to(logps.device),
                                   ref["rejected"][chunk].to(logps.device), cfg)
        return losses.sum(), stats

    def evaluate(model) -> dict:
        logps = pair_logprobs(model.policy, tokenizer, heldout, **lengths)
        losses, stats = pair_stats(logps["chosen"], logps["rejected"], ref["heldout"]["chosen"],
                                   ref["heldout"]["rejected"], cfg)
        return {"eval/loss": float(losses.mean()), "eval/accuracy": float(stats["rewards/accuracy"].mean()),
                "eval/margin": float(stats["rewards/margin"].mean())}

    total_steps = max(1, math.ceil(cfg.epochs * len(pairs) / cfg.batch_size))
    metrics = train_offline(TokenLogprobs(policy), list(range(len(pairs))), cfg, total_steps, stage="dpo",
                            loss=loss, evaluate=evaluate if heldout else None, data_seed=cfg.seed * 1000,
                            length=lambda i: shared_width(pairs[i].prompt, [pairs[i].chosen, pairs[i].rejected]),
                            save=lambda m: save_model(m.policy, tokenizer, out),  # 4.
                            state={"steps": total_steps, "pairs": len(pairs), "ties_dropped": ties},
                            accelerator=accelerator)
    print(f"dpo: {total_steps} steps; last loss {metrics['train/loss']:.3f}, implicit-reward accuracy "
          f"{metrics['rewards/accuracy']:.2f}, saved to {out}")
    return metrics
