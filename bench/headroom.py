"""How much room does a policy have to beat the SFT policy on the world's held-out (or validation) prompts?

The win rate of the issues' targets compares one sample of each policy per prompt, by
gold score, ties counting half. This measures what simple policies built from the SFT
model itself would score against it, with the gold oracle in the loop where it says so:

  sharpened  the SFT model at a low temperature (0.05: almost greedy) -- what RL gains
             by only making the policy surer of what it already prefers
  mode-of-K  the most frequent of K SFT samples (no oracle)
  best-of-K  the best of K SFT samples by *gold* score -- an oracle's choice among the
             SFT policy's own answers, the ceiling of rejection sampling with a perfect
             reward model; its KL to SFT is at most log K - (K - 1) / K nats
  best-of-K by the reward model
             the same choice made by the demo's reward model (run/rm, or --rm): what
             rejection sampling against it gives. Optimising reward - beta * KL has
             the optimum pi_ref * exp(r / beta), a soft best-of-many by that reward, so
             this is what DPO, REBEL, GRPO, RLOO and PPO are aiming at
  sharpened, then best-of-2 by the reward model
             two samples at temperature 0.3, the reward model picking: whether
             following the reward model adds anything to sharpening

and the SFT policy's perfect rate (gold 1.0) per task type. A policy that beats SFT by
more than best-of-K has learnt something that K of SFT's samples rarely say.

    python bench/headroom.py runs/demo                  # writes runs/demo/headroom.json
    python bench/headroom.py runs/demo --split valid    # validation prompts: headroom_valid.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from heed.data import read_prompts
from heed.evaluate import gold_scores, win_rate
from heed.generate import generate
from heed.models import load_policy
from heed.rules import load_reward
from heed.world.tasks import parse_prompt


def scored(samples) -> list[float]:
    return gold_scores([s.prompt for s in samples], [s.response for s in samples])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished `heed demo` directory (sft/ and world/)")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt for best-of-K and mode-of-K")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="judge only the first N prompts (0 = all)")
    ap.add_argument("--split", choices=("heldout", "valid"), default="heldout",
                    help="the world's held-out prompts, or its validation prompts (for tuning)")
    ap.add_argument("--rm", type=Path, default=None,
                    help="reward model for the best-of-K-by-reward-model rows (default: RUN/rm if it exists)")
    args = ap.parse_args(argv)

    prompts = read_prompts(args.run / "world" / f"prompts_{args.split}.jsonl")
    prompts = prompts[:args.limit] if args.limit > 0 else prompts
    model, tok = load_policy(args.run / "sft")
    common = dict(max_new_tokens=args.max_new_tokens, desc="sampling")
    baseline = generate(model, tok, prompts, seed=args.seed, **common)
    cold = generate(model, tok, prompts, temperature=0.05, seed=args.seed + 1, **common)
    many = generate(model, tok, prompts, n=args.k, seed=args.seed + 2, **common)

    base_scores, many_scores = scored(baseline), scored(many)
    groups = [range(i * args.k, (i + 1) * args.k) for i in range(len(prompts))]  # generate() keeps prompt order
    policies = {"sharpened (T = 0.05)": scored(cold)}
    ks = [k for k in sorted({2, 4, args.k}) if k <= args.k]
    for k in ks:
        policies[f"best-of-{k} by gold"] = [max(many_scores[j] for j in g[:k]) for g in groups]
    rm_dir = args.rm or (args.run / "rm" if (args.run / "rm").is_dir() else None)
    if rm_dir is not None:
        reward = load_reward([str(rm_dir)])
        many_rewards = reward([s.prompt for s in many], [s.response for s in many])
        for k in ks:
            policies[f"best-of-{k} by the RM"] = [many_scores[max(g[:k], key=lambda j: many_rewards[j])]
                                                  for g in groups]
        cool = generate(model, tok, prompts, n=2, temperature=0.3, seed=args.seed + 3, **common)
        cool_scores = scored(cool)
        cool_rewards = reward([s.prompt for s in cool], [s.response for s in cool])
        policies["T = 0.3, one sample"] = cool_scores[::2]
        policies["T = 0.3, best-of-2 by the RM"] = [cool_scores[max(2 * i, 2 * i + 1, key=lambda j: cool_rewards[j])]
                                                    for i in range(len(prompts))]
    modes = [Counter(many[j].response for j in g).most_common(1)[0][0] for g in groups]
    policies[f"mode-of-{args.k}"] = gold_scores(prompts, modes)
    perfect: dict[str, list[bool]] = defaultdict(list)
    for s, g in zip(baseline, base_scores):
        perfect[parse_prompt(s.prompt).type].append(g > 1 - 1e-9)

    result = {"split": args.split, "n_prompts": len(prompts), "reward_model": str(rm_dir) if rm_dir else None,
              "sft_gold_mean": sum(base_scores) / len(base_scores),
              "sft_perfect_rate": {t: sum(v) / len(v) for t, v in sorted(perfect.items())}, "policies": {}}
    print(f"{len(prompts)} {args.split} prompts; SFT (T = 1) gold mean {result['sft_gold_mean']:.3f}")
    print(f"{'policy':30s} {'gold mean':>9s} {'win rate over SFT':>20s}")
    for name, scores in policies.items():
        wr, se = win_rate(scores, base_scores)
        result["policies"][name] = {"gold_mean": sum(scores) / len(scores), "win_rate_vs_sft": wr, "se": se}
        print(f"{name:30s} {sum(scores) / len(scores):9.3f} {wr:14.3f} ± {se:.3f}")
    k = args.k
    print(f"(best-of-{k} is at most {math.log(k) - (k - 1) / k:.2f} nats from SFT)")
    print("SFT perfect rate by task: " + ", ".join(f"{t} {v:.2f}" for t, v in result["sft_perfect_rate"].items()))
    name = "headroom.json" if args.split == "heldout" else "headroom_valid.json"
    (args.run / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
