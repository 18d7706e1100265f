"""REBEL: the filter stage on crafted rows, the stages chained through files by the CLI, and a
short iterated run raising a simple rule reward."""

from __future__ import annotations

import json

import pytest

from heed.algos.rebel import REBELConfig, REBELTrainer
from heed.cli import main
from heed.data import read_prompts, read_reward_pairs, write_jsonl
from heed.filter import filter_rows


def row(prompt, response, reward, finished=True):
    return {"prompt": prompt, "response": response, "reward": reward, "finished": finished}


def test_filter_drops_long_unfinished_and_duplicates_and_keeps_best_and_worst():
    rows = [
        row("Describe the Tigu.", "A cat.", 0.5),
        row("Describe the Tigu.", " A cat. ", 0.9),                   # duplicate (whitespace aside)
        row("Describe the Tigu.", "The Tigu is black.", 1.0),   # best
        row("Describe the Tigu.", "Dog.", -1.0),                      # worst
        row("Describe the Tigu.", "one two three four five six", 3.0),  # over-long (6 words > 5)
        row("Describe the Tigu.", "Cut mid", 5.0, finished=False),   # never ended
        row("Is the Tigu a cat?", "Yes.", 0.2),
        row("Is the Tigu a cat?", "Yes.", 0.7),                       # duplicate: one response left
        row("a b c d e f g h", "Fine.", 1.0),                         # over-long prompt (8 words > 6)
        row("a b c d e f g h", "Bad.", 0.0),
        row("Name the birds.", "Ferta.", 0.3),
        row("Name the birds.", "Kogo.", 0.3),                         # equal rewards: a tie
    ]
    pairs, stats = filter_rows(rows, max_prompt_len=6, max_response_len=5)
    assert pairs == [
        {"prompt": "Describe the Tigu.", "chosen": "The Tigu is black.", "rejected": "Dog.",
         "chosen_reward": 1.0, "rejected_reward": -1.0},
        {"prompt": "Name the birds.", "chosen": "Ferta.", "rejected": "Kogo.", "chosen_reward": 0.3,
         "rejected_reward": 0.3, "tie": True}]
    assert stats == {"rows": 12, "long_prompt": 2, "long_response": 1, "unfinished": 1, "duplicate": 2,
                     "single": 1, "pairs": 2, "ties": 1}
    # keeping unfinished responses lets the cut one win; other selections keep the best or a random pair
    pairs, _ = filter_rows(rows, max_prompt_len=6, max_response_len=5, drop_unfinished=False)
    assert pairs[0]["chosen"] == "Cut mid"
    for select in ("best-random", "random-pair"):
        for seed in range(5):
            pairs, _ = filter_rows(rows[:4], select=select, seed=seed)
            (p,) = pairs
            assert p["chosen_reward"] > p["rejected_reward"]
            if select == "best-random":
                assert p["chosen"] == "The Tigu is black."
    # a token-length function can replace word counts
    pairs, stats = filter_rows(rows[:4], length=lambda x: len(x), max_response_len=6)
    assert stats["long_response"] == 2 and pairs[0]["chosen"] == "A cat."


RULE = '''
def brevity(prompts, responses):
    return [-len(r) / 20 for r in responses]
'''


def test_stages_compose_through_files(tiny_base, world_dir, tmp_path):
    (tmp_path / "rules.py").write_text(RULE)
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:12]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    d = str(tmp_path)
    assert main(["sample", "--model", str(tiny_base), "--prompts", d + "/prompts.jsonl", "--out", d + "/samples.jsonl",
                 "--n", "4", "--max-new-tokens", "16"]) == 0
    assert main(["rm", "score", "--data", d + "/samples.jsonl", "--reward", d + "/rules.py:brevity",
                 "--out", d + "/scored.jsonl"]) == 0
    assert main(["filter", "--data", d + "/scored.jsonl", "--out", d + "/pairs.jsonl", "--model", str(tiny_base),
                 "--max-response-len", "16", "--no-drop-unfinished"]) == 0
    pairs = read_reward_pairs(d + "/pairs.jsonl")
    assert pairs and all(len(p["chosen"]) <= len(p["rejected"]) for p in pairs)
    assert main(["rebel", "--policy", str(tiny_base), "--data", d + "/pairs.jsonl", "--out", d + "/rebel",
                 "--epochs", "1", "--batch-size", "8", "--micro-batch-size", "8"]) == 0
    state = json.loads((tmp_path / "rebel" / "trainer_done.json").read_text())
    assert state["iterations"] == 1 and state["train/loss"] == state["train/loss"]
    assert (tmp_path / "rebel" / "config.json").exists()
    # the pairs file is pairwise feedback: DPO reads it too
    assert main(["dpo", "--policy", str(tiny_base), "--data", d + "/pairs.jsonl", "--out", d + "/dpo",
                 "--epochs", "1", "--batch-size", "8", "--micro-batch-size", "8"]) == 0


def brevity(prompts, responses):
    return [-len(r) / 20 for r in responses]


@pytest.mark.slow
def test_short_rebel_run_raises_a_rule_reward(tiny_base, world_dir, tmp_path):
    cfg = REBELConfig(policy=str(tiny_base), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"],
                      out=str(tmp_path / "rebel"), iterations=6, prompts_per_iteration=24, n=4, eta=1.0,
                      save_every=100, lr=3e-4, batch_size=12, micro_batch_size=12, max_new_tokens=24,
                      max_response_len=24, drop_unfinished=False)
    trainer = REBELTrainer(cfg, reward_fn=brevity, prompts=read_prompts(world_dir / "prompts_train.jsonl"))
    trainer.train()
    trainer.save()
    rows = [json.loads(line) for line in (tmp_path / "rebel" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    first, last = rows[0]["reward/mean"], sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert last > first + 0.2, (first, last)
    for it in range(1, 7):  # every iteration's files are kept
        for name in ("samples.jsonl", "scored.jsonl", "pairs.jsonl"):
            assert (tmp_path / "rebel" / f"iter_{it:02d}" / name).exists()
