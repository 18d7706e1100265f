"""Memory savers: gradient checkpointing changes nothing but memory (on the shared-prompt KV path
too, and with LoRA), bf16 weights train, and packed rows give the unpacked loss."""

from __future__ import annotations

import json

import pytest
import torch

from heed.algos.common import prepare_model
from heed.algos.ppo import PPOConfig, PPOTrainer
from heed.algos.pretrain import pack_documents
from heed.algos.sft import SFTConfig, build_examples, run as run_sft
from heed.data import read_demos, read_prompts
from heed.models import (
    TokenLogprobs,
    collate_lm,
    load_policy,
    make_batch,
    pack_examples,
    shared_batch,
    token_logprobs,
    token_nll,
)

PROMPTS = ["Describe the Buba.", "Is the Febo black?", "List the black animals."]
RESPONSES = [["The Buba is a small fish.", "A fish."], ["Yes.", "No, the Febo is white and very big."],
             ["The Febo and the Buba.", "None."]]


def config(tiny_base, tmp_path, **fields) -> SFTConfig:
    return SFTConfig(model=str(tiny_base), data="-", out=str(tmp_path), **fields)


def loss_and_grads(model, tok, batch_kind: str):
    """A loss through one of heed's forward paths, and the gradients of every trainable weight."""
    model.train()
    model.zero_grad()
    if batch_kind == "shared":  # each prompt once, its responses continuing its keys and values
        batch = shared_batch(tok, PROMPTS, RESPONSES, max_prompt_len=32, max_response_len=32)
        loss = (TokenLogprobs(model)(batch) * batch.response_mask).sum()
    else:  # every row in full
        batch = make_batch(tok, [p for p, rs in zip(PROMPTS, RESPONSES) for _ in rs], sum(RESPONSES, []))
        loss = (token_logprobs(model, batch) * batch.response_mask).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_base, tmp_path, lora):
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tok = load_policy(tiny_base)
        model = prepare_model(model, config(tiny_base, tmp_path, gradient_checkpointing=checkpointing, lora_r=lora))
        if lora:  # an adapter that has moved, so its gradients are not all zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        for kind in ("shared", "full"):
            results[checkpointing, kind] = loss_and_grads(model, tok, kind)
    for kind in ("shared", "full"):
        (loss, grads), (loss_gc, grads_gc) = results[False, kind], results[True, kind]
        torch.testing.assert_close(loss_gc, loss, atol=1e-5, rtol=1e-6)
        assert grads.keys() == grads_gc.keys() and len(grads) > 0
        assert all("lora_" in n for n in grads) if lora else len(grads) > 30
        for name in grads:
            torch.testing.assert_close(grads_gc[name], grads[name], atol=1e-5, rtol=1e-4)
    # the shared path and the full rows agree with each other as well
    torch.testing.assert_close(results[True, "shared"][0], results[True, "full"][0], atol=1e-4, rtol=1e-5)


def test_bf16_weights_train_and_stay_bf16(tiny_base, world_dir, tmp_path):
    out = tmp_path / "sft"
    run_sft(SFTConfig(model=str(tiny_base), data=str(world_dir / "demos.jsonl"), out=str(out), dtype="bf16",
                      epochs=1.0, batch_size=16, micro_batch_size=16, lr=3e-3, warmup_steps=1, eval_every=3,
                      max_response_len=48))
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    logged = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    evals = [r["eval/loss"] for r in logged if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.05, evals
    # PPO with bf16 weights: the policy is bf16, its value head fp32, and an update runs and moves both
    prompts = str(world_dir / "prompts_train.jsonl")
    trainer = PPOTrainer(PPOConfig(policy=str(tiny_base), prompts=prompts, reward=["-"], out=str(tmp_path / "ppo"),
                                   dtype="bf16", ppo_epochs=1, lr=1e-3),
                         reward_fn=lambda p, r: [0.0] * len(r), prompts=read_prompts(prompts))
    ac = trainer.actor_critic
    assert {p.dtype for p in ac.policy.parameters()} == {torch.bfloat16}
    assert ac.value_head.weight.dtype == torch.float32
    before = ac.value_head.weight.detach().clone()
    stats = trainer.step(["Is the Febo black?", "Describe the Buba."], ["Yes.", "The Buba is a fish."], [1.0, -1.0])
    assert all(v == v for v in stats.values()) and not torch.equal(before, ac.value_head.weight)


def test_packed_rows_give_the_unpacked_loss(tiny_base, world_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    llama, tok = load_policy(tiny_base)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2))
    examples = build_examples(tok, read_demos(world_dir / "demos.jsonl")[:24], 96, 48)
    packed = pack_examples(examples, 160)
    assert len(packed) < len(examples) / 2  # several demonstrations share a row
    assert sum(len(e.input_ids) for e in packed) == sum(len(e.input_ids) for e in examples)
    for model in (llama.eval(), gpt2.eval()):
        with torch.no_grad():
            nll, n = token_nll(model, collate_lm(examples, tok.pad_token_id))
            nll_packed, n_packed = token_nll(model, collate_lm(packed, tok.pad_token_id))
        assert n == n_packed
        torch.testing.assert_close(nll_packed / n_packed, nll / n, atol=1e-5, rtol=0)
    # pretraining's documents: each starts at position 0, and no piece is longer than a row
    rows = pack_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]], [0], 5)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 0], [4, 5, 6, 7, 8], [9, 10, 0], [11, 12, 0]]
    two = pack_examples(rows[2:], 6)[0]
    assert two.input_ids == [9, 10, 0, 11, 12, 0] and two.position_ids == [0, 1, 2, 0, 1, 2]
    assert two.loss_mask == [0, 1, 1, 0, 1, 1]  # nothing in the row predicts an example's first token
    # and `heed sft --pack` trains on packed rows
    out = tmp_path / "sft"
    run_sft(SFTConfig(model=str(tiny_base), data=str(world_dir / "demos.jsonl"), out=str(out), pack=True,
                      seq_len=160, epochs=1.0, batch_size=8, micro_batch_size=8, eval_every=100, max_response_len=48))
    rows = list(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
