"""LoRA (peft) on the training stages: the adapter learns while every base weight stays bit-identical,
the reference is the policy with its adapter off, runs resume, and `heed merge` writes a plain model."""

from __future__ import annotations

import json

import pytest
import torch

from heed.algos.common import Learner
from heed.algos.dpo import DPOConfig, run as run_dpo
from heed.algos.ppo import PPOConfig, PPOTrainer
from heed.algos.sft import SFTConfig, run as run_sft
from heed.cli import main
from heed.data import read_prompts, write_jsonl
from heed.generate import sample_tokens
from heed.models import encode_prompts, is_peft, load_policy, make_batch, token_logprobs, unwrap

pytest.importorskip("peft")


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of a model that is not LoRA's, by the name it has without the adapter."""
    return {name.replace(".base_layer", ""): p.detach().clone() for name, p in unwrap(model).named_parameters()
            if "lora_" not in name}


def assert_same_weights(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, p in before.items():
        assert torch.equal(p, after[name]), f"base weight {name} changed"


def brevity(prompts, responses):
    return [-len(r) / 20 for r in responses]


def lora_ppo(tiny_base, world_dir, out, **overrides) -> PPOTrainer:
    cfg = dict(policy=str(tiny_base), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"], out=str(out),
               steps=8, prompts_per_iteration=32, mini_batch_size=16, micro_batch_size=8, ppo_epochs=2,
               max_new_tokens=24, lr=1e-2, kl_coef=0.02, save_every=1000, samples_every=1000, lora_r=8,
               normalize_reward=False, missing_eos_penalty=0.0)
    cfg.update(overrides)
    return PPOTrainer(PPOConfig(**cfg), reward_fn=brevity, prompts=read_prompts(world_dir / "prompts_train.jsonl"))


def test_the_reference_is_the_policy_with_its_adapter_off(tiny_base, world_dir, tmp_path):
    trainer = lora_ppo(tiny_base, world_dir, tmp_path)
    assert is_peft(trainer.policy) and trainer.reference.adapter_off  # no second copy of the weights
    trainable = [n for n, p in trainer.learner.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    for name, p in trainer.policy.named_parameters():  # an adapter that has moved
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    tok = trainer.tokenizer
    batch = make_batch(tok, ["Describe the Buba.", "Is the Febo black?"], ["The Buba is a fish.", "Yes."])
    frozen, _ = load_policy(tiny_base)  # a separate frozen copy of the initial model
    with torch.no_grad():
        expected = token_logprobs(frozen.eval(), batch)
        with trainer.reference() as reference:
            ref = token_logprobs(reference, batch)
        policy = token_logprobs(trainer.policy, batch)
    m = batch.response_mask.bool()
    torch.testing.assert_close(ref[m], expected[m], atol=1e-5, rtol=1e-5)
    assert (policy[m] - expected[m]).abs().max() > 1e-2  # and outside the context the adapter is on again
    exp = trainer.rollout(read_prompts(world_dir / "prompts_train.jsonl")[:6], torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = token_logprobs(frozen, exp.batch) * exp.mask
    torch.testing.assert_close(exp.ref_logprobs, full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lora_ppo_raises_a_rule_reward_and_leaves_the_base_weights_alone(tiny_base, world_dir, tmp_path):
    trainer = lora_ppo(tiny_base, world_dir, tmp_path / "ppo")
    before = base_weights(trainer.policy)
    head_before = trainer.actor_critic.value_head.weight.detach().clone()
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["reward/raw"], sum(r["reward/raw"] for r in rows[-2:]) / 2
    assert last > first + 0.2, (first, last)
    assert_same_weights(before, base_weights(trainer.policy))
    assert not torch.equal(head_before, trainer.actor_critic.value_head.weight)  # the value head trains in full
    out = tmp_path / "ppo"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "value_head.pt").exists()
    merged, _ = load_policy(out)  # an adapter directory loads as base + adapter
    assert not is_peft(merged)


def short_long_pairs(world_dir, n: int = 48) -> list[dict]:
    demos = [json.loads(line) for line in (world_dir / "demos.jsonl").read_text().splitlines()][:n]
    return [{"prompt": d["prompt"], "chosen": d["response"].split(". ")[0].rstrip(".") + ".",
             "rejected": d["response"] + " " + d["response"]} for d in demos]


@pytest.fixture(scope="module")
def lora_dpo(tiny_base, world_dir, tmp_path_factory):
    """A LoRA DPO run: (its output directory, its metrics, the base weights before and after)."""
    import heed.algos.dpo as dpo

    tmp = tmp_path_factory.mktemp("lora_dpo")
    write_jsonl(tmp / "pairs.jsonl", short_long_pairs(world_dir))
    seen = {}
    train_offline = dpo.train_offline

    def spy(model, *args, **kwargs):  # the model DPO trains, before and after
        seen["before"] = base_weights(model.policy)
        result = train_offline(model, *args, **kwargs)
        seen["after"] = base_weights(model.policy)
        return result

    dpo.train_offline = spy
    try:
        cfg = DPOConfig(policy=str(tiny_base), data=[str(tmp / "pairs.jsonl")], out=str(tmp / "dpo"), epochs=3,
                        lr=1e-2, batch_size=16, micro_batch_size=8, max_response_len=48, log_every=1,
                        warmup_steps=1, lora_r=8)
        run_dpo(cfg)
    finally:
        dpo.train_offline = train_offline
    logged = [json.loads(line) for line in (tmp / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return tmp / "dpo", logged, seen


def test_lora_dpo_learns_the_preference_and_leaves_the_base_weights_alone(lora_dpo):
    out, logged, seen = lora_dpo
    assert logged[-1]["rewards/margin"] > logged[0]["rewards/margin"] + 0.5, (logged[0], logged[-1])
    assert logged[-1]["rewards/accuracy"] > 0.7
    assert_same_weights(seen["before"], seen["after"])
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))  # peft's format: the adapter only
    assert saved and all("lora_" in k for k in saved)


def test_heed_merge_writes_a_plain_model_that_generates_like_the_adapter(lora_dpo, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, _ = lora_dpo
    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base, tok = load_policy(tiny_base)
    adapter = PeftModel.from_pretrained(base, str(out)).eval()  # not merged: base + B A x at every layer
    prompts = encode_prompts(tok, ["Describe the Buba.", "Is the Febo black?", "List the black animals."], 96)
    greedy = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=20, temperature=0.0)
    theirs = sample_tokens(plain, prompts, **greedy)[0]
    ours = sample_tokens(adapter, prompts, **greedy)[0]
    assert torch.equal(theirs, ours)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    # and every stage takes the merged directory as a model
    load_policy(tmp_path / "merged")


def test_a_killed_lora_run_resumes_where_it_stopped(tiny_base, world_dir, tmp_path, monkeypatch):
    args = dict(model=str(tiny_base), data=str(world_dir / "demos.jsonl"), epochs=0.3, batch_size=8,
                micro_batch_size=8, lr=1e-2, eval_every=100, save_every=2, lora_r=4, max_response_len=48)
    run_sft(SFTConfig(out=str(tmp_path / "straight"), **args))

    step, calls = Learner.step, {"n": 0}

    def dying_step(self, *a, **kw):  # killed during step 4, after the checkpoint of step 2
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, *a, **kw)

    monkeypatch.setattr(Learner, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_sft(SFTConfig(out=str(tmp_path / "resumed"), **args))
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(Learner, "step", step)
    run_sft(SFTConfig(out=str(tmp_path / "resumed"), **args))
    from safetensors.torch import load_file

    straight = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5)
    last = {d: json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1])
            for d in ("straight", "resumed")}
    assert last["resumed"]["step"] == last["straight"]["step"] == 5


