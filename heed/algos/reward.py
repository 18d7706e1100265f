"""Stage 3: reward models from human feedback (`heed rm train`, `heed rm eval`, `heed rm score`).

`heed rm train`
1. read feedback files, any mix of formats (heed/data.py); hold out a share of the
   prompts (all feedback on a held-out prompt is held out)
2. for each ensemble member k = 1..K: a bootstrap resample of the training rows
   (K > 1; Christiano et al. 2017, sec. 2.2.3), the trunk of the SFT model, a fresh head
3. minimise the loss of each row's kind (heed/losses.py): Bradley-Terry for pairs,
   all-pairs per ranking for rankings (each ranking counts once), binary
   cross-entropy for thumbs, squared error for standardised ratings; plus the
   optional centring term on pairs and rankings. Held-out accuracy is logged.
4. normalise: sample responses from the SFT policy on training prompts, fit each
   member's gain and bias so the ensemble reward there has mean 0 and std 1
5. save (heed/reward_model.py) and report held-out accuracy (and, on the embedded
   world, accuracy against the gold oracle's noiseless preference)

Departures, deliberate:
- One optimiser step takes `batch_size` feedback rows of any kind; a ranking of K
  responses is one row, as InstructGPT counts it, even though it costs K forward passes.
- Centring is not applied to thumbs and ratings: their losses pin the reward's zero already.
- Pairs marked both_bad are incomparable and not used (Christiano et al. 2017 drop them too).
- Ratings are standardised with the training set's mean and std before the squared error.

Marked spans (`--format spans`) train a token-level model instead (TokenRewardMember):
per-token cross-entropy against BIO tags of the marked spans, each row's loss the mean
over its response tokens; unmarked tokens are "outside". Each label's reward comes from
--label-rewards, else the data's "label_rewards", else +1 for "good" and -1 for any other
label. Held out: per-label span accuracy (heed.reward_metrics.span_metrics). Omissions
cannot be marked, so such a model knows only what was marked (Wu et al. 2023 pair theirs
with a holistic reward model for completeness; here: `--reward runs/rm_spans,runs/rm`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from heed.algos.common import (
    DONE_FILE,
    OfflineConfig,
    already_trained,
    prepare_model,
    shape_multiple,
    train_offline,
    weight_dtype,
)
from heed.config import option, save as save_config
from heed.data import (
    Marked,
    Pair,
    Ranking,
    Rating,
    Thumb,
    describe_feedback,
    read_feedback_files,
    responses_of,
    split_by_prompt,
)
from heed.generate import response_char_ends, sample_prompts
from heed.losses import (
    bradley_terry_loss,
    centering_loss,
    ranking_loss,
    rating_loss,
    thumbs_loss,
    token_tag_loss,
)
from heed.models import device_of, encode_responses, load_policy, load_tokenizer, shared_batch, shared_width
from heed.reward_metrics import evaluate_rows, format_metrics, format_span_metrics, span_metrics
from heed.reward_model import RewardMember, RewardModel, TokenRewardMember, token_tags
from heed.rules import load_reward
from heed.utils import HeedError, seed_everything


@dataclass(kw_only=True)
class RewardTrainConfig(OfflineConfig):
    model: str = option(help="the SFT model: trunk initialisation, and the policy sampled for normalisation")
    data: list[str] = option(help="feedback files (JSONL, .jsonl.gz, Parquet, dataset dirs), comma-separated")
    format: str = option("auto", "feedback format of every file (auto: from the columns; spans files "
                                 "train a token-level model)",
                         choices=("auto", "pairs", "hh", "chat", "rankings", "thumbs", "ratings", "spans"))
    label_rewards: list[str] = option([], "spans: each label's reward as LABEL=NUMBER, comma-separated (default: "
                                          "the data's label_rewards, else good=1 and -1 for any other label)")
    eval_data: list[str] = option([], "held-out feedback files (default: hold out --eval-fraction of the prompts)")
    eval_fraction: float = option(0.1, "share of prompts held out when --eval-data is not given")
    epochs: float = option(2.0, "passes over the training rows (per member)")
    ensemble: int = option(1, "ensemble members, each trained on a bootstrap resample")
    bootstrap: bool = option(True, "resample the training rows with replacement for each member (when K > 1)")
    center_coef: float = option(0.0, "weight of the reward-centring term (Eisenstein et al. 2023); 0 = off")
    use_margin: bool = option(True, "subtract pairs' margins inside the Bradley-Terry sigmoid")
    lm_coef: float = option(0.0, "weight of a language-modelling term on each row's preferred response (the "
                                 "chosen, the top-ranked, a thumbs-up), which keeps what the trunk knows "
                                 "(Yang et al. 2024); 0 = off")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    max_response_len: int = option(96, "response tokens kept (EOS included)")
    norm_samples: int = option(256, "SFT samples on training prompts for the normalisation (0 = none)")
    norm_max_new_tokens: int = option(64, "token limit of those samples")
    oracle: str | None = option(None, "also measure held-out accuracy against this rule's scores (module:function; "
                                      "heed.rules:gold on the embedded world)")
    lr: float = option(1e-3, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(10, "linear warm-up steps")
    batch_size: int = option(32, "global batch size (feedback rows per optimiser step, all processes)")
    micro_batch_size: int = option(32, "feedback rows per forward pass (at most), per process; a batch runs in "
                                                "micro-batches of similar length, gradients accumulated")
    eval_every: int = option(50, "evaluate on held-out feedback every N steps")
    save_every: int = option(100, "checkpoint every N steps (a killed run resumes from the last)")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


# ---------------------------------------------------------------------------
# Rows -> sequences -> losses
# ---------------------------------------------------------------------------

def row_losses(rewards: torch.Tensor, rows: list, *, rating_mean: float = 0.0, rating_std: float = 1.0,
               center_coef: float = 0.0, use_margin: bool = True) -> torch.Tensor:
    """Per-row losses (N,) from the flat rewards of every row's responses (in `responses_of` order)."""
    offsets, n = [], 0
    for row in rows:
        offsets.append(n)
        n += len(responses_of(row))
    device = rewards.device
    losses = torch.zeros(len(rows), device=device)
    by_type: dict[type, list[int]] = {}
    for i, row in enumerate(rows):
        by_type.setdefault(type(row), []).append(i)

    if Pair in by_type:
        idx = by_type[Pair]
        start = torch.tensor([offsets[i] for i in idx], device=device)
        chosen, rejected = rewards[start], rewards[start + 1]
        margin = torch.tensor([rows[i].margin if use_margin else 0.0 for i in idx], device=device)
        tie = torch.tensor([rows[i].tie for i in idx], device=device)
        loss = bradley_terry_loss(chosen, rejected, margin, tie)
        if center_coef:
            loss = loss + center_coef * centering_loss(torch.stack([chosen, rejected], -1))
        losses[idx] = loss
    if Ranking in by_type:
        idx = by_type[Ranking]
        K = max(len(rows[i].responses) for i in idx)
        padded = torch.zeros(len(idx), K, device=device)
        ranking = torch.full((len(idx), K), -1, dtype=torch.long, device=device)
        for j, i in enumerate(idx):
            k = len(rows[i].responses)
            padded[j, :k] = rewards[offsets[i]:offsets[i] + k]
            ranking[j, :k] = torch.tensor(rows[i].ranking, device=device)
        loss = ranking_loss(padded, ranking)
        if center_coef:
            loss = loss + center_coef * centering_loss(padded)
        losses[idx] = loss
    if Thumb in by_type:
        idx = by_type[Thumb]
        up = torch.tensor([float(rows[i].up) for i in idx], device=device)
        losses[idx] = thumbs_loss(rewards[[offsets[i] for i in idx]], up)
    if Rating in by_type:
        idx = by_type[Rating]
        target = torch.tensor([(rows[i].score - rating_mean) / rating_std for i in idx], device=device)
        losses[idx] = rating_loss(rewards[[offsets[i] for i in idx]], target)
    return losses


