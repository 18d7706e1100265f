"""Who answers the queries: a synthetic oracle on the true return, or people in the feedback app.

Both have the same two calls, so the training loop never waits on either:
`submit(pairs)` asks, `collect()` returns the answers that have arrived since the last
call as (pairs, mu) with mu = 1 if clip 0 was preferred, 0 if clip 1, 0.5 if equal.

Departures from Christiano et al. (2017):
- The paper's synthetic labeler is exact; here it can also be noisy (a Bradley-Terry
  choice with a temperature, and a chance of a uniformly random answer), to test the
  reward model's 10%-random assumption against a labeler that actually errs.
- People answer in heed's feedback app, not the paper's crowdsourcing interface: "tie"
  and "both_bad" both mean "equally good" (mu = 0.5, as the paper's "equally
  preferable"), "skip" drops the comparison (the paper's "incomparable"); several
  people answering the same item are averaged.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np

from heed.control.queries import ClipPairs
from heed.utils import HeedError


class SyntheticOracle:
    """Prefers the clip with the higher true return.

    temperature > 0: Bradley-Terry choice, P[clip 0] = sigmoid((R0 - R1) / temperature);
    random_prob: chance of answering uniformly at random; equal returns (within
    `tie_margin`) give mu = 0.5.
    """

    def __init__(self, rng: np.random.Generator, temperature: float = 0.0, random_prob: float = 0.0,
                 tie_margin: float = 0.0):
        self.rng = rng
        self.temperature = temperature
        self.random_prob = random_prob
        self.tie_margin = tie_margin
        self._answered: list[tuple[ClipPairs, np.ndarray]] = []

    def preferences(self, ret0: np.ndarray, ret1: np.ndarray) -> np.ndarray:
        diff = np.asarray(ret0, dtype=np.float64) - np.asarray(ret1, dtype=np.float64)
        if self.temperature > 0:
            p0 = 1.0 / (1.0 + np.exp(-np.clip(diff / self.temperature, -50, 50)))
            mu = (self.rng.random(len(diff)) < p0).astype(np.float64)
        else:
            mu = (diff > 0).astype(np.float64)
        mu[np.abs(diff) <= self.tie_margin] = 0.5
        random = self.rng.random(len(diff)) < self.random_prob
        mu[random] = self.rng.integers(2, size=int(random.sum()))
        return mu

    def submit(self, pairs: ClipPairs) -> None:
        if len(pairs):
            self._answered.append((pairs, self.preferences(pairs.ret0, pairs.ret1)))

    def collect(self) -> list[tuple[ClipPairs, np.ndarray]]:
        out, self._answered = self._answered, []
        return out

    @property
    def pending(self) -> int:
        return 0

    def state(self) -> dict:  # answers are immediate and the rng is the loop's, checkpointed there
        return {}

    def load_state(self, state: dict) -> int:
        return 0


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 20) -> None:
    """(T, H, W, 3) uint8 frames to a looping animated GIF."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.gif")  # rename when done: the app never serves half a GIF
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    tmp.replace(path)


def open_store(db: str):
    """The feedback app's store; imported here so the synthetic path never needs the app."""
    try:
        from heed.feedback.store import Store
    except ImportError as e:
        raise HeedError(f"--labeler human needs the feedback app (pip install 'heed[app]'): {e}") from None
    return Store(db)


CHOICE_MU = {"0": 1.0, "1": 0.0, "tie": 0.5, "both_bad": 0.5}


class HumanLabeler:
    """Queries become pairs of animated GIFs in the feedback app; answers are polled, never awaited."""

    def __init__(self, store, clip_dir: str | Path, *, task: str = "", fps: int = 20, run_id: str | None = None):
        self.store = store
        self.clip_dir = Path(clip_dir)
        self.clip_dir.mkdir(parents=True, exist_ok=True)
        self.task = task
        self.fps = fps
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self._n = 0
        self._pending: dict[str, ClipPairs] = {}  # item id -> a one-pair ClipPairs
        self.skipped = 0

    def submit(self, pairs: ClipPairs) -> None:
        if not len(pairs):
            return
        if pairs.frames0 is None or pairs.frames1 is None:
            raise HeedError("human labelling needs rendered clips; "
                            "the environment must support render_mode='rgb_array'")
        items = []
        for i in range(len(pairs)):
            item_id = f"control-{self.run_id}-{self._n:06d}"
            self._n += 1
            paths = []
            for side, frames in ((0, pairs.frames0[i]), (1, pairs.frames1[i])):
                path = (self.clip_dir / f"{item_id}-{side}.gif").resolve()
                write_gif(frames, path, self.fps)
                paths.append(str(path))
            prompt = "Which clip shows the better behaviour?" + (f" Goal: {self.task}" if self.task else "")
            items.append({"id": item_id, "prompt": prompt, "kind": "pair",
                          "responses": [{"media": paths[0]}, {"media": paths[1]}],
                          "meta": {"source": "heed control", "run": self.run_id}})
            self._pending[item_id] = pairs.take([i])
            # the clip arrays on disk too: a run killed before its next checkpoint still gets these answers
            one = self._pending[item_id]
            np.savez(self.clip_dir / f"{item_id}.npz", obs0=one.obs0, act0=one.act0, obs1=one.obs1, act1=one.act1,
                     ret0=one.ret0, ret1=one.ret1)
        self.store.add_items(items)

    def collect(self) -> list[tuple[ClipPairs, np.ndarray]]:
        if not self._pending:
            return []
        by_item: dict[str, list[str]] = {}
        for ans in self.store.answers(list(self._pending)):
            if ans.get("item_id") in self._pending:
                by_item.setdefault(ans["item_id"], []).append(str(ans.get("choice")))
        out = []
        for item_id, choices in by_item.items():
            pair = self._pending.pop(item_id)
            mus = [CHOICE_MU[c] for c in choices if c in CHOICE_MU]
            if not mus:  # only skips: the paper drops incomparable pairs
                self.skipped += 1
                continue
            out.append((pair, np.asarray([float(np.mean(mus))])))
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    def state(self) -> dict:
        """What a resumed run needs to match answers that arrive later to their clips."""
        pending = {k: dataclasses.replace(v, frames0=None, frames1=None) for k, v in self._pending.items()}
        return {"run_id": self.run_id, "n": self._n, "skipped": self.skipped, "pending": pending}

    def load_state(self, state: dict) -> int:
        """Restore; returns how many items were asked after the checkpoint (recovered from disk)."""
        self.run_id, self._n, self.skipped = state["run_id"], state["n"], state["skipped"]
        self._pending = dict(state["pending"])
        recovered = 0
        while (path := self.clip_dir / f"control-{self.run_id}-{self._n:06d}.npz").exists():
            with np.load(path) as z:
                self._pending[path.stem] = ClipPairs(z["obs0"], z["act0"], z["obs1"], z["act1"], z["ret0"], z["ret1"])
            self._n += 1
            recovered += 1
        return recovered
