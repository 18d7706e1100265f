"""The same reward model trained from each feedback kind and label budget, judged against gold.

    python bench/rm_feedback_kinds.py --sft /tmp/r1/sft --samples train_samples.jsonl \
        --eval heldout_pairs.jsonl --out runs/rm_kinds --budgets 250,500,1000,0

`--samples` holds several responses per prompt sampled from the SFT policy
(`heed sample --n 4`). The simulated labeler labels those same samples as
pairs, rankings (of 4), thumbs and ratings (`heed label oracle`); for each
budget (a number of labels, i.e. judgements; 0 = every label the samples
give) a reward model is trained with `heed rm train` defaults, and evaluated
with `heed rm eval` on `--eval`: pairs the RM never saw. The table reports
accuracy against the gold oracle's noiseless preference, the number of
responses the labels covered, and the training time. Runs that finished are
reused, so a killed benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heed.algos.reward import RewardTrainConfig, train
from heed.label_oracle import OracleLabelConfig, run as label
from heed.reward_metrics import RewardEvalConfig, evaluate

KINDS = ("pairs", "rankings", "thumbs", "ratings")
RESPONSES_PER_LABEL = {"pairs": 2, "rankings": 4, "thumbs": 1, "ratings": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, help="SFT model directory (trunk init)")
    ap.add_argument("--samples", required=True, help="prompt/response rows, several per prompt")
    ap.add_argument("--eval", required=True, help="held-out labelled pairs to evaluate on")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budgets", default="250,500,1000,0", help="labels per run, comma-separated (0 = all)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--train-args", default="", help="extra `heed rm train` fields as key=value,key=value")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(kv.split("=", 1) for kv in args.train_args.split(",") if kv)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for kind in args.kinds.split(","):
        labels = out / f"{kind}.jsonl"
        if not labels.exists():
            label(OracleLabelConfig(samples=args.samples, out=str(labels), kind=kind, k=4, seed=args.seed))
        n_labels = sum(1 for _ in labels.open())
        for budget in (int(b) for b in args.budgets.split(",")):
            n = n_labels if budget == 0 else min(budget, n_labels)
            key = f"{kind}/{n}"  # "all" may equal a budget already run
            if key in results:
                continue
            data = out / f"{kind}_{n}.jsonl"
            data.write_text("".join(labels.open().readlines()[:n]))
            rm_dir = out / f"rm_{kind}_{n}"
            t0 = time.time()
            from heed.config import build

            cfg = build(RewardTrainConfig, {"model": args.sft, "data": [str(data)], "out": str(rm_dir),
                                            "eval_fraction": 0.0, "norm_samples": 0, "seed": args.seed, **extra})
            train(cfg)
            seconds = time.time() - t0
            ev = evaluate(RewardEvalConfig(model=str(rm_dir), data=[args.eval], oracle="heed.rules:gold"))["overall"]
            results[key] = {"kind": kind, "labels": n, "responses": n * RESPONSES_PER_LABEL[kind],
                            "gold_accuracy": ev["gold_accuracy"], "label_accuracy": ev["accuracy"],
                            "calibration_error": ev["calibration_error"], "train_seconds": round(seconds, 1)}
            results_file.write_text(json.dumps(results, indent=2))
            print(json.dumps(results[key]))
    print(table(results))
    (out / "table.md").write_text(table(results) + "\n")


def table(results: dict) -> str:
    budgets = sorted({r["labels"] for r in results.values()})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in results.values())]
    lines = ["| feedback kind | " + " | ".join(f"{b} labels" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for kind in kinds:
        cells = []
        for b in budgets:
            r = next((r for r in results.values() if r["kind"] == kind and r["labels"] == b), None)
            cells.append(f"{r['gold_accuracy']:.3f} ({r['train_seconds']:.0f}s)" if r else "")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
