"""A simulated labeler: the gold oracle seen through human-like noise.

People disagree with the "true" preference more when two answers are close,
sometimes answer at random, and call near-equal answers a tie. The labeler
models that on top of `oracle.score` (scale: 1.0 perfect, about 0.3 for a
response with one bad behaviour, see oracle.py):

- every answer is, with probability `random_rate` (default 0.1, the rate
  Christiano et al. 2017 assumed for their human labelers), uniformly random;
- otherwise, pairs with |s_a - s_b| < `tie_margin` (default 0.02) are a tie,
  and the rest follow Bradley-Terry: P(a > b) = sigmoid((s_a - s_b) / temperature).
  The default temperature 0.1 makes a gap of 0.1 (a small flaw) a 73/27 call
  and a gap of 0.5 (one bad behaviour) a 99/1 call;
- rankings follow Plackett-Luce with weights exp(s / temperature) (sampled as
  scores plus Gumbel noise), a uniformly random order with `random_rate`;
- thumbs up with probability sigmoid((s - thumbs_threshold) / temperature),
  threshold 0.5: midway between a one-flaw response and a perfect one;
- ratings 1..7: the score plus Gaussian noise (std = temperature), mapped
  linearly from [-1, 1] onto 1..7 and rounded (1.0 -> 7, 0.0 -> 4, <= -1 -> 1);
- marked spans: the sentences `oracle.judge_spans` marks (a wrong fact, filler, a rude
  aside, a repeated sentence, and the good ones), each missed with `miss_rate` (0.1),
  its start or end a word off with `boundary_rate` (0.2), and its label a random one
  with `random_rate`. A correction, when asked for, is the response with the marked
  sentences cut and wrong facts put right (`correct`); written only where it scores
  better, and skipped with `random_rate`, as a hurried person would.

All randomness comes from one `random.Random(seed)`: the same seed and the
same sequence of calls give the same answers.
"""

from __future__ import annotations

import math
import random
import re

from heed.world.kb import BY_NAME, NAMES_LOWER, PLURALS, VALUE_WORDS
from heed.world.lexicon import NEGATIONS
from heed.world.oracle import SPAN_LABELS, judge_spans, score
from heed.world.responses import good
from heed.world.tasks import parse_prompt

_WORD_AT = re.compile(r"\S+")
_WORD_CHARS = re.compile(r"[A-Za-z]+(?:'t)?")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


