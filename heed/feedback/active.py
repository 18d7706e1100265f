"""Active selection: ask people about the items a reward-model ensemble disagrees on most.

Christiano et al. 2017 ("Deep RL from human preferences", section 2.2.4) sample
many candidate pairs and query the ones with the highest variance, across the
ensemble's members, of the predicted preference P(a > b) = sigmoid(r_a - r_b)
(Bradley-Terry). Here every item in the queue is scored once and served in
order of that disagreement, most informative first; ties keep queue order.

Departures, deliberate:
- The reward model reports each response's mean and standard deviation across
  members, not the members' scores. Then the variance of sigmoid(r_a - r_b) is
  taken by the delta method: sigmoid'(mu_a - mu_b)^2 * (sd_a^2 + sd_b^2),
  treating the members' errors on a and b as independent. With per-member
  scores (`member_disagreement`) it is exact; tests check the two agree when
  the spread is small.
- A ranking's disagreement is the mean over its pairs of responses. A thumbs or
  rating item has one response; its disagreement is the variance of
  sigmoid(r), the ensemble's spread on "is this good", on the same 0-0.25 scale.
- Items are scored once, when first seen, not re-scored as the model retrains.
"""

from __future__ import annotations

import math
import threading
from itertools import combinations
from typing import Sequence

from heed.utils import progress

MAX_SCORE_CHARS = 20_000  # a response longer than this is cut before scoring


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def member_disagreement(member_scores: Sequence[Sequence[float]]) -> float:
    """Exact: `member_scores[m][k]` is member m's score for response k. Returns the mean over
    response pairs of Var_m[sigmoid(r_i - r_j)] (one response: Var_m[sigmoid(r)])."""
    k = len(member_scores[0])

    def variance(xs: list[float]) -> float:
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    if k == 1:
        return variance([_sigmoid(s[0]) for s in member_scores])
    pairs = list(combinations(range(k), 2))
    return sum(variance([_sigmoid(s[i] - s[j]) for s in member_scores]) for i, j in pairs) / len(pairs)


def moment_disagreement(mean: Sequence[float], std: Sequence[float]) -> float:
    """Delta-method version of `member_disagreement` from each response's ensemble mean and std."""
    def slope(x: float) -> float:
        p = _sigmoid(x)
        return p * (1.0 - p)

    if len(mean) == 1:
        return slope(mean[0]) ** 2 * std[0] ** 2
    pairs = list(combinations(range(len(mean)), 2))
    return sum(slope(mean[i] - mean[j]) ** 2 * (std[i] ** 2 + std[j] ** 2) for i, j in pairs) / len(pairs)


def selection_order(disagreement: dict[str, float], queue_order: Sequence[str]) -> list[str]:
    """Item ids, most disagreement first; equal ones (and unscored, counted as 0) in queue order."""
    position = {item_id: n for n, item_id in enumerate(queue_order)}
    return sorted(queue_order, key=lambda i: (-disagreement.get(i, 0.0), position[i]))


def score_items(rm, items: list[dict], batch_size: int = 64) -> dict[str, tuple[float, list]]:
    """item id -> (disagreement, mean score per response) for a batch of stored items.

    `rm.score(prompts, responses) -> (mean, std)` is the reward-model ensemble. Media
    responses cannot be scored: such items get disagreement 0 and scores of None.
    """
    out: dict[str, tuple[float, list]] = {}
    rows: list[tuple[str, int, str, str]] = []
    for item in items:
        if any(not isinstance(r, str) for r in item["responses"]):
            out[item["id"]] = (0.0, [None] * len(item["responses"]))
        else:
            rows += [(item["id"], k, item["prompt"], r[:MAX_SCORE_CHARS]) for k, r in enumerate(item["responses"])]
    means: dict[tuple[str, int], float] = {}
    stds: dict[tuple[str, int], float] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        mean, std = rm.score([r[2] for r in chunk], [r[3] for r in chunk])
        for (item_id, k, _, _), m, s in zip(chunk, mean, std):
            means[(item_id, k)], stds[(item_id, k)] = float(m), float(s)
    for item in items:
        if item["id"] in out:
            continue
        ks = range(len(item["responses"]))
        mu = [means[(item["id"], k)] for k in ks]
        sd = [stds[(item["id"], k)] for k in ks]
        out[item["id"]] = (moment_disagreement(mu, sd), mu)
    return out


def score_pending(store, rm, batch_size: int = 64, *, show_progress: bool = False) -> int:
    """Score every item not yet scored (items added since are picked up by the next call)."""
    total = 0
    bar = progress(desc="scoring queue", unit="item", disable=not show_progress)
    while True:
        pending = store.unscored_items(limit=batch_size * 4)
        if not pending:
            bar.close()
            return total
        store.set_scores(score_items(rm, pending, batch_size))
        total += len(pending)
        bar.update(len(pending))


class Scorer(threading.Thread):
    """Scores items added while the server runs (`heed label add`), every few seconds."""

    def __init__(self, store, rm, interval: float = 5.0):
        super().__init__(name="heed-active-scorer", daemon=True)
        self.store, self.rm, self.interval = store, rm, interval
        self.stopped = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                score_pending(self.store, self.rm)
            except Exception as e:  # keep serving in queue order rather than crash the app
                self.error = f"{type(e).__name__}: {e}"
