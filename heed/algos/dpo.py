"""Direct preference optimisation: fit the policy to preference pairs, no reward model, no sampling.

 1. pairs      read any pairwise feedback file `heed rm train` reads (pairs, HH-RLHF
               transcripts, chat message lists; auto-detected); ties and both_bad rows are
               dropped, since they state no preference. Spans feedback (heed/data.py) gives
               a pair for every row with a correction: chosen the correction, rejected the
               response (RLHF-V, Yu et al. 2024); rows without one are counted and skipped
 2. reference  one batched pass of the frozen reference over every pair: its sequence
               log-probs are computed once and cached (out/reference_logps.pt), never again;
               the reference is --reference, or the policy before training (with --lora-r,
               the policy with its adapter switched off: no second copy of the weights)
 3. update     for `epochs` passes over a seeded shuffle of the pairs, each step the policy's
               sequence log-probs of chosen and rejected (one forward pass of both) and the
               loss of heed/losses.py:
                 sigmoid  DPO (Rafailov et al. 2023, eq. 7), label smoothing = conservative DPO
                 ipo      IPO (Azar et al. 2023, eq. 17)
               with --dense-gamma != 1, Dense DPO (RLHF-V, sec. 3.1, eq. 5): each response
               scored by the weighted mean of its token log-probs, the tokens the correction
               changed counting gamma times (losses.dense_dpo_logps), for policy and reference
               learning rate warmed up then annealed to zero; checkpoints resume
               (the loop of heed/algos/common.py:train_offline); with --eval-data, the loss
               and implicit-reward accuracy on held-out pairs every --eval-every steps
 4. save       the policy, a Hugging Face causal-LM directory

Metrics: `rewards/chosen`, `rewards/rejected` are the implicit rewards beta * (log pi -
log pi_ref) (eq. 5), `rewards/accuracy` the share of pairs where chosen's is higher,
`rewards/margin` their mean difference, `logps/chosen`, `logps/rejected` the policy's (with
--dense-gamma != 1, all of these are of the Dense DPO scores).

Departures: sequence log-probs are sums over response tokens with logits at temperature 1
(the sampling temperature of evaluation); responses longer than `max_response_len` are
truncated (and lose their EOS). Margins in the data are ignored.

Dense DPO, departures from RLHF-V: the changed segments are found by a word diff of response
and correction (the paper's annotators rewrite segments; sec. 3.1 does not say how their tokens
are found); a token is changed if it covers any changed character, EOS never.
Pairs with no correction (pairwise files) have no changed token: with gamma != 1 they too are
scored by eq. 5, which for them is the mean token log-prob, so that one beta means one thing
across the run (RLHF-V trains on corrections only). gamma = 1 is plain DPO, sums of
log-probs, not eq. 5 at gamma = 1 (a mean).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Sequence

import torch

from heed.algos.common import (
    OfflineConfig,
    already_trained,
    make_accelerator,
    micro_batches,
    prepare_model,
    shape_multiple,
    train_offline,
    weight_dtype,
)
from heed.config import option
from heed.data import Marked, Pair, read_feedback
from heed.generate import response_char_ends
from heed.losses import dense_dpo_logps, dpo_implicit_reward, dpo_loss
from heed.models import (
    Reference,
    TokenLogprobs,
    batched_pair_logprobs,
    device_of,
    encode_responses,
    load_policy,
    save_model,
    shared_batch,
    shared_token_logprobs,
    shared_width,
)
from heed.utils import HeedError, seed_everything

PAIRWISE_FORMATS = ("auto", "pairs", "hh", "chat", "spans")


@dataclass(kw_only=True)
class DPOConfig(OfflineConfig):
    policy: str = option(help="the SFT policy to fine-tune: a local Hugging Face causal-LM directory")
    data: list[str] = option(help="pairwise feedback files (pairs, HH-RLHF, chat; JSONL/Parquet), and spans files "
                                  "whose rows carry a correction (chosen: the correction), comma-separated")
    eval_data: list[str] = option([], "held-out pairwise feedback: loss and implicit-reward accuracy every "
                                      "--eval-every steps")
    format: str = option("auto", "feedback format of every file (auto: from the columns)", choices=PAIRWISE_FORMATS)
    reference: str | None = option(None, "frozen reference model (default: --policy before training)")
    loss_type: str = option("sigmoid", "sigmoid (DPO) or ipo (IPO)", choices=("sigmoid", "ipo"))
    beta: float = option(0.1, "beta: strength of the tether to the reference (IPO's tau)")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO; sigmoid only)")
    dense_gamma: float = option(1.0, "Dense DPO (RLHF-V): the tokens a correction changed count gamma times in a "
                                     "response's score, a weighted mean of token log-probs (1 = plain DPO's sums; "
                                     "RLHF-V: 5)")
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


@dataclass
class CorrectedPair(Pair):
    """The pair a spans row with a correction gives: chosen the correction, rejected the response,
    and the characters the correction changed in each, as (start, end) ranges."""

    chosen_changed: list[tuple[int, int]] = field(default_factory=list)
    rejected_changed: list[tuple[int, int]] = field(default_factory=list)


# Masks of the tokens a correction changed, per pair: (chosen's, rejected's), one 0/1 per token of
# the response as encode_responses makes it; None for a pair with no correction.
ChangedMasks = list[tuple[list[int], list[int]] | None]

# words with the spaces before them (as byte-level BPE splits text), other characters one by one,
# trailing spaces: every character falls in exactly one piece
_WORDS = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")


def changed_ranges(before: str, after: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The characters an edit of `before` into `after` changed, as (start, end) ranges: in `before`
    those it deleted or replaced, in `after` those it inserted or replaced. A diff of words (runs
    of letters and digits with the spaces before them, other characters one by one; difflib's
    longest matching blocks), so a replaced word counts whole, not less the letters it shares with
    its replacement, and a rewritten phrase is one change, not words between matching spaces."""
    a, b = _WORDS.findall(before), _WORDS.findall(after)
    a_at, b_at = list(accumulate(map(len, a), initial=0)), list(accumulate(map(len, b), initial=0))
    in_before, in_after = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            in_before.append((a_at[i1], a_at[i2]))
        if op in ("replace", "insert"):
            in_after.append((b_at[j1], b_at[j2]))
    return in_before, in_after