class SimulatedLabeler:
    def __init__(self, seed: int = 0, temperature: float = 0.1, random_rate: float = 0.1,
                 tie_margin: float = 0.02, thumbs_threshold: float = 0.5, miss_rate: float = 0.1,
                 boundary_rate: float = 0.2):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= random_rate <= 1:
            raise ValueError(f"random_rate must be in [0, 1], got {random_rate}")
        self.temperature = temperature
        self.random_rate = random_rate
        self.tie_margin = tie_margin
        self.thumbs_threshold = thumbs_threshold
        self.miss_rate, self.boundary_rate = miss_rate, boundary_rate
        self.rng = random.Random(seed)

    def _at_random(self) -> bool:
        return self.rng.random() < self.random_rate

    def compare(self, prompt: str | list[dict], a: str, b: str) -> str:
        """'a', 'b' or 'tie': which response the labeler prefers."""
        if self._at_random():
            return self.rng.choice(("a", "b"))
        diff = score(prompt, a) - score(prompt, b)
        if abs(diff) < self.tie_margin:
            return "tie"
        return "a" if self.rng.random() < _sigmoid(diff / self.temperature) else "b"

    def rank(self, prompt: str | list[dict], responses: list[str]) -> list[int]:
        """Indices of `responses`, best first (Plackett-Luce on the scores)."""
        order = list(range(len(responses)))
        if self._at_random():
            self.rng.shuffle(order)
            return order
        # Gumbel-max: sorting s/T + Gumbel noise samples a Plackett-Luce ranking.
        keys = [score(prompt, r) / self.temperature - math.log(-math.log(self.rng.random() or 1e-300))
                for r in responses]
        return sorted(order, key=lambda i: -keys[i])

    def thumbs(self, prompt: str | list[dict], response: str) -> bool:
        """True for thumbs up."""
        if self._at_random():
            return self.rng.random() < 0.5
        p_up = _sigmoid((score(prompt, response) - self.thumbs_threshold) / self.temperature)
        return self.rng.random() < p_up

    def rate(self, prompt: str | list[dict], response: str) -> int:
        """A 1..7 rating (7 best)."""
        if self._at_random():
            return self.rng.randint(1, 7)
        noisy = score(prompt, response) + self.rng.gauss(0.0, self.temperature)
        return 1 + round(6 * max(0.0, min(1.0, (noisy + 1) / 2)))

    def mark(self, prompt: str | list[dict], response: str, labels: tuple[str, ...] = SPAN_LABELS) -> list[dict]:
        """Marked spans {"start", "end", "label"} of `response` (character offsets), with labels
        from `labels`: the oracle's sentence judgement with misses, loose boundaries and now and
        then a random label. Spans never overlap."""
        starts = [m.start() for m in _WORD_AT.finditer(response)]
        ends = [m.end() for m in _WORD_AT.finditer(response)]
        out: list[dict] = []
        for start, end, label in judge_spans(prompt, response):
            if label not in labels or self.rng.random() < self.miss_rate:
                continue
            if self._at_random():
                label = self.rng.choice(labels)
            if self.rng.random() < self.boundary_rate:  # a word too many or too few, at one end
                if self.rng.random() < 0.5:
                    earlier = [s for s in starts if s < start]
                    later = [s for s in starts if start < s < end]
                    start = (earlier[-1] if earlier and self.rng.random() < 0.5 else later[0] if later else start)
                else:
                    inside = [e for e in ends if start < e < end]
                    after = [e for e in ends if e > end]
                    end = (after[0] if after and self.rng.random() < 0.5 else inside[-1] if inside else end)
            if out and start < out[-1]["end"]:
                start = out[-1]["end"]
            if end > start:
                out.append({"start": start, "end": end, "label": label})
        return out

    def correct(self, prompt: str | list[dict], response: str) -> str | None:
        """A corrected response, or None: the response without the sentences marked irrelevant,
        rude or repeated (and without a run into a new turn), with wrong facts put right
        word by word (a list answer that names a wrong member is rewritten whole). None where
        that is no better by the oracle, and with `random_rate` (nobody wrote one)."""
        if self._at_random():
            return None
        task = parse_prompt(prompt)
        kept = []
        for start, end, label in judge_spans(prompt, response):
            if label == "good":
                kept.append(response[start:end])
            elif label == "wrong":
                kept.append(good(task, self.rng) if task.type == "list" else _fix_facts(task, response[start:end]))
        correction = " ".join(kept) or good(task, self.rng)
        return correction if score(prompt, correction) > score(prompt, response) + 1e-9 else None


def _fix_facts(task, sentence: str) -> str:
    """The sentence with each wrong value word replaced by the KB's value (the subject read as
    the oracle reads it: the asked entity, then the last one named; a wrong "yes" or "no"
    flipped). A wrong negated claim ("is not red" of a red one) loses its negation."""
    subject, negation = task.entity, None
    out, last = [], 0
    for m in _WORD_CHARS.finditer(sentence):
        w = m.group().lower()
        replacement = None
        if w in NAMES_LOWER:
            subject, negation = NAMES_LOWER[w], None
        elif w in NEGATIONS:
            negation = m
        elif w in ("yes", "no") and task.type == "yes_no":
            truth = "yes" if BY_NAME[task.entity].get(task.attribute) == task.value else "no"
            replacement = truth if w != truth else None
        elif w in VALUE_WORDS and subject is not None:
            attribute, value = VALUE_WORDS[w]
            true = BY_NAME[subject].get(attribute)
            if negation is None and value != true:
                replacement = PLURALS[true] if attribute == "kind" and w == PLURALS.get(value) else true
            elif negation is not None and value == true:  # "is not red" of a red one: drop the "not"
                out.append(sentence[last:negation.start()].rstrip() + " ")
                last = negation.end() + 1
            negation = None
        if replacement is not None:
            if m.group()[0].isupper():
                replacement = replacement.capitalize()
            out.append(sentence[last:m.start()] + replacement)
            last = m.end()
    out.append(sentence[last:])
    return "".join(out)
