"""GRPO and RLOO on a tiny model: rollout log-probs equal a forward pass, groups are laid out
prompt by prompt, and short runs raise a simple rule reward."""

from __future__ import annotations

import json

import pytest
import torch

from heed.algos.grpo import GroupTrainer, GRPOConfig, RLOOConfig
from heed.data import read_prompts
from heed.models import load_policy, token_logprobs


def brevity(prompts, responses):
    """A simple rule: shorter responses score higher."""
    return [-len(r) / 20 for r in responses]


def make_trainer(cls, policy_dir, world_dir, out, **overrides):
    cfg = dict(policy=str(policy_dir), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"], out=str(out),
               steps=6, prompts_per_iteration=6, n=4, mini_batch_size=24, micro_batch_size=24, max_new_tokens=20,
               lr=1e-3, save_every=1000, samples_every=1000, missing_eos_penalty=0.0, normalize_reward=False)
    cfg.update(overrides)
    return GroupTrainer(cls(**cfg), reward_fn=brevity, prompts=read_prompts(world_dir / "prompts_train.jsonl"))


def test_rollout_groups_and_logprobs(tiny_base, world_dir, tmp_path):
    trainer = make_trainer(GRPOConfig, tiny_base, world_dir, tmp_path, temperature=0.8, n=3)
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:5]
    exp = trainer.rollout(prompts, torch.Generator().manual_seed(0))
    assert exp.prompts == [p for p in prompts for _ in range(3)] and len(exp.texts) == 15
    with torch.no_grad():
        logprobs = token_logprobs(trainer.policy, exp.batch, temperature=0.8)
    m = exp.mask.bool()
    torch.testing.assert_close(logprobs[m], exp.logprobs[m], atol=1e-4, rtol=1e-4)
    # the reference starts as a copy: its log-probs equal the policy's
    torch.testing.assert_close(exp.ref_logprobs[m], exp.logprobs[m], atol=1e-4, rtol=1e-4)
    # one update step moves the weights; the KL is measured against the unchanged reference
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    exp.scores = torch.tensor(brevity(exp.prompts, exp.texts))
    metrics = trainer.optimize(exp, torch.Generator().manual_seed(0))
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    assert abs(metrics["objective/kl"]) < 1e-4 and "kl_k3" in metrics
    assert metrics["loss/policy"] == metrics["loss/policy"] and metrics["train/grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_short_run_raises_a_rule_reward(tiny_base, world_dir, tmp_path, cls):
    trainer = make_trainer(cls, tiny_base, world_dir, tmp_path / "run")
    assert trainer.name == ("grpo" if cls is GRPOConfig else "rloo")
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    first, last = sum(r["reward/raw"] for r in rows[:2]) / 2, sum(r["reward/raw"] for r in rows[-2:]) / 2
    assert last > first + 0.2, (first, last)
    assert max(r["objective/kl"] for r in rows) < 25
    load_policy(tmp_path / "run")  # the saved policy loads back as a plain causal LM
    assert (tmp_path / "run" / "trainer_done.json").exists()
