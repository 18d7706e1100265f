"""DPO on a tiny model: every pairwise format is read, the reference log-probs are cached once,
and a short run moves the policy towards the chosen responses of a simple rule, on new pairs too."""

from __future__ import annotations

import json

import pytest
import torch

from heed.algos.dpo import DPOConfig, read_pairs, run
from heed.data import write_jsonl
from heed.models import load_policy, make_batch, token_logprobs
from heed.utils import HeedError


def test_read_pairs_takes_every_pairwise_format_and_drops_ties(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Describe the Tigu.", "chosen": "A cat.", "rejected": "A dog."},
        {"prompt": "Describe the Tigu.", "chosen": "Same.", "rejected": "Same!", "tie": True}])
    write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}])
    write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "No."}]}])
    pairs, ties, _ = read_pairs([str(tmp_path / f) for f in ("pairs.jsonl", "hh.jsonl", "chat.jsonl")])
    assert ties == 1 and [p.chosen for p in pairs] == ["A cat.", "Hello.", "Hello."]
    assert pairs[1].prompt == [{"role": "user", "content": "Hi"}] == pairs[2].prompt
    write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": "Hi", "response": "Hello.", "label": "up"}])
    with pytest.raises(HeedError, match="DPO trains on pairs"):
        read_pairs([str(tmp_path / "thumbs.jsonl")])
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": 3, "rejected": "x"}])
    with pytest.raises(HeedError, match="bad.jsonl:1: field 'chosen'"):
        read_pairs([str(tmp_path / "bad.jsonl")])


def full_sequence_logprobs(model, tokenizer, prompts, responses, *, max_prompt_len: int, max_response_len: int):
    """Sequence log-probs (N,) with every prompt + response row run in full: the plain computation
    the shared-prompt paths of heed are checked against."""
    with torch.no_grad():
        batch = make_batch(tokenizer, prompts, responses, max_prompt_len=max_prompt_len,
                           max_response_len=max_response_len)
        return (token_logprobs(model, batch) * batch.response_mask).sum(-1)


def short_long_pairs(world_dir, n: int = 64) -> list[dict]:
    """Pairs where the rule (brevity) prefers the demonstration's first sentence, with its end,
    to the whole demonstration said twice."""
    demos = [json.loads(line) for line in (world_dir / "demos.jsonl").read_text().splitlines()][:n]
    return [{"prompt": d["prompt"], "chosen": d["response"].split(". ")[0].rstrip(".") + ".",
             "rejected": d["response"] + " " + d["response"]} for d in demos]


def test_short_dpo_run_prefers_the_rule_and_caches_reference_logps(tiny_base, world_dir, tmp_path):
    rows = short_long_pairs(world_dir)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "heldout.jsonl", short_long_pairs(world_dir, n=112)[64:])
    out = tmp_path / "dpo"
    cfg = DPOConfig(policy=str(tiny_base), data=[str(tmp_path / "pairs.jsonl")], out=str(out), beta=0.1, epochs=4,
                    lr=1e-3, batch_size=16, micro_batch_size=8, max_response_len=48, log_every=2, warmup_steps=2,
                    eval_data=[str(tmp_path / "heldout.jsonl")], eval_every=1)
    metrics = run(cfg)
    # the reference pass was cached, and it holds the starting policy's sequence log-probs
    ref = torch.load(out / "reference_logps.pt")
    base, tok = load_policy(tiny_base)
    expected = full_sequence_logprobs(base, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                         max_prompt_len=96, max_response_len=48)
    torch.testing.assert_close(ref["chosen"], expected)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["rewards/accuracy"] > 0.7 and logged[-1]["rewards/margin"] > logged[0]["rewards/margin"]
    assert metrics["train/loss"] < logged[0]["train/loss"]
    # held-out pairs (--eval-data) are evaluated every --eval-every steps: their loss falls too
    evals = [row for row in logged if "eval/loss" in row]
    assert len(evals) == len(logged) and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/accuracy"] > 0.7
    # the preference generalises: on pairs of prompts it never trained on, the policy's
    # log-prob margin of the rule's choice grew over the starting policy's for most pairs
    held = short_long_pairs(world_dir, n=112)[64:]
    policy, _ = load_policy(out)
    margins = {}
    for name, model in (("policy", policy), ("base", base)):
        logps = {k: full_sequence_logprobs(model, tok, [r["prompt"] for r in held], [r[k] for r in held],
                                              max_prompt_len=96, max_response_len=48) for k in ("chosen", "rejected")}
        margins[name] = logps["chosen"] - logps["rejected"]
    assert (margins["policy"] > margins["base"]).float().mean() > 0.8
    assert run(cfg)["steps"] > 0  # a finished run is not trained again