def preferred_responses(rows: list) -> tuple[list[int], list[int]]:
    """(row index, flat response index) of each row's preferred response: a pair's chosen
    (none for a tie), a ranking's top, a thumbs-up; ratings have none."""
    row_idx, flat, n = [], [], 0
    for i, row in enumerate(rows):
        best = None
        if isinstance(row, Pair) and not row.tie:
            best = 0
        elif isinstance(row, Ranking):
            best = row.ranking[0]
        elif isinstance(row, Thumb) and row.up:
            best = 0
        if best is not None:
            row_idx.append(i)
            flat.append(n + best)
        n += len(responses_of(row))
    return row_idx, flat


def train_member(k: int, cfg: RewardTrainConfig, tokenizer, train_rows: list, heldout_rows: list,
                 rating_stats: tuple[float, float]) -> None:
    """Train ensemble member k on its resample of `train_rows` (the loop of
    heed/algos/common.py:train_offline); saves to out/member_k."""
    member_dir = Path(cfg.out) / f"member_{k}"
    if cfg.ensemble > 1 and cfg.bootstrap:
        rng = random.Random(cfg.seed * 1000 + k)
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in train_rows]
    else:
        rows = train_rows
    rating_mean, rating_std = rating_stats

    def loss(member, chunk: list):
        batch = shared_batch(tokenizer, [row.prompt for row in chunk], [responses_of(row) for row in chunk],
                             max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                             pad_to_multiple_of=shape_multiple(cfg))
        batch = batch.to(device_of(member))
        # each row's prompt runs once for all its responses; with --lm-coef the same pass gives the NLLs
        rows_preferred, preferred = preferred_responses(chunk) if cfg.lm_coef else ([], [])
        device = batch.counts.device
        out = member(batch, lm_rows=torch.tensor(preferred, dtype=torch.long, device=device) if cfg.lm_coef else None)
        rewards, nll = out if cfg.lm_coef else (out, None)
        losses = row_losses(rewards.float(), chunk, rating_mean=rating_mean, rating_std=rating_std,
                            center_coef=cfg.center_coef, use_margin=cfg.use_margin)
        if nll is None:
            return losses.sum(), {}
        losses = losses.index_add(0, torch.tensor(rows_preferred, dtype=torch.long, device=device), cfg.lm_coef * nll)
        return losses.sum(), {"train/lm_nll": nll}

    def evaluate(member) -> dict:
        ev = evaluate_rows([member], tokenizer, heldout_rows, cfg)
        return {f"eval/{name}": ev[name] for name in ("accuracy", "calibration_error") if name in ev}

    if already_trained(member_dir) is not None:
        return
    total_steps = max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    member = RewardMember.from_policy(cfg.model, seed=cfg.seed * 1000 + k, keep_lm_head=cfg.lm_coef > 0)
    member.trunk = prepare_model(member.trunk, cfg)  # --dtype, --gradient-checkpointing, --lora-r; the head stays fp32
    if member.lm_head is not None:  # an untied LM head is outside the trunk: it follows --dtype
        member.lm_head.to(weight_dtype(cfg))
    train_offline(member, rows, cfg, total_steps,
                  stage=f"rm member {k}", loss=loss, evaluate=evaluate if heldout_rows else None,
                  save=lambda member: member.save(member_dir), data_seed=cfg.seed * 1000 + k * 100,
                  length=lambda row: shared_width(row.prompt, responses_of(row)),
                  run_dir=member_dir, log_dir=cfg.out, tags={"member": k})


