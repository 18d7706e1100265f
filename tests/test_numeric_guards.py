"""Numeric guards: a NaN or inf in a loss, a gradient or a reward stops the stage at once, naming
the step, the value and the batch's prompts, and keeps the last good checkpoint; with
--skip-nonfinite N up to N such batches are skipped (no update) and counted."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from heed.algos.common import OfflineConfig, train_offline
from heed.algos.ppo import PPOConfig, PPOTrainer
from heed.data import read_prompts
from heed.utils import HeedError


@dataclass
class Row:
    prompt: str
    x: float


ROWS = [Row(f"question {k}?", float(k)) for k in range(16)]


def run_offline(tmp_path, *, bad_step: int, how: str, skip: int = 0, steps: int = 6):
    """Fit y = 2x with a linear model; at optimiser step `bad_step` the loss (or the gradient) is NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    calls = {"step": 0}
    if how == "gradient":  # a backward hook that turns one step's gradient into NaN
        model.weight.register_hook(lambda g: g * math.nan if calls["step"] == bad_step else g)

    def loss(m, chunk):
        calls["step"] += 1  # one micro-batch per step here
        x = torch.tensor([[r.x / 16] for r in chunk])
        per_row = (m(x) - 2 * x).pow(2).squeeze(-1)
        if how == "loss" and calls["step"] == bad_step:
            per_row = per_row * math.nan
        return per_row.sum(), {"train/rows": torch.ones(len(chunk))}

    weights = []
    cfg = OfflineConfig(out=str(tmp_path), batch_size=4, micro_batch_size=4, lr=0.05, warmup_steps=0,
                        save_every=2, skip_nonfinite=skip)
    metrics = train_offline(model, ROWS, cfg, steps, stage="toy", loss=loss, data_seed=0,
                            save=lambda m: weights.append(m.weight.detach().clone()))
    return metrics, model, weights


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_nan_stops_the_stage_naming_the_step_value_and_prompts(tmp_path, how):
    with pytest.raises(HeedError) as info:
        run_offline(tmp_path, bad_step=3, how=how)
    message = str(info.value)
    assert message.startswith("toy step 3: the " + ("loss" if how == "loss" else "gradient norm") + " is nan")
    assert "question " in message and "--skip-nonfinite" in message
    assert f"{tmp_path / 'checkpoint'}, is kept" in message
    # the last good checkpoint (after step 2) is intact, and a rerun resumes from it
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "trainer_done.json").exists()
    metrics, model, saved = run_offline(tmp_path, bad_step=-1, how=how)  # the cause gone: it finishes
    assert torch.isfinite(saved[0]).all() and metrics["train/loss"] < 1


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_skip_nonfinite_skips_the_batch_without_an_update_and_counts_it(tmp_path, how):
    metrics, model, saved = run_offline(tmp_path, bad_step=3, how=how, skip=1)
    assert metrics["train/nonfinite_skipped"] == 1 and math.isfinite(metrics["train/loss"])
    assert torch.isfinite(saved[0]).all() and torch.isfinite(model.bias).all()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "train/loss" not in next(r for r in logged if r.get("step") == 3)  # the skipped step logs no loss
    with pytest.raises(HeedError, match="toy step 5: the loss is nan"):  # a second one is past the budget
        two_bad_steps(tmp_path / "again")


def two_bad_steps(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    calls = {"step": 0}

    def loss(m, chunk):
        calls["step"] += 1
        x = torch.tensor([[r.x / 16] for r in chunk])
        return (m(x) - 2 * x).pow(2).sum() * (math.nan if calls["step"] in (3, 5) else 1.0), {}

    cfg = OfflineConfig(out=str(tmp_path), batch_size=4, micro_batch_size=4, lr=0.05, warmup_steps=0,
                        save_every=100, skip_nonfinite=1)
    train_offline(model, ROWS, cfg, 8, stage="toy", loss=loss, data_seed=0, save=lambda m: None)


def test_a_nan_reward_stops_ppo_naming_the_prompt(tiny_base, world_dir, tmp_path):
    prompts = read_prompts(world_dir / "prompts_train.jsonl")
    seen = {"calls": 0}

    def reward(ps, rs):
        seen["calls"] += 1
        values = [-len(r) / 20 for r in rs]
        if seen["calls"] == 2:
            values[3] = math.inf
        return values

    def trainer(out, skip):
        cfg = PPOConfig(policy=str(tiny_base), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"],
                        out=str(out), steps=3, prompts_per_iteration=8, mini_batch_size=8, micro_batch_size=8,
                        ppo_epochs=1, max_new_tokens=8, save_every=1, samples_every=1000, skip_nonfinite=skip)
        return PPOTrainer(cfg, reward_fn=reward, prompts=prompts)

    with pytest.raises(HeedError) as info:
        trainer(tmp_path / "stop", 0).train()
    message = str(info.value)
    assert message.startswith("ppo iteration 2: the reward is inf (1 of 8 values)")
    assert any(repr(p[:40])[1:-1] in message for p in prompts if isinstance(p, str))
    assert json.loads((tmp_path / "stop" / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    seen["calls"] = 0
    t = trainer(tmp_path / "skip", 1)
    t.train()
    assert t.learner.nonfinite == 1 and t.iteration == 3
    assert all(torch.isfinite(p).all() for p in t.learner.model.parameters())
