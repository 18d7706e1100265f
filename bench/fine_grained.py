"""Span feedback against pairwise comparisons, at equal numbers of judged responses.

    python bench/fine_grained.py --run runs/demo --out runs/fine_grained \
        --budgets 100,300,1000,3000 --ppo-budgets 1000

`--run` is a finished `heed demo` directory: its world, SFT policy and SFT samples
(4 per training prompt). For each budget B (judged responses) the simulated labeler
judges the same SFT samples, in the same order, two ways:

  pairs   B / 2 comparisons (each judges two responses): `heed label oracle --kind pairs`,
          then a scalar reward model (`heed rm train`, the demo's settings)
  spans   B responses, each with its sentences marked wrong / irrelevant / rude / repeated /
          good (`--kind spans`, same noise model), then a token-level reward model
          (`heed rm train --format spans`, same settings)

Each reward model is judged against the gold oracle on pairs of SFT samples for the
world's held-out prompts (`heed rm eval --oracle heed.rules:gold`): the share of pairs
with different gold scores that it orders as gold does. At the `--ppo-budgets`, PPO
(the demo's settings) trains against each reward model, with `--dense-rewards` for the
token-level one (each span's reward at its last token), and its gold win rate over the
SFT policy is measured on the held-out prompts, one sample each, as the demo does. The
token-level models' per-label accuracy is measured on the held-out pairs' responses, marked
by the simulated labeler (`heed.reward_metrics.span_metrics`).
Finished runs are reused, so a killed benchmark resumes. Writes OUT/results.json,
OUT/table.md and OUT/fine_grained.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heed.algos.ppo import PPOConfig, run as ppo_run
from heed.algos.reward import RewardTrainConfig, train as rm_train
from heed.data import read_feedback, read_prompts, write_jsonl
from heed.evaluate import gold_scores, win_rate
from heed.generate import generate
from heed.label_oracle import group_by_prompt, label
from heed.models import load_policy
from heed.reward_metrics import RewardEvalConfig, evaluate, span_metrics
from heed.reward_model import RewardModel
from heed.world import SimulatedLabeler

KINDS = ("pairs", "spans")
RESPONSES_PER_ROW = {"pairs": 2, "spans": 1}


def heldout_pairs(run: Path, out: Path, n_prompts: int, seed: int) -> Path:
    """Two SFT samples per held-out prompt, as pairs ordered by gold (equal scores left out)."""
    path = out / "heldout_pairs.jsonl"
    if not path.exists():
        prompts = read_prompts(run / "world" / "prompts_heldout.jsonl")[:n_prompts]
        model, tok = load_policy(run / "sft")
        samples = generate(model, tok, prompts, n=2, max_new_tokens=48, seed=seed + 7, desc="held-out pairs")
        scores = gold_scores([s.prompt for s in samples], [s.response for s in samples])
        rows = []
        for i in range(0, len(samples), 2):
            a, b = samples[i], samples[i + 1]
            if abs(scores[i] - scores[i + 1]) > 1e-9:
                better, worse = (a, b) if scores[i] > scores[i + 1] else (b, a)
                rows.append({"prompt": a.prompt, "chosen": better.response, "rejected": worse.response})
        write_jsonl(path, rows)
    return path


def heldout_spans(out: Path, seed: int) -> Path:
    """The held-out pairs' responses with their spans marked by the simulated labeler."""
    path = out / "heldout_spans.jsonl"
    if not path.exists():
        pairs = [json.loads(line) for line in (out / "heldout_pairs.jsonl").read_text().splitlines()]
        labeler = SimulatedLabeler(seed + 1)
        write_jsonl(path, [{"prompt": p["prompt"], "response": r, "spans": labeler.mark(p["prompt"], r)}
                           for p in pairs for r in (p["chosen"], p["rejected"])])
    return path