POSITIVE_LABELS = ("good",)


def span_labels(rows: list[Marked], flag: list[str]) -> tuple[list[str], list[float]]:
    """(labels, their rewards): every label marked in `rows` or named in the flag, in sorted
    order; each reward from the flag (LABEL=NUMBER), else the rows' label_rewards (which must
    agree), else +1 for "good" and -1 otherwise."""
    given: dict[str, float] = {}
    for row in rows:
        for label, value in (row.label_rewards or {}).items():
            if given.setdefault(label, value) != value:
                raise HeedError(f"label_rewards disagree across rows for {label!r}: {given[label]} and {value}; "
                                "set them with --label-rewards")
    for item in flag:
        label, sep, value = item.partition("=")
        try:
            given[label.strip()] = float(value)
        except ValueError:
            raise HeedError(f"--label-rewards: expected LABEL=NUMBER, got {item!r}") from None
        if not sep or not label.strip():
            raise HeedError(f"--label-rewards: expected LABEL=NUMBER, got {item!r}")
    labels = sorted({span.label for row in rows for span in row.spans} | {item.partition("=")[0].strip()
                                                                          for item in flag})
    if not labels:
        raise HeedError("no marked spans in the training rows, and no labels named in --label-rewards")
    return labels, [given.get(label, 1.0 if label in POSITIVE_LABELS else -1.0) for label in labels]


