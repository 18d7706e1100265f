"""How far annotators agree with each other, and with a reward model.

- Cohen's kappa for each pair of annotators, on the items both answered
  (Cohen 1960): (p_observed - p_chance) / (1 - p_chance).
- Krippendorff's alpha over everyone (Krippendorff 2011, "Computing
  Krippendorff's alpha-reliability"): 1 - D_observed / D_expected from the
  coincidence matrix; it handles any number of annotators and missing answers.
  Nominal for pairs, thumbs and rankings; interval for 1-7 ratings.

What is compared, per kind: a pair's choice (in original-response terms, so
the random sides do not matter; "tie" and "both_bad" are categories of their
own), a ranking's top response, a thumbs label, a rating's score. Skips are
not answers and are left out, and so are spans answers: agreement on marked
spans is not measured. Both statistics are undefined (None) when there
is no variation to measure.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from typing import Hashable, Sequence


def answer_value(answer: dict) -> Hashable | None:
    """The value agreement is measured on, or None for a skip or a spans answer."""
    if answer["choice"] == "skip" or answer["kind"] == "spans":
        return None
    kind = answer["kind"]
    if kind == "pair":
        return answer["choice"]
    if kind == "ranking":
        return answer["ranking"][0]
    if kind == "thumbs":
        return answer["label"]
    return answer["score"]


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa between two annotators' answers to the same items (same order)."""
    if len(a) != len(b):
        raise ValueError("both annotators must answer the same items")
    n = len(a)
    if n == 0:
        return None
    p_observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_chance = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if p_chance >= 1.0:
        return None  # both gave one and the same answer throughout: nothing to measure
    return (p_observed - p_chance) / (1.0 - p_chance)


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], metric: str = "nominal") -> float | None:
    """Krippendorff's alpha; `units` holds the values given to each unit (missing ones left out).

    metric "nominal" (delta = 0 if equal else 1) or "interval" (delta = (c - k)^2).
    """
    if metric not in ("nominal", "interval"):
        raise ValueError(f"unknown metric {metric!r}")

    def delta(c, k) -> float:
        if metric == "nominal":
            return 0.0 if c == k else 1.0
        return float(c - k) ** 2

    coincidence: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:  # a unit answered once has nothing to agree with
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[(values[i], values[j])] += 1.0 / (m - 1)
    n_c: dict[Hashable, float] = defaultdict(float)
    for (c, _k), o in coincidence.items():
        n_c[c] += o
    n = sum(n_c.values())
    if n <= 1:
        return None
    observed = sum(o * delta(c, k) for (c, k), o in coincidence.items())
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in n_c for k in n_c) / (n - 1)
    if expected == 0:
        return None
    return 1.0 - observed / expected


def agreement_report(answers: list[dict]) -> dict:
    """{kind: {"alpha", "units", "pairs": [{"a", "b", "kappa", "n"}]}} for every kind answered."""
    by_kind: dict[str, dict[str, dict[str, Hashable]]] = defaultdict(lambda: defaultdict(dict))
    for ans in answers:
        value = answer_value(ans)
        if value is not None:
            by_kind[ans["kind"]][ans["item_id"]][ans["annotator"]] = value
    report = {}
    for kind, per_item in sorted(by_kind.items()):
        units = [list(v.values()) for v in per_item.values()]
        alpha = krippendorff_alpha(units, "interval" if kind == "rating" else "nominal")
        people = sorted({name for v in per_item.values() for name in v})
        pairs = []
        for a, b in combinations(people, 2):
            shared = [v for v in per_item.values() if a in v and b in v]
            if shared:
                kappa = cohen_kappa([v[a] for v in shared], [v[b] for v in shared])
                pairs.append({"a": a, "b": b, "kappa": kappa, "n": len(shared)})
        report[kind] = {"alpha": alpha, "units": sum(len(u) >= 2 for u in units), "pairs": pairs}
    return report


def reward_model_agreement(answers: list[dict], items_by_id: dict[str, dict]) -> dict:
    """How often people pick the response the reward model scores higher.

    Pairs with a clear choice ("0"/"1") and rankings (their top response) count; items the
    model has not scored (no `rm_scores`, or media) do not. Returns {"overall", "n",
    "annotators": {name: {"agreement", "n"}}}.
    """
    hits: dict[str, list[int]] = defaultdict(list)
    for ans in answers:
        item = items_by_id.get(ans["item_id"])
        scores = item and item.get("rm_scores")
        if not scores or any(s is None for s in scores):
            continue
        if ans["kind"] == "pair" and ans["choice"] in ("0", "1"):
            picked = int(ans["choice"])
        elif ans["kind"] == "ranking" and ans["ranking"]:
            picked = ans["ranking"][0]
        else:
            continue
        best = max(range(len(scores)), key=lambda i: scores[i])
        hits[ans["annotator"]].append(int(picked == best))
    every = [h for per in hits.values() for h in per]
    return {"overall": sum(every) / len(every) if every else None, "n": len(every),
            "annotators": {name: {"agreement": sum(h) / len(h), "n": len(h)} for name, h in sorted(hits.items())}}
