"""Evaluation: gold score, win rate and KL of a policy against a baseline, on held-out prompts.

`heed eval --policy A --baseline B --prompts FILE` samples one response per
prompt from each model (same seed, same settings), judges every response with
the embedded world's gold oracle, and reports:
- mean gold score of each, with its standard error;
- the win rate of A over B: per prompt 1 if A's response scores higher, 0.5 on
  a tie, 0 otherwise, averaged (with its standard error);
- per criterion of the gold oracle, the share of each model's responses losing
  points on it (`criteria_lost`);
- KL(A || B) on A's samples: the sum over response tokens of
  log pi_A - log pi_B (the k1 estimator, unbiased), averaged over prompts, with
  both models' logits divided by the sampling temperature.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from heed.config import option
from heed.data import read_prompts
from heed.generate import Sample, generate
from heed.models import collate, load_policy, token_logprobs
from heed.utils import HeedError, atomic_write_text, seed_everything
from heed.world import score, score_breakdown
from heed.world.oracle import WEIGHTS


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _judge(oracle, prompts: Sequence, responses: Sequence[str]) -> list:
    """`oracle(prompt, response)` on each pair; HeedError for prompts the world never asks."""
    try:
        return [oracle(p, r) for p, r in zip(prompts, responses)]
    except ValueError as e:
        raise HeedError(f"the gold oracle only judges the embedded world's prompts: {e}") from None


def gold_scores(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """The embedded world's gold oracle on each (prompt, response)."""
    return [float(s) for s in _judge(score, prompts, responses)]


def criteria_lost(prompts: Sequence, responses: Sequence[str]) -> dict[str, float]:
    """Per criterion of the gold oracle (in `WEIGHTS` order), the share of responses losing
    points on it: scoring below the criterion's weight by more than 1e-9. NaN with no responses."""
    breakdowns = _judge(score_breakdown, prompts, responses)
    n = len(breakdowns)
    return {c: sum(b[c] < w - 1e-9 for b in breakdowns) / n if n else float("nan")
            for c, w in WEIGHTS.items()}


@torch.no_grad()
def kl_to(reference, samples: Sequence[Sample], pad_id: int, *, temperature: float = 1.0,
          batch_size: int = 32) -> list[float]:
    """Per-sample sum over response tokens of log pi(y) - log pi_ref(y) (k1, on the policy's samples)."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = collate([s.prompt_ids for s in chunk], [s.response_ids for s in chunk], pad_id)
        batch = batch.to(next(reference.parameters()).device)
        ref = token_logprobs(reference, batch, temperature=temperature)[:, batch.prompt_len:]
        for row, s in enumerate(chunk):
            n = len(s.response_ids)
            out.append(float(sum(s.logprobs) - ref[row, :n].sum()))
    return out


def summarize(samples: Sequence[Sample], scores: Sequence[float]) -> dict:
    mean, se = mean_se(scores)
    return {"gold_mean": mean, "gold_se": se,
            "length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
            "finished_rate": sum(s.finished for s in samples) / len(samples)}


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of per-prompt outcomes (1 win, 0.5 tie, 0 loss)."""
    outcomes = [1.0 if a > b + 1e-9 else 0.5 if abs(a - b) <= 1e-9 else 0.0 for a, b in zip(scores_a, scores_b)]
    return mean_se(outcomes)


