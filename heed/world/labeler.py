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
  linearly from [-1, 1] onto 1..7 and rounded (1.0 -> 7, 0.0 -> 4, <= -1 -> 1).

All randomness comes from one `random.Random(seed)`: the same seed and the
same sequence of calls give the same answers.
"""

from __future__ import annotations

import math
import random

from heed.world.oracle import score


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


class SimulatedLabeler:
    def __init__(self, seed: int = 0, temperature: float = 0.1, random_rate: float = 0.1,
                 tie_margin: float = 0.02, thumbs_threshold: float = 0.5):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= random_rate <= 1:
            raise ValueError(f"random_rate must be in [0, 1], got {random_rate}")
        self.temperature = temperature
        self.random_rate = random_rate
        self.tie_margin = tie_margin
        self.thumbs_threshold = thumbs_threshold
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