def train_token_member(k: int, cfg: RewardTrainConfig, tokenizer, train_rows: list[Marked],
                       heldout_rows: list[Marked], labels: list[str], rewards: list[float]) -> None:
    """Train token-level member k on marked spans: per-token cross-entropy against BIO tags."""
    member_dir = Path(cfg.out) / f"member_{k}"
    if already_trained(member_dir) is not None:
        return
    rows = train_rows
    if cfg.ensemble > 1 and cfg.bootstrap:
        rng = random.Random(cfg.seed * 1000 + k)
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in train_rows]
    tags: dict[int, list[int]] = {}  # per row, computed once: tokenising and decoding prefixes is not free

    def tags_of(row: Marked) -> list[int]:
        if id(row) not in tags:
            ids = encode_responses(tokenizer, [row.response], cfg.max_response_len)[0]
            tags[id(row)] = token_tags(row.response, response_char_ends(tokenizer, ids), row.spans, labels)
        return tags[id(row)]

    def loss(member, chunk: list[Marked]):
        batch = shared_batch(tokenizer, [row.prompt for row in chunk], [[row.response] for row in chunk],
                             max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                             pad_to_multiple_of=shape_multiple(cfg)).to(device_of(member))
        logits = member(batch, logits=True)                                   # (M, R, C)
        targets = torch.full(logits.shape[:2], -100, dtype=torch.long)
        for i, row in enumerate(chunk):
            row_tags = tags_of(row)
            targets[i, :len(row_tags)] = torch.tensor(row_tags, dtype=torch.long)
        targets = targets.to(logits.device)
        hit = ((logits.argmax(-1) == targets) & (targets != -100)).sum() / (targets != -100).sum().clamp(min=1)
        return token_tag_loss(logits, targets).sum(), {"train/tag_accuracy": hit}

    def evaluate(member) -> dict:
        was = member.training
        rm = RewardModel([member], tokenizer, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len)
        m = span_metrics(rm, heldout_rows, batch_size=max(8, cfg.micro_batch_size * 2))
        member.train(was)
        return {"eval/span_accuracy": m["span_accuracy"], "eval/untagged_accuracy": m["untagged_accuracy"]}

    total_steps = max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    member = TokenRewardMember.from_policy(cfg.model, labels, rewards, seed=cfg.seed * 1000 + k)
    member.trunk = prepare_model(member.trunk, cfg)
    train_offline(member, rows, cfg, total_steps,
                  stage=f"rm member {k} (token-level)", loss=loss, evaluate=evaluate if heldout_rows else None,
                  save=lambda member: member.save(member_dir), data_seed=cfg.seed * 1000 + k * 100,
                  length=lambda row: shared_width(row.prompt, [row.response]),
                  run_dir=member_dir, log_dir=cfg.out, tags={"member": k})


def sft_samples(cfg: RewardTrainConfig, prompts: list) -> tuple[list, list[str]]:
    """Responses of the SFT policy on (a seeded choice of) training prompts, for normalisation."""
    policy, tokenizer = load_policy(cfg.model)
    samples = sample_prompts(policy, tokenizer, prompts, cfg.norm_samples, seed=cfg.seed,
                             max_new_tokens=cfg.norm_max_new_tokens, max_prompt_len=cfg.max_prompt_len,
                             desc="rm: SFT samples")
    return [s.prompt for s in samples], [s.response for s in samples]