def corrected_pair(row: Marked) -> CorrectedPair:
    in_response, in_correction = changed_ranges(row.response, row.correction)
    return CorrectedPair(row.prompt, row.correction, row.response, chosen_changed=in_correction,
                         rejected_changed=in_response)


def read_pairs(paths: Sequence[str], fmt: str = "auto", skip_invalid: bool = False
               ) -> tuple[list[Pair], int, int]:
    """(pairs with a preference, ties dropped, spans rows skipped for want of a correction) from
    feedback files: pairwise ones (pairs, HH-RLHF, chat), ties dropped, and spans files, each row
    with a correction that differs from its response a CorrectedPair; other kinds are refused."""
    if not paths:
        raise HeedError("no feedback files given (--data)")
    pairs, ties, uncorrected = [], 0, 0
    for path in paths:
        feedback = read_feedback(path, format=fmt, skip_invalid=skip_invalid)
        if feedback.kind == "spans":
            for row in feedback.rows:
                if row.correction is None or row.correction == row.response:
                    uncorrected += 1
                else:
                    pairs.append(corrected_pair(row))
        elif feedback.kind == "pairs":
            for row in feedback.rows:
                if row.tie:
                    ties += 1
                else:
                    pairs.append(row)
        else:
            raise HeedError(f"{path}: DPO trains on pairs, and this file holds {feedback.format}; "
                            "convert it or train a reward model on it (`heed rm train`)")
    if not pairs:
        raise HeedError(f"no pairs with a preference in {', '.join(paths)} ({ties} ties, {uncorrected} spans rows "
                        "without a correction)")
    return pairs, ties, uncorrected


