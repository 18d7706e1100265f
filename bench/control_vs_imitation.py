"""Benchmark: heed's preference-based RL for control against the `imitation` library's preference
comparisons (imitation.algorithms.preference_comparisons), same label budgets, same steps, same seeds.

For every environment and label budget it runs
- heed: `heed control train --env ENV --labels N --seed S --no-baseline` with the environment's own
  defaults (Pendulum: SAC, 10,000 steps; HalfCheetah: PPO + VecNormalize, 4 envs, 200,000 steps;
  see ENV_DEFAULTS in heed/control/train.py), plus one true-reward agent per environment
  (`--reward true`, same algorithm, seed and steps) for the normalised score;
- imitation: bench/imitation_runner.py in imitation's own virtual environment, with heed's resolved
  config for that environment: the same SB3 algorithm and hyperparameters (VecNormalize on top of
  imitation's reward wrapper where heed normalises), the same environment steps (heed's warm-up is
  imitation's initial sample, heed's RL rounds are imitation's agent-training calls), 25-step
  fragments, 25% of the comparisons before RL and imitation's hyperbolic schedule for the rest, an
  ensemble of 3 reward nets with active selection (10x candidates, variance of the predicted
  preference), the exact synthetic oracle, the same number of comparisons;
then evaluates both final policies on the TRUE reward, deterministic, over heed's 10 evaluation seeds
(10_000 + 100*seed + i) and its fixed horizon, and prints a markdown table (also OUT/table.md, and
OUT/summary.json): return of each, the true-reward agent, a random policy, the normalised score
(R - R_random) / (R_true - R_random) of each, wall / CPU minutes of each.

    .venv/bin/python bench/control_vs_imitation.py --envs Pendulum-v1,HalfCheetah-v5 \\
        --budgets 350,700,1400 --seed 0 --out runs/vs_imitation
    .venv/bin/python bench/control_vs_imitation.py --envs Pendulum-v1 --budgets 40 --steps 2000 \\
        --out runs/vs_imitation_smoke                                   # a smoke test, a few minutes

The peer library never enters heed's dependencies: on first use the script makes
runs/venv-imitation (--peer-venv) with torch 2.13.0 (the CPU wheel) installed first and then held by
a constraints file, imitation 1.0.1 and the versions it accepts (gymnasium 0.29.1, stable-baselines3
2.2.1), mujoco 4.0.0 (heed's) and numpy<2 (gymnasium 0.29 predates numpy 2); about 4 minutes and
1.8 GB. gymnasium 0.29 has no HalfCheetah-v5, so imitation runs HalfCheetah-v4: the same MuJoCo
model and reward (an open-loop 1,000-step rollout from the same seed gives the same return in both
to 1e-8); the table says so.

How long, in CPU minutes of one process with one torch thread, as measured for docs/control.md
(wall time is about twice that on a shared 2-core machine). heed: Pendulum 2.5-3 per preference
agent, HalfCheetah 14 (PPO, 200k steps) and 10 for the true-reward agent. imitation: Pendulum 12 / 19
/ 35 for 350 / 700 / 1400 comparisons, HalfCheetah 55 at 1400 (its reward training runs every pair of
fragments through the nets one at a time, and by default trains each member 200x the usual 3 epochs
on the initial comparisons). The whole default grid is some 4 hours of CPU.

Resumable: a (tool, env, budget) whose result JSON exists is skipped; a killed heed run continues
from its last checkpoint (heed's own resume); a killed imitation run starts again (imitation has no
mid-run checkpoint). `--tools imitation` (or heed) runs one side only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "bench" / "imitation_runner.py"
TORCH = "torch==2.13.0"
# imitation 1.0.1 wants gymnasium~=0.29 and stable-baselines3~=2.2.1; mujoco as heed's venv has it
# (HalfCheetah-v4 runs on it: only gymnasium's viewer uses a renamed field), numpy<2 for gymnasium 0.29
PEER_PINS = ["imitation==1.0.1", "gymnasium[mujoco]==0.29.1", "stable-baselines3==2.2.1", "mujoco==4.0.0", "numpy<2"]


def ensure_peer_venv(venv: Path) -> Path:
    """The Python of imitation's virtual environment, made on first use (torch first, then held)."""
    python = venv / "bin" / "python"
    marker, wanted = venv / ".heed-bench-installed", json.dumps([TORCH, *PEER_PINS])
    if marker.exists() and marker.read_text() == wanted:
        return python
    print(f"making {venv}: {TORCH}, then {' '.join(PEER_PINS)} (a few minutes)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [TORCH], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")  # any looser torch would pull the CUDA wheels
    subprocess.run(pip + ["-c", str(constraints), *PEER_PINS], check=True)
    have = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if not have.startswith(TORCH.split("==")[1]):
        sys.exit(f"{venv}: torch is {have}, expected {TORCH}")
    marker.write_text(wanted)
    return python