def train(cfg: RewardTrainConfig) -> dict:
    out = Path(cfg.out)
    done = already_trained(out)
    if done is not None:
        return done
    if cfg.ensemble < 1:
        raise HeedError("--ensemble must be at least 1")
    t0 = time.time()
    seed_everything(cfg.seed)
    # 1. feedback
    feedbacks = read_feedback_files(cfg.data, cfg.format, cfg.skip_invalid)
    rows = [r for f in feedbacks for r in f.rows]
    if cfg.eval_data:
        heldout_feedbacks = read_feedback_files(cfg.eval_data, cfg.format, cfg.skip_invalid)
        train_rows, heldout_rows = rows, [r for f in heldout_feedbacks for r in f.rows]
    else:
        train_rows, heldout_rows = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
    if not train_rows:
        raise HeedError("no training rows left after holding out prompts; lower --eval-fraction")
    kinds = {f.kind for f in feedbacks}
    token_level = "spans" in kinds
    if token_level and (len(kinds) > 1 or any(not isinstance(r, Marked) for r in heldout_rows)):
        raise HeedError("marked spans train a token-level reward model on their own: give only spans files "
                        "(train another reward model on the other feedback and sum both with --reward)")
    if token_level and cfg.lm_coef:
        raise HeedError("--lm-coef applies to scalar reward models, not to a token-level one")
    ratings = [r.score for r in train_rows if isinstance(r, Rating)]
    rating_stats = (0.0, 1.0)
    if ratings:
        m = sum(ratings) / len(ratings)
        sd = math.sqrt(sum((x - m) ** 2 for x in ratings) / len(ratings)) or 1.0
        rating_stats = (m, sd)
    print(f"rm: {describe_feedback(feedbacks)}; {len(train_rows)} training rows, {len(heldout_rows)} held out; "
          f"{cfg.ensemble} member(s)")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    tokenizer = load_tokenizer(cfg.model)
    # 2-3. members
    if token_level:
        labels, label_rewards = span_labels(train_rows, cfg.label_rewards)
        print("rm: token-level; label rewards " + ", ".join(f"{l} {w:+g}" for l, w in zip(labels, label_rewards)))
    for k in range(cfg.ensemble):
        if token_level:
            train_token_member(k, cfg, tokenizer, train_rows, heldout_rows, labels, label_rewards)
        else:
            train_member(k, cfg, tokenizer, train_rows, heldout_rows, rating_stats)
    from accelerate import PartialState

    state = PartialState()
    result: dict = {}
    if state.is_main_process:
        members = [RewardMember.load(out / f"member_{k}") for k in range(cfg.ensemble)]
        info = {"trained_on": {"files": [f.path for f in feedbacks],
                               "rows": {f.format: len(f.rows) for f in feedbacks},
                               "train_rows": len(train_rows), "heldout_rows": len(heldout_rows),
                               "base": str(cfg.model)},
                "rating_mean": rating_stats[0], "rating_std": rating_stats[1]}
        rm = RewardModel(members, tokenizer, max_prompt_len=cfg.max_prompt_len,
                         max_response_len=cfg.max_response_len, info=info)
        # 4. normalisation on SFT samples
        if cfg.norm_samples > 0:
            prompts, responses = sft_samples(cfg, [r.prompt for r in train_rows])
            stats = rm.fit_normalization(rm.raw_scores(prompts, responses))
            print(f"rm: normalised on {stats['n_samples']} SFT samples (mean {stats['mean_after']:.3f}, "
                  f"std {stats['std_after']:.3f})")
        # 5. held-out report, then save
        if heldout_rows and token_level:
            result = span_metrics(rm, heldout_rows, batch_size=max(8, cfg.micro_batch_size * 2))
            rm.info["heldout"] = result
        elif heldout_rows:
            oracle = load_reward([cfg.oracle]) if cfg.oracle else None
            result = evaluate_rows(members, tokenizer, heldout_rows, cfg, rm.gain, rm.bias, oracle=oracle)
            rm.info["heldout"] = result
        rm.info["train_seconds"] = round(time.time() - t0, 1)
        rm.save(out)
        (out / DONE_FILE).write_text(json.dumps(result))
        print(f"rm: saved to {out} in {time.time() - t0:.0f}s")
        if result:
            print(format_span_metrics(result, "held-out") if token_level else format_metrics(result, "held-out"))
    state.wait_for_everyone()
    return result
