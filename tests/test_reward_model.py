"""RewardModel: head initialisation, reward at the last real token, save/load, normalisation; rule rewards."""

from __future__ import annotations

import math

import pytest
import torch

from heed.models import load_tokenizer, make_batch
from heed.reward_model import RewardMember, RewardModel
from heed.utils import HeedError

PROMPTS = ["Describe the Zalko.", "Is the Tigu a cat?",
           [{"role": "user", "content": "Be brief: where does the Tigu live?"}]]
RESPONSES = ["The Zalko is a huge red flower. It lives in the river.", "No.", "Sea."]


@pytest.fixture(scope="module")
def members(tiny_base):
    return [RewardMember.from_policy(tiny_base, seed=s) for s in (0, 1)]


def test_head_initialization(members):
    d = members[0].trunk.config.hidden_size
    w = members[0].head.weight
    assert torch.all(members[0].head.bias == 0)
    # N(0, 1/sqrt(d+1)): the sample std of d weights is within a few standard errors
    assert abs(float(w.detach().std()) - 1 / math.sqrt(d + 1)) < 4 / math.sqrt(d + 1) / math.sqrt(2 * d)
    assert not torch.equal(members[0].head.weight, members[1].head.weight)  # members start apart
    assert all(not isinstance(m, torch.nn.Dropout) or m.p == 0 for m in members[0].modules())


def test_reward_read_at_last_real_token(members, tiny_base):
    tok = load_tokenizer(tiny_base)
    m = members[0].eval()
    with torch.no_grad():
        batch = make_batch(tok, PROMPTS, RESPONSES)
        together = m(batch.input_ids, batch.attention_mask)
        alone = torch.cat([m(b.input_ids, b.attention_mask) for b in
                           (make_batch(tok, [p], [r]) for p, r in zip(PROMPTS, RESPONSES))])
        assert torch.allclose(together, alone, atol=1e-5)  # padding changes nothing
        # The reward is the head applied to the hidden state at the last real token (EOS).
        from heed.models import forward_hidden
        hidden = forward_hidden(m.trunk, batch.input_ids, batch.attention_mask)
        last = batch.attention_mask.shape[1] - 1 - batch.attention_mask.flip(1).argmax(1)
        manual = m.head(hidden[torch.arange(3), last]).squeeze(-1)
        assert torch.allclose(together, manual, atol=1e-6)
        assert (batch.input_ids[torch.arange(3), last] == tok.eos_token_id).all()


def test_save_load_round_trip(members, tiny_base, tmp_path):
    tok = load_tokenizer(tiny_base)
    rm = RewardModel(members, tok, gain=[2.0, 0.5], bias=[-1.0, 0.25], max_prompt_len=64, max_response_len=48,
                     info={"note": "x"})
    mean, std = rm.score(PROMPTS, RESPONSES)
    rm.save(tmp_path / "rm")
    from heed.reward_model import load_reward_model
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.n_members == 2 and loaded.max_prompt_len == 64 and loaded.info["note"] == "x"
    assert loaded.gain.tolist() == [2.0, 0.5] and loaded.bias.tolist() == [-1.0, 0.25]
    mean2, std2 = loaded.score(PROMPTS, RESPONSES)
    assert mean2 == pytest.approx(mean, abs=1e-5) and std2 == pytest.approx(std, abs=1e-5)
    raw = loaded.raw_scores(PROMPTS, RESPONSES)
    z = raw * torch.tensor([[2.0], [0.5]]) + torch.tensor([[-1.0], [0.25]])
    assert mean2 == pytest.approx(z.mean(0).tolist(), abs=1e-5)
    assert std2 == pytest.approx(z.std(0, unbiased=False).tolist(), abs=1e-5)
    # The tensor API agrees with the text API.
    batch = make_batch(loaded.tokenizer, PROMPTS, RESPONSES, max_prompt_len=64, max_response_len=48)
    with torch.no_grad():
        assert torch.allclose(loaded.rewards(batch), z, atol=1e-5)
    with pytest.raises(HeedError, match="not a reward model directory"):
        RewardModel.load(tmp_path)


def test_single_member_std_is_zero(members, tiny_base):
    rm = RewardModel(members[:1], load_tokenizer(tiny_base))
    assert rm.score(PROMPTS, RESPONSES)[1] == [0.0, 0.0, 0.0]


