"""Any local Hugging Face causal LM, end to end: a Llama-style model whose tokenizer has its own
chat template (with a system message) and pads with EOS, and a GPT-2-style one with no pad token,
each through SFT -> reward model -> PPO and DPO, by the functions the CLI calls."""

from __future__ import annotations

import json

import pytest
import torch

from heed.algos.dpo import DPOConfig, run as run_dpo
from heed.algos.ppo import PPOConfig, run as run_ppo
from heed.algos.reward import RewardTrainConfig, train as train_rm
from heed.algos.sft import SFTConfig, run as run_sft
from heed.data import write_jsonl
from heed.generate import generate
from heed.models import last_token_index, load_policy, load_tokenizer, make_batch, render_prompt, token_logprobs
from heed.reward_model import load_reward_model

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


def build(kind: str, texts: list[str], out) -> None:
    """A tiny model and its own tokenizer, saved with save_pretrained: "llama" pads with EOS
    (<|im_end|>, ChatML template), "gpt2" has no pad token (<|endoftext|>, a plain template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>"] if kind == "llama" else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                               show_progress=False))
    eos = specials[-1]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos if kind == "llama" else None)
    hf.chat_template = CHATML if kind == "llama" else PLAIN
    hf.save_pretrained(out)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=len(hf),
                                             max_position_embeddings=256, eos_token_id=hf.eos_token_id,
                                             pad_token_id=hf.eos_token_id))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(hf), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                           eos_token_id=hf.eos_token_id, bos_token_id=hf.eos_token_id))
    model.save_pretrained(out)


def pairs(world_dir, n: int = 48) -> list[dict]:
    demos = [json.loads(line) for line in (world_dir / "demos.jsonl").read_text().splitlines()][:n]
    return [{"prompt": d["prompt"], "chosen": d["response"].split(". ")[0].rstrip(".") + ".",
             "rejected": d["response"] + " " + d["response"]} for d in demos]


def test_a_chat_template_with_a_system_message_renders_prompts_and_eos_pad_is_masked(world_dir, tmp_path):
    texts = [json.loads(line)["text"] for line in (world_dir / "corpus.jsonl").read_text().splitlines()[:300]]
    build("llama", texts, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id == tok.eos_token_id
    assert render_prompt(tok, "Describe the Buba.") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                        "<|im_start|>user\nDescribe the Buba.<|im_end|>\n"
                                                        "<|im_start|>assistant\n")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the Buba."}]
    assert render_prompt(tok, chat).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    batch = make_batch(tok, ["Describe the Buba.", "Hi"], ["The Buba is a small black fish.", "Hello."])
    # padding (EOS ids) is told apart by the mask: each response's own EOS is a response token ...
    ends = last_token_index(batch.attention_mask)
    assert torch.equal(batch.input_ids[torch.arange(2), ends], torch.full((2,), tok.eos_token_id))
    assert bool(batch.response_mask[torch.arange(2), ends].all())
    assert (batch.input_ids[batch.attention_mask == 0] == tok.eos_token_id).all()  # ... and the padding is EOS too
    model, _ = load_policy(tmp_path)
    with torch.no_grad():
        logprobs = token_logprobs(model, batch)
    assert (logprobs[torch.arange(2), ends] < 0).all()  # the ending EOS is scored
    samples = generate(model, tok, ["Describe the Buba."], n=4, max_new_tokens=8, seed=0)
    for s in samples:  # a response that never ended keeps all its tokens, even with pad = EOS
        assert len(s.response_ids) == 8 or s.response_ids[-1] == tok.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sft_reward_model_ppo_and_dpo_on_a_local_hf_model(kind, world_dir, tmp_path):
    texts = [json.loads(line)["text"] for line in (world_dir / "corpus.jsonl").read_text().splitlines()[:300]]
    base = tmp_path / "base"
    build(kind, texts, base)
    write_jsonl(tmp_path / "pairs.jsonl", pairs(world_dir))
    # prompts with a system message, as chat messages
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "system", "content": "Answer briefly."},
                                                         {"role": "user", "content": p["prompt"]}]}
                                            for p in pairs(world_dir, 16)])
    lora = dict(lora_r=4) if kind == "gpt2" else {}  # GPT-2's default targets: c_attn, c_proj, c_fc
    run_sft(SFTConfig(model=str(base), data=str(world_dir / "demos.jsonl"), out=str(tmp_path / "sft"), epochs=1.0,
                      batch_size=16, micro_batch_size=16, lr=3e-3, eval_every=2, max_response_len=48, **lora))
    logged = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in logged if "eval/loss" in r]
    assert evals[-1] < evals[0]
    sft_tok = load_tokenizer(tmp_path / "sft")
    assert sft_tok.chat_template == (CHATML if kind == "llama" else PLAIN) and len(sft_tok) == 400
    heldout = train_rm(RewardTrainConfig(model=str(tmp_path / "sft"), data=[str(tmp_path / "pairs.jsonl")],
                               out=str(tmp_path / "rm"), epochs=2.0, batch_size=16, micro_batch_size=16, lr=3e-3,
                               norm_samples=16, norm_max_new_tokens=16, eval_fraction=0.2, **lora))
    assert heldout["accuracy"] >= 0.7  # it learned the pairs' preference on held-out prompts
    rm = load_reward_model(tmp_path / "rm")  # a LoRA-trained member is saved merged: a plain trunk
    assert rm.tokenizer.chat_template == sft_tok.chat_template
    metrics = run_ppo(PPOConfig(policy=str(tmp_path / "sft"), prompts=str(tmp_path / "prompts.jsonl"),
                                reward=[str(tmp_path / "rm")], out=str(tmp_path / "ppo"), steps=2,
                                prompts_per_iteration=8, mini_batch_size=8, micro_batch_size=8, ppo_epochs=1,
                                max_new_tokens=16, **lora))
    assert metrics["objective/kl"] == metrics["objective/kl"]
    load_policy(tmp_path / "ppo")
    metrics = run_dpo(DPOConfig(policy=str(tmp_path / "sft"), data=[str(tmp_path / "pairs.jsonl")],
                                out=str(tmp_path / "dpo"), epochs=2.0, batch_size=16, micro_batch_size=16, lr=3e-3,
                                log_every=1, max_response_len=48, **lora))
    assert metrics["rewards/accuracy"] > 0.5
    load_policy(tmp_path / "dpo")
