"""Environments for preference-based RL: fixed horizons, recorded episodes, the learned reward.

Departures from Christiano et al. (2017):
- The paper removed termination per environment (Atari: no life loss; MuJoCo: a penalty
  for leaving the healthy range) because an episode that ends early leaks reward
  information through its length. Here every environment gets the same treatment: a
  terminated episode becomes an absorbing state (the last observation repeated, true
  reward 0) until a fixed horizon, so every episode has the same length and the reward
  model alone must say what the absorbing state is worth.
- Clips hold (observation, action) steps exactly as the policy met them; frames for
  people are recorded only when a human labeler asks for them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np

from heed.utils import HeedError

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (obs (N, D), actions (N, A)) -> (N,)


@dataclass
class Episode:
    obs: np.ndarray  # (T, D) observation before each action
    actions: np.ndarray  # (T, A) actions as the environment received them (Discrete: (T, 1))
    true_rewards: np.ndarray  # (T,) the environment's reward, never shown to the learner
    frames: np.ndarray | None  # (T, H, W, 3) uint8, the state before each action; None unless rendering
    end_step: int  # env steps taken (by this recorder) when the episode ended

    @property
    def true_return(self) -> float:
        return float(self.true_rewards.sum())


class FixedHorizon(gym.Wrapper):
    """Every episode lasts exactly `horizon` steps; termination becomes an absorbing state."""

    def __init__(self, env: gym.Env, horizon: int):
        super().__init__(env)
        self.horizon = horizon
        self._t = 0
        self._absorbed = False
        self._last_obs = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._t, self._absorbed, self._last_obs = 0, False, obs
        return obs, info

    def step(self, action):
        self._t += 1
        if self._absorbed:
            obs, reward, info = self._last_obs, 0.0, {"absorbed": True}
        else:
            obs, reward, terminated, truncated, info = self.env.step(action)
            # the inner time limit equals the horizon; an earlier truncation is absorbed too
            self._absorbed = bool(terminated or truncated)
            self._last_obs = obs
        return obs, float(reward), False, self._t >= self.horizon, info


class PreferenceEnv(gym.Wrapper):
    """Records every episode and, when `reward_fn` is set, replaces the reward by the learned one.

    The true reward stays in `info["true_reward"]` and in the recorded episodes (for the
    synthetic oracle and the metrics); the agent sees only `reward_fn(obs, action)`.
    """

    def __init__(self, env: gym.Env, reward_fn: RewardFn | None = None, *, record_frames: bool = False,
                 frame_width: int = 160, keep_episodes: int = 200, keep_frames: int = 20):
        super().__init__(env)
        self.reward_fn = reward_fn
        self.record_frames = record_frames
        self.frame_width = frame_width
        self.keep_frames = keep_frames
        self.episodes: deque[Episode] = deque(maxlen=keep_episodes)
        self.steps = 0
        self.episodes_done = 0
        self._obs = None
        self._frame = None
        self._cur: dict[str, list] = {}

    def _render(self) -> np.ndarray:
        frame = self.env.render()
        if frame is None:
            raise HeedError("the environment returned no frame; make it with render_mode='rgb_array'")
        from PIL import Image

        img = Image.fromarray(np.asarray(frame, dtype=np.uint8))
        if img.width > self.frame_width:
            img = img.resize((self.frame_width, round(img.height * self.frame_width / img.width)))
        return np.asarray(img)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._obs = np.asarray(obs, dtype=np.float32)
        self._cur = {"obs": [], "actions": [], "true_rewards": [], "frames": []}
        if self.record_frames:
            self._frame = self._render()
        return obs, info

    def step(self, action):
        obs_before = self._obs
        act = np.asarray(action, dtype=np.float32).reshape(-1)
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self._cur["obs"].append(obs_before)
        self._cur["actions"].append(act)
        self._cur["true_rewards"].append(float(reward))
        if self.record_frames:
            self._cur["frames"].append(self._frame)
            self._frame = self._render()
        info = dict(info, true_reward=float(reward))
        if self.reward_fn is not None:
            reward = float(self.reward_fn(obs_before[None], act[None])[0])
        self._obs = np.asarray(obs, dtype=np.float32)
        if terminated or truncated:
            self._finish_episode()
        return obs, reward, terminated, truncated, info

    def _finish_episode(self) -> None:
        c = self._cur
        if not c.get("obs"):
            return
        self.episodes.append(Episode(
            obs=np.stack(c["obs"]), actions=np.stack(c["actions"]),
            true_rewards=np.asarray(c["true_rewards"], dtype=np.float64),
            frames=np.stack(c["frames"]) if c["frames"] else None, end_step=self.steps))
        self.episodes_done += 1
        # frames are large: keep them only for the most recent episodes (the query pool)
        for ep in list(self.episodes)[:-self.keep_frames]:
            ep.frames = None
        self._cur = {"obs": [], "actions": [], "true_rewards": [], "frames": []}

    def recent(self, n: int) -> list[Episode]:
        return list(self.episodes)[-n:] if n > 0 else []

    def since(self, step: int) -> list[Episode]:
        return [ep for ep in self.episodes if ep.end_step > step]


def check_spaces(env: gym.Env) -> None:
    """Vector observations and Box or Discrete actions: what the reward model takes."""
    obs_space, act_space = env.observation_space, env.action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise HeedError(f"heed control needs vector observations (a 1-D Box); got {obs_space}")
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise HeedError(f"heed control needs Box or Discrete actions; got {act_space}")


def default_horizon(env_id: str) -> int:
    spec = gym.spec(env_id)
    if not spec.max_episode_steps:
        raise HeedError(f"{env_id} has no time limit; pass --horizon")
    return int(spec.max_episode_steps)


def make_env(env_id: str, horizon: int, *, render: bool = False) -> gym.Env:
    """gym.make with the time limit at `horizon`, then the fixed-horizon wrapper."""
    try:
        env = gym.make(env_id, max_episode_steps=horizon, render_mode="rgb_array" if render else None)
    except gym.error.Error as e:
        raise HeedError(f"cannot make environment {env_id!r}: {e}") from None
    except ImportError as e:
        raise HeedError(f"environment {env_id!r} needs a package that is not installed: {e}") from None
    check_spaces(env)
    return FixedHorizon(env, horizon)


def evaluate(policy: Callable[[np.ndarray], np.ndarray] | None, env_id: str, horizon: int,
             seeds: list[int]) -> list[float]:
    """True returns of `policy` (None: uniform random actions) on the fixed-horizon env, one per seed."""
    env = make_env(env_id, horizon)
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        total, done = 0.0, False
        while not done:
            action = env.action_space.sample() if policy is None else policy(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns
