"""Tokenizer, batching and sampling: the details that make log-probs right."""

from __future__ import annotations

import pytest
import torch

from heed.algos.sft import build_examples
from heed.generate import generate
from heed.models import collate, load_policy, load_tokenizer, make_batch, token_logprobs, train_tokenizer
from heed.template import EOS_TOKEN, format_transcript


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    texts = [format_transcript("Describe the Tarvo.", "The Tarvo is a small red bird.")] * 20 + \
        ["Odd bytes: caf\u00e9 \u2603 tabs\tand\nnewlines"] * 5
    tok = train_tokenizer(texts, 400, tmp_path)
    assert tok.pad_token_id != tok.eos_token_id
    loaded = load_tokenizer(tmp_path)
    for text in texts[::5] + ["never seen: \u00fcber zebra 42"]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text  # byte-level: lossless on any text
    ids = loaded(texts[0], add_special_tokens=False)["input_ids"]
    assert ids[-1] == loaded.eos_token_id and loaded.convert_ids_to_tokens(ids[-1]) == EOS_TOKEN
    # The chat template renders messages exactly like the plain template.
    rendered = loaded.apply_chat_template([{"role": "user", "content": "Describe the Tarvo."}],
                                          tokenize=False, add_generation_prompt=True)
    assert rendered == "User: Describe the Tarvo.\nAssistant:"


def test_prompt_and_response_tokenized_separately_match_whole_text(tiny_base):
    _, tok = load_policy(tiny_base)
    batch = make_batch(tok, ["Describe the Buba."], ["The Buba is a small black fish."])
    whole = tok(format_transcript("Describe the Buba.", "The Buba is a small black fish."),
                add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist() == whole


def test_sft_masks_prompt_tokens(tiny_base):
    _, tok = load_policy(tiny_base)
    (ex,) = build_examples(tok, [{"prompt": "Is the Febo black?", "response": "Yes."}], 96, 96)
    n_prompt = len(tok("User: Is the Febo black?\nAssistant:", add_special_tokens=False)["input_ids"])
    assert ex.loss_mask[:n_prompt] == [0] * n_prompt
    assert all(ex.loss_mask[n_prompt:]) and ex.input_ids[-1] == tok.eos_token_id


def test_left_padding_does_not_change_logprobs(tiny_base):
    model, tok = load_policy(tiny_base)
    short = make_batch(tok, ["Is the Febo black?"], ["Yes, the Febo is black."])
    padded = make_batch(tok, ["Is the Febo black?", "Write a short note praising the Buba, please, now."],
                        ["Yes, the Febo is black.", "What a great fish."])
    with torch.no_grad():
        a = token_logprobs(model, short)[0][short.response_mask[0].bool()]
        b = token_logprobs(model, padded)[0][padded.response_mask[0].bool()]
    assert padded.prompt_len > short.prompt_len  # the first row really is left-padded
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sampler_logprobs_equal_forward_pass(tiny_base):
    model, tok = load_policy(tiny_base)
    prompts = ["Describe the Buba.", "Is the Febo black?", "List the black robots."]
    samples = generate(model, tok, prompts, n=2, max_new_tokens=24, temperature=0.8, top_k=40, seed=3)
    assert len(samples) == 6 and [s.prompt for s in samples[:2]] == [prompts[0]] * 2
    batch = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples], tok.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature=0.8)
    for i, s in enumerate(samples):
        got = lp[i, batch.prompt_len:batch.prompt_len + len(s.response_ids)]
        torch.testing.assert_close(got, torch.tensor(s.logprobs), atol=1e-4, rtol=1e-4)
        assert s.finished == (s.response_ids[-1] == tok.eos_token_id)


def test_sampling_is_seeded(tiny_base):
    model, tok = load_policy(tiny_base)
    a = generate(model, tok, ["Describe the Buba."] * 3, max_new_tokens=16, seed=7)
    b = generate(model, tok, ["Describe the Buba."] * 3, max_new_tokens=16, seed=7)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    greedy = generate(model, tok, ["Describe the Buba."] * 2, max_new_tokens=16, temperature=0)
    assert greedy[0].response_ids == greedy[1].response_ids


