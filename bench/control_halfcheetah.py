"""Benchmark: preference-based RL on HalfCheetah-v5 with at most 1,400 synthetic labels.

Runs `heed control train` twice over, as the paper's Figure 2 compares: SAC on the
reward learned from synthetic-oracle comparisons of 25-step clips, and SAC on the true
reward for the same number of environment steps, then prints the true returns over 10
evaluation episodes (same seeds for both agents and for a random policy) and the two
ratios (see docs/control.md). Needs `pip install mujoco imageio` (gymnasium's MuJoCo
environments). Takes far longer than CI allows: on 2 CPU cores SAC runs about 40-60
environment steps a second, so the default 100k steps per agent take one to two hours.

    .venv/bin/python bench/control_halfcheetah.py --out runs/bench_halfcheetah
    .venv/bin/python bench/control_halfcheetah.py --steps 20000   # a shorter check
"""

from __future__ import annotations

import argparse
import json

from heed.control.train import ControlTrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=100_000, help="environment steps per agent")
    p.add_argument("--labels", type=int, default=1400, help="label budget (the issue allows at most 1,400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_control_halfcheetah")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.labels > 1400:
        p.error("the benchmark allows at most 1,400 labels")
    cfg = ControlTrainConfig(
        env=args.env, out=args.out, seed=args.seed, total_timesteps=args.steps, labels=args.labels,
        initial_steps=min(5000, args.steps // 10), round_steps=max(1000, args.steps // 40),
        clip_length=25, pool_episodes=5, net_arch=[128, 128], rl_lr=3e-4,
        eval_every=max(5000, args.steps // 5), eval_episodes=10, threads=args.threads)
    report = train(cfg)
    figures = {
        "env": cfg.env, "env_steps_per_agent": cfg.total_timesteps,
        "labels_used": report["learned"]["labels_used"],
        "return_learned_reward": report["learned"]["return_mean"],
        "return_true_reward": report["true"]["return_mean"],
        "return_random_policy": report["random"]["return_mean"],
        "normalised_score": report["normalised_score"], "return_ratio": report["return_ratio"],
        "wall_s": report["wall_s"], "cpu_s": report["cpu_s"],
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
