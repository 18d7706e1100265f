"""Rule rewards, and rewards as a weighted sum of rules and reward models.

A rule is any Python callable `f(prompts, responses) -> list[float]`, one number
per (prompt, response). On the command line a reward term is written

    [WEIGHT*]TARGET
    TARGET = a reward-model directory        runs/rm
           | a reward server (heed rm serve) http://rm-host:8765
           | module:function                 heed.rules:gold
           | path/to/file.py:function        my_rules.py:brevity

and a reward is a list of terms, summed with their weights (default 1):
`--reward runs/rm,0.5*my_rules.py:brevity`. A reward model contributes its
normalised ensemble mean (heed.reward_model); one served over HTTP the same
(heed.reward_server: the token comes from $HEED_REWARD_TOKEN).

    reward = load_reward(["runs/rm", "0.5*my_rules.py:brevity"])
    total = reward(prompts, responses)                    # list[float]
    total, parts, stds = reward.score(prompts, responses) # per term: values; per reward model: std

Every trainer calls `reward(prompts, responses)` on decoded text; `heed rm score`
(`score` below) adds a reward column to a file of rows.

Dense rewards (Wu et al. 2023, Fine-Grained RLHF). A rule may return, for a response,
a list of (end, value) segments instead of a number: `value` is earned by the text up
to character `end` of the response (a Python string index), and the response's reward
is their sum. A token-level reward model (`heed rm train --format spans`) gives the
same. `reward.dense(prompts, responses)` returns every term as segments, a scalar term
as one segment at the end, and PPO with `--dense-rewards` puts each segment's value
on the token that completes it (`token_rewards`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from heed.config import option
from heed.data import get_prompt, get_str, read_rows, write_jsonl
from heed.evaluate import gold_scores
from heed.reward_model import RewardModel
from heed.reward_server import RemoteRewardModel
from heed.utils import HeedError

Rule = Callable[[Sequence, Sequence[str]], Sequence]
Segments = list[tuple[int, float]]  # (end character, value) pairs of one response


def load_rule(spec: str) -> Rule:
    """`module:function` or `path/to/file.py:function` -> the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise HeedError(f"rule {spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py") or "/" in target or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise HeedError(f"rule {spec!r}: file {path} not found")
        module_name = f"heed_rule_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise HeedError(f"rule {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise HeedError(f"rule {spec!r}: cannot import module {target!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise HeedError(f"rule {spec!r}: {target} has no function {name!r}")
    return fn


def call_rule_dense(name: str, fn: Rule, prompts: Sequence, responses: Sequence[str]) -> list[float | Segments]:
    """Call a rule and check it returned, per response, one finite number or a list of
    (end, value) segments with 0 <= end <= len(response) and finite values."""
    out = fn(list(prompts), list(responses))
    try:
        values = list(out)
    except TypeError:
        raise HeedError(f"rule {name}: must return a list, got {type(out).__name__}") from None
    if len(values) != len(responses):
        raise HeedError(f"rule {name}: returned {len(values)} values for {len(responses)} responses")
    checked: list[float | Segments] = []
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):
            try:
                segments = [(int(end), float(value)) for end, value in v]
            except (TypeError, ValueError):
                raise HeedError(f"rule {name}: response {i}: segments must be (end, value) pairs, "
                                f"got {v!r:.80}") from None
            bad = [(e, x) for e, x in segments if not 0 <= e <= len(responses[i]) or not math.isfinite(x)]
            if bad:
                raise HeedError(f"rule {name}: response {i}: segment {bad[0]} has an end outside the response's "
                                f"{len(responses[i])} characters or a non-finite value")
            checked.append(segments)
            continue
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise HeedError(f"rule {name}: must return a list of numbers (or of segment lists), "
                            f"got {type(v).__name__}") from None
        if not math.isfinite(number):
            raise HeedError(f"rule {name}: returned a non-finite value ({number})")
        checked.append(number)
    return checked


def call_rule(name: str, fn: Rule, prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """Call a rule and check it returned one finite number (or segments, summed) per response."""
    return [v if isinstance(v, float) else sum(x for _, x in v)
            for v in call_rule_dense(name, fn, prompts, responses)]


def token_rewards(segments: Segments, char_ends: Sequence[int]) -> list[float]:
    """Each segment's value on the token that completes it: the first whose end (in
    `generate.response_char_ends`) reaches the segment's end. A segment that ends with the
    text goes on the last token (EOS, where the response has one), as a scalar reward does."""
    out = [0.0] * len(char_ends)
    if not out:
        return out
    for end, value in segments:
        t = len(out) - 1 if end >= char_ends[-1] else next(t for t, e in enumerate(char_ends) if e >= end)
        out[t] += value
    return out


_WEIGHTED = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(.+?)\s*$")


@dataclass
class RewardFunction:
    """A weighted sum of rule rewards and reward models."""

    rules: list[tuple[str, float, Rule]] = field(default_factory=list)     # (name, weight, callable)
    # (name, weight, model): a RewardModel, or a RemoteRewardModel (heed rm serve): both have score, n_members
    models: list[tuple[str, float, object]] = field(default_factory=list)

    def rule_rewards(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        """The weighted sum of the rules alone (0 when there are none)."""
        total = [0.0] * len(responses)
        for name, weight, fn in self.rules:
            total = [t + weight * v for t, v in zip(total, call_rule(name, fn, prompts, responses))]
        return total

    def score(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64
              ) -> tuple[list[float], dict[str, list[float]], dict[str, list[float]]]:
        """(weighted total, each term's unweighted values by name, each reward model's std by name)."""
        parts: dict[str, list[float]] = {}
        stds: dict[str, list[float]] = {}
        for name, _, fn in self.rules:
            parts[name] = call_rule(name, fn, prompts, responses)
        for name, _, rm in self.models:
            parts[name], stds[name] = rm.score(prompts, responses, batch_size=batch_size)
        weights = {name: w for name, w, _ in self.rules + self.models}
        total = [sum(weights[n] * parts[n][i] for n in parts) for i in range(len(responses))]
        return total, parts, stds

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        return self.score(prompts, responses)[0]

    @property
    def is_dense(self) -> bool:
        """Whether a term may give rewards inside a response (rules may: known when called)."""
        return bool(self.rules) or any(getattr(rm, "is_dense", False) for _, _, rm in self.models)

    def dense(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64) -> list[Segments]:
        """Per response, the weighted (end, value) segments of every term; their sum is `__call__`'s.
        A scalar term is one segment at the response's end; a token-level reward model gives
        its per-token rewards (normalised) at each token's end."""
        out: list[Segments] = [[] for _ in responses]
        for name, weight, fn in self.rules:
            for i, v in enumerate(call_rule_dense(name, fn, prompts, responses)):
                out[i] += [(len(responses[i]), weight * v)] if isinstance(v, float) else \
                    [(end, weight * x) for end, x in v]
        for name, weight, rm in self.models:
            if getattr(rm, "is_dense", False):
                for i, segments in enumerate(rm.dense(prompts, responses, batch_size=batch_size)):
                    out[i] += [(end, weight * x) for end, x in segments]
            else:
                for i, v in enumerate(rm.score(prompts, responses, batch_size=batch_size)[0]):
                    out[i].append((len(responses[i]), weight * v))
        return out


def load_reward(specs: Sequence[str]) -> RewardFunction:
    """Terms `[WEIGHT*]TARGET` (see the module docstring) -> their weighted sum."""
    if not specs:
        raise HeedError("no reward given: name a reward-model directory or a rule (module:function)")
    reward = RewardFunction()
    for spec in specs:
        match = _WEIGHTED.match(spec)
        weight, target = (float(match.group(1)), match.group(2)) if match else (1.0, spec.strip())
        if target.startswith(("http://", "https://")):
            reward.models.append((target, weight, RemoteRewardModel(target)))
        elif Path(target).is_dir():
            reward.models.append((target, weight, RewardModel.load(target)))
        else:
            reward.rules.append((target, weight, load_rule(target)))
    names = [n for n, _, _ in reward.rules + reward.models]
    if len(set(names)) != len(names):
        raise HeedError(f"reward terms named twice: {names}")
    return reward


# ---------------------------------------------------------------------------
# Rules that come with heed
# ---------------------------------------------------------------------------

def gold(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """The embedded world's gold oracle as a rule (`heed.rules:gold`): an upper bound to compare with."""
    return gold_scores(prompts, responses)


# ---------------------------------------------------------------------------
# heed rm score
# ---------------------------------------------------------------------------

@dataclass
class RewardScoreConfig:
    data: str = option(help="JSONL/Parquet rows with 'prompt' and 'response' (other fields are kept)")
    out: str = option(help="output JSONL: the rows with a reward column added")
    model: str | None = option(None, "reward model directory (shorthand for --reward DIR)")
    reward: list[str] = option([], "reward terms [WEIGHT*]TARGET: a reward-model dir, http://HOST:PORT "
                                   "(heed rm serve), module:function or file.py:function, comma-separated; "
                                   "summed with their weights")
    column: str = option("reward", "name of the added column")
    batch_size: int = option(64, "rows scored together")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def score(cfg: RewardScoreConfig) -> list[dict]:
    specs = ([cfg.model] if cfg.model else []) + list(cfg.reward)
    reward = load_reward(specs)

    def parse(row: dict) -> dict:
        get_prompt(row)
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