def test_shared_prompts_give_the_same_logprobs_rewards_and_gradients(tiny_base):
    """Each prompt run once for all its responses (a pair's two, a ranking's K) equals running every
    prompt + response row in full: sequence log-probs, rewards, and the reward model's gradients."""
    from heed.models import shared_batch, shared_sequence_logprobs
    from heed.reward_model import RewardMember

    model, tok = load_policy(tiny_base)
    prompts = ["Is the Febo black?", [{"role": "user", "content": "Describe the Buba."},
                                      {"role": "assistant", "content": "The Buba is a small fish."},
                                      {"role": "user", "content": "Where does it live?"}]]
    groups = [["Yes, the Febo is black.", "No."], ["It lives in the sea, far from here.", "Sea.", "In the river."]]
    shared = shared_batch(tok, prompts, groups, max_prompt_len=96, max_response_len=48)
    full = make_batch(tok, [p for p, g in zip(prompts, groups) for _ in g], [r for g in groups for r in g])
    torch.testing.assert_close(shared_sequence_logprobs(model, shared),
                               (token_logprobs(model, full) * full.response_mask).sum(-1), atol=1e-4, rtol=1e-4)
    member = RewardMember(model.base_model, seed=0)
    grads = []
    for rewards in (lambda: member(shared), lambda: member(full.input_ids, full.attention_mask)):
        member.zero_grad()
        r = rewards()
        (r * torch.arange(1.0, 6.0)).sum().backward()
        grads.append((r.detach(), [p.grad.clone() for p in member.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_gelu_equals_gpt2s_own(tiny_base, tmp_path):
    """A GPT-2-style model loaded by heed runs GELU in one fused kernel: the same logits and
    gradients as transformers' own NewGELUActivation, and the saved config is unchanged."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    from heed.reward_model import RewardMember

    tok = load_tokenizer(tiny_base)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                               pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    ours, _ = load_policy(tmp_path / "gpt2")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert not any(isinstance(m, NewGELUActivation) for m in ours.modules())
    assert sum(isinstance(m, GELUTanh) for m in ours.modules()) == 2
    assert any(isinstance(m, NewGELUActivation) for m in theirs.modules())
    batch = make_batch(tok, ["Is the Febo black?", "Describe the Buba."], ["Yes.", "The Buba is a small fish."])
    results = []
    for model in (ours, theirs):
        model.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        (logits.float().square().mean()).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    member = RewardMember.from_policy(tmp_path / "gpt2")
    member.save(tmp_path / "member")
    assert not any(isinstance(m, NewGELUActivation) for m in RewardMember.load(tmp_path / "member").modules())
    assert '"gelu_new"' in (tmp_path / "member" / "config.json").read_text()


def test_padding_to_a_multiple_changes_widths_not_results(tiny_base):
    """shared_batch(pad_to_multiple_of=16) rounds both widths up and leaves rewards and log-probs as they were."""
    from heed.models import shared_batch, shared_sequence_logprobs
    from heed.reward_model import RewardMember

    model, tok = load_policy(tiny_base)
    member = RewardMember(model.base_model, seed=0)
    args = (tok, ["Is the Febo black?", "Describe the Buba."], [["Yes.", "No."], ["The Buba is a fish.", "Fish."]])
    plain = shared_batch(*args, max_prompt_len=64, max_response_len=32)
    padded = shared_batch(*args, max_prompt_len=64, max_response_len=32, pad_to_multiple_of=16)
    assert padded.prompt_ids.shape[1] == 16 and padded.response_ids.shape[1] == 16
    assert plain.prompt_ids.shape[1] < 16 and plain.response_ids.shape[1] < 16
    with torch.no_grad():
        torch.testing.assert_close(member(padded), member(plain), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared_sequence_logprobs(model, padded), shared_sequence_logprobs(model, plain),
                                   atol=1e-4, rtol=1e-4)


def test_reserved_cache_samples_what_transformers_cache_samples(tiny_base, monkeypatch):
    """The sampler's cache, allocated once and written in place (repeated prompts run once),
    gives the same tokens, log-probs and finished flags as transformers' own cache, on
    left-padded prompts of the Llama-style demo model and a GPT-2-style one; a sliding-window
    model keeps its own cache."""
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig

    import heed.generate as G

    model, tok = load_policy(tiny_base)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2)).eval()
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ["User: Is the Febo black?\nAssistant:", "User: Describe the Buba, please, now.\nAssistant:"]]
    prompts = [prompts[0]] * 2 + [prompts[1]] * 3 + [prompts[0]]
    args = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=20, temperature=0.9)
    for m in (model, gpt2):
        assert G.reserved_cache(m, 8) is not None
        ours = G.sample_tokens(m, prompts, generator=torch.Generator().manual_seed(1), **args)
        with monkeypatch.context() as patch:
            patch.setattr(G, "reserved_cache", lambda *a: None)
            theirs = G.sample_tokens(m, prompts, generator=torch.Generator().manual_seed(1), **args)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2])
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="full"):
        G.reserved_cache(model, 2).update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), 0)
    sliding = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    assert G.reserved_cache(type("M", (), {"config": sliding})(), 16) is None