def test_normalization_statistics(members, tiny_base):
    rm = RewardModel(members, load_tokenizer(tiny_base))
    g = torch.Generator().manual_seed(0)
    raw = torch.stack([3.0 + 2.0 * torch.randn(200, generator=g), -5 + 0.1 * torch.randn(200, generator=g)])
    stats = rm.fit_normalization(raw)
    z = rm.normalize(raw)
    ensemble = z.mean(0)
    assert abs(float(ensemble.mean())) < 1e-5 and abs(float(ensemble.std(unbiased=False)) - 1) < 1e-5
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-5)  # each member centred on the samples
    # one shared scale: members' standardised rewards are scaled alike
    ratio = z.std(1, unbiased=False)
    assert abs(float(ratio[0] - ratio[1])) < 1e-4 and ratio[0] > 1  # independent members: spread > 1
    assert stats["std_after"] == pytest.approx(1.0, abs=1e-5) and stats["n_samples"] == 200
    assert stats["raw_mean"] == pytest.approx(raw.mean(1).tolist(), abs=1e-5)


# ---------------------------------------------------------------------------
# Rule rewards
# ---------------------------------------------------------------------------

RULES = '''
def brevity(prompts, responses):
    return [-len(r.split()) for r in responses]

def wrong_length(prompts, responses):
    return [0.0]

def not_finite(prompts, responses):
    return [float("nan") for _ in responses]

def not_numbers(prompts, responses):
    return ["a" for _ in responses]
'''


def test_rules_from_file_and_module(tmp_path):
    from heed.rules import call_rule, load_rule

    path = tmp_path / "my_rules.py"
    path.write_text(RULES)
    brevity = load_rule(f"{path}:brevity")
    assert brevity(["p", "q"], ["one two", "three"]) == [-2, -1]
    gold = load_rule("heed.rules:gold")
    assert gold(["Describe the Zalko."], ["What a stupid question."])[0] < 0
    for spec, msg in [(f"{path}:wrong_length", "returned 1 values for 2"), (f"{path}:not_finite", "non-finite"),
                      (f"{path}:not_numbers", "list of numbers")]:
        with pytest.raises(HeedError, match=msg):
            call_rule(spec, load_rule(spec), ["p", "q"], ["a", "b"])
    for spec, msg in [("nope", "expected module:function"), (f"{tmp_path}/missing.py:f", "not found"),
                      (f"{path}:absent", "has no function 'absent'"), ("no_such_module_xyz:f", "cannot import")]:
        with pytest.raises(HeedError, match=msg):
            load_rule(spec)


def test_weighted_sum_of_rules_and_reward_model(members, tiny_base, tmp_path):
    from heed.rules import gold, load_reward

    (tmp_path / "my_rules.py").write_text(RULES)
    rm = RewardModel(members[:1], load_tokenizer(tiny_base), gain=[1.5], bias=[0.5])
    rm.save(tmp_path / "rm")
    reward = load_reward([str(tmp_path / "rm"), f"0.5*{tmp_path}/my_rules.py:brevity", "-2e-1*heed.rules:gold"])
    prompts, responses = ["Describe the Zalko.", "Is the Tigu a cat?"], ["The Zalko is a red flower.", "No."]
    total, parts, stds = reward.score(prompts, responses)
    rm_mean = rm.score(prompts, responses)[0]
    g = gold(prompts, responses)
    expected = [m + 0.5 * -len(r.split()) - 0.2 * s for m, r, s in zip(rm_mean, responses, g)]
    assert total == pytest.approx(expected, abs=1e-5)
    assert reward(prompts, responses) == pytest.approx(expected, abs=1e-5)
    assert reward.rule_rewards(prompts, responses) == pytest.approx(
        [0.5 * -len(r.split()) - 0.2 * s for r, s in zip(responses, g)])
    assert parts[str(tmp_path / "rm")] == pytest.approx(rm_mean, abs=1e-5) and list(stds) == [str(tmp_path / "rm")]
    with pytest.raises(HeedError, match="named twice"):
        load_reward(["heed.rules:gold", "2*heed.rules:gold"])


def test_lm_term_is_the_policy_nll_of_the_chosen_responses(tiny_base):
    """With the LM head kept, a member's NLL of a response is the policy's own mean token NLL."""
    from heed.models import load_policy, shared_batch, shared_token_logprobs

    tok = load_tokenizer(tiny_base)
    policy, _ = load_policy(tiny_base)
    member = RewardMember.from_policy(tiny_base, keep_lm_head=True).eval()
    batch = shared_batch(tok, PROMPTS, [[r, r + " More."] for r in RESPONSES], max_prompt_len=64, max_response_len=48)
    rows = torch.tensor([0, 3, 5])
    with torch.no_grad():
        rewards, nll = member(batch, lm_rows=rows)
        expected = -shared_token_logprobs(policy.eval(), batch)[rows].sum(-1) / batch.response_mask[rows].sum(-1)
        assert torch.allclose(rewards, member(batch), atol=1e-6)  # the rewards are unchanged
    assert torch.allclose(nll, expected, atol=1e-4)
    with pytest.raises(ValueError, match="LM head"):
        RewardMember.from_policy(tiny_base)(batch, lm_rows=rows)
