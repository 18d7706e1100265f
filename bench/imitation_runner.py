"""One run of the `imitation` library's preference comparisons, for bench/control_vs_imitation.py.

Runs inside the peer virtual environment (imitation 1.0.1, gymnasium 0.29, stable-baselines3 2.2),
never in heed's: the bench script makes that environment and writes the settings, which are heed's
resolved `heed control train` config for the environment, as JSON:

    runs/venv-imitation/bin/python bench/imitation_runner.py --config SETTINGS.json --out RESULT.json

What it builds, with imitation's own components (imitation.algorithms.preference_comparisons):
- the environment: imitation's `make_vec_env` (DummyVecEnv, `n_envs` copies, time limit = heed's
  horizon), a step counter under everything so the JSON says how many environment steps were
  really taken;
- the reward model: a `RewardEnsemble` of `ensemble_size` `BasicRewardNet`s (heed's hidden sizes, on
  observation and action, inputs normalised by `RunningNorm`, each member's output normalised by
  `NormalizedRewardNet` as imitation's ensemble config does), the agent rewarded with the members'
  mean (the `RewardEnsemble` itself: imitation's config wraps it in `AddSTDRewardWrapper` with alpha 0,
  the same mean, but with that wrapper 1.0.1's probability-variance selection fails on
  `model.num_members`);
- queries: `ActiveSelectionFragmenter` over `RandomFragmenter`, `oversample`x candidate pairs, the
  ones whose preference probability varies most across the members (heed's criterion; imitation's
  script default is the logit), fragments of `clip_length` steps;
- labels: `SyntheticGatherer` at temperature 0 (the exact oracle on true fragment returns, as heed's);
  `PreferenceModel` with noise_prob = heed's random_answer_prob; `EnsembleTrainer` (bagging) with
  imitation's training defaults (3 epochs per iteration, 200x that on the initial comparisons, AdamW,
  no regulariser), heed's learning rate and batch size of 64;
- the schedule: `initial_comparison_frac` of the comparisons before RL, the rest by imitation's
  "hyperbolic" schedule over `num_iterations` = heed's rounds - 1 (imitation trains the agent
  num_iterations + 1 times), each training call the same number of steps as one heed round;
- the agent: the same Stable-Baselines3 algorithm and hyperparameters as heed's config. SAC relabels
  every replay batch with the current reward model (imitation's `ReplayBufferRewardWrapper`, as its
  training script does for off-policy agents). PPO with `normalize` sees observations and rewards
  through SB3's `VecNormalize` stacked on top of imitation's reward wrapper, as heed stacks it on
  its learned-reward env; the reward model sees raw observations in both.

Then the final policy (deterministic; VecNormalize statistics frozen) is evaluated on the TRUE reward
on heed's evaluation seeds (10_000 + 100*seed + i) with heed's fixed horizon, as
`heed.control.envs.evaluate` (imported from this checkout), and so is a random policy. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import gymnasium as gym
import imitation
import numpy as np
import stable_baselines3 as sb3
import torch
from imitation.algorithms import preference_comparisons as pc
from imitation.data.wrappers import RolloutInfoWrapper
from imitation.policies.replay_buffer_wrapper import ReplayBufferRewardWrapper
from imitation.rewards import reward_nets
from imitation.util import logger as imit_logger
from imitation.util.networks import RunningNorm
from imitation.util.util import make_vec_env
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecEnvWrapper, VecNormalize

# heed's own evaluation protocol (fixed horizon, the same seeds): heed is not installed in the peer
# environment, but heed.control.envs needs only gymnasium, numpy and stable-baselines3, which it has
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from heed.control.envs import evaluate  # noqa: E402

ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU, "leaky_relu": torch.nn.LeakyReLU}


class StepCounter(VecEnvWrapper):
    """Counts environment steps over all copies, whoever takes them (RL, or imitation's extra sampling)."""

    def __init__(self, venv):
        super().__init__(venv)
        self.steps = 0

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        out = self.venv.step_wait()
        self.steps += self.num_envs
        return out


def build_agent(s: dict, venv, relabel):
    """The SB3 agent with heed's algorithm and hyperparameters (`s` is heed's resolved config)."""
    extra = dict(s["rl_kwargs"])
    policy_kwargs = {"net_arch": list(s["net_arch"]), **dict(extra.pop("policy_kwargs", None) or {})}
    if isinstance(policy_kwargs.get("activation_fn"), str):
        policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"].lower()]
    cls = {"sac": sb3.SAC, "td3": sb3.TD3, "ppo": sb3.PPO, "a2c": sb3.A2C}[s["algo"]]
    common = dict(learning_rate=s["rl_lr"], seed=s["seed"], verbose=0, device="cpu", policy_kwargs=policy_kwargs)
    if s["algo"] in ("sac", "td3"):
        # heed's buffer holds the whole run; its learning_starts is its warm-up, which here is imitation's
        # initial sampling (outside the agent), so the agent keeps SB3's own default unless heed's
        # rl_kwargs name one
        common.update(buffer_size=s["total_timesteps"], replay_buffer_class=ReplayBufferRewardWrapper,
                      replay_buffer_kwargs=dict(replay_buffer_class=ReplayBuffer, reward_fn=relabel))
    return cls("MlpPolicy", venv, **common, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="JSON settings written by bench/control_vs_imitation.py")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    args = p.parse_args()
    s = json.loads(Path(args.config).read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env_id, seed, horizon, length = s["imitation_env"], s["seed"], s["horizon"], s["clip_length"]
    torch.set_num_threads(max(1, s.get("threads", 1)))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0, cpu0 = time.time(), time.process_time()
    log = imit_logger.configure(folder=out.parent / "imitation_log", format_strs=["log", "csv"])

    # -- environment: imitation's vec env, every step counted ----------------------------------------
    counter = StepCounter(make_vec_env(env_id, rng=rng, n_envs=s["n_envs"], max_episode_steps=horizon,
                                       post_wrappers=[lambda env, _: RolloutInfoWrapper(env)]))

    # -- reward model: an ensemble of BasicRewardNets, each output-normalised ---------------------------
    hidden = (s["rm_hidden"],) * s["rm_layers"]
    def member():
        net = reward_nets.BasicRewardNet(counter.observation_space, counter.action_space, hid_sizes=hidden,
                                         normalize_input_layer=RunningNorm)
        return reward_nets.NormalizedRewardNet(net, RunningNorm)
    ensemble_size = s["ensemble_size"] if not s.get("no_ensemble") else 1
    if ensemble_size >= 2:
        # the bare ensemble: its predict_processed is the members' mean, as AddSTDRewardWrapper(alpha=0) gives,
        # and imitation 1.0.1's uncertainty_on="probability" needs model.num_members, which that wrapper lacks
        reward_net = reward_nets.RewardEnsemble(counter.observation_space, counter.action_space,
                                                [member() for _ in range(ensemble_size)])
    else:  # imitation's ensemble needs 2 members; one net, random queries
        reward_net = member()

    # SAC's replay buffer stores actions scaled to [-1, 1]; the reward model was fitted on the env's actions,
    # so relabelled batches get their actions unscaled first (imitation passes the stored ones as they are)
    space = counter.action_space
    def relabel(state, action, next_state, done):
        if isinstance(space, gym.spaces.Box):
            action = space.low + 0.5 * (np.asarray(action) + 1.0) * (space.high - space.low)
        return reward_net.predict_processed(state, action, next_state, done, update_stats=False)

    # -- agent and trajectory generator --------------------------------------------------------------
    agent = build_agent(s, counter, relabel)
    trainer = pc.AgentTrainer(algorithm=agent, reward_fn=reward_net, venv=counter, rng=rng, exploration_frac=0.0,
                              custom_logger=log)
    vecnorm = None
    if s["normalize"]:  # heed: VecNormalize(learned-reward env); here VecNormalize(imitation's reward wrapper)
        vecnorm = VecNormalize(trainer.venv, gamma=s["rl_kwargs"].get("gamma", 0.99))
        agent.set_env(vecnorm)

    # -- preference model, queries, labels, reward trainer -----------------------------------------------
    pref_model = pc.PreferenceModel(reward_net, noise_prob=s["random_answer_prob"])
    fragmenter = pc.RandomFragmenter(rng=rng, warning_threshold=0, custom_logger=log)
    if ensemble_size >= 2 and s.get("queries", "disagreement") == "disagreement":
        fragmenter = pc.ActiveSelectionFragmenter(pref_model, fragmenter, fragment_sample_factor=s["oversample"],
                                                  uncertainty_on="probability", custom_logger=log)
    gatherer = pc.SyntheticGatherer(temperature=0, rng=rng, custom_logger=log)
    trainer_cls = pc.EnsembleTrainer if ensemble_size >= 2 else pc.BasicRewardTrainer  # bagging per member
    reward_trainer = trainer_cls(pref_model, pc.CrossEntropyRewardLoss(), rng=rng, batch_size=s["rm_batch_size"],
                                 lr=s["rm_lr"], epochs=3, custom_logger=log)  # epochs: imitation's script default

    # -- step budget: heed's warm-up becomes imitation's initial sample; heed's RL rounds its agent calls --
    warm, total = s["initial_steps"], s["total_timesteps"]
    rl_steps = total - warm
    calls = max(2, math.ceil(rl_steps / s["round_steps"]))   # imitation trains the agent num_iterations + 1 times
    num_iterations = calls - 1
    per_call = rl_steps // calls
    pc_timesteps = rl_steps - per_call  # divmod(pc_timesteps, num_iterations) gives per_call (+ the remainder)
    initial = int(s["labels"] * s["initial_label_fraction"])
    oversampling = warm / (2 * max(initial, 1) * length)  # the initial sample is heed's warm-up, in steps
    main_trainer = pc.PreferenceComparisons(
        trainer, reward_net, num_iterations=num_iterations, fragmenter=fragmenter, preference_gatherer=gatherer,
        reward_trainer=reward_trainer, fragment_length=length, transition_oversampling=oversampling,
        initial_comparison_frac=s["initial_label_fraction"], custom_logger=log, allow_variable_horizon=False,
        query_schedule="hyperbolic")  # initial_epoch_multiplier: imitation's default (200)

    def progress(iteration: int) -> None:
        print(f"[imitation] iteration {iteration + 1}/{num_iterations + 1}: {len(main_trainer.dataset)} comparisons, "
              f"{agent.num_timesteps} agent steps, {counter.steps} env steps, {time.time() - t0:.0f}s", flush=True)

    print(f"[imitation] {env_id}: {s['labels']} comparisons ({initial} initial), {num_iterations} iterations, "
          f"{warm} initial-sample + {rl_steps} RL steps, {s['algo']}", flush=True)
    stats = main_trainer.train(total_timesteps=pc_timesteps, total_comparisons=s["labels"], callback=progress)
    train_wall, train_cpu = time.time() - t0, time.process_time() - cpu0

    # -- evaluation on the true reward, heed's seeds and horizon ---------------------------------------
    def policy(obs):
        if vecnorm is not None:
            obs = vecnorm.normalize_obs(obs)  # statistics as training left them
        return agent.predict(obs, deterministic=True)[0]

    seeds = [10_000 + 100 * seed + i for i in range(s["eval_episodes"])]
    returns = evaluate(policy, env_id, horizon, seeds)
    rand = evaluate(None, env_id, horizon, seeds)
    result = {
        "tool": "imitation", "env": env_id, "heed_env": s["env"], "seed": seed, "labels": s["labels"],
        "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
        "eval_returns": returns, "random_return_mean": float(np.mean(rand)),
        "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
        "comparisons_used": len(main_trainer.dataset), "env_steps": counter.steps,
        "agent_steps": int(agent.num_timesteps), "reward_accuracy": stats.get("reward_accuracy"),
        "settings": {"algo": s["algo"], "num_iterations": num_iterations, "agent_steps_per_call": per_call,
                     "initial_comparisons": initial, "transition_oversampling": oversampling,
                     "fragment_length": length, "query_schedule": "hyperbolic",
                     "ensemble_size": ensemble_size, "active_selection": isinstance(
                         fragmenter, pc.ActiveSelectionFragmenter), "fragment_sample_factor": s["oversample"],
                     "uncertainty_on": "probability", "noise_prob": s["random_answer_prob"],
                     "reward_net_hidden": list(hidden), "reward_epochs": 3, "initial_epoch_multiplier": 200,
                     "reward_batch_size": s["rm_batch_size"], "reward_lr": s["rm_lr"],
                     "vec_normalize": bool(s["normalize"]), "n_envs": s["n_envs"], "horizon": horizon,
                     "learning_starts": getattr(agent, "learning_starts", None)},
        "versions": versions(),
    }
    text = json.dumps(result, indent=2)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text, flush=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("imitation", "stable-baselines3", "gymnasium", "mujoco", "torch", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    found["imitation"] = getattr(imitation, "__version__", found.get("imitation"))
    return found


if __name__ == "__main__":
    sys.exit(main())