def changed_tokens(tokenizer, ids: list[int], ranges: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token of a response (`ids`, as encode_responses makes them) that covers a changed
    character (`ranges` of the response's text), 0 for the others and for EOS. Token t covers the
    characters [ends[t - 1], ends[t]) of `generate.response_char_ends`; one that covers none and
    is not special (the second byte-level token of a character split over two) covers the
    character it completes, ends[t] - 1. Offsets assume the tokens decode to the text (byte-level
    BPE, heed's tokenizers, do); a tokenizer that normalises text shifts them."""
    ends = response_char_ends(tokenizer, ids)
    n = max(ends, default=0)
    flags = [0] * n
    for start, end in ranges:
        for c in range(start, min(end, n)):
            flags[c] = 1
    before = list(accumulate(flags, initial=0))  # before[c]: changed characters ahead of c
    special = set(tokenizer.all_special_ids)
    out = []
    for t, (token, hi) in enumerate(zip(ids, ends)):
        lo = ends[t - 1] if t else 0
        if lo == hi and token not in special:
            lo = max(0, hi - 1)
        out.append(int(before[hi] > before[lo]))
    return out


def changed_masks(tokenizer, pairs: Sequence[Pair], max_response_len: int) -> ChangedMasks:
    """Each pair's changed-token masks (chosen's, rejected's); None for a pair with no correction."""
    out: ChangedMasks = []
    for p in pairs:
        if isinstance(p, CorrectedPair):
            chosen, rejected = encode_responses(tokenizer, [p.chosen, p.rejected], max_response_len)
            out.append((changed_tokens(tokenizer, chosen, p.chosen_changed),
                        changed_tokens(tokenizer, rejected, p.rejected_changed)))
        else:
            out.append(None)
    return out


def changed_matrix(masks: ChangedMasks, width: int) -> torch.Tensor:
    """(2n, width) 0/1 in shared_batch's order: row 2i pair i's chosen response, 2i + 1 its rejected."""
    out = torch.zeros((2 * len(masks), width))
    for i, pair in enumerate(masks):
        for j, mask in enumerate(pair or ()):
            out[2 * i + j, :len(mask)] = torch.tensor(mask, dtype=out.dtype)
    return out


def sequence_scores(token_logps: torch.Tensor, response_mask: torch.Tensor, masks: ChangedMasks,
                    gamma: float) -> torch.Tensor:
    """The score (2n,) of each response in the loss, token_logps (2n, R) in shared_batch's order: the
    sum of its token log-probs (plain DPO, gamma = 1), or Dense DPO's weighted mean (eq. 5)."""
    if gamma == 1:
        return (token_logps * response_mask).sum(-1)
    changed = changed_matrix(masks, token_logps.shape[1]).to(token_logps.device)
    return dense_dpo_logps(token_logps, response_mask, changed, gamma)


def pair_logprobs(model, tokenizer, pairs: Sequence[Pair], masks: ChangedMasks, gamma: float = 1.0,
                  **lengths) -> dict[str, torch.Tensor]:
    """{"chosen", "rejected"}: the scores (N,) of every pair's two responses, no gradients:
    sequence log-probs, or with gamma != 1 Dense DPO's (which needs every token's log-prob)."""
    if gamma == 1:
        chosen, rejected = batched_pair_logprobs(model, tokenizer, [p.prompt for p in pairs],
                                                 [p.chosen for p in pairs], [p.rejected for p in pairs], **lengths)
        return {"chosen": chosen, "rejected": rejected}
    was_training = model.training
    model.eval()
    out = torch.zeros((len(pairs), 2))
    widths = [shared_width(p.prompt, [p.chosen, p.rejected]) for p in pairs]
    with torch.no_grad():
        for rows in micro_batches(list(range(len(pairs))), 32, widths):
            batch = shared_batch(tokenizer, [pairs[i].prompt for i in rows],
                                 [[pairs[i].chosen, pairs[i].rejected] for i in rows], **lengths)
            batch = batch.to(device_of(model))
            scores = sequence_scores(shared_token_logprobs(model, batch), batch.response_mask,
                                     [masks[i] for i in rows], gamma)
            out[rows] = scores.float().cpu().view(-1, 2)
    model.train(was_training)
    return {"chosen": out[:, 0], "rejected": out[:, 1]}


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
    if not cfg.dense_gamma > 0:
        raise HeedError(f"--dense-gamma must be positive, got {cfg.dense_gamma}")
    seed_everything(cfg.seed)
    accelerator = make_accelerator(cfg)  # first: on a CPU, multi-process runs are set up here

    # 1. pairs
    pairs, ties, uncorrected = read_pairs(cfg.data, cfg.format, cfg.skip_invalid)
    if cfg.limit:
        pairs = pairs[:cfg.limit]
    heldout = read_pairs(cfg.eval_data, cfg.format, cfg.skip_invalid)[0] if cfg.eval_data else []
    policy, tokenizer = load_policy(cfg.policy, dtype=weight_dtype(cfg))
    policy = prepare_model(policy, cfg)
    corrected = sum(isinstance(p, CorrectedPair) for p in pairs)
    gamma = cfg.dense_gamma
    print(f"dpo: {len(pairs)} pairs ({ties} ties dropped"
          + (f"; {corrected} from corrections, {uncorrected} spans rows without one skipped" if corrected
             or uncorrected else "") + f"), {cfg.loss_type} loss, beta {cfg.beta}"
          + (f", dense DPO gamma {gamma}" if gamma != 1 else "")
          + (f"; {len(heldout)} held-out pairs" if heldout else ""))
    out.mkdir(parents=True, exist_ok=True)
    lengths = dict(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)
    # the tokens each correction changed, once (only Dense DPO weighs them)
    masks = changed_masks(tokenizer, pairs, cfg.max_response_len) if gamma != 1 else [None] * len(pairs)
    heldout_masks = changed_masks(tokenizer, heldout, cfg.max_response_len) if gamma != 1 else [None] * len(heldout)

    # 2. reference log-probs, once (every process computes them: cheap, and no file race)
    cache = out / "reference_logps.pt"
    if cache.exists():
        ref = torch.load(cache)
        if ref.get("dense_gamma", 1.0) != gamma:
            raise HeedError(f"{cache} holds scores for --dense-gamma {ref.get('dense_gamma', 1.0)}, not {gamma}: "
                            "run with that, or into a new --out")
    else:
        # --reference, or the policy before training (with LoRA: its adapter switched off)
        reference = Reference(policy, cfg.reference, snapshot=False)
        with reference() as model:
            ref = pair_logprobs(model, tokenizer, pairs, masks, gamma, **lengths)
            if heldout:
                ref["heldout"] = pair_logprobs(model, tokenizer, heldout, heldout_masks, gamma, **lengths)
        del reference, model
        if gamma != 1:
            ref["dense_gamma"] = gamma
        if accelerator.is_main_process:
            torch.save(ref, cache)

    # 3. update: rows are pair indices, so the cached reference log-probs are looked up by pair
    def loss(model, chunk: list[int]):
        # chosen and rejected in one forward pass, their prompt run once
        rows = [pairs[i] for i in chunk]
        batch = shared_batch(tokenizer, [r.prompt for r in rows], [[r.chosen, r.rejected] for r in rows], **lengths,
                             pad_to_multiple_of=shape_multiple(cfg))
        batch = batch.to(device_of(model))
        # (2n,): pair i's chosen at 2i, rejected at 2i + 1
        logps = sequence_scores(model(batch), batch.response_mask, [masks[i] for i in chunk], gamma)
        losses, stats = pair_stats(logps[0::2], logps[1::2], ref["chosen"][chunk].to(logps.device),
                                   ref["rejected"][chunk].to(logps.device), cfg)
        return losses.sum(), stats

    def evaluate(model) -> dict:
        logps = pair_logprobs(model.policy, tokenizer, heldout, heldout_masks, gamma, **lengths)
        losses, stats = pair_stats(logps["chosen"], logps["rejected"], ref["heldout"]["chosen"],
                                   ref["heldout"]["rejected"], cfg)
        return {"eval/loss": float(losses.mean()), "eval/accuracy": float(stats["rewards/accuracy"].mean()),
                "eval/margin": float(stats["rewards/margin"].mean())}

    total_steps = max(1, math.ceil(cfg.epochs * len(pairs) / cfg.batch_size))
    metrics = train_offline(TokenLogprobs(policy), list(range(len(pairs))), cfg, total_steps, stage="dpo",
                            loss=loss, evaluate=evaluate if heldout else None, data_seed=cfg.seed * 1000,
                            length=lambda i: shared_width(pairs[i].prompt, [pairs[i].chosen, pairs[i].rejected]),
                            save=lambda m: save_model(m.policy, tokenizer, out),  # 4.
                            state={"steps": total_steps, "pairs": len(pairs), "ties_dropped": ties,
                                   "corrections": corrected, "uncorrected_skipped": uncorrected},
                            accelerator=accelerator)
    print(f"dpo: {total_steps} steps; last loss {metrics['train/loss']:.3f}, implicit-reward accuracy "
          f"{metrics['rewards/accuracy']:.2f}, saved to {out}")
    return metrics
