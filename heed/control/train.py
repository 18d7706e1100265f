"""`heed control train`: deep RL from (synthetic or human) preferences, Christiano et al. 2017.

The loop is `AgentRun` (warm-up, resume, one round, the checkpoint); `train` runs it for the
learned-reward agent and the true-reward baseline and writes the report.

The loop, as in the paper's Figure 1, run online:
  1. warm-up: the agent acts at random (SAC/TD3's learning_starts) and every episode is
     recorded; the learned reward is 0 meanwhile, so no true reward leaks in;
  2. initial labels: 25% of the budget on random pairs of clips from the warm-up;
     the ensemble is fitted on them before RL starts;
  3. rounds of `round_steps` env steps, each:
     a. RL on the learned reward (Stable-Baselines3), episodes recorded;
     b. how well the reward model does on the round's fresh clips (correlation with the truth);
     c. ask the labels now due (decaying rate) about the candidate pairs (10x
        oversampled) whose predicted preference varies most across the ensemble;
     d. collect whatever answers have arrived (people answer while RL goes on);
     e. refit the ensemble, renormalise it, relabel the replay buffer;
     f. evaluate on the true return every `eval_every` steps;
  4. the same RL algorithm with the same steps on the true reward (`--baseline`), the
     random policy, and the report.

Departures from the paper:
- The paper's policy optimisers were A2C (Atari) and TRPO (MuJoCo); the default here is
  SAC (`--algo`, also td3, ppo, a2c), which is far more sample-efficient on a CPU budget;
  HalfCheetah defaults to PPO (ENV_DEFAULTS): SAC's gradient step per environment step is
  too slow on 2 CPU cores for the 10^5 steps it needs there.
  Off-policy agents keep old transitions, so after every reward-model update the whole
  replay buffer is relabelled with the new reward (the paper, on-policy, never needed to).
- The paper ran labelling and RL as asynchronous processes; here they alternate every
  `round_steps` env steps in one process, and people's answers are polled each round
  (the loop never waits for them, except for the first `human_wait` answers before RL).
- Warm-up steps count towards `total_timesteps` for both the preference agent and the
  true-reward baseline, so both get exactly the same number of environment steps.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecNormalize

from heed import config as heed_config
from heed.config import option
from heed.control.envs import default_horizon, evaluate, preference_env
from heed.control.labelers import HumanLabeler, SyntheticOracle, open_store
from heed.control.queries import labels_due, member_preferences, sample_clips, sample_pairs, select_queries
from heed.control.reward_model import Comparisons, EnsembleTrainer, RewardEnsemble
from heed.utils import (
    HeedError,
    MetricsLogger,
    atomic_write_text,
    fault_point,
    progress,
    read_metrics,
    seed_everything,
)


@dataclass
class ControlTrainConfig:
    env: str = option(help="Gymnasium environment id with vector observations, e.g. Pendulum-v1; "
                           "HalfCheetah gets its own defaults (see docs/control.md), under YAML and flags")
    out: str = option("runs/control", "output directory: metrics, reward ensemble, policy, report")
    seed: int = option(0, "random seed (environment, agent, reward model, queries)")
    reward: str = option("learned", "train on the learned reward from preferences, or only on the true reward",
                         choices=("learned", "true"))
    baseline: bool = option(True, "also train the same algorithm on the true reward for the same steps, "
                                  "and report the ratio")
    algo: str = option("sac", "Stable-Baselines3 policy optimiser", choices=("sac", "td3", "ppo", "a2c"))
    total_timesteps: int = option(10000, "environment steps for the agent (warm-up included)")
    initial_steps: int = option(1000, "warm-up steps of random actions before RL; the initial labels come from them")
    round_steps: int = option(1000, "environment steps between label / reward-model rounds")
    horizon: int = option(0, "fixed episode length (0: the environment's own time limit)")
    n_envs: int = option(1, "copies of the environment stepped together (vectorised, in one process)")
    normalize: bool = option(False, "the agent sees observations and rewards normalised by running statistics "
                                    "(SB3's VecNormalize); the reward model and the labeler see the raw ones")
    net_arch: list[int] = option([64, 64], "hidden sizes of the policy and value networks")
    rl_lr: float = option(1e-3, "learning rate of the RL algorithm")
    rl_kwargs: str = option("", "more Stable-Baselines3 arguments, a YAML mapping such as '{n_steps: 512, "
                                "gamma: 0.98}'; policy_kwargs may name activation_fn: relu, tanh, elu, leaky_relu")
    labels: int = option(700, "label budget: comparisons asked in the whole run")
    initial_label_fraction: float = option(0.25, "fraction of the budget asked before RL starts (paper: 0.25)")
    label_decay: float = option(0.25, "label rate ∝ 1/(t + τ), τ = this × RL steps; smaller front-loads more")
    offline: bool = option(False, "ask all labels at the start, from the warm-up episodes (paper's ablation)")
    queries: str = option("disagreement", "how to choose queries: highest ensemble variance, or at random",
                          choices=("disagreement", "random"))
    oversample: int = option(10, "candidate pairs per query asked")
    clip_length: int = option(25, "steps per clip")
    pool_episodes: int = option(10, "queries are drawn from this many most recent episodes")
    ensemble_size: int = option(3, "reward models in the ensemble")
    no_ensemble: bool = option(False, "one reward model and random queries (paper's 'no ensemble' ablation)")
    rm_hidden: int = option(64, "hidden units per layer of each reward model")
    rm_layers: int = option(2, "hidden layers of each reward model")
    rm_lr: float = option(1e-3, "reward-model learning rate (Adam)")
    rm_batch_size: int = option(64, "comparisons per reward-model batch")
    rm_steps: int = option(200, "reward-model gradient steps per member per round")
    rm_initial_steps: int = option(1000, "reward-model gradient steps per member on the initial labels")
    rm_l2: float = option(1e-3, "initial L2 coefficient (then adapted to keep val/train loss in [1.1, 1.5])")
    random_answer_prob: float = option(0.1, "the reward model assumes this chance of a random answer (paper: 0.1)")
    val_fraction: float = option(0.3679, "fraction of comparisons held out (paper: 1/e)")
    labeler: str = option("oracle", "who answers: the synthetic oracle on the true return, or people",
                          choices=("oracle", "human"))
    oracle_temperature: float = option(0.0, "oracle's Bradley-Terry temperature on return differences (0: exact)")
    oracle_random_prob: float = option(0.0, "chance the oracle answers at random")
    db: str | None = option(None, "feedback app database (path or URL) for --labeler human")
    task: str = option("", "what people are told the agent should do (human labeler)")
    human_wait: int = option(20, "answers to wait for before RL starts (human labeler)")
    poll_seconds: float = option(5.0, "seconds between polls while waiting for the first answers")
    eval_every: int = option(2000, "evaluate on the true return every this many steps")
    eval_episodes: int = option(10, "episodes per evaluation (same seeds for every agent)")
    threads: int = option(1, "torch CPU threads (small networks run fastest on one)")
    resume: bool = option(True, "continue from the checkpoint in --out when there is one (saved every round)")

    @staticmethod
    def defaults_for(given: dict) -> dict:
        """ENV_DEFAULTS for the environment given (heed.config.build puts them under YAML and flags)."""
        env = str(given.get("env") or "")
        return next((dict(d) for prefix, d in ENV_DEFAULTS.items() if env.startswith(prefix)), {})


# Defaults that learn on 2 CPU cores, per environment family (ids starting with the key); a YAML file
# and flags override each one. HalfCheetah: PPO with RL Baselines3 Zoo's published hyperparameters for
# it (normalised observations and rewards, 256x256 ReLU networks, initial action std e^-2). SAC needs
# fewer steps there but runs about 45 steps a second on these cores against PPO's 400 or so.
ENV_DEFAULTS: dict[str, dict] = {
    "HalfCheetah": dict(
        algo="ppo", total_timesteps=200_000, initial_steps=10_000, round_steps=5_000, labels=1400,
        n_envs=4, normalize=True, net_arch=[256, 256], rl_lr=2.0633e-5,
        rl_kwargs="{n_steps: 128, batch_size: 64, gamma: 0.98, gae_lambda: 0.92, n_epochs: 20, clip_range: 0.1, "
                  "ent_coef: 0.000401762, vf_coef: 0.58096, max_grad_norm: 0.8, "
                  "policy_kwargs: {log_std_init: -2, ortho_init: false, activation_fn: relu}}",
        eval_every=50_000),
}


ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "elu": "ELU", "leaky_relu": "LeakyReLU"}


def _rl_kwargs(cfg: ControlTrainConfig) -> dict:
    """--rl-kwargs as keyword arguments for the SB3 algorithm, activation names made torch.nn classes."""
    import yaml

    try:
        extra = yaml.safe_load(cfg.rl_kwargs) if cfg.rl_kwargs.strip() else {}
    except yaml.YAMLError as e:
        raise HeedError(f"--rl-kwargs is not YAML: {e}") from None
    if not isinstance(extra, dict):
        raise HeedError(f"--rl-kwargs must be a mapping such as '{{gamma: 0.98}}', got {cfg.rl_kwargs!r}")
    policy_kwargs = dict(extra.pop("policy_kwargs", None) or {})
    act = policy_kwargs.get("activation_fn")
    if isinstance(act, str):
        if act.lower() not in ACTIVATIONS:
            raise HeedError(f"--rl-kwargs: activation_fn {act!r} is not one of {', '.join(ACTIVATIONS)}")
        policy_kwargs["activation_fn"] = getattr(torch.nn, ACTIVATIONS[act.lower()])
    return {"policy_kwargs": {"net_arch": list(cfg.net_arch), **policy_kwargs}, **extra}


def _check(cfg: ControlTrainConfig) -> None:
    if cfg.total_timesteps <= cfg.initial_steps:
        raise HeedError("--total-timesteps must exceed --initial-steps")
    if min(cfg.round_steps, cfg.clip_length, cfg.oversample, cfg.eval_episodes, cfg.rm_batch_size) < 1:
        raise HeedError("--round-steps, --clip-length, --oversample, --eval-episodes, --rm-batch-size must be >= 1")
    if cfg.labels < 1 and cfg.reward == "learned":
        raise HeedError("--labels must be >= 1")
    if not 0 <= cfg.initial_label_fraction <= 1 or not 0 < cfg.val_fraction < 1:
        raise HeedError("--initial-label-fraction must be in [0, 1] and --val-fraction in (0, 1)")
    if cfg.labeler == "human" and not cfg.db and cfg.reward == "learned":
        raise HeedError("--labeler human needs --db PATH (the feedback app's database)")


def _agent_class(cfg: ControlTrainConfig):
    from stable_baselines3 import A2C, PPO, SAC, TD3

    return {"sac": SAC, "td3": TD3, "ppo": PPO, "a2c": A2C}[cfg.algo]


def _make_agent(cfg: ControlTrainConfig, env, seed: int):
    import gymnasium as gym

    cls = _agent_class(cfg)
    common = dict(learning_rate=cfg.rl_lr, seed=seed, verbose=0, device="cpu", **_rl_kwargs(cfg))
    if cfg.algo in ("sac", "td3"):
        if not isinstance(env.action_space, gym.spaces.Box):
            raise HeedError(f"--algo {cfg.algo} needs continuous actions; use --algo ppo or a2c")
        common = dict(learning_starts=cfg.initial_steps, buffer_size=cfg.total_timesteps, **common)
    try:
        return cls("MlpPolicy", env, **common)
    except TypeError as e:  # an argument the algorithm does not take
        raise HeedError(f"--algo {cfg.algo} with --rl-kwargs {cfg.rl_kwargs!r}: {e}") from None


def _relabel_replay(agent, ensemble: RewardEnsemble) -> None:
    """Off-policy agents: recompute every stored transition's reward with the current model."""
    buf = getattr(agent, "replay_buffer", None)
    if buf is None:
        return
    n = buf.buffer_size if buf.full else buf.pos
    if n == 0:
        return
    obs = buf.observations[:n].reshape(n * buf.n_envs, -1)  # (steps, envs, D): raw, even under VecNormalize
    actions = agent.policy.unscale_action(buf.actions[:n].reshape(n * buf.n_envs, -1))  # stored scaled to [-1, 1]
    buf.rewards[:n] = ensemble.reward(obs, actions).reshape(n, buf.n_envs)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class Checkpoint:
    """Everything a round leaves besides the agent and its replay buffer: enough to go on
    exactly where it stopped (`checkpoint_RUN/state.pkl`, next to `agent.zip`)."""

    start: int                 # environment steps when RL began (after the warm-up)
    asked: int                 # labels asked so far
    evals: list                # the evaluation curve so far
    last_eval: int             # step // eval_every of the last evaluation
    episodes: list             # recorded episodes, frames dropped
    env_steps: int
    episodes_done: int
    rng: dict                  # numpy bit-generator state
    torch_rng: torch.Tensor
    wall_s: float
    cpu_s: float
    ensemble: dict | None = None          # the learned-reward run only: the reward model,
    trainer: dict | None = None           # its trainer, the comparisons, the labeler
    comparisons: Comparisons | None = None
    labeler: dict | None = None

    def save(self, ckpt_dir: Path, agent) -> None:
        """Write into a fresh folder, then swap it in, so a kill mid-write keeps the previous one."""
        tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        agent.save(str(tmp / "agent.zip"))
        if getattr(agent, "replay_buffer", None) is not None:
            agent.save_replay_buffer(str(tmp / "replay_buffer.pkl"))
        if agent.get_vec_normalize_env() is not None:  # the running statistics the policy was trained under
            agent.get_vec_normalize_env().save(str(tmp / "vec_normalize.pkl"))
        with open(tmp / "state.pkl", "wb") as f:
            pickle.dump({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, f)
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if ckpt_dir.exists():
            ckpt_dir.rename(old)
        fault_point("checkpoint-swap")
        tmp.rename(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, ckpt_dir: Path) -> "Checkpoint | None":
        for d in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".old")):  # .old: killed during the swap
            if (d / "state.pkl").exists():
                if d != ckpt_dir:
                    d.rename(ckpt_dir)
                with open(ckpt_dir / "state.pkl", "rb") as f:
                    return cls(**pickle.load(f))
        return None


