"""The items of the PPO checklist (docs/ppo.md) that no other test covers."""

from __future__ import annotations

import torch

from heed.algos.common import make_optimizer
from heed.algos.online import iteration_seed, shape_scores
from heed.algos.ppo import PPOConfig
from heed.losses import ppo_token_rewards
from heed.models import load_policy


class OneProcess:
    """What shape_scores asks of an accelerator, for one process."""

    @staticmethod
    def gather(x):
        return x


def test_score_joins_at_the_last_response_token_and_kl_everywhere_else():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float)
    kl = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0]])
    rewards = ppo_token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[0.0, -0.05, -0.1, -0.15 + 2.0, 0.0], [0.0, 0.0, -0.25 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_reward_normalized_on_the_first_rollout_and_missing_eos_penalized():
    cfg = PPOConfig(policy="-", prompts="-", reward=["-"], out="-", missing_eos_penalty=1.0)
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    finished = torch.tensor([True, True, False, True])
    scores, norm = shape_scores(raw, finished, None, cfg, OneProcess())
    assert norm == {"bias": 3.0, "gain": float(raw.std())}
    z = (raw - 3.0) / raw.std()
    torch.testing.assert_close(scores, z - torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # later rollouts keep the first rollout's gain and bias
    again, same = shape_scores(raw + 1, torch.ones(4, dtype=torch.bool), norm, cfg, OneProcess())
    assert same is norm and torch.allclose(again, (raw + 1 - 3.0) / raw.std())
    cfg.normalize_reward = False
    plain, _ = shape_scores(raw, finished, None, cfg, OneProcess())
    torch.testing.assert_close(plain, raw - torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_learning_rate_warms_up_then_anneals_to_zero():
    cfg = PPOConfig(policy="-", prompts="-", reward=["-"], out="-", lr=1e-3, warmup_steps=4)
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and scheduler.get_last_lr()[0] == 0.0


def test_dropout_is_off_in_every_loaded_model(tiny_base, tmp_path):
    """A model saved with dropout (Llama's functional attention dropout here) loads without it:
    two passes over the same tokens in training mode give the same log-probs."""
    import shutil

    from transformers import AutoConfig

    shutil.copytree(tiny_base, tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m")
    config.attention_dropout = 0.5
    config.save_pretrained(tmp_path / "m")
    model, tok = load_policy(tmp_path / "m")
    model.train()
    ids = torch.tensor([tok("Describe the Tigu. The Tigu is a cat.")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_every_iteration_and_process_draws_its_own_generator():
    seeds = {iteration_seed(0, it, rank) for it in range(200) for rank in range(8)}
    assert len(seeds) == 200 * 8 and iteration_seed(1, 0, 0) not in seeds