def peer_versions(python: Path) -> dict:
    code = ("import json, platform; from importlib.metadata import version as v; print(json.dumps("
            "{'python': platform.python_version(), **{n: v(n) for n in ('imitation', 'stable-baselines3', "
            "'gymnasium', 'mujoco', 'torch', 'numpy')}}))")
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def peer_env_id(python: Path, env: str) -> str:
    """`env` if the peer's gymnasium has it, else the highest registered version of the same family below it."""
    code = "import json, gymnasium as gym; print(json.dumps(sorted(gym.registry)))"
    ids = json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)
    if env in ids:
        return env
    m = re.fullmatch(r"(.+)-v(\d+)", env)
    older = sorted((int(v), f"{m.group(1)}-v{v}") for i in ids if m and (v := _version_of(i, m.group(1)))
                   is not None and int(v) < int(m.group(2)))
    if not older:
        sys.exit(f"imitation's gymnasium has no {env} nor an older version of it")
    return older[-1][1]


def _version_of(env_id: str, family: str) -> str | None:
    m = re.fullmatch(re.escape(family) + r"-v(\d+)", env_id)
    return m.group(1) if m else None


def heed_config(env: str, steps: int | None):
    """heed's resolved ControlTrainConfig for `env` (its env defaults), and the flags that override it."""
    from heed import config as heed_config_mod
    from heed.control.envs import default_horizon
    from heed.control.train import ControlTrainConfig

    base = heed_config_mod.build(ControlTrainConfig, {"env": env})
    over: dict = {}
    if steps:
        over["total_timesteps"] = steps
        if base.initial_steps >= steps:  # a short check: a shorter warm-up, still whole episodes on every copy
            initial = max(default_horizon(env) * base.n_envs, round(steps * base.initial_steps / base.total_timesteps))
            if initial >= steps:
                sys.exit(f"--steps {steps} leaves no RL steps on {env} after a warm-up of {initial}")
            over["initial_steps"] = initial
        over["round_steps"] = min(base.round_steps, steps - over.get("initial_steps", base.initial_steps))
        over["eval_every"] = min(base.eval_every, steps)
    cfg = heed_config_mod.build(ControlTrainConfig, {"env": env, **over})
    flags = [x for k, v in over.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return cfg, flags, default_horizon(env)


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("  $ " + " ".join(cmd) + f"  > {log}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:  # a resumed run appends
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    print(f"    exit {rc} after {time.time() - t0:.0f}s", flush=True)
    return rc, time.time() - t0


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def score(r: float | None, true: float | None, rand: float | None) -> float | None:
    if r is None or true is None or rand is None or true == rand:
        return None
    return (r - rand) / (true - rand)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="Pendulum-v1,HalfCheetah-v5", help="comma-separated Gymnasium ids (heed's)")
    p.add_argument("--budgets", default="350,700,1400", help="comma-separated label budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="environment steps per agent (default: heed's per env)")
    p.add_argument("--out", default="runs/vs_imitation")
    p.add_argument("--tools", default="heed,imitation", help="which side(s) to run: heed, imitation or both")
    p.add_argument("--peer-venv", default="runs/venv-imitation", help="imitation's virtual environment")
    p.add_argument("--setup-only", action="store_true", help="make the peer environment and stop")
    args = p.parse_args()
    envs = [e for e in args.envs.split(",") if e]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    tools = {t.strip() for t in args.tools.split(",")}
    if not tools <= {"heed", "imitation"}:
        p.error("--tools takes heed, imitation or both")
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    peer_venv = Path(args.peer_venv) if Path(args.peer_venv).is_absolute() else ROOT / args.peer_venv
    heed = str(Path(sys.executable).with_name("heed"))

    python = ensure_peer_venv(peer_venv) if "imitation" in tools or args.setup_only else None
    versions = peer_versions(python) if python else {}
    if args.setup_only:
        print(json.dumps(versions, indent=2))
        return
    failed: list[str] = []
    rows, summary = [], {"seed": args.seed, "steps_override": args.steps, "budgets": budgets,
                         "imitation_versions": versions, "envs": {}}
    t_start = time.time()
    for env in envs:
        cfg, flags, horizon = heed_config(env, args.steps)
        peer_env = peer_env_id(python, env) if python else env
        env_sum: dict = {"heed_config": asdict(cfg), "imitation_env": peer_env, "budgets": {}}
        summary["envs"][env] = env_sum
        if flags:
            print(f"{env}: heed's defaults with {' '.join(flags)}", flush=True)
        if peer_env != env:
            print(f"{env}: imitation's gymnasium ({versions.get('gymnasium')}) has no {env}; it runs {peer_env}",
                  flush=True)
        base = out / "heed" / env
        # -- the true-reward agent (heed, same algorithm, seed and steps) ----------------------------------
        true_dir = base / "true"
        if "heed" in tools and not (true_dir / "report.json").exists():
            print(f"[heed] {env}: true-reward agent", flush=True)
            cmd = [heed, "control", "train", "--env", env, "--reward", "true", "--seed", str(args.seed),
                   "--out", str(true_dir), *flags]
            if run_logged(cmd, true_dir / "train.log")[0] != 0:
                failed.append(f"heed {env} true: see {true_dir / 'train.log'}\n{tail(true_dir / 'train.log')}")
        true_report = json.loads((true_dir / "report.json").read_text()) if (true_dir / "report.json").exists() \
            else None
        for n in budgets:
            # -- heed -----------------------------------------------------------------------------------
            h_dir = base / f"labels{n}"
            if "heed" in tools and not (h_dir / "report.json").exists():
                print(f"[heed] {env}: {n} labels", flush=True)
                cmd = [heed, "control", "train", "--env", env, "--labels", str(n), "--seed", str(args.seed),
                       "--out", str(h_dir), "--no-baseline", *flags]
                if run_logged(cmd, h_dir / "train.log")[0] != 0:
                    failed.append(f"heed {env} {n}: see {h_dir / 'train.log'}\n{tail(h_dir / 'train.log')}")
            h = json.loads((h_dir / "report.json").read_text()) if (h_dir / "report.json").exists() else None
            # -- imitation ------------------------------------------------------------------------------
            i_dir = out / "imitation" / env / f"labels{n}"
            i_result = i_dir / "result.json"
            if "imitation" in tools and not i_result.exists():
                print(f"[imitation] {env} ({peer_env}): {n} comparisons", flush=True)
                import yaml

                settings = {**asdict(cfg), "labels": n, "seed": args.seed, "imitation_env": peer_env,
                            "horizon": cfg.horizon or horizon,
                            "rl_kwargs": yaml.safe_load(cfg.rl_kwargs) if cfg.rl_kwargs.strip() else {}}
                i_dir.mkdir(parents=True, exist_ok=True)
                (i_dir / "settings.json").write_text(json.dumps(settings, indent=2))
                env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
                env_vars.pop("VIRTUAL_ENV", None)
                cmd = [str(python), str(RUNNER), "--config", str(i_dir / "settings.json"), "--out", str(i_result)]
                if run_logged(cmd, i_dir / "run.log", env_vars)[0] != 0:
                    failed.append(f"imitation {env} {n}: see {i_dir / 'run.log'}\n{tail(i_dir / 'run.log')}")
            im = json.loads(i_result.read_text()) if i_result.exists() else None
            # -- the row ------------------------------------------------------------------------------------
            true_r = true_report["true"]["return_mean"] if true_report else None
            rand = next((r["random"]["return_mean"] for r in (true_report, h) if r), None)
            if rand is None and im:
                rand = im["random_return_mean"]  # the same seeds, on imitation's env id
            hl = h["learned"] if h else None
            row = {
                "env": env, "labels": n, "imitation_env": peer_env, "steps": cfg.total_timesteps,
                "heed": None if hl is None else {k: hl.get(k) for k in (
                    "return_mean", "return_std", "wall_s", "cpu_s", "labels_used", "env_steps", "rm_corr_clip_last")},
                "imitation": None if im is None else {k: im.get(k) for k in (
                    "return_mean", "return_std", "wall_s", "cpu_s", "comparisons_used", "env_steps", "agent_steps",
                    "random_return_mean", "reward_accuracy")},
                "true_reward": true_r, "random": rand,
                "heed_score": score(hl and hl["return_mean"], true_r, rand),
                "imitation_score": score(im and im["return_mean"], true_r, rand),
            }
            env_sum["budgets"][n] = row
            rows.append(row)
        env_sum["true_reward"] = true_report["true"] if true_report else None

    table = render(rows, summary, args)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    summary["total_wall_s"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'table.md'} and {out / 'summary.json'}")
    if failed:
        sys.exit("failed runs:\n" + "\n\n".join(failed))


def render(rows: list[dict], summary: dict, args) -> str:
    def ret(d):
        return "–" if d is None else f"{d['return_mean']:.1f} ± {d['return_std']:.1f}"

    def mins(d):
        return "–" if d is None else f"{d['wall_s'] / 60:.1f} / {d['cpu_s'] / 60:.1f}"

    def name(r):
        return r["env"] if r["imitation_env"] == r["env"] else f"{r['env']} (imitation: {r['imitation_env']})"

    lines = ["| env | labels | heed return | imitation return | true-reward agent | random | heed normalised score "
             "| imitation normalised score | heed wall / CPU min | imitation wall / CPU min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {name(r)} | {r['labels']} | {ret(r['heed'])} | {ret(r['imitation'])} "
                     f"| {fmt(r['true_reward'])} | {fmt(r['random'])} | {fmt(r['heed_score'], '.3f')} "
                     f"| {fmt(r['imitation_score'], '.3f')} | {mins(r['heed'])} | {mins(r['imitation'])} |")
    v = summary["imitation_versions"]
    notes = [f"Seed {args.seed}; true return over 10 evaluation episodes (seeds 10000 + 100·seed + i), deterministic "
             "policy, the environment's time limit as a fixed horizon; the true-reward agent is heed's algorithm "
             "with the same steps on the true reward; normalised score = (R − R_random) / (R_true − R_random)."]
    if args.steps:
        notes.append(f"Shortened: {args.steps} environment steps per agent (--steps).")
    if v:
        notes.append(f"imitation {v.get('imitation')}, stable-baselines3 {v.get('stable-baselines3')}, gymnasium "
                     f"{v.get('gymnasium')}, mujoco {v.get('mujoco')}, torch {v.get('torch')} in its own venv.")
    if any(r["imitation_env"] != r["env"] for r in rows):
        notes.append("imitation's gymnasium 0.29 has no HalfCheetah-v5: it runs HalfCheetah-v4, the same MuJoCo "
                     "model and reward (same returns from the same seed and actions).")
    over = [r for r in rows if r["imitation"] and r["imitation"]["env_steps"] > 1.1 * r["steps"]]
    if over:
        notes.append("imitation took more environment steps than the budget in: " + ", ".join(
            f"{r['env']} {r['labels']} labels ({r['imitation']['env_steps']} for {r['steps']})" for r in over)
            + ". It samples extra steps with the agent when its last training call left fewer finished "
              "episodes than the queries due need, which happens only with a short --steps.")
    notes.append("Wall and CPU time: the preference agent's run alone (heed's includes its evaluations every "
                 "eval_every steps; imitation's the final one); one torch thread each.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


if __name__ == "__main__":
    main()