def labels_for(kind: str, budget: int, run: Path, out: Path, seed: int) -> Path:
    """The first `budget` judged responses of the demo's SFT samples, labelled as `kind`."""
    path = out / f"{kind}_{budget}.jsonl"
    if not path.exists():
        samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        groups = group_by_prompt([(r["prompt"], r["response"]) for r in samples])
        rows, _ = label(groups, kind, SimulatedLabeler(seed), budget=budget // RESPONSES_PER_ROW[kind])
        write_jsonl(path, rows)
    return path


def ppo_win_rate(run: Path, policy: Path, prompts: list, seed: int) -> tuple[float, float]:
    """Gold win rate of `policy` over the SFT policy on `prompts` (one sample each, T = 1)."""
    scores = {}
    for name, path in (("sft", run / "sft"), ("policy", policy)):
        model, tok = load_policy(path)
        samples = generate(model, tok, prompts, max_new_tokens=48, temperature=1.0, seed=seed + 1,
                           desc=f"eval {path.name}")
        scores[name] = gold_scores(prompts, [s.response for s in samples])
    return win_rate(scores["policy"], scores["sft"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `heed demo` directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="100,300,1000,3000", help="judged responses per run, comma-separated")
    ap.add_argument("--ppo-budgets", default="1000", help="budgets at which PPO trains on each reward model")
    ap.add_argument("--eval-prompts", type=int, default=600, help="held-out prompts for the PPO win rates")
    ap.add_argument("--rm-eval-prompts", type=int, default=600, help="held-out prompts for the reward models' pairs")
    ap.add_argument("--rm-epochs", type=float, default=3.0)
    ap.add_argument("--rm-lr", type=float, default=3e-4)
    ap.add_argument("--ppo-steps", type=int, default=60)
    ap.add_argument("--ppo-lr", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    eval_pairs = heldout_pairs(args.run, out, args.rm_eval_prompts, args.seed)
    heldout = read_prompts(args.run / "world" / "prompts_heldout.jsonl")[:args.eval_prompts]
    ppo_budgets = {int(b) for b in args.ppo_budgets.split(",") if b}

    for budget in (int(b) for b in args.budgets.split(",")):
        for kind in KINDS:
            key = f"{kind}/{budget}"
            entry = results.get(key, {"kind": kind, "judged_responses": budget})
            data = labels_for(kind, budget, args.run, out, args.seed)
            rm_dir = out / f"rm_{kind}_{budget}"
            if "gold_accuracy" not in entry:
                t0 = time.time()
                rm_train(RewardTrainConfig(model=str(args.run / "sft"), data=[str(data)], out=str(rm_dir),
                                           epochs=args.rm_epochs, lr=args.rm_lr, eval_fraction=0.0,
                                           seed=args.seed))
                ev = evaluate(RewardEvalConfig(model=str(rm_dir), data=[str(eval_pairs)],
                                               oracle="heed.rules:gold"))["overall"]
                entry.update(rows=sum(1 for _ in data.open()), gold_accuracy=ev["gold_accuracy"],
                             gold_pairs=ev["gold_pairs"], rm_seconds=round(time.time() - t0, 1))
            if kind == "spans" and "per_label" not in entry:  # the token-level model on held-out marks
                spans = read_feedback(heldout_spans(out, args.seed)).rows
                m = span_metrics(RewardModel.load(rm_dir), spans)
                entry.update(span_accuracy=m["span_accuracy"], untagged_accuracy=m["untagged_accuracy"],
                             per_label={label: v["accuracy"] for label, v in m["per_label"].items()})
            if budget in ppo_budgets and "win_rate_vs_sft" not in entry:
                t0 = time.time()
                ppo_dir = out / f"ppo_{kind}_{budget}"
                prompts = str(args.run / "world" / "prompts_train.jsonl")
                ppo_run(PPOConfig(policy=str(args.run / "sft"), prompts=prompts,
                                  reward=[str(rm_dir)], out=str(ppo_dir), steps=args.ppo_steps, lr=args.ppo_lr,
                                  monitor=["heed.rules:gold"], seed=args.seed, dense_rewards=kind == "spans"))
                entry["ppo_seconds"] = round(time.time() - t0, 1)
                entry["win_rate_vs_sft"], entry["win_rate_se"] = ppo_win_rate(args.run, ppo_dir, heldout, args.seed)
            results[key] = entry
            results_file.write_text(json.dumps(results, indent=2))
            print(json.dumps(entry))
    (out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    plot(results, out / "fine_grained.png")


def table(results: dict) -> str:
    budgets = sorted({r["judged_responses"] for r in results.values()})
    lines = ["| judged responses | RM vs gold: pairs | RM vs gold: spans | PPO win rate over SFT: pairs | "
             "PPO win rate over SFT: spans |", "|---|---|---|---|---|"]
    for b in budgets:
        cells = []
        for field in ("gold_accuracy", "win_rate_vs_sft"):
            for kind in KINDS:
                r = results.get(f"{kind}/{b}", {})
                value = r.get(field)
                se = f" ± {r['win_rate_se']:.3f}" if field == "win_rate_vs_sft" and value is not None else ""
                cells.append("" if value is None else f"{value:.3f}{se}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    spans = sorted((r for r in results.values() if "per_label" in r), key=lambda r: r["judged_responses"])
    if spans:
        labels = list(spans[0]["per_label"])
        lines += ["", "Token-level reward model, held-out marked spans found (per label) and unmarked tokens "
                  "left unmarked:",
                  "", "| judged responses | " + " | ".join(labels) + " | all spans | unmarked tokens |",
                  "|---" * (len(labels) + 3) + "|"]
        lines += [f"| {r['judged_responses']} | " + " | ".join(f"{r['per_label'][label]:.3f}" for label in labels)
                  + f" | {r['span_accuracy']:.3f} | {r['untagged_accuracy']:.3f} |" for r in spans]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in zip(KINDS, ("o-", "s-")):
        rows = sorted((r for r in results.values() if r["kind"] == kind), key=lambda r: r["judged_responses"])
        xs = [r["judged_responses"] for r in rows if "gold_accuracy" in r]
        axes[0].plot(xs, [r["gold_accuracy"] for r in rows if "gold_accuracy" in r], style, label=kind)
        ppo = [r for r in rows if "win_rate_vs_sft" in r]
        axes[1].errorbar([r["judged_responses"] for r in ppo], [r["win_rate_vs_sft"] for r in ppo],
                         yerr=[r["win_rate_se"] for r in ppo], fmt=style, label=kind, capsize=3)
    axes[0].set(xscale="log", xlabel="judged responses", ylabel="accuracy against gold",
                title="reward model on held-out pairs")
    axes[1].set(xscale="log", xlabel="judged responses", ylabel="gold win rate over SFT", title="PPO")
    axes[1].axhline(0.5, color="grey", lw=0.8)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