def test_grpo_rebel_and_the_reward_model_train_adapters_too(tiny_base, world_dir, tmp_path):
    from safetensors.torch import load_file

    from heed.algos.grpo import GroupTrainer, GRPOConfig
    from heed.algos.rebel import REBELConfig, run as run_rebel
    from heed.algos.reward import RewardTrainConfig, train as train_rm

    prompts = str(world_dir / "prompts_train.jsonl")
    grpo = GroupTrainer(GRPOConfig(policy=str(tiny_base), prompts=prompts, reward=["-"], out=str(tmp_path / "grpo"),
                                   steps=2, prompts_per_iteration=4, n=2, mini_batch_size=8, micro_batch_size=4,
                                   max_new_tokens=12, lr=1e-2, lora_r=4, gradient_checkpointing=True),
                        reward_fn=brevity, prompts=read_prompts(prompts))
    assert grpo.reference.adapter_off
    before = base_weights(grpo.policy)
    grpo.train()
    assert_same_weights(before, base_weights(grpo.policy))
    adapter = load_file(str(tmp_path / "grpo" / "adapter_model.safetensors"))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapter.items() if "lora_B" in k)

    rows = [{**p, "chosen_reward": 1.0, "rejected_reward": -1.0} for p in short_long_pairs(world_dir, 16)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    run_rebel(REBELConfig(policy=str(tiny_base), data=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "rebel"),
                          batch_size=8, micro_batch_size=8, lr=1e-2, lora_r=4))
    assert (tmp_path / "rebel" / "adapter_config.json").exists()

    train_rm(RewardTrainConfig(model=str(tiny_base), data=[str(tmp_path / "pairs.jsonl")], out=str(tmp_path / "rm"),
                               epochs=1.0, batch_size=8, micro_batch_size=8, norm_samples=0, lora_r=4, lr=1e-2))
    member = tmp_path / "rm" / "member_0"  # a member trained with LoRA is saved merged: whole weights
    assert (member / "config.json").exists() and not (member / "adapter_config.json").exists()
    trunk = load_file(str(member / "model.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trunk[q], base["model." + q])  # the adapter's update is in the weights
    assert torch.equal(trunk["embed_tokens.weight"], base["model.embed_tokens.weight"])  # LoRA left these
