"""How good a reward model is on feedback: accuracy against the labels, against an oracle's
scores (on the embedded world, the gold oracle's noiseless preference), and calibration.

Used by `heed rm train` (held-out rows) and `heed rm eval`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from heed.config import option
from heed.data import Marked, Pair, Ranking, Rating, Thumb, read_feedback_files, responses_of
from heed.reward_model import RewardMember, RewardModel, token_tags
from heed.rules import load_reward
from heed.template import prompt_key
from heed.utils import HeedError


def comparisons(rows: list) -> list[tuple[int, int, float]]:
    """(better response id, worse response id, weight) pairs the labels assert, over `unique_responses` ids.

    Pairs (ties left out), every pair of a ranking, and for thumbs and ratings every
    pair of responses to the same prompt with different labels.
    """
    ids = response_ids(rows)
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


def response_ids(rows: list) -> list[list[int]]:
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


def feedback_metrics(rows: list, raw: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor,
                     gold: list[float] | None = None) -> dict:
    """Accuracy (against the labels and, given `gold` scores, an oracle's) and calibration.

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
        ids = response_ids(rows)
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


def evaluate_rows(members, tokenizer, rows: list, cfg_like, gain=None, bias=None, *,
                  oracle: Callable | None = None) -> dict:
    """`feedback_metrics` of reward-model members on feedback rows; against `oracle(prompts, responses)`
    scores (the embedded world's gold oracle, heed.rules:gold) too when given."""
    prompts, responses = unique_responses(rows)
    raw = score_texts(members, tokenizer, prompts, responses, max_prompt_len=cfg_like.max_prompt_len,
                      max_response_len=cfg_like.max_response_len, batch_size=max(8, cfg_like.micro_batch_size * 2))
    K = len(members)
    gain = torch.ones(K) if gain is None else gain.cpu()
    bias = torch.zeros(K) if bias is None else bias.cpu()
    gold = [float(x) for x in oracle(prompts, responses)] if oracle is not None else None
    return feedback_metrics(rows, raw, gain, bias, gold)


def span_metrics(rm: RewardModel, rows: list[Marked], *, batch_size: int = 64) -> dict:
    """How well a token-level reward model finds marked spans it did not train on.

    per_label[l].accuracy: the share of the spans marked l whose tokens the model, on average
    over them, puts in l rather than outside or in another label (the ensemble's mean tag
    probabilities); span_accuracy: the same over every span; untagged_accuracy: the share of
    unmarked tokens it leaves outside every span. Spans of labels the model lacks are skipped.
    """
    labels = rm.members[0].labels
    outputs = rm.token_outputs([r.prompt for r in rows], [r.response for r in rows], batch_size=batch_size)
    per_label = {label: [0, 0] for label in labels}
    untagged = [0, 0]
    for row, (ends, _, probs) in zip(rows, outputs):
        p = probs.mean(0)                                                    # (R, C)
        by_label = torch.cat([p[:, :1], p[:, 1::2] + p[:, 2::2]], -1)         # (R, 1 + L): outside, each label
        tags = token_tags(row.response, ends, row.spans, labels)
        for t, tag in enumerate(tags):
            if tag == 0:
                untagged[0] += int(by_label[t].argmax() == 0)
                untagged[1] += 1
        for span in row.spans:
            if span.label not in per_label:
                continue
            tokens = [t for t, tag in enumerate(token_tags(row.response, ends, [span], labels)) if tag]
            if not tokens:  # cut off by the length limit
                continue
            predicted = int(by_label[tokens].mean(0).argmax())
            per_label[span.label][0] += int(predicted == 1 + labels.index(span.label))
            per_label[span.label][1] += 1
    spans = sum(n for _, n in per_label.values())
    return {"n_rows": len(rows), "n_spans": spans,
            "span_accuracy": sum(c for c, _ in per_label.values()) / spans if spans else float("nan"),
            "untagged_accuracy": untagged[0] / untagged[1] if untagged[1] else float("nan"),
            "per_label": {label: {"n": n, "accuracy": c / n if n else float("nan")}
                          for label, (c, n) in per_label.items()}}


def format_span_metrics(m: dict, name: str) -> str:
    per = ", ".join(f"{label} {v['accuracy']:.3f} ({v['n']})" for label, v in m["per_label"].items())
    return (f"{name}: {m['n_rows']} rows, {m['n_spans']} spans; span accuracy {m['span_accuracy']:.3f}, "
            f"unmarked tokens left unmarked {m['untagged_accuracy']:.3f}; per label: {per}")


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
                         choices=("auto", "pairs", "hh", "chat", "rankings", "thumbs", "ratings", "spans"))
    batch_size: int = option(64, "sequences scored together")
    oracle: str | None = option(None, "also report accuracy against this rule's scores (module:function; "
                                      "heed.rules:gold on the embedded world)")
    out: str | None = option(None, "write the metrics as JSON here")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def evaluate(cfg: RewardEvalConfig) -> dict:
    """Pairwise accuracy, calibration and (on the world) gold accuracy, per file and overall;
    for spans files, a token-level model's `span_metrics`."""
    rm = RewardModel.load(cfg.model)
    feedbacks = read_feedback_files(cfg.data, cfg.format, cfg.skip_invalid)
    result: dict = {"model": cfg.model, "files": {}, "counts": {}}
    for f in [f for f in feedbacks if f.kind == "spans"]:
        if not rm.is_dense:
            raise HeedError(f"{f.path}: marked spans evaluate a token-level reward model (heed rm train "
                            f"--format spans); {cfg.model} gives one reward per response")
        result["files"][f.path] = {"format": f.format, **span_metrics(rm, f.rows, batch_size=cfg.batch_size)}
        result["counts"]["spans"] = result["counts"].get("spans", 0) + len(f.rows)
        print(format_span_metrics(result["files"][f.path], f.path))
    feedbacks = [f for f in feedbacks if f.kind != "spans"]
    if feedbacks:
        scalar_metrics(rm, feedbacks, cfg, result)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2))
    return result


def scalar_metrics(rm: RewardModel, feedbacks: list, cfg: RewardEvalConfig, result: dict) -> None:
    """`evaluate`'s pairwise accuracy, calibration and gold accuracy per file and overall, into `result`."""
    all_rows = []
    for f in feedbacks:
        all_rows += f.rows
        result["counts"][f.format] = result["counts"].get(f.format, 0) + len(f.rows)
        if f.skipped:
            result["counts"]["skipped"] = result["counts"].get("skipped", 0) + f.skipped
    prompts, responses = unique_responses(all_rows)
    raw_all = rm.raw_scores(prompts, responses, batch_size=cfg.batch_size)
    gold_all = [float(x) for x in load_reward([cfg.oracle])(prompts, responses)] if cfg.oracle else None
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