def compare(policy, baseline, tokenizer, prompts: Sequence, *, max_new_tokens: int = 64,
            temperature: float = 1.0, seed: int = 0, batch_size: int = 64, with_kl: bool = True,
            desc: str = "eval") -> dict:
    """Sample both models on `prompts` and compare them by gold score (both share a tokenizer)."""
    kwargs = dict(n=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                  batch_size=batch_size)
    policy_samples = generate(policy, tokenizer, prompts, desc=f"{desc}: policy", **kwargs)
    baseline_samples = generate(baseline, tokenizer, prompts, desc=f"{desc}: baseline", **kwargs)
    policy_scores = gold_scores(prompts, [s.response for s in policy_samples])
    baseline_scores = gold_scores(prompts, [s.response for s in baseline_samples])
    wr, wr_se = win_rate(policy_scores, baseline_scores)
    result = {"n_prompts": len(prompts), "temperature": temperature,
              "policy": summarize(policy_samples, policy_scores),
              "baseline": summarize(baseline_samples, baseline_scores),
              "win_rate": wr, "win_rate_se": wr_se}
    result["criteria_lost"] = {
        "policy": criteria_lost(prompts, [s.response for s in policy_samples]),
        "baseline": criteria_lost(prompts, [s.response for s in baseline_samples])}
    if with_kl:
        kl, kl_se = mean_se(kl_to(baseline, policy_samples, tokenizer.pad_token_id, temperature=temperature))
        result["kl_to_baseline"], result["kl_to_baseline_se"] = kl, kl_se
    result["examples"] = [{"prompt": p, "policy": a.response, "policy_score": sa,
                           "baseline": b.response, "baseline_score": sb}
                          for p, a, b, sa, sb in zip(prompts[:20], policy_samples, baseline_samples,
                                                     policy_scores, baseline_scores)]
    return result


def format_table(result: dict, policy_name: str = "policy", baseline_name: str = "baseline") -> str:
    p, b = result["policy"], result["baseline"]
    rows = [f"{'':<12}{'gold score':>20}{'length':>10}{'ended':>8}",
            f"{policy_name:<12}{p['gold_mean']:>12.3f} ± {p['gold_se']:<5.3f}{p['length_mean']:>10.1f}"
            f"{p['finished_rate']:>8.0%}",
            f"{baseline_name:<12}{b['gold_mean']:>12.3f} ± {b['gold_se']:<5.3f}{b['length_mean']:>10.1f}"
            f"{b['finished_rate']:>8.0%}",
            f"win rate of {policy_name} over {baseline_name}: {result['win_rate']:.3f} ± "
            f"{result['win_rate_se']:.3f} over {result['n_prompts']} prompts (ties count half)"]
    if "kl_to_baseline" in result:
        rows.append(f"KL({policy_name} || {baseline_name}): {result['kl_to_baseline']:.3f} ± "
                    f"{result['kl_to_baseline_se']:.3f} nats per response")
    return "\n".join(rows)


@dataclass
class EvalConfig:
    policy: str = option(help="the model to evaluate: a local Hugging Face causal-LM directory")
    baseline: str = option(help="the model to compare against (e.g. the SFT or pretrained model)")
    prompts: str = option(help="held-out prompts: JSONL/Parquet rows with a 'prompt' field")
    limit: int = option(0, "use only the first N prompts (0 = all)")
    max_new_tokens: int = option(64, "stop after this many tokens if no EOS came")
    temperature: float = option(1.0, "sampling temperature for both models (KL is between tempered policies)")
    batch_size: int = option(64, "sequences generated together")
    kl: bool = option(True, "also estimate KL(policy || baseline) on the policy's samples")
    out: str | None = option(None, "write the full result (with example responses) as JSON here")
    seed: int = option(0, "random seed (both models sample with it)")
    skip_invalid: bool = option(False, "skip and count malformed prompt rows instead of stopping")


def run(cfg: EvalConfig) -> dict:
    seed_everything(cfg.seed)
    prompts = read_prompts(cfg.prompts, skip_invalid=cfg.skip_invalid)
    if cfg.limit:
        prompts = prompts[:cfg.limit]
    policy, tokenizer = load_policy(cfg.policy)
    baseline, baseline_tokenizer = load_policy(cfg.baseline)
    if baseline_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise HeedError(f"{cfg.policy} and {cfg.baseline} use different tokenizers; KL and sampling "
                        "settings assume one")
    result = compare(policy, baseline, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size, with_kl=cfg.kl)
    result.update(policy_path=cfg.policy, baseline_path=cfg.baseline)
    print(format_table(result))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(result, indent=2))
        print(f"wrote {Path(cfg.out)}")
    return result