class AgentRun:
    """One agent, start to finish: on the learned reward (the paper's loop) or on the true one.

    `warm_up()` (or `resume(checkpoint)`), then `round()` until the step budget is spent,
    then `finish()`; `run_agent` strings them together."""

    def __init__(self, cfg: ControlTrainConfig, learned: bool, out: Path, logger: MetricsLogger):
        from stable_baselines3.common.logger import Logger

        self.cfg, self.learned, self.out, self.logger = cfg, learned, out, logger
        self.run = "learned" if learned else "true"
        seed_everything(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.horizon = cfg.horizon or default_horizon(cfg.env)
        if cfg.clip_length > self.horizon:
            raise HeedError(f"--clip-length {cfg.clip_length} is longer than the horizon {self.horizon}")
        self.human = learned and cfg.labeler == "human"
        self.env = preference_env(cfg.env, self.horizon, cfg.n_envs, render=self.human, keep_frames=cfg.pool_episodes)
        self.env.action_space.seed(cfg.seed)
        # what the agent steps: the recorder, or the recorder seen through running normalisation
        self.agent_env = VecNormalize(self.env, gamma=_rl_kwargs(cfg).get("gamma", 0.99)) if cfg.normalize \
            else self.env
        self.agent = _make_agent(cfg, self.agent_env, cfg.seed)
        self.agent.set_logger(Logger(None, []))  # heed logs its own metrics; SB3's default leaves a dir in /tmp
        self.eval_seeds = [10_000 + 100 * cfg.seed + i for i in range(cfg.eval_episodes)]
        self.t0, self.cpu0 = time.time(), time.process_time()
        self.bar = progress(total=cfg.total_timesteps, desc=f"{cfg.env} ({self.run} reward)", unit="step")
        self.ensemble = self.trainer = self.labeler = None
        self.data = Comparisons()
        self.asked, self.start, self.evals, self.last_eval = 0, 0, [], -1
        if learned:
            members = 1 if cfg.no_ensemble else cfg.ensemble_size
            self.ensemble = RewardEnsemble(self.env.observation_space.shape[0], self.env.action_space, members,
                                           cfg.rm_hidden, cfg.rm_layers)
            self.trainer = EnsembleTrainer(self.ensemble, lr=cfg.rm_lr, batch_size=cfg.rm_batch_size, l2=cfg.rm_l2,
                                           random_prob=cfg.random_answer_prob, seed=cfg.seed)
            if self.human:
                self.labeler = HumanLabeler(open_store(cfg.db), out / "clips", task=cfg.task)
            else:
                self.labeler = SyntheticOracle(self.rng, cfg.oracle_temperature, cfg.oracle_random_prob)
            self.env.reward_fn = lambda obs, act: np.zeros(len(obs), dtype=np.float32)  # warm-up: no reward at all
        self.random_queries = cfg.queries == "random" or cfg.no_ensemble

    def policy(self, obs):
        if self.agent_env is not self.env:
            obs = self.agent_env.normalize_obs(obs)  # the agent's statistics, frozen at this point
        return self.agent.predict(obs, deterministic=True)[0]

    def pool(self, episodes) -> list:
        """Episodes to draw clips from: people need frames, kept only for recent episodes of this process."""
        return [ep for ep in episodes if ep.frames is not None] if self.human else list(episodes)

    def take_answers(self) -> None:
        for pairs, mu in self.labeler.collect():
            for i in range(len(pairs)):
                self.data.add(pairs.obs0[i], pairs.act0[i], pairs.obs1[i], pairs.act1[i], mu[i], self.rng,
                              self.ensemble.size, self.cfg.val_fraction)

    def fit(self, steps: int) -> dict:
        """Refit the ensemble on the comparisons, renormalise it on recent episodes, relabel the replay buffer."""
        if len(self.data) == 0:
            return {}
        stats = self.trainer.fit(self.data, steps)
        recent = self.env.recent(self.cfg.pool_episodes)
        self.ensemble.normalize(np.concatenate([ep.obs for ep in recent]),
                                np.concatenate([ep.actions for ep in recent]))
        _relabel_replay(self.agent, self.ensemble)
        return stats

    # -- 0. resume -------------------------------------------------------------------------------
    def resume(self, state: Checkpoint, ckpt_dir: Path) -> None:
        """The agent, its replay buffer, the reward model, the labels, every rng, as the checkpoint left them."""
        from stable_baselines3.common.logger import Logger

        if self.agent_env is not self.env:
            self.agent_env = VecNormalize.load(str(ckpt_dir / "vec_normalize.pkl"), self.env)
        self.agent = _agent_class(self.cfg).load(str(ckpt_dir / "agent.zip"), env=self.agent_env, device="cpu")
        self.agent.set_logger(Logger(None, []))
        if (ckpt_dir / "replay_buffer.pkl").exists():
            self.agent.load_replay_buffer(str(ckpt_dir / "replay_buffer.pkl"))
        self.start, self.asked, self.evals, self.last_eval = state.start, state.asked, state.evals, state.last_eval
        self.env.episodes.extend(state.episodes)
        self.env.steps, self.env.episodes_done = state.env_steps, state.episodes_done
        self.rng.bit_generator.state = state.rng
        torch.set_rng_state(state.torch_rng)
        self.t0, self.cpu0 = self.t0 - state.wall_s, self.cpu0 - state.cpu_s
        if self.learned:
            self.ensemble.load_state_dict(state.ensemble)
            self.trainer.load_state(state.trainer)
            self.data = state.comparisons
            self.asked += self.labeler.load_state(state.labeler)  # queries sent after the checkpoint still count
            self.env.reward_fn = self.ensemble.reward
        _truncate_metrics(self.out, self.run, self.agent.num_timesteps)  # rows logged after it are redone
        self.bar.update(self.agent.num_timesteps)

    # -- 1.-2. warm-up and the initial labels -------------------------------------------------------
    def warm_up(self) -> None:
        cfg, run = self.cfg, self.run
        # 1. random actions, every episode recorded
        if cfg.algo in ("sac", "td3"):  # their learning_starts: uniform random actions into the replay buffer
            self.agent.learn(cfg.initial_steps, reset_num_timesteps=False)
        else:  # on-policy: the same uniform random actions, outside the agent; the steps count all the same
            self.env.reset()
            while self.env.steps < cfg.initial_steps:
                self.env.step(np.stack([self.env.action_space.sample() for _ in range(self.env.num_envs)]))
            self.agent.num_timesteps = self.env.steps
        self.bar.update(self.agent.num_timesteps)
        self.start = self.agent.num_timesteps  # PPO/A2C may overshoot --initial-steps by part of a rollout
        if not self.learned:
            return
        # 2. initial labels: random pairs from the warm-up episodes, ensemble fitted before RL
        warm = self.pool(self.env.episodes)
        if not warm:
            raise HeedError(f"no episode finished in the {self.start} warm-up steps; raise --initial-steps "
                            f"above the horizon ({self.horizon})")
        self.ensemble.set_input_stats(np.concatenate([ep.obs for ep in warm]))
        rl_total = cfg.total_timesteps - self.start
        n0 = cfg.labels if cfg.offline else labels_due(0, rl_total, cfg.labels, cfg.initial_label_fraction,
                                                       cfg.label_decay)
        self.labeler.submit(sample_pairs(warm, n0, cfg.clip_length, self.rng))
        self.asked = n0
        self.take_answers()
        wait_for = min(cfg.human_wait, n0)
        while self.human and len(self.data) < wait_for:
            self.bar.set_postfix_str(f"waiting for answers {len(self.data)}/{wait_for} in {cfg.db}")
            time.sleep(cfg.poll_seconds)
            self.take_answers()
        stats = self.fit(cfg.rm_initial_steps)
        self.env.reward_fn = self.ensemble.reward
        self.logger.log(self.agent.num_timesteps, **{f"{run}/labels_asked": self.asked,
                                                     f"{run}/labels_used": len(self.data),
                                                     **{f"{run}/rm_{k}": v for k, v in stats.items()}})

    # -- 3. one round ---------------------------------------------------------------------------
    def round(self) -> None:
        """RL on the learned reward, fresh-clip metrics, queries, answers, refit, evaluation."""
        cfg, run, agent, ensemble, rng = self.cfg, self.run, self.agent, self.ensemble, self.rng
        last_step = agent.num_timesteps
        # a. RL
        agent.learn(min(cfg.round_steps, cfg.total_timesteps - agent.num_timesteps), reset_num_timesteps=False)
        step = agent.num_timesteps
        self.bar.total = max(self.bar.total, step)  # PPO/A2C end on a whole rollout, a little past the budget
        self.bar.update(step - last_step)
        fresh = self.env.since(last_step)
        row: dict = {f"{run}/wall_s": time.time() - self.t0}
        if fresh:
            row[f"{run}/return_train"] = float(np.mean([ep.true_return for ep in fresh]))
        if self.learned:
            # b. the reward model on clips it has never seen
            if fresh:
                obs, act, ret, _ = sample_clips(fresh, 200, cfg.clip_length, rng)
                pred = ensemble.reward(obs.reshape(-1, obs.shape[-1]), act.reshape(-1, act.shape[-1]))
                row[f"{run}/rm_corr_clip"] = _corr(pred.reshape(len(ret), -1).sum(1), ret)
                steps_obs = np.concatenate([ep.obs for ep in fresh])
                steps_act = np.concatenate([ep.actions for ep in fresh])
                row[f"{run}/rm_corr_step"] = _corr(ensemble.reward(steps_obs, steps_act),
                                                   np.concatenate([ep.true_rewards for ep in fresh]))
            # c. queries now due, where the ensemble disagrees most
            due = 0 if cfg.offline else labels_due(step - self.start, cfg.total_timesteps - self.start, cfg.labels,
                                                   cfg.initial_label_fraction, cfg.label_decay)
            k = min(due, cfg.labels) - self.asked
            candidates_from = self.pool(self.env.recent(cfg.pool_episodes))
            if k > 0 and candidates_from:
                candidates = sample_pairs(candidates_from, k * cfg.oversample, cfg.clip_length, rng)
                variances = member_preferences(ensemble, candidates).var(0)  # (N,) across members
                chosen = select_queries(None if self.random_queries else variances, k, rng, len(candidates))
                self.labeler.submit(candidates.take(chosen))
                self.asked += len(chosen)
                row[f"{run}/disagreement_candidates"] = float(variances.mean())
                row[f"{run}/disagreement_asked"] = float(variances[chosen].mean())
            # d. answers that have arrived; e. refit, renormalise, relabel
            self.take_answers()
            stats = self.fit(cfg.rm_steps)
            row.update({f"{run}/rm_{k}": v for k, v in stats.items()})
            row.update({f"{run}/labels_asked": self.asked, f"{run}/labels_used": len(self.data)})
            _save_comparisons(self.data, self.out / "labels.npz")
            ensemble.save(self.out / "reward_ensemble.pt")
        # f. evaluation on the true return
        if step // cfg.eval_every != self.last_eval or step >= cfg.total_timesteps:
            self.last_eval = step // cfg.eval_every
            returns = evaluate(self.policy, cfg.env, self.horizon, self.eval_seeds)
            row[f"{run}/return_eval"] = float(np.mean(returns))
            self.evals.append({"step": step, "labels_used": len(self.data), "return_mean": float(np.mean(returns)),
                               "return_std": float(np.std(returns))})
        self.logger.log(step, **row)
        # the bar: steps with rate and ETA; then labels used, the learned reward's correlation with the true
        # one on this round's fresh clips, the training episodes' and the last evaluation's true return
        shown = {"labels": f"{len(self.data)}/{cfg.labels}" if self.learned else None,
                 "corr": row.get(f"{run}/rm_corr_clip"), "return": row.get(f"{run}/return_train"),
                 "eval": self.evals[-1]["return_mean"] if self.evals else None}
        self.bar.set_postfix_str(", ".join(
            f"{k} {v if isinstance(v, str) else format(v, '.2f' if k == 'corr' else '.0f')}"
            for k, v in shown.items() if v is not None))

    # -- g. the checkpoint of a round ---------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            start=self.start, asked=self.asked, evals=self.evals, last_eval=self.last_eval,
            episodes=[_without_frames(ep) for ep in self.env.episodes], env_steps=self.env.steps,
            episodes_done=self.env.episodes_done, rng=self.rng.bit_generator.state, torch_rng=torch.get_rng_state(),
            wall_s=time.time() - self.t0, cpu_s=time.process_time() - self.cpu0,
            **({"ensemble": self.ensemble.state_dict(), "trainer": self.trainer.state(),
                "comparisons": self.data, "labeler": self.labeler.state()} if self.learned else {}))

    # -- 4. the result ----------------------------------------------------------------------------
    def finish(self) -> dict:
        self.bar.close()
        self.agent.save(str(self.out / f"policy_{self.run}_reward.zip"))
        if self.agent_env is not self.env:
            self.agent_env.save(str(self.out / f"vec_normalize_{self.run}_reward.pkl"))
        final = evaluate(self.policy, self.cfg.env, self.horizon, self.eval_seeds)
        result = {"eval_returns": [float(r) for r in final], "return_mean": float(np.mean(final)),
                  "return_std": float(np.std(final)), "env_steps": int(self.agent.num_timesteps),
                  "wall_s": round(time.time() - self.t0, 1),
                  "cpu_s": round(time.process_time() - self.cpu0, 1), "curve": self.evals}
        if self.learned:
            # the learned reward against the true one on each round's fresh clips, before any was labelled
            corr = [v for r in read_metrics(self.out)
                    if (v := r.get("learned/rm_corr_clip")) is not None and not np.isnan(v)]
            if corr:
                result.update(rm_corr_clip_last=corr[-1], rm_corr_clip_mean=float(np.mean(corr)))
            result.update(labels_asked=self.asked, labels_used=len(self.data),
                          labels_skipped=getattr(self.labeler, "skipped", 0), labels_pending=self.labeler.pending)
        self.env.close()
        return result


