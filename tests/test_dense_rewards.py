"""Dense rewards in PPO (issue 18; Wu et al. 2023, Fine-Grained RLHF): each (end, value) segment of a
reward on the token that completes it, shaped so each response's rewards sum to the scalar path's
score, and a rule rewarding one word raises that word's rate faster than the same rule at the end."""

from __future__ import annotations

import json
import re

import pytest
import torch

from heed.algos.online import shape_scores
from heed.algos.ppo import PPOConfig, PPOTrainer, dense_share, segment_token_scores, shape_token_scores
from heed.data import read_prompts
from heed.losses import ppo_dense_token_rewards, ppo_token_rewards
from heed.models import collate
from heed.rules import RewardFunction
from heed.utils import HeedError


class PieceTokenizer:
    """A hand-made tokenizer: id -> text piece; id 0 is EOS (special, decodes to nothing)."""

    pieces = {0: "<eos>", 1: " The", 2: " Fe", 3: "bo", 4: " is", 5: " black", 6: "."}
    pad_token_id, eos_token_id = 9, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i != self.eos_token_id or not skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(ids, skip_special_tokens) for ids in rows]


class OneProcess:
    """What shape_scores asks of an accelerator, for one process."""

    @staticmethod
    def gather(x):
        return x


def test_segments_land_on_the_tokens_that_complete_them():
    tok = PieceTokenizer()
    # "The Febo is black." then EOS; an unfinished "The is"; the prompts are left-padded
    batch = collate([[5, 6], [6]], [[1, 2, 3, 4, 5, 6, 0], [1, 4]], tok.pad_token_id)
    mask = batch.response_mask.float()
    text = "The Febo is black."
    segments = [[(len("The Febo"), 2.0),      # the two-token word: on its last token, "bo"
                 (len("The F"), 0.5),         # inside " Fe": on " Fe"
                 (len("The Fe") + 1, 0.25),   # inside "bo": on "bo"
                 (0, -1.0),                   # nothing yet: on the first token
                 (len(text), 3.0)],           # the whole text: on EOS, where a scalar reward goes
                [(len("The is"), 1.0)]]       # no EOS: the last token
    scores = segment_token_scores(tok, batch, mask, segments)
    P = batch.prompt_len
    assert P == 2 and scores.shape == batch.input_ids.shape
    expected = torch.zeros_like(scores)
    expected[0, P:P + 7] = torch.tensor([-1.0, 0.5, 2.25, 0.0, 0.0, 0.0, 3.0])
    expected[1, P:P + 2] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.sum(-1), torch.tensor([sum(v for _, v in row) for row in segments]))
    # the absolute reward before the last token over all of it: (1 + 0.5 + 2.25) / (1 + 0.5 + 2.25 + 3 + 1)
    assert dense_share(scores, mask) == pytest.approx(3.75 / 7.75)


def test_token_scores_are_shaped_as_their_sums_are():
    """Gain and bias fitted on the row sums, the missing-EOS penalty: each row of the shaped per-token
    scores sums to the scalar path's score, and off the last token each reward is divided by the gain."""
    cfg = PPOConfig(policy="-", prompts="-", reward=["-"], out="-", missing_eos_penalty=1.0)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.float)
    raw = torch.tensor([[0, 1.0, 0, 2.0, 0], [0, 0, 3.0, 0, -1.0], [0, 0.5, 0, 0, 0], [0, 4.0, 2.0, 0, 0]])
    finished = torch.tensor([True, False, True, True])
    scalar, norm = shape_scores(raw.sum(-1), finished, None, cfg, OneProcess())  # what the scalar path gives
    token_scores = shape_token_scores(raw, scalar, mask, norm)
    torch.testing.assert_close(token_scores.sum(-1), scalar)
    last = torch.tensor([3, 4, 1, 2])
    off_last = mask.clone()
    off_last[torch.arange(4), last] = 0
    torch.testing.assert_close(token_scores * off_last, raw * off_last / norm["gain"])
    assert not (token_scores * (1 - mask)).any()
    # all of a reward at the end: exactly the scalar path's per-token rewards
    at_end = torch.zeros_like(raw)
    at_end[torch.arange(4), last] = raw.sum(-1)
    kl = torch.rand(4, 5) * mask
    torch.testing.assert_close(ppo_dense_token_rewards(shape_token_scores(at_end, scalar, mask, norm), kl, mask, 0.1),
                               ppo_token_rewards(scalar, kl, mask, 0.1))


def test_dense_token_rewards_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(7)[None] < torch.tensor([[3], [7], [1]])).float()
    token_scores, kl = torch.randn(3, 7, generator=g) * mask, torch.randn(3, 7, generator=g) * mask
    rewards = ppo_dense_token_rewards(token_scores, kl, mask, kl_coef=0.3)
    for b in range(3):
        for t in range(7):
            expected = token_scores[b, t] - 0.3 * kl[b, t] if mask[b, t] else 0.0
            assert float(rewards[b, t]) == pytest.approx(float(expected), abs=1e-6)


def test_dense_rewards_refuse_a_reward_without_segments():
    cfg = PPOConfig(policy="-", prompts="-", reward=["-"], out="-", dense_rewards=True)
    with pytest.raises(HeedError, match="dense-rewards"):
        PPOTrainer(cfg, reward_fn=lambda prompts, responses: [0.0] * len(responses), prompts=["a"])


# -- on a tiny model ---------------------------------------------------------------------------

