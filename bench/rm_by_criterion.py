"""Where a reward model goes wrong on the embedded world: held-out accuracy against the gold
oracle, by the criterion that decides each pair and by task.

    .venv/bin/python bench/rm_by_criterion.py runs/demo/rm runs/demo/labels.jsonl

The held-out pairs are the ones `heed rm train` held out (the same prompt split: share and
seed as given). A pair is decided by the gold criterion whose points differ most between its
two responses; pairs the oracle ties are left out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from heed.data import Pair, read_feedback_files, split_by_prompt
from heed.reward_model import load_reward_model
from heed.world.oracle import score_breakdown
from heed.world.tasks import parse_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rm", help="reward-model directory")
    p.add_argument("data", help="the pairs it was trained on (JSONL)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="as given to heed rm train")
    p.add_argument("--seed", type=int, default=0, help="as given to heed rm train")
    args = p.parse_args()
    rows = [r for f in read_feedback_files([args.data], "auto", False) for r in f.rows]
    _, heldout = split_by_prompt(rows, args.eval_fraction, args.seed)
    pairs = [r for r in heldout if isinstance(r, Pair) and not r.tie]
    rm = load_reward_model(args.rm)
    chosen, _ = rm.score([r.prompt for r in pairs], [r.chosen for r in pairs])
    rejected, _ = rm.score([r.prompt for r in pairs], [r.rejected for r in pairs])
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row, a, b in zip(pairs, chosen, rejected):
        ba, bb = score_breakdown(row.prompt, row.chosen), score_breakdown(row.prompt, row.rejected)
        gap = sum(ba.values()) - sum(bb.values())
        if abs(gap) < 1e-9:
            continue
        criterion = max(ba, key=lambda c: abs(ba[c] - bb[c]))
        right = (a > b) == (gap > 0)
        for key in (("all", ""), ("criterion", criterion), ("task", parse_prompt(row.prompt).type)):
            tally[key][0] += right
            tally[key][1] += 1
    print(f"{'':<10} {'':<14} {'pairs':>6} {'accuracy vs gold':>17}")
    for (kind, name), (right, n) in sorted(tally.items(), key=lambda kv: (kv[0][0], -kv[1][1])):
        print(f"{kind:<10} {name:<14} {n:>6} {right / n:>17.3f}")


if __name__ == "__main__":
    main()