def run_agent(cfg: ControlTrainConfig, learned: bool, out: Path, logger: MetricsLogger) -> dict:
    """One agent, start to finish, resuming from its checkpoint when there is one."""
    run = "learned" if learned else "true"
    done_path, ckpt_dir = out / f"result_{run}.json", out / f"checkpoint_{run}"
    if cfg.resume and done_path.exists():
        return json.loads(done_path.read_text())
    agent_run = AgentRun(cfg, learned, out, logger)
    state = Checkpoint.load(ckpt_dir) if cfg.resume else None
    if state is not None:
        agent_run.resume(state, ckpt_dir)                                        # 0.
    else:
        agent_run.warm_up()                                                      # 1.-2.
    while agent_run.agent.num_timesteps < cfg.total_timesteps:
        agent_run.round()                                                        # 3.
        agent_run.checkpoint().save(ckpt_dir, agent_run.agent)                   # g. a killed run restarts here
    result = agent_run.finish()                                                  # 4.
    atomic_write_text(done_path, json.dumps(result))
    return result


def _truncate_metrics(out: Path, run: str, step: int) -> None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and not (
        json.loads(line)["step"] > step and any(k.startswith(run + "/") for k in json.loads(line)))]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _without_frames(ep):
    return dataclasses.replace(ep, frames=None)


