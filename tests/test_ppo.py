"""PPO on a real (tiny) language model: log-probs and values line up, updates move the policy, the
reward goes up while KL stays bounded, and two processes stay in lockstep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heed.algos.ppo import PPOConfig, PPOTrainer
from heed.data import read_prompts
from heed.models import load_policy


def brevity(prompts, responses):
    """A simple rule: shorter responses score higher."""
    return [-len(r) / 20 for r in responses]


def make_trainer(policy_dir, world_dir, out, **overrides):
    cfg = dict(policy=str(policy_dir), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"],
               out=str(out), steps=8, prompts_per_iteration=32, mini_batch_size=16, micro_batch_size=8, ppo_epochs=2,
               max_new_tokens=24, lr=2e-3, kl_coef=0.02, save_every=1000, samples_every=1000)
    cfg.update(overrides)
    return PPOTrainer(PPOConfig(**cfg), reward_fn=brevity, prompts=read_prompts(world_dir / "prompts_train.jsonl"))


def test_rollout_logprobs_and_values_equal_a_forward_pass(tiny_base, world_dir, tmp_path):
    trainer = make_trainer(tiny_base, world_dir, tmp_path, temperature=0.7)
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:12]
    exp = trainer.rollout(prompts, torch.Generator().manual_seed(0))
    assert not exp.values.any()  # the value head starts at zero: V = 0 in every state
    torch.nn.init.normal_(trainer.actor_critic.value_head.weight, std=0.1)  # so the columns below mean something
    exp = trainer.rollout(prompts, torch.Generator().manual_seed(0))
    assert exp.values[exp.mask.bool()].abs().min() > 0
    P = exp.batch.prompt_len
    assert not exp.mask[:, :P].any() and bool(exp.mask[:, P].all())  # responses start right after the prompts
    assert not bool(exp.batch.attention_mask[:, 0].all())  # and the prompts really are left-padded
    with torch.no_grad():
        logprobs, _, values = trainer.actor_critic(exp.batch, 0.7)
    m = exp.mask.bool()
    torch.testing.assert_close(logprobs[m], exp.logprobs[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values[m], exp.values[m], atol=1e-4, rtol=1e-4)
    # the reference starts as a copy: its log-probs equal the policy's
    torch.testing.assert_close(exp.ref_logprobs[m], exp.logprobs[m], atol=1e-4, rtol=1e-4)
    assert len(exp.texts) == 12 and exp.prompts == prompts and exp.finished.dtype == torch.bool


def test_step_on_hand_made_triplets_changes_the_parameters(tiny_base, world_dir, tmp_path):
    trainer = make_trainer(tiny_base, world_dir, tmp_path, ppo_epochs=1)
    before = {k: v.clone() for k, v in trainer.actor_critic.state_dict().items()}
    stats = trainer.step(["Is the Febo black?", "Describe the Buba."],
                         ["Yes, the Febo is black.", "The Buba is a small black fish."], [1.0, -1.0])
    after = trainer.actor_critic.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("policy.") for k in changed) and "value_head.weight" in changed
    for key in ("loss/policy", "loss/value", "objective/kl", "clipfrac", "policy/entropy"):
        assert key in stats and stats[key] == stats[key]  # present and not NaN
    with pytest.raises(ValueError):
        trainer.step(["a"], ["b", "c"], [1.0])


@pytest.mark.slow
def test_short_ppo_run_raises_a_rule_reward_with_bounded_kl(tiny_base, world_dir, tmp_path):
    trainer = make_trainer(tiny_base, world_dir, tmp_path / "ppo", normalize_reward=False, missing_eos_penalty=0.0)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = rows[0]["reward/raw"], sum(r["reward/raw"] for r in rows[-2:]) / 2
    assert last > first + 0.2, (first, last)
    assert max(r["objective/kl"] for r in rows) < 25
    policy, _ = load_policy(tmp_path / "ppo")  # the saved policy loads back as a plain causal LM
    assert (tmp_path / "ppo" / "value_head.pt").exists()


@pytest.mark.slow
def test_two_process_ppo_keeps_ranks_identical(tiny_base, world_dir, tmp_path):
    script = Path(__file__).with_name("ddp_ppo_script.py")
    env = dict(os.environ, HEED_QUIET="1", OMP_NUM_THREADS="1")
    launcher = str(Path(sys.executable).parent / "accelerate")
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tiny_base),
                        str(world_dir / "prompts_train.jsonl"), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "processes1.txt").read_text() == "2", "accelerate did not train with two processes"
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    base, _ = load_policy(tiny_base)
    for name, p in rank0.items():
        assert torch.equal(p, rank1[name]), f"ranks differ at {name}"
    assert not torch.equal(rank0["policy.model.embed_tokens.weight"], base.model.embed_tokens.weight)


def test_a_micro_batch_keeps_only_the_columns_its_rows_use(tiny_base):
    """online.Rows: a micro-batch of a rollout is cut to the columns its rows use, and its
    log-probs there equal the full-width batch's, column for column."""
    from heed.algos.online import Rows
    from heed.models import collate, encode_prompts, encode_responses, token_logprobs

    model, tok = load_policy(tiny_base)
    prompts = ["Hi.", "Describe the Buba, the small fish of the river, in a few words, please.", "Is the Febo black?"]
    responses = ["Hello there, how are you today?", "A fish.", "Yes."]
    full = collate(encode_prompts(tok, prompts, 64), encode_responses(tok, responses, 32), tok.pad_token_id)
    at = Rows.of([2, 0], full)
    sub = at.batch(full)
    assert sub.input_ids.shape[1] < full.input_ids.shape[1]
    assert bool(sub.attention_mask[:, 0].any()) and bool(sub.attention_mask[:, -1].any())  # no all-pad column
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(model, sub) * sub.response_mask,
                                   at(token_logprobs(model, full) * full.response_mask), atol=1e-5, rtol=1e-5)
    assert torch.equal(at(full.response_mask), sub.response_mask) and torch.equal(at(torch.arange(3)), at.rows)