WORD = re.compile(r"\blikes\b")  # about 0.2 per response from the tiny model: frequent, not dominant


def word_segments(prompts, responses):
    """+1 at the end of every "likes": a dense rule."""
    return [[(m.end(), 1.0) for m in WORD.finditer(r)] for r in responses]


def word_count(prompts, responses):
    """The same total at the end: a scalar rule."""
    return [float(len(WORD.findall(r))) for r in responses]


def make_trainer(policy_dir, world_dir, out, rule, **overrides):
    cfg = dict(policy=str(policy_dir), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"],
               out=str(out), steps=8, prompts_per_iteration=32, mini_batch_size=16, micro_batch_size=8, ppo_epochs=2,
               max_new_tokens=24, lr=2e-3, kl_coef=0.02, save_every=1000, samples_every=1000)
    cfg.update(overrides)
    return PPOTrainer(PPOConfig(**cfg), reward_fn=RewardFunction(rules=[("word", 1.0, rule)]),
                      prompts=read_prompts(world_dir / "prompts_train.jsonl"))


def test_dense_scores_of_a_rollout_sum_to_the_scalar_scores(tiny_base, world_dir, tmp_path):
    dense = make_trainer(tiny_base, world_dir, tmp_path / "d", word_segments, dense_rewards=True)
    scalar = make_trainer(tiny_base, world_dir, tmp_path / "s", word_count)
    prompts = read_prompts(world_dir / "prompts_train.jsonl")[:48]
    exp = dense.rollout(prompts, torch.Generator().manual_seed(0))
    assert not bool(exp.finished.all()) and sum(word_count(None, exp.texts)) > 0  # both cases are there
    scores, metrics = dense.score(exp)
    expected, expected_metrics = scalar.score(exp)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(exp.token_scores.sum(-1), expected)
    assert dense.norm == pytest.approx(scalar.norm)
    assert {k: pytest.approx(v) for k, v in expected_metrics.items()} == {k: metrics[k] for k in expected_metrics}
    assert 0 < metrics["reward/dense_share"] <= 1


def test_step_with_segments_at_the_end_equals_step_with_numbers(tiny_base, world_dir, tmp_path):
    queries = ["Is the Febo black?", "Describe the Buba."]
    responses = ["Yes, the Febo is black.", "The Buba likes fish."]
    states = []
    for i, rewards in enumerate([[1.0, -1.0], [[(len(responses[0]), 1.0)], -1.0]]):
        trainer = make_trainer(tiny_base, world_dir, tmp_path / str(i), word_count, ppo_epochs=1)
        trainer.step(queries, responses, rewards, generator=torch.Generator().manual_seed(0))
        states.append(trainer.actor_critic.state_dict())
    for name, p in states[0].items():
        torch.testing.assert_close(p, states[1][name], rtol=0, atol=0)
    trainer.step(queries, responses, [[(len("The Buba likes"), 1.0)], [(3, 0.5), (8, 0.5)]])  # runs


def word_rate(trainer, world_dir, seed) -> float:
    """Occurrences of the word per response, in 128 fresh samples on held-out prompts."""
    from heed.generate import generate

    prompts = read_prompts(world_dir / "prompts_heldout.jsonl")[:64]
    samples = generate(trainer.policy, trainer.tokenizer, prompts, n=2, max_new_tokens=24, seed=1000 + seed)
    return sum(word_count(None, [s.response for s in samples])) / len(samples)


@pytest.fixture
def one_thread():
    # six short runs of a tiny model on a shared 2-core machine: a second thread only waits on the
    # first, and when another process holds a core, two spinning threads ran this test 10x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_dense_rewards_raise_a_rewarded_word_faster_than_the_same_reward_at_the_end(tiny_base, world_dir, tmp_path,
                                                                                    one_thread):
    """The issue's test: +1 at each "likes" (dense) against the count of "likes" at the end, the
    same total, for 5 iterations of 32 prompts on 3 seeds, the rate measured in 128 fresh samples
    on held-out prompts. Measured here, per response: seeds 0-2 start at 0.16, 0.15, 0.16 and reach
    3.28, 1.80, 2.57 dense and 0.52, 0.36, 1.59 end-only (gains 2.39 against 0.67 on average);
    seeds 3-5 reach 1.84, 0.87, 1.34 and 0.59, 0.39, 0.25. Of the 20 choices of 3 of those 6
    seeds, the smallest mean dense gain is 1.18 (asserted: 0.5) and the smallest ratio of the
    gains 2.3 (asserted: 1.5)."""
    start, rates = [], {True: [], False: []}
    for seed in range(3):
        for dense in (True, False):
            trainer = make_trainer(tiny_base, world_dir, tmp_path / f"{seed}-{dense}",
                                   word_segments if dense else word_count, dense_rewards=dense, steps=5, seed=seed)
            if dense:
                start.append(word_rate(trainer, world_dir, seed))
            trainer.train()
            rates[dense].append(word_rate(trainer, world_dir, seed))
        rows = [json.loads(line) for line in (tmp_path / f"{seed}-True" / "metrics.jsonl").read_text().splitlines()]
        assert all(0 < r["reward/dense_share"] <= 1 for r in rows if r["reward/raw"] > 0)
    before, dense, end = (sum(x) / len(x) for x in (start, rates[True], rates[False]))
    report = f"start {start}, dense {rates[True]}, end-only {rates[False]}"
    assert dense > before + 0.5, report
    assert dense - before > 1.5 * (end - before), report