def _save_comparisons(data: Comparisons, path: Path) -> None:
    if len(data):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            data.save(f)
        tmp.replace(path)


def score(learned: float, true: float, random: float) -> dict:
    """How the preference agent compares with the true-reward agent.

    normalised_score = (R_learned - R_random) / (R_true - R_random): 1 means as good as
    training on the true reward, 0 no better than acting at random; it works for any sign
    of return. return_ratio is the plain ratio oriented so that 1 is parity and less is
    worse: R_learned / R_true for positive returns, R_true / R_learned for negative ones
    (Pendulum: the ratio of costs).
    """
    out = {"normalised_score": (learned - random) / (true - random) if true != random else float("nan")}
    if learned > 0 and true > 0:
        out["return_ratio"] = learned / true
    elif learned < 0 and true < 0:
        out["return_ratio"] = true / learned
    else:
        out["return_ratio"] = float("nan")
    return out


def train(cfg: ControlTrainConfig) -> dict:
    _check(cfg)
    torch.set_num_threads(max(1, cfg.threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = [p for p in out.glob("*") if p.name.startswith(("checkpoint_", "result_"))]
    if cfg.resume and previous:
        saved = heed_config.load_yaml(out / "config.yaml") if (out / "config.yaml").exists() else {}
        now = asdict(cfg)
        changed = sorted(k for k in now if k != "resume" and saved.get(k) != now[k])
        if changed:
            raise HeedError(f"{out} holds a run with different settings ({', '.join(changed)}); "
                            "use another --out, or --no-resume to start over")
        print(f"resuming from the checkpoints in {out}")
    else:  # a fresh run: nothing of an earlier one may mix in
        for p in previous:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        (out / "metrics.jsonl").unlink(missing_ok=True)
    heed_config.save(cfg, out / "config.yaml")
    logger = MetricsLogger(out)
    t0, cpu0 = time.time(), time.process_time()
    report: dict = {"env": cfg.env, "algo": cfg.algo, "total_timesteps": cfg.total_timesteps, "config": asdict(cfg)}
    try:
        if cfg.reward == "learned":
            report["learned"] = run_agent(cfg, True, out, logger)
        if cfg.reward == "true" or cfg.baseline:
            report["true"] = run_agent(cfg, False, out, logger)
    finally:
        logger.close()
    horizon = cfg.horizon or default_horizon(cfg.env)
    rand = evaluate(None, cfg.env, horizon, [10_000 + 100 * cfg.seed + i for i in range(cfg.eval_episodes)])
    report["random"] = {"eval_returns": [float(r) for r in rand], "return_mean": float(np.mean(rand)),
                        "return_std": float(np.std(rand))}
    if "learned" in report and "true" in report:
        report.update(score(report["learned"]["return_mean"], report["true"]["return_mean"],
                            report["random"]["return_mean"]))
    report["wall_s"] = round(time.time() - t0, 1)
    report["cpu_s"] = round(time.process_time() - cpu0, 1)  # CPU time of this process: wall time on an idle machine
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    from heed.control.report import write_html

    write_html(report, out)
    _print_summary(report, out)
    return report


def _print_summary(report: dict, out: Path) -> None:
    lines = [f"{report['env']} ({report['algo']}, {report['total_timesteps']} env steps), true return over "
             f"{len(report['random']['eval_returns'])} evaluation episodes:"]
    for run, name in (("learned", "learned reward"), ("true", "true reward"), ("random", "random policy")):
        if run in report:
            r = report[run]
            extra = f", {r['labels_used']} labels" if "labels_used" in r else ""
            extra += f", {r['wall_s']:.0f}s" if "wall_s" in r else ""
            lines.append(f"  {name:<15} {r['return_mean']:9.1f} ± {r['return_std']:.1f}{extra}")
    if "rm_corr_clip_last" in report.get("learned", {}):
        lines.append(f"  learned vs true reward on fresh clips: r = {report['learned']['rm_corr_clip_last']:.3f} "
                     f"(last round), {report['learned']['rm_corr_clip_mean']:.3f} (mean over rounds)")
    if "normalised_score" in report:
        lines.append(f"  normalised score (learned - random) / (true - random) = {report['normalised_score']:.3f}; "
                     f"return ratio = {report['return_ratio']:.3f}")
    lines.append(f"  wall time {report['wall_s']:.0f}s, CPU time {report['cpu_s']:.0f}s")
    lines.append(f"  report: {out / 'report.html'}")
    print("\n".join(lines))
