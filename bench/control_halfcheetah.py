"""Benchmark: preference-based RL on HalfCheetah-v5 from at most 1,400 synthetic labels, several seeds.

For each seed, `heed control train --env HalfCheetah-v5` with its HalfCheetah defaults (see
docs/control.md): the agent on the reward learned from synthetic-oracle comparisons of
25-step clips, the same algorithm with the same seed and steps on the true reward, and a
random policy, all on the same evaluation episodes. Seeds run as parallel processes
(`--jobs`); each prints its own summary into OUT/seedN/train.log. At the end, one table:
true returns, the normalised score and return ratio, the learned reward's correlation with
the true one on fresh clips, wall and CPU time per run, and OUT/summary.json.

    .venv/bin/python bench/control_halfcheetah.py --seeds 0,1,2 --out runs/bench_halfcheetah
    .venv/bin/python bench/control_halfcheetah.py --seeds 0 --steps 30000   # a shorter check

Extra arguments after `--` go to `heed control train` as they are (e.g. `-- --algo sac`).
A killed benchmark resumes: rerunning the same command continues every seed from its last round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def row(seed: int, report: dict) -> str:
    learned, true, rand = report["learned"], report["true"], report["random"]
    return (f"| {seed} | {learned['return_mean']:.0f} ± {learned['return_std']:.0f} "
            f"| {true['return_mean']:.0f} ± {true['return_std']:.0f} | {rand['return_mean']:.0f} "
            f"| {report['normalised_score']:.3f} | {report['return_ratio']:.3f} | {learned['labels_used']} "
            f"| {learned.get('rm_corr_clip_last', float('nan')):.3f} "
            f"| {learned['wall_s'] / 60:.1f} / {learned['cpu_s'] / 60:.1f} | {true['wall_s'] / 60:.1f} / "
            f"{true['cpu_s'] / 60:.1f} |")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=3, help="seeds run at once (each is one process, one thread)")
    p.add_argument("--steps", type=int, default=None, help="environment steps per agent (default: heed's)")
    p.add_argument("--labels", type=int, default=1400, help="label budget (the issue allows at most 1,400)")
    p.add_argument("--out", default="runs/bench_halfcheetah")
    args = p.parse_args(argv)
    if args.labels > 1400:
        p.error("the benchmark allows at most 1,400 labels")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    heed = str(Path(sys.executable).with_name("heed"))
    running: list[tuple[int, subprocess.Popen]] = []
    t0 = time.time()
    for i, seed in enumerate(seeds):
        while len([1 for _, proc in running if proc.poll() is None]) >= args.jobs:
            time.sleep(5)
        run_dir = out / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [heed, "control", "train", "--env", args.env, "--seed", str(seed), "--labels", str(args.labels),
               "--out", str(run_dir), *(["--total-timesteps", str(args.steps)] if args.steps else []), *extra]
        print(" ".join(cmd[1:]), f"> {run_dir / 'train.log'}", flush=True)
        running.append((seed, subprocess.Popen(cmd, stdout=open(run_dir / "train.log", "w"),
                                                stderr=subprocess.STDOUT)))
    failed = [seed for seed, proc in running if proc.wait() != 0]
    if failed:
        sys.exit(f"seeds {failed} failed: see {out}/seed*/train.log")
    reports = {seed: json.loads((out / f"seed{seed}" / "report.json").read_text()) for seed in seeds}
    print(f"\n{args.env}, {reports[seeds[0]]['algo']}, {reports[seeds[0]]['total_timesteps']} env steps per agent, "
          f"{time.time() - t0:.0f} s for all seeds ({args.jobs} at once)\n")
    print("| seed | learned reward | true reward | random policy | normalised score | return ratio | labels "
          "| r(learned, true) on fresh clips | learned: wall / CPU min | true: wall / CPU min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        print(row(seed, reports[seed]))
    keys = ("normalised_score", "return_ratio")
    summary = {"env": args.env, "seeds": seeds, "per_seed": {s: {k: reports[s][k] for k in keys} | {
        "learned": reports[s]["learned"]["return_mean"], "true": reports[s]["true"]["return_mean"],
        "random": reports[s]["random"]["return_mean"]} for s in seeds}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
