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
from typing import Sequence

import torch

from heed.algos.common import Checkpointer, TrainConfig, global_batch, make_accelerator, make_optimizer
from heed.config import option, save as save_config
from heed.data import Feedback, Pair, Ranking, Rating, Thumb, read_feedback, read_rows, \
    get_messages, get_str, write_jsonl
from heed.losses import bradley_terry_loss, centering_loss, rating_loss, ranking_loss, thumbs_loss
from heed.models import make_batch
from heed.reward_model import META_FILE, RewardMember, RewardModel
from heed.template import prompt_key
from heed.utils import HeedError, MetricsLogger, progress, seed_everything


@dataclass(kw_only=True)
class RewardTrainConfig(TrainConfig):
    model: str = option(help="the SFT model: trunk initialisation, and the policy sampled for normalisation")
    data: list[str] = option(help="feedback files (JSONL, .jsonl.gz, Parquet, dataset dirs), comma-separated")
    format: str = option("auto", "feedback format of every file (auto: from the columns)",
                         choices=("auto", "pairs", "hh", "chat", "rankings", "thumbs", "ratings"))
    eval_data: list[str] = option([], "held-out feedback files (default: hold out --eval-fraction of the prompts)")
    eval_fraction: float = option(0.1, "share of prompts held out when --eval-data is not given")
    epochs: float = option(2.0, "passes over the training rows (per member)")
    ensemble: int = option(1, "ensemble members, each trained on a bootstrap resample")
    bootstrap: bool = option(True, "resample the training rows with replacement for each member (when K > 1)")
    center_coef: float = option(0.0, "weight of the reward-centring term (Eisenstein et al. 2023); 0 = off")
    use_margin: bool = option(True, "subtract pairs' margins inside the Bradley-Terry sigmoid")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    max_response_len: int = option(96, "response tokens kept (EOS included)")
    norm_samples: int = option(256, "SFT samples on training prompts for the normalisation (0 = none)")
    norm_max_new_tokens: int = option(64, "token limit of those samples")
    lr: float = option(1e-3, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(10, "linear warm-up steps")
    batch_size: int = option(32, "global batch size (feedback rows per optimiser step, all processes)")
    micro_batch_size: int = option(32, "feedback rows per forward pass (gradient accumulation below this)")
    eval_every: int = option(50, "evaluate on held-out feedback every N steps")
    save_every: int = option(100, "checkpoint every N steps (a killed run resumes from the last)")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


# ---------------------------------------------------------------------------
# Rows -> sequences -> losses
# ---------------------------------------------------------------------------

def responses_of(row) -> list[str]:
    """The responses a row's loss needs rewards for, in a fixed order."""
    if isinstance(row, Pair):
        return [row.chosen, row.rejected]
    if isinstance(row, Ranking):
        return row.responses
    return [row.response]


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


def flat_batch(tokenizer, rows: list, max_prompt_len: int, max_response_len: int):
    prompts, responses = [], []
    for row in rows:
        for r in responses_of(row):
            prompts.append(row.prompt)
            responses.append(r)
    return make_batch(tokenizer, prompts, responses, max_prompt_len=max_prompt_len,
                      max_response_len=max_response_len)


# ---------------------------------------------------------------------------
# Metrics: accuracy against labels and against the gold oracle, calibration
# ---------------------------------------------------------------------------

def comparisons(rows: list) -> list[tuple[int, int, float]]:
    """(better response id, worse response id, weight) pairs the labels assert, over `unique_responses` ids.

    Pairs (ties left out), every pair of a ranking, and for thumbs and ratings every
    pair of responses to the same prompt with different labels.
    """
    ids = _response_ids(rows)
    out: list[tuple[int, int, float]] = []
    singles: dict[str, list[tuple[int, float]]] = {}
    for row, row_ids in zip(rows, ids):
        if isinstance(row, Pair):
            if not row.tie:
                out.append((row_ids[0], row_ids[1], 1.0))
        elif isinstance(row, Ranking):
            ordered = [row_ids[i] for i in row.ranking]
            out += [(ordered[a], ordered[b], 1.0) for a in range(len(ordered)) for b in range(a + 1, len(ordered))]
        else:
            value = float(row.up) if isinstance(row, Thumb) else row.score
            singles.setdefault(prompt_key(row.prompt), []).append((row_ids[0], value))
    for group in singles.values():
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                (ia, va), (ib, vb) = group[a], group[b]
                if va != vb and ia != ib:
                    out.append((ia, ib, 1.0) if va > vb else (ib, ia, 1.0))
    return out


def _response_ids(rows: list) -> list[list[int]]:
    """For each row, an id per response into `unique_responses(rows)` (same prompt + text = same id)."""
    index: dict[tuple[str, str], int] = {}
    out = []
    for row in rows:
        key = prompt_key(row.prompt)
        out.append([index.setdefault((key, r), len(index)) for r in responses_of(row)])
    return out


def unique_responses(rows: list) -> tuple[list, list[str]]:
    """(prompts, responses) of every distinct (prompt, response) in `rows`, in id order."""
    seen: dict[tuple[str, str], tuple] = {}
    for row in rows:
        key = prompt_key(row.prompt)
        for r in responses_of(row):
            seen.setdefault((key, r), (row.prompt, r))
    return [p for p, _ in seen.values()], [r for _, r in seen.values()]


def calibration_error(probs: Sequence[float], outcomes: Sequence[float], n_bins: int = 10) -> float:
    """Expected calibration error (Guo et al. 2017) of binary predictions.

    Each prediction's confidence is max(p, 1 - p), binned in [0.5, 1]; ECE is the
    count-weighted mean over bins of |accuracy - mean confidence|.
    """
    bins: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for p, y in zip(probs, outcomes):
        conf = max(p, 1 - p)
        correct = y if p >= 0.5 else 1 - y
        bins[min(n_bins - 1, int((conf - 0.5) * 2 * n_bins))].append((conf, correct))
    n = sum(len(b) for b in bins)
    return sum(len(b) / n * abs(sum(c for _, c in b) / len(b) - sum(f for f, _ in b) / len(b))
               for b in bins if b) if n else float("nan")


def gold_preferences(prompts: list, responses: list[str]) -> list[float] | None:
    """The gold oracle's score of each response, or None when these are not the world's prompts."""
    from heed.world import score

    try:
        return [float(score(p, r)) for p, r in zip(prompts, responses)]
    except ValueError:
        return None


def feedback_metrics(rows: list, raw: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor,
                     gold: list[float] | None = None) -> dict:
    """Accuracy (against the labels and, given `gold` scores, the gold oracle) and calibration.

    raw: (K, U) raw rewards of `unique_responses(rows)`. Rankings use the ensemble's
    normalised mean; calibration uses P(a > b) = mean_k sigmoid(raw_k(a) - raw_k(b)).
    """
    mean = (raw * gain[:, None] + bias[:, None]).mean(0)  # (U,)
    comps = comparisons(rows)
    out: dict = {"n_rows": len(rows), "n_comparisons": len(comps)}
    if comps:
        better = torch.tensor([a for a, _, _ in comps])
        worse = torch.tensor([b for _, b, _ in comps])
        diff = mean[better] - mean[worse]
        correct = (diff > 0).float() + 0.5 * (diff == 0).float()
        out["accuracy"] = float(correct.mean())
        probs = torch.sigmoid(raw[:, better] - raw[:, worse]).mean(0)
        out["calibration_error"] = calibration_error(probs.tolist(), [1.0] * len(comps))
        out["mean_prob_label"] = float(probs.mean())
    if gold is not None:
        ids = _response_ids(rows)
        pairs = set()
        for row, row_ids in zip(rows, ids):
            if isinstance(row, (Pair, Ranking)):
                pairs.update((a, b) for i, a in enumerate(row_ids) for b in row_ids[i + 1:] if a != b)
        singles: dict[str, list[int]] = {}
        for row, row_ids in zip(rows, ids):
            if isinstance(row, (Thumb, Rating)):
                singles.setdefault(prompt_key(row.prompt), []).append(row_ids[0])
        for group in singles.values():
            group = sorted(set(group))
            pairs.update((a, b) for i, a in enumerate(group) for b in group[i + 1:])
        decided = [(a, b) if gold[a] > gold[b] else (b, a) for a, b in sorted(pairs) if abs(gold[a] - gold[b]) > 1e-9]
        out["gold_pairs"] = len(decided)
        if decided:
            diff = torch.tensor([float(mean[a] - mean[b]) for a, b in decided])
            out["gold_accuracy"] = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
        if comps:  # how often the labels themselves agree with gold: the ceiling noisy labels give
            agree = [1.0 if gold[a] > gold[b] else 0.5 if abs(gold[a] - gold[b]) <= 1e-9 else 0.0
                     for a, b, _ in comps]
            out["label_gold_agreement"] = sum(agree) / len(agree)
    return out


@torch.no_grad()
def score_texts(members: Sequence[RewardMember], tokenizer, prompts: list, responses: list[str], *,
                max_prompt_len: int, max_response_len: int, batch_size: int = 64) -> torch.Tensor:
    """(K, N) raw rewards; a thin wrapper so training-time evaluation and RewardModel agree."""
    rm = RewardModel(list(members), tokenizer, max_prompt_len=max_prompt_len, max_response_len=max_response_len)
    was = [m.training for m in members]
    raw = rm.raw_scores(prompts, responses, batch_size=batch_size)
    for m, w in zip(members, was):
        m.train(w)
    return raw


def evaluate_rows(members, tokenizer, rows: list, cfg_like, gain=None, bias=None, *, with_gold: bool = True) -> dict:
    prompts, responses = unique_responses(rows)
    raw = score_texts(members, tokenizer, prompts, responses, max_prompt_len=cfg_like.max_prompt_len,
                      max_response_len=cfg_like.max_response_len, batch_size=max(8, cfg_like.micro_batch_size * 2))
    K = len(members)
    gain = torch.ones(K) if gain is None else gain.cpu()
    bias = torch.zeros(K) if bias is None else bias.cpu()
    gold = gold_preferences(prompts, responses) if with_gold else None
    return feedback_metrics(rows, raw, gain, bias, gold)


# ---------------------------------------------------------------------------
# heed rm train
# ---------------------------------------------------------------------------

def read_all(paths: Sequence[str], fmt: str, skip_invalid: bool) -> list[Feedback]:
    if not paths:
        raise HeedError("no feedback files given (--data)")
    return [read_feedback(p, format=fmt, skip_invalid=skip_invalid) for p in paths]


def split_by_prompt(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded `fraction` of the distinct prompts, with all their rows, is held out."""
    keys = sorted({prompt_key(r.prompt) for r in rows})
    random.Random(seed).shuffle(keys)
    n = int(round(len(keys) * fraction))
    if fraction > 0 and n == 0 and len(keys) > 1:
        n = 1
    held = set(keys[:n])
    return [r for r in rows if prompt_key(r.prompt) not in held], [r for r in rows if prompt_key(r.prompt) in held]


def train_member(k: int, cfg: RewardTrainConfig, tokenizer, train_rows: list, heldout_rows: list,
                 rating_stats: tuple[float, float], logger_out: Path) -> None:
    """Train ensemble member k on its resample of `train_rows`; saves to out/member_k."""
    member_dir = Path(cfg.out) / f"member_{k}"
    if (member_dir / "head.safetensors").exists():
        print(f"member {k}: already trained ({member_dir})")
        return
    if cfg.ensemble > 1 and cfg.bootstrap:
        rng = random.Random(cfg.seed * 1000 + k)
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in train_rows]
    else:
        rows = train_rows
    total_steps = max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    member = RewardMember.from_policy(cfg.model, seed=cfg.seed * 1000 + k)
    accelerator = make_accelerator(cfg)
    optimizer, scheduler = make_optimizer(member, cfg, total_steps)
    member, optimizer, scheduler = accelerator.prepare(member, optimizer, scheduler)
    checkpointer = Checkpointer(accelerator, member_dir)
    start = checkpointer.load()["step"]
    logger = MetricsLogger(logger_out, enabled=accelerator.is_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise HeedError(f"batch_size {cfg.batch_size} must divide evenly across {world} processes")
    rating_mean, rating_std = rating_stats

    member.train()
    bar = progress(range(start, total_steps), desc=f"rm member {k}", disable=not accelerator.is_main_process,
                   unit="step")
    for step in bar:
        batch_rows = global_batch(rows, step, cfg.batch_size, seed=cfg.seed * 1000 + k * 100)  # per member
        local = batch_rows[rank::world]
        micro = [local[i:i + cfg.micro_batch_size] for i in range(0, len(local), cfg.micro_batch_size)]
        loss_sum = 0.0
        for j, chunk in enumerate(micro):
            batch = flat_batch(tokenizer, chunk, cfg.max_prompt_len, cfg.max_response_len).to(accelerator.device)
            sync = j == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(member):
                with accelerator.autocast():
                    rewards = member(batch.input_ids, batch.attention_mask)
                losses = row_losses(rewards.float(), chunk, rating_mean=rating_mean, rating_std=rating_std,
                                    center_coef=cfg.center_coef, use_margin=cfg.use_margin)
                # DDP averages over ranks: scale so the gradient is that of the global row mean.
                accelerator.backward(losses.sum() * world / len(batch_rows))
            loss_sum += float(losses.detach().sum())
        grad_norm = accelerator.clip_grad_norm_(member.parameters(), cfg.max_grad_norm) \
            if cfg.max_grad_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum")) / len(batch_rows)
        metrics = {"member": k, "train/loss": loss, "train/lr": scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm)}
        done = step + 1
        if heldout_rows and (done % cfg.eval_every == 0 or done == total_steps) and accelerator.is_main_process:
            ev = evaluate_rows([accelerator.unwrap_model(member)], tokenizer, heldout_rows, cfg, with_gold=False)
            metrics.update({f"eval/{name}": v for name, v in ev.items() if name in ("accuracy", "calibration_error")})
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{ev.get('accuracy', float('nan')):.3f}")
        else:
            bar.set_postfix(loss=f"{loss:.3f}")
        logger.log(done, **metrics)
        if done % cfg.save_every == 0 and done < total_steps:
            checkpointer.save(done)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(checkpointer.dir, ignore_errors=True)
        accelerator.unwrap_model(member).save(member_dir)  # head.safetensors last: the "done" mark
    accelerator.wait_for_everyone()
    logger.close()


def sft_samples(cfg: RewardTrainConfig, prompts: list) -> tuple[list, list[str]]:
    """Responses of the SFT policy on (a seeded choice of) training prompts, for normalisation."""
    from heed.generate import generate
    from heed.models import load_policy

    distinct = list({prompt_key(p): p for p in prompts}.values())
    random.Random(cfg.seed).shuffle(distinct)
    n_per = max(1, math.ceil(cfg.norm_samples / len(distinct)))
    chosen = distinct[:math.ceil(cfg.norm_samples / n_per)]
    policy, tokenizer = load_policy(cfg.model)
    samples = generate(policy, tokenizer, chosen, n=n_per, max_new_tokens=cfg.norm_max_new_tokens,
                       max_prompt_len=cfg.max_prompt_len, seed=cfg.seed, desc="rm: SFT samples")
    samples = samples[:cfg.norm_samples]
    return [s.prompt for s in samples], [s.response for s in samples]


def describe(feedbacks: Sequence[Feedback]) -> str:
    return ", ".join(f"{Path(f.path).name}: {len(f.rows)} {f.format}" + (f" ({f.skipped} skipped)" if f.skipped else "")
                     + (f" ({f.unused} both_bad unused)" if f.unused else "") for f in feedbacks)


def train(cfg: RewardTrainConfig) -> dict:
    out = Path(cfg.out)
    if (out / META_FILE).exists():
        print(f"{out}: already trained ({META_FILE} exists); delete the directory to train again")
        return json.loads((out / META_FILE).read_text()).get("heldout", {})
    if cfg.ensemble < 1:
        raise HeedError("--ensemble must be at least 1")
    t0 = time.time()
    seed_everything(cfg.seed)
    # 1. feedback
    feedbacks = read_all(cfg.data, cfg.format, cfg.skip_invalid)
    rows = [r for f in feedbacks for r in f.rows]
    if cfg.eval_data:
        heldout_feedbacks = read_all(cfg.eval_data, cfg.format, cfg.skip_invalid)
        train_rows, heldout_rows = rows, [r for f in heldout_feedbacks for r in f.rows]
    else:
        train_rows, heldout_rows = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
    if not train_rows:
        raise HeedError("no training rows left after holding out prompts; lower --eval-fraction")
    ratings = [r.score for r in train_rows if isinstance(r, Rating)]
    rating_stats = (0.0, 1.0)
    if ratings:
        m = sum(ratings) / len(ratings)
        sd = math.sqrt(sum((x - m) ** 2 for x in ratings) / len(ratings)) or 1.0
        rating_stats = (m, sd)
    print(f"rm: {describe(feedbacks)}; {len(train_rows)} training rows, {len(heldout_rows)} held out; "
          f"{cfg.ensemble} member(s)")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    from heed.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    # 2-3. members
    for k in range(cfg.ensemble):
        train_member(k, cfg, tokenizer, train_rows, heldout_rows, rating_stats, out)
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
        if heldout_rows:
            result = evaluate_rows(members, tokenizer, heldout_rows, cfg, rm.gain, rm.bias)
            rm.info["heldout"] = result
        rm.info["train_seconds"] = round(time.time() - t0, 1)
        rm.save(out)
        print(f"rm: saved to {out} in {time.time() - t0:.0f}s")
        if result:
            print(format_metrics(result, "held-out"))
    state.wait_for_everyone()
    return result


def format_metrics(m: dict, name: str) -> str:
    parts = [f"{name}: {m['n_rows']} rows, {m['n_comparisons']} comparisons"]
    if "accuracy" in m:
        parts.append(f"accuracy {m['accuracy']:.3f}, calibration error {m['calibration_error']:.3f}")
    if "gold_accuracy" in m:
        parts.append(f"accuracy vs gold {m['gold_accuracy']:.3f} on {m['gold_pairs']} pairs "
                     f"(labels agree with gold on {m.get('label_gold_agreement', float('nan')):.3f})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# heed rm eval
# ---------------------------------------------------------------------------

@dataclass
class RewardEvalConfig:
    model: str = option(help="reward model directory (from `heed rm train`)")
    data: list[str] = option(help="feedback files to evaluate on (any format), comma-separated")
    format: str = option("auto", "feedback format of every file (auto: from the columns)",
                         choices=("auto", "pairs", "hh", "chat", "rankings", "thumbs", "ratings"))
    batch_size: int = option(64, "sequences scored together")
    gold: bool = option(True, "also report accuracy against the embedded world's gold oracle (world prompts only)")
    out: str | None = option(None, "write the metrics as JSON here")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def evaluate(cfg: RewardEvalConfig) -> dict:
    """Pairwise accuracy, calibration and (on the world) gold accuracy, per file and overall."""
    rm = RewardModel.load(cfg.model)
    feedbacks = read_all(cfg.data, cfg.format, cfg.skip_invalid)
    result: dict = {"model": cfg.model, "files": {}, "counts": {}}
    all_rows = []
    for f in feedbacks:
        all_rows += f.rows
        result["counts"][f.format] = result["counts"].get(f.format, 0) + len(f.rows)
        if f.skipped:
            result["counts"]["skipped"] = result["counts"].get("skipped", 0) + f.skipped
    prompts, responses = unique_responses(all_rows)
    raw_all = rm.raw_scores(prompts, responses, batch_size=cfg.batch_size)
    gold_all = gold_preferences(prompts, responses) if cfg.gold else None
    position = {(prompt_key(p), r): i for i, (p, r) in enumerate(zip(prompts, responses))}

    def metrics_for(rows: list) -> dict:
        p, r = unique_responses(rows)
        idx = [position[(prompt_key(a), b)] for a, b in zip(p, r)]
        gold = [gold_all[i] for i in idx] if gold_all is not None else None
        return feedback_metrics(rows, raw_all[:, idx], rm.gain.cpu(), rm.bias.cpu(), gold)

    for f in feedbacks:
        result["files"][f.path] = {"format": f.format, **metrics_for(f.rows)}
        print(format_metrics(result["files"][f.path], f"{f.path} ({f.format})"))
    result["overall"] = metrics_for(all_rows)
    if len(feedbacks) > 1:
        print(format_metrics(result["overall"], "overall"))
    print("counts: " + ", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------
# heed rm score
# ---------------------------------------------------------------------------

@dataclass
class RewardScoreConfig:
    data: str = option(help="JSONL/Parquet rows with 'prompt' and 'response' (other fields are kept)")
    out: str = option(help="output JSONL: the rows with a reward column added")
    model: str | None = option(None, "reward model directory (shorthand for --reward DIR)")
    reward: list[str] = option([], "reward terms [WEIGHT*]TARGET: a reward-model dir, module:function or "
                                   "file.py:function, comma-separated; summed with their weights")
    column: str = option("reward", "name of the added column")
    batch_size: int = option(64, "rows scored together")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def score(cfg: RewardScoreConfig) -> list[dict]:
    from heed.rules import load_reward

    specs = ([cfg.model] if cfg.model else []) + list(cfg.reward)
    reward = load_reward(specs)

    def parse(row: dict) -> dict:
        if isinstance(row.get("prompt"), list):
            get_messages(row, "prompt")
        else:
            get_str(row, "prompt")
        get_str(row, "response", allow_empty=True)
        return row

    rows = read_rows(cfg.data, parse, skip_invalid=cfg.skip_invalid, what="prompt/response rows")
    multi_member = any(rm.n_members > 1 for _, _, rm in reward.models)
    out_rows = []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        prompts, responses = [r["prompt"] for r in chunk], [r["response"] for r in chunk]
        total, parts, stds = reward.score(prompts, responses, batch_size=cfg.batch_size)
        # One ensemble alone: its spread is the reward's uncertainty, worth a column.
        ensemble_std = next(iter(stds.values())) if len(parts) == 1 and stds and multi_member else None
        for i, row in enumerate(chunk):
            row = dict(row)
            row[cfg.column] = total[i]
            if ensemble_std is not None:
                row[f"{cfg.column}_std"] = ensemble_std[i]
            if len(parts) > 1:
                row[f"{cfg.column}_terms"] = {name: values[i] for name, values in parts.items()}
            out_rows.append(row)
    write_jsonl(cfg.out, out_rows)
    print(f"scored {len(out_rows)} rows to {cfg.out}")
    return out_rows
