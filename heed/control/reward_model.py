"""The reward model: an ensemble of small MLPs on (observation, action), fitted to clip comparisons.

Christiano et al. (2017) §2.2.3, followed here: the probability that a labeler prefers
clip σ0 is a Bradley-Terry model over the clips' summed predicted rewards (Eq. 1); the
model assumes a 10% chance that the labeler answered uniformly at random; an ensemble of
predictors, each trained on a bootstrap resample of the comparisons, each normalised to
zero mean and unit standard deviation, their normalised outputs averaged; 1/e of the data
held out, and the L2 coefficient adjusted to keep validation loss between 1.1 and 1.5
times training loss.

Departures from the paper:
- The bootstrap is online: each comparison gets a Poisson(1) count per member when it
  arrives (the limit of resampling with replacement), and a fixed held-out flag, so a
  held-out comparison is never trained on in a later round.
- Inputs are standardised with the mean and std of the first (random-policy) data; the
  paper does not say how it scaled inputs.
- No dropout or batch norm (the paper used them on Atari only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def preference_loss(returns_0: torch.Tensor, returns_1: torch.Tensor, mu: torch.Tensor,
                    random_prob: float = 0.1, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of clip preferences under Bradley-Terry on clip sums.

    Christiano et al. 2017, Eq. 1: P̂[σ0 ≻ σ1] = exp Σ r̂(σ0) / (exp Σ r̂(σ0) + exp Σ r̂(σ1)),
    mixed with a `random_prob` chance of a uniform answer (§2.2.3: "a 10% chance that the
    human responds uniformly at random"): P = (1 - ε)·P̂ + ε/2. Loss (Eq. 2):
    -Σ μ(0) log P[σ0 ≻ σ1] + μ(1) log P[σ1 ≻ σ0], with μ(0) = `mu` (1: σ0 preferred,
    0: σ1 preferred, 0.5: equal). returns_*: (B,) summed predicted rewards of each clip.
    `weights` (B,) are bootstrap counts; the result is the weighted mean.
    """
    p0 = (1 - random_prob) * torch.sigmoid(returns_0 - returns_1) + random_prob / 2
    p1 = (1 - random_prob) * torch.sigmoid(returns_1 - returns_0) + random_prob / 2
    nll = -(mu * torch.log(p0) + (1 - mu) * torch.log(p1))  # (B,)
    if weights is None:
        return nll.mean()
    return (nll * weights).sum() / weights.sum().clamp_min(1e-8)


def preference_probs(returns_0: torch.Tensor, returns_1: torch.Tensor) -> torch.Tensor:
    """P̂[σ0 ≻ σ1] of Eq. 1 (no random-answer mixing), elementwise."""
    return torch.sigmoid(returns_0 - returns_1)


def mlp(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.LeakyReLU(0.01)]
        d = hidden
    mods.append(nn.Linear(d, 1))
    return nn.Sequential(*mods)


