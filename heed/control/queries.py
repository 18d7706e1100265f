"""Which clips to ask about, and when.

Christiano et al. (2017) §2.2.4: sample many candidate pairs of clips, predict the
preference with every ensemble member, and ask about the pairs whose predictions vary
most across the ensemble. Their schedule (App. A.1): 25% of the labels from the
initial random policy before RL starts, then a rate that decays as 1/(T + τ).

Departures from the paper:
- τ is a fraction of this run's RL steps (`decay`), not the paper's fixed 2·10^6, so the
  same schedule shape fits a 15k-step Pendulum run and a 100k-step HalfCheetah run;
  the schedule is scaled to spend exactly the budget by the last step.
- Clips are drawn from the most recent episodes (a pool of `pool_episodes`), uniformly
  over episodes and start times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from heed.control.envs import Episode
from heed.control.reward_model import RewardEnsemble, preference_probs


def labels_due(step: int, total_steps: int, budget: int, initial_fraction: float = 0.25,
               decay: float = 0.25) -> int:
    """Labels to have asked for by RL step `step` (0 = before RL starts).

    `initial_fraction`·budget at step 0; the rest arrives at a rate ∝ 1/(t + τ),
    τ = decay·total_steps, so the cumulative count is ∝ log(1 + t/τ).
    """
    initial = int(round(initial_fraction * budget))
    if step <= 0 or total_steps <= 0:
        return initial
    tau = max(decay * total_steps, 1e-9)
    frac = math.log1p(min(step, total_steps) / tau) / math.log1p(total_steps / tau)
    return initial + int(math.floor((budget - initial) * frac + 1e-9))


@dataclass
class ClipPairs:
    """N candidate pairs of clips of length L, with what the oracle and the people need."""

    obs0: np.ndarray  # (N, L, D)
    act0: np.ndarray  # (N, L, A)
    obs1: np.ndarray
    act1: np.ndarray
    ret0: np.ndarray  # (N,) true returns, for the synthetic oracle and the metrics only
    ret1: np.ndarray
    frames0: list | None = None  # N arrays (L, H, W, 3), when the episodes were rendered
    frames1: list | None = None

    def __len__(self) -> int:
        return len(self.ret0)

    def take(self, idx) -> "ClipPairs":
        idx = np.asarray(idx, dtype=int)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        return ClipPairs(self.obs0[idx], self.act0[idx], self.obs1[idx], self.act1[idx], self.ret0[idx],
                         self.ret1[idx], pick(self.frames0), pick(self.frames1))


def sample_clips(episodes: list[Episode], n: int, length: int, rng: np.random.Generator):
    """n clips: an episode uniformly, then a start uniformly. -> obs (n,L,D), act (n,L,A), ret (n,), frames."""
    eps = [ep for ep in episodes if len(ep.true_rewards) >= length]
    if not eps:
        raise ValueError(f"no recorded episode is {length} steps long")
    which = rng.integers(len(eps), size=n)
    obs, act, ret, frames = [], [], [], []
    for k in which:
        ep = eps[k]
        s = int(rng.integers(len(ep.true_rewards) - length + 1))
        obs.append(ep.obs[s:s + length]); act.append(ep.actions[s:s + length])
        ret.append(ep.true_rewards[s:s + length].sum())
        frames.append(None if ep.frames is None else ep.frames[s:s + length])
    has_frames = all(f is not None for f in frames)
    return np.stack(obs), np.stack(act), np.asarray(ret), (frames if has_frames else None)


def sample_pairs(episodes: list[Episode], n: int, length: int, rng: np.random.Generator) -> ClipPairs:
    o0, a0, r0, f0 = sample_clips(episodes, n, length, rng)
    o1, a1, r1, f1 = sample_clips(episodes, n, length, rng)
    return ClipPairs(o0, a0, o1, a1, r0, r1, f0, f1)


@torch.no_grad()
def member_preferences(model: RewardEnsemble, pairs: ClipPairs) -> np.ndarray:
    """P̂_m[σ0 ≻ σ1] for every member m and pair: (M, N)."""
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)
    ret0 = model.raw(t(pairs.obs0), t(pairs.act0)).sum(-1)  # (M, N)
    ret1 = model.raw(t(pairs.obs1), t(pairs.act1)).sum(-1)
    return preference_probs(ret0, ret1).numpy()


def select_queries(variances: np.ndarray | None, k: int, rng: np.random.Generator,
                   n_candidates: int | None = None) -> np.ndarray:
    """Indices of the k pairs to ask: the k highest variances, or k at random when `variances` is None."""
    n = len(variances) if variances is not None else int(n_candidates)
    k = min(k, n)
    if variances is None:
        return rng.choice(n, size=k, replace=False)
    return np.argsort(-variances, kind="stable")[:k]
