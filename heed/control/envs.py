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

import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper

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


class PreferenceVecEnv(VecEnvWrapper):
    """`n` copies of the environment stepped together; records every episode of every copy and,
    when `reward_fn` is set, replaces the reward by the learned one, computed for all copies in
    one call.

    The true reward stays in `info["true_reward"]` and in the recorded episodes (for the
    synthetic oracle and the metrics); the agent sees only `reward_fn(obs, action)`.
    `steps` counts environment steps over all copies, as Stable-Baselines3's `num_timesteps`
    does, and each episode's `end_step` is on that count.
    """

    def __init__(self, venv: VecEnv, reward_fn: RewardFn | None = None, *, record_frames: bool = False,
                 frame_width: int = 160, keep_episodes: int = 200, keep_frames: int = 20):
        super().__init__(venv)
        self.reward_fn = reward_fn
        self.record_frames = record_frames
        self.frame_width = frame_width
        self.keep_frames = keep_frames
        self.episodes: deque[Episode] = deque(maxlen=keep_episodes)
        self.steps = 0
        self.episodes_done = 0
        self._obs: np.ndarray | None = None
        self._actions: np.ndarray | None = None
        self._frames: list | None = None
        self._cur = [self._empty() for _ in range(self.num_envs)]

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"obs": [], "actions": [], "true_rewards": [], "frames": []}

    def _render(self) -> list[np.ndarray]:
        from PIL import Image

        try:
            frames = self.venv.env_method("render")
        except HeedError:
            raise
        except Exception as e:  # MuJoCo without an OpenGL context, a renderer missing its library
            raise HeedError(f"cannot render the environment for people to judge ({type(e).__name__}: {e}). "
                            "MuJoCo renders offscreen through EGL or OSMesa: set MUJOCO_GL=egl (or osmesa) and "
                            "install libEGL (or libOSMesa); classic-control environments need pygame") from None
        out = []
        for frame in frames:
            if frame is None:
                raise HeedError("the environment returned no frame; make it with render_mode='rgb_array'")
            img = Image.fromarray(np.asarray(frame, dtype=np.uint8))
            if img.width > self.frame_width:
                img = img.resize((self.frame_width, round(img.height * self.frame_width / img.width)))
            out.append(np.asarray(img))
        return out

    def reset(self):
        obs = self.venv.reset()
        self._obs = np.asarray(obs, dtype=np.float32).reshape(self.num_envs, -1)
        self._cur = [self._empty() for _ in range(self.num_envs)]
        if self.record_frames:
            self._frames = self._render()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)
        self.venv.step_async(actions)

    def step_wait(self):
        obs_before, acts = self._obs, self._actions
        obs, rewards, dones, infos = self.venv.step_wait()
        self.steps += self.num_envs
        frames_after = self._render() if self.record_frames else None
        for i, cur in enumerate(self._cur):
            cur["obs"].append(obs_before[i])
            cur["actions"].append(acts[i])
            cur["true_rewards"].append(float(rewards[i]))
            infos[i] = dict(infos[i], true_reward=float(rewards[i]))
            if self.record_frames:
                cur["frames"].append(self._frames[i])
        if self.reward_fn is not None:
            rewards = np.asarray(self.reward_fn(obs_before, acts), dtype=np.float32).reshape(self.num_envs)
        for i in np.flatnonzero(dones):
            self._finish_episode(i)
        self._obs = np.asarray(obs, dtype=np.float32).reshape(self.num_envs, -1)  # after a done: the reset obs
        self._frames = frames_after  # after a done, the frame of the new episode's first state
        return obs, rewards, dones, infos

    def _finish_episode(self, i: int) -> None:
        c = self._cur[i]
        if c["obs"]:
            self.episodes.append(Episode(
                obs=np.stack(c["obs"]), actions=np.stack(c["actions"]),
                true_rewards=np.asarray(c["true_rewards"], dtype=np.float64),
                frames=np.stack(c["frames"]) if c["frames"] else None, end_step=self.steps))
            self.episodes_done += 1
            # frames are large: keep them only for the most recent episodes (the query pool)
            for ep in list(self.episodes)[:-self.keep_frames]:
                ep.frames = None
        self._cur[i] = self._empty()

    def recent(self, n: int) -> list[Episode]:
        return list(self.episodes)[-n:] if n > 0 else []

    def since(self, step: int) -> list[Episode]:
        return [ep for ep in self.episodes if ep.end_step > step]


def preference_env(env_id: str, horizon: int, n_envs: int = 1, *, render: bool = False,
                   keep_frames: int = 20) -> PreferenceVecEnv:
    """`n_envs` fixed-horizon copies of `env_id` in one process (SB3's DummyVecEnv), recorded."""
    venv = DummyVecEnv([lambda: make_env(env_id, horizon, render=render)] * n_envs)
    return PreferenceVecEnv(venv, record_frames=render, keep_frames=keep_frames)


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
    if render and "mujoco" not in sys.modules and "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"  # no display: MuJoCo's offscreen renderer (its default, GLFW, needs one)
    try:
        size = {}
        if render and "mujoco" in str(gym.spec(env_id).entry_point):
            size = {"width": 160, "height": 160}  # the clips' size: no 480x480 frame rendered to be shrunk
        env = gym.make(env_id, max_episode_steps=horizon, render_mode="rgb_array" if render else None, **size)
    except gym.error.Error as e:
        raise HeedError(f"cannot make environment {env_id!r}: {e}") from None
    except ImportError as e:
        raise HeedError(f"environment {env_id!r} needs a package that is not installed: {e}") from None
    check_spaces(env)
    return FixedHorizon(env, horizon)


def evaluate(policy: Callable[[np.ndarray], np.ndarray] | None, env_id: str, horizon: int,
             seeds: list[int]) -> list[float]:
    """True returns of `policy` (None: uniform random actions) on the fixed-horizon env, one per seed.

    The episodes run side by side, one environment per seed, so the policy is asked once per
    step for all of them: `policy` maps a batch of observations (N, D) to a batch of actions."""
    envs = [make_env(env_id, horizon) for _ in seeds]
    obs = []
    for env, seed in zip(envs, seeds):
        obs.append(env.reset(seed=seed)[0])
        env.action_space.seed(seed)
    totals = np.zeros(len(seeds))
    running = np.ones(len(seeds), dtype=bool)
    while running.any():
        live = np.flatnonzero(running)
        actions = ([envs[i].action_space.sample() for i in live] if policy is None
                   else policy(np.stack([obs[i] for i in live])))
        for i, action in zip(live, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            totals[i] += reward
            running[i] = not (terminated or truncated)
    for env in envs:
        env.close()
    return [float(t) for t in totals]