class RewardEnsemble(nn.Module):
    """M MLPs r̂_m(o, a); `forward` gives the mean of the members' normalised outputs."""

    def __init__(self, obs_dim: int, action_space: gym.Space, members: int = 3, hidden: int = 64,
                 layers: int = 2):
        super().__init__()
        self.obs_dim, self.hidden, self.layers = obs_dim, hidden, layers
        if isinstance(action_space, gym.spaces.Discrete):
            self.n_actions, act_dim = int(action_space.n), int(action_space.n)
            low = high = np.zeros(0)
        else:
            self.n_actions, act_dim = 0, int(np.prod(action_space.shape))
            low, high = action_space.low.reshape(-1), action_space.high.reshape(-1)
        self.act_dim = act_dim
        bounded = np.isfinite(low) & np.isfinite(high)
        # Box actions are scaled to [-1, 1] where the space is bounded
        self.register_buffer("act_low", torch.as_tensor(np.where(bounded, low, -1.0), dtype=torch.float32))
        self.register_buffer("act_high", torch.as_tensor(np.where(bounded, high, 1.0), dtype=torch.float32))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("out_mean", torch.zeros(members))
        self.register_buffer("out_std", torch.ones(members))
        self.members = nn.ModuleList(mlp(obs_dim + act_dim, hidden, layers) for _ in range(members))

    @property
    def size(self) -> int:
        return len(self.members)

    def features(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(..., D), (..., A or 1) -> (..., D + A): standardised observation, scaled/one-hot action."""
        x = (obs - self.obs_mean) / self.obs_std
        if self.n_actions:
            a = torch.nn.functional.one_hot(actions[..., 0].long(), self.n_actions).float()
        else:
            a = 2 * (actions - self.act_low) / (self.act_high - self.act_low) - 1
        return torch.cat([x.clamp(-10, 10), a], dim=-1)

    def raw(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Unnormalised per-step rewards of every member: (M, ...)."""
        x = self.features(obs, actions)
        return torch.stack([m(x).squeeze(-1) for m in self.members])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The reward the agent trains on: mean over members of (r̂_m - mean_m) / std_m. (...)."""
        r = self.raw(obs, actions)
        shape = (-1,) + (1,) * (r.dim() - 1)
        return ((r - self.out_mean.view(shape)) / self.out_std.view(shape)).mean(0)

    @torch.no_grad()
    def reward(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """numpy in, numpy out, in chunks: for the env wrapper and for relabelling replay buffers."""
        out = []
        for i in range(0, len(obs), 65536):
            out.append(self(torch.as_tensor(obs[i:i + 65536], dtype=torch.float32),
                            torch.as_tensor(actions[i:i + 65536], dtype=torch.float32)).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    @torch.no_grad()
    def set_input_stats(self, obs: np.ndarray) -> None:
        self.obs_mean.copy_(torch.as_tensor(obs.mean(0), dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(obs.std(0), dtype=torch.float32).clamp_min(1e-3))

    @torch.no_grad()
    def normalize(self, obs: np.ndarray, actions: np.ndarray) -> None:
        """Each member to zero mean, unit std on these (recent) steps (paper §2.2.3)."""
        r = self.raw(torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(actions, dtype=torch.float32))
        self.out_mean.copy_(r.mean(1))
        self.out_std.copy_(r.std(1).clamp_min(1e-6))

    def save(self, path) -> None:
        torch.save({"obs_dim": self.obs_dim, "hidden": self.hidden, "layers": self.layers,
                    "members": self.size, "n_actions": self.n_actions, "act_dim": self.act_dim,
                    "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path) -> "RewardEnsemble":
        ck = torch.load(path, map_location="cpu", weights_only=False)
        space = (gym.spaces.Discrete(ck["n_actions"]) if ck["n_actions"]
                 else gym.spaces.Box(-1.0, 1.0, (ck["act_dim"],), dtype=np.float32))
        model = cls(ck["obs_dim"], space, ck["members"], ck["hidden"], ck["layers"])
        model.load_state_dict(ck["state_dict"])
        return model


@dataclass
class Comparisons:
    """Labelled clip pairs, growing as answers arrive. Clips all have the same length L."""

    obs0: list[np.ndarray] = field(default_factory=list)  # each (L, D)
    act0: list[np.ndarray] = field(default_factory=list)  # each (L, A)
    obs1: list[np.ndarray] = field(default_factory=list)
    act1: list[np.ndarray] = field(default_factory=list)
    mu: list[float] = field(default_factory=list)  # 1: clip 0 preferred, 0: clip 1, 0.5: equal
    held_out: list[bool] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)  # (M,) bootstrap counts per member
    _stacked: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.mu)

    def add(self, obs0, act0, obs1, act1, mu: float, rng: np.random.Generator, members: int,
            val_fraction: float) -> None:
        self.obs0.append(obs0); self.act0.append(act0)
        self.obs1.append(obs1); self.act1.append(act1)
        self.mu.append(float(mu))
        self.held_out.append(bool(rng.random() < val_fraction))
        self.counts.append(rng.poisson(1.0, size=members).astype(np.float32))

    def tensors(self, idx: np.ndarray):
        """(obs0, act0, obs1, act1, mu) of the comparisons `idx`, as float32 tensors."""
        if self._stacked is None or len(self._stacked[-1]) != len(self):  # restack only after adds
            self._stacked = tuple(torch.as_tensor(np.stack(xs), dtype=torch.float32)
                                  for xs in (self.obs0, self.act0, self.obs1, self.act1, self.mu))
        idx = torch.as_tensor(idx, dtype=torch.long)
        return tuple(x[idx] for x in self._stacked)

    def __getstate__(self) -> dict:  # pickled in checkpoints: the tensor cache is rebuilt on demand
        return {**self.__dict__, "_stacked": None}

    def save(self, path) -> None:
        np.savez_compressed(path, obs0=np.stack(self.obs0), act0=np.stack(self.act0), obs1=np.stack(self.obs1),
                            act1=np.stack(self.act1), mu=np.asarray(self.mu), held_out=np.asarray(self.held_out),
                            counts=np.stack(self.counts))


class EnsembleTrainer:
    """Fits each member on its bootstrap counts with an adaptive L2 coefficient."""

    def __init__(self, model: RewardEnsemble, *, lr: float = 1e-3, batch_size: int = 64, l2: float = 1e-3,
                 random_prob: float = 0.1, val_band: tuple[float, float] = (1.1, 1.5), seed: int = 0):
        self.model = model
        self.batch_size = batch_size
        self.random_prob = random_prob
        self.val_band = val_band
        self.l2 = [l2] * model.size
        self.opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in model.members]
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict:
        return {"l2": list(self.l2), "opts": [o.state_dict() for o in self.opts], "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.l2 = list(state["l2"])
        for opt, sd in zip(self.opts, state["opts"]):
            opt.load_state_dict(sd)
        self.rng.bit_generator.state = state["rng"]

    def _member_loss(self, m: int, obs0, act0, obs1, act1, mu, weights=None) -> torch.Tensor:
        x0, x1 = self.model.features(obs0, act0), self.model.features(obs1, act1)
        net = self.model.members[m]
        ret0, ret1 = net(x0).squeeze(-1).sum(-1), net(x1).squeeze(-1).sum(-1)  # (B,) clip sums
        return preference_loss(ret0, ret1, mu, self.random_prob, weights)

    def fit(self, data: Comparisons, steps: int) -> dict:
        """`steps` Adam steps per member; then the L2 coefficient moves to keep val/train in the band."""
        held_out = np.asarray(data.held_out)
        counts = np.stack(data.counts)  # (N, M)
        val_idx = np.flatnonzero(held_out)
        stats: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": []}
        for m, net in enumerate(self.model.members):
            train_idx = np.flatnonzero(~held_out & (counts[:, m] > 0))
            if len(train_idx) == 0:
                continue
            p = counts[train_idx, m] / counts[train_idx, m].sum()
            net.train()
            for _ in range(steps):
                batch = self.rng.choice(train_idx, size=min(self.batch_size, len(train_idx)), p=p)
                loss = self._member_loss(m, *data.tensors(batch))
                l2 = sum((w ** 2).sum() for name, w in net.named_parameters() if name.endswith("weight"))
                self.opts[m].zero_grad()
                (loss + self.l2[m] * l2).backward()
                self.opts[m].step()
            net.eval()
            with torch.no_grad():
                train_loss = float(self._member_loss(m, *data.tensors(train_idx),
                                                     weights=torch.as_tensor(counts[train_idx, m])))
                stats["train_loss"].append(train_loss)
                if len(val_idx):
                    obs0, act0, obs1, act1, mu = data.tensors(val_idx)
                    val_loss = float(self._member_loss(m, obs0, act0, obs1, act1, mu))
                    x0, x1 = self.model.features(obs0, act0), self.model.features(obs1, act1)
                    diff = net(x0).squeeze(-1).sum(-1) - net(x1).squeeze(-1).sum(-1)
                    decided = mu != 0.5
                    if decided.any():
                        stats["val_acc"].append(float(((diff > 0) == (mu > 0.5))[decided].float().mean()))
                    stats["val_loss"].append(val_loss)
                    # paper §2.2.3: keep validation loss between 1.1 and 1.5 times training loss
                    if val_loss > self.val_band[1] * train_loss:
                        self.l2[m] = min(self.l2[m] * 2, 10.0)
                    elif val_loss < self.val_band[0] * train_loss:
                        self.l2[m] = max(self.l2[m] / 2, 1e-6)
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        out["l2"] = float(math.exp(np.mean(np.log(self.l2))))
        return out
