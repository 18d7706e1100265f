"""heed.control: the clip-sum Bradley-Terry loss, query selection, labelers, schedule, and a tiny run."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile

import gymnasium as gym
import numpy as np
import pytest
import torch

from heed.control.envs import FixedHorizon, evaluate, preference_env
from heed.control.labelers import HumanLabeler, SyntheticOracle
from heed.control.queries import ClipPairs, labels_due, member_preferences, sample_pairs, select_queries
from heed.control.reward_model import Comparisons, EnsembleTrainer, RewardEnsemble, preference_loss
from heed.control.train import ControlTrainConfig, score, train


class Reach1D(gym.Env):
    """x in [-2, 2]; the action moves it by up to 0.25; reward -|x' - 1|. Random play stays far from 1."""

    observation_space = gym.spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.x = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-2.0, 0.0))
        return np.array([self.x], dtype=np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.25 * float(np.asarray(action).reshape(-1)[0]), -2.0, 2.0))
        return np.array([self.x], dtype=np.float32), -abs(self.x - 1.0), False, False, {}

    def render(self):
        frame = np.zeros((8, 40, 3), dtype=np.uint8)
        frame[:, int((self.x + 2) / 4 * 39)] = 255
        return frame


@pytest.fixture(autouse=True)
def one_thread():
    # small networks on a shared 2-core machine: more threads only wait on each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


gym.register(id="HeedReach1D-v0", entry_point=Reach1D, max_episode_steps=20)


def test_preference_loss_matches_plain_computation():
    rng = np.random.default_rng(0)
    r0, r1 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))  # per-step rewards of 6 clip pairs
    mu = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    w = np.array([1.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    plain, plain_w = [], []
    for i in range(6):
        e0, e1 = math.exp(sum(r0[i])), math.exp(sum(r1[i]))
        p0 = 0.9 * e0 / (e0 + e1) + 0.05
        p1 = 0.9 * e1 / (e0 + e1) + 0.05
        nll = -(mu[i] * math.log(p0) + (1 - mu[i]) * math.log(p1))
        plain.append(nll)
        plain_w.append(w[i] * nll)
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    got = preference_loss(t(r0).sum(1), t(r1).sum(1), t(mu), random_prob=0.1)
    assert got.item() == pytest.approx(sum(plain) / 6, rel=1e-12)
    got_w = preference_loss(t(r0).sum(1), t(r1).sum(1), t(mu), random_prob=0.1, weights=t(w))
    assert got_w.item() == pytest.approx(sum(plain_w) / w.sum(), rel=1e-12)
    # no random-answer mixing: plain Bradley-Terry cross-entropy
    got0 = preference_loss(t([2.0]), t([0.0]), t([1.0]), random_prob=0.0)
    assert got0.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))), rel=1e-12)


def test_select_queries_picks_highest_variance():
    rng = np.random.default_rng(0)
    variances = rng.random(50)
    chosen = select_queries(variances, 5, rng)
    assert set(chosen) == set(np.argsort(variances)[-5:])
    random = select_queries(None, 5, rng, 50)
    assert len(set(random)) == 5 and all(0 <= i < 50 for i in random)


def test_identical_clips_have_no_disagreement_and_are_never_asked():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ens = RewardEnsemble(3, gym.spaces.Box(-1, 1, (2,)), members=3, hidden=16)
    n, L = 40, 5
    obs0, act0 = rng.normal(size=(n, L, 3)), rng.uniform(-1, 1, size=(n, L, 2))
    obs1, act1 = rng.normal(size=(n, L, 3)), rng.uniform(-1, 1, size=(n, L, 2))
    same = np.arange(n) % 2 == 0  # half the pairs compare a clip with itself
    obs1[same], act1[same] = obs0[same], act0[same]
    pairs = ClipPairs(obs0, act0, obs1, act1, np.zeros(n), np.zeros(n))
    probs = member_preferences(ens, pairs)  # (M, N)
    assert probs.shape == (3, n)
    var = probs.var(0)
    assert np.allclose(var[same], 0.0) and (var[~same] > 0).all()
    chosen = select_queries(var, n // 2, rng)
    assert not same[chosen].any()


def test_oracle_follows_true_returns():
    rng = np.random.default_rng(0)
    ret0, ret1 = rng.normal(size=2000), rng.normal(size=2000)
    exact = SyntheticOracle(rng).preferences(ret0, ret1)
    assert np.array_equal(exact, (ret0 > ret1).astype(float))
    assert SyntheticOracle(rng).preferences(np.array([1.0]), np.array([1.0]))[0] == 0.5
    noisy = SyntheticOracle(rng, temperature=0.5).preferences(ret0, ret1)
    agree = noisy == (ret0 > ret1)
    big = np.abs(ret0 - ret1) > 1.5
    assert agree[big].mean() > 0.9 and 0.5 < agree[~big].mean() < agree[big].mean()
    coin = SyntheticOracle(rng, random_prob=1.0).preferences(ret0, ret1)
    assert 0.45 < (coin == (ret0 > ret1)).mean() < 0.55
    # submit / collect hands back the same pairs with their answers
    oracle = SyntheticOracle(rng)
    pairs = ClipPairs(np.zeros((3, 2, 1)), np.zeros((3, 2, 1)), np.zeros((3, 2, 1)), np.zeros((3, 2, 1)),
                      np.array([1.0, -1.0, 0.0]), np.array([0.0, 0.0, 2.0]))
    oracle.submit(pairs)
    ((got, mu),) = oracle.collect()
    assert got is pairs and mu.tolist() == [1.0, 0.0, 0.0] and oracle.collect() == []


def test_label_schedule_front_loads_and_spends_the_budget():
    due = [labels_due(t, 10_000, 700) for t in range(0, 10_001, 500)]
    assert due[0] == 175 and due[-1] == 700
    assert all(a <= b for a, b in zip(due, due[1:]))
    increments = np.diff(due)
    assert increments[0] > increments[-1]  # the rate decays


def test_fixed_horizon_turns_termination_into_an_absorbing_state():
    env = FixedHorizon(gym.make("CartPole-v1", max_episode_steps=60), 60)
    obs, _ = env.reset(seed=0)
    rewards, steps, done = [], 0, False
    while not done:
        obs, r, terminated, truncated, info = env.step(0)  # always push left: falls within ~10 steps
        assert not terminated
        rewards.append(r)
        steps += 1
        done = truncated
    assert steps == 60
    assert rewards[0] == 1.0 and rewards[-1] == 0.0 and sum(rewards) < 20


class FakeStore:
    """The feedback store's interface, in memory."""

    def __init__(self):
        self.items, self._answers = [], []

    def add_items(self, items):
        self.items += items
        return [it["id"] for it in items]

    def answers(self, item_ids=None):
        return [a for a in self._answers if item_ids is None or a["item_id"] in item_ids]

    def answer(self, item_id, choice, annotator="ann"):
        self._answers.append({"item_id": item_id, "annotator": annotator, "kind": "pair", "choice": choice})


def test_human_labeler_renders_gifs_and_reads_answers(tmp_path):
    from PIL import Image

    env = preference_env("HeedReach1D-v0", 20, render=True)
    for seed in (0, 1):
        env.seed(seed)
        env.reset()
        for _ in range(20):
            env.step(np.stack([env.action_space.sample()]))
    assert len(env.episodes) == 2
    pairs = sample_pairs(list(env.episodes), 5, 6, np.random.default_rng(0))
    assert pairs.frames0 is not None and pairs.frames0[0].shape == (6, 8, 40, 3)
    store = FakeStore()
    labeler = HumanLabeler(store, tmp_path / "clips", task="reach x = 1")
    labeler.submit(pairs)
    assert len(store.items) == 5 and labeler.pending == 5
    item = store.items[0]
    assert item["kind"] == "pair" and "reach x = 1" in item["prompt"]
    gif = Image.open(item["responses"][0]["media"])
    durations = []
    for i in range(gif.n_frames):  # Pillow merges repeated frames, adding up their durations
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert gif.format == "GIF" and gif.n_frames > 1 and sum(durations) == 6 * 50
    ids = [it["id"] for it in store.items]
    assert labeler.collect() == []  # nobody has answered: nothing blocks, nothing comes back
    store.answer(ids[0], "0"); store.answer(ids[1], "1"); store.answer(ids[2], "tie"); store.answer(ids[3], "skip")
    got = labeler.collect()
    assert [mu[0] for _, mu in got] == [1.0, 0.0, 0.5]
    assert np.array_equal(got[1][0].obs0[0], pairs.obs0[1])  # answers stay with their clips
    assert labeler.pending == 1 and labeler.skipped == 1
    store.answer(ids[4], "1", "a"); store.answer(ids[4], "0", "b")  # two people disagree: averaged
    assert [mu[0] for _, mu in labeler.collect()] == [0.5]


def test_ensemble_learns_a_reward_from_comparisons_and_is_normalized():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    true_r = lambda o, a: o[..., 0] - 0.5 * a[..., 0] ** 2  # a reward on (observation, action)
    ens = RewardEnsemble(2, gym.spaces.Box(-1, 1, (1,)), members=3, hidden=32)
    data = Comparisons()
    for _ in range(400):
        o0, o1 = rng.normal(size=(2, 8, 2))
        a0, a1 = rng.uniform(-1, 1, size=(2, 8, 1))
        mu = float(true_r(o0, a0).sum() > true_r(o1, a1).sum())
        data.add(o0, a0, o1, a1, mu, rng, ens.size, 0.3679)
    stats = EnsembleTrainer(ens, seed=0).fit(data, 300)
    assert stats["val_acc"] > 0.85 and stats["train_loss"] < 0.45
    obs, act = rng.normal(size=(2000, 2)), rng.uniform(-1, 1, size=(2000, 1))
    ens.normalize(obs, act)
    raw = ens.raw(torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(act, dtype=torch.float32))
    normed = (raw - ens.out_mean[:, None]) / ens.out_std[:, None]
    assert torch.allclose(normed.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(normed.std(1), torch.ones(3), atol=1e-4)
    assert np.corrcoef(ens.reward(obs, act), true_r(obs, act))[0, 1] > 0.9


def test_score_for_negative_and_positive_returns():
    s = score(learned=-200.0, true=-150.0, random=-1200.0)
    assert s["normalised_score"] == pytest.approx(1000 / 1050)
    assert s["return_ratio"] == pytest.approx(0.75)
    assert score(80.0, 100.0, 0.0)["return_ratio"] == pytest.approx(0.8)


def test_cli_lists_control_options(capsys):
    from heed.cli import main

    with pytest.raises(SystemExit):
        main(["control", "train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--env", "--labels", "--clip-length", "--oversample", "--no-ensemble", "--offline",
                 "--labeler", "--db", "--reward"):
        assert flag in out
    assert main(["control", "train", "--env", "HeedReach1D-v0", "--labeler", "human"]) == 2  # no --db


@pytest.mark.slow
def test_tiny_run_beats_a_random_policy(tmp_path, monkeypatch):
    out, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where SB3's default logger would leave a dir
    cfg = ControlTrainConfig(env="HeedReach1D-v0", out=str(out), total_timesteps=1000,
                             initial_steps=200, round_steps=400, labels=60, clip_length=5, eval_every=800,
                             eval_episodes=8, baseline=False, rm_initial_steps=200, rm_steps=60, net_arch=[32, 32])
    report = train(cfg)
    assert not [p for p in scratch.iterdir() if p.name.startswith("SB3")]  # torch may cache here, SB3 must not
    random_returns = evaluate(None, "HeedReach1D-v0", 20, [10_000 + i for i in range(8)])
    assert report["random"]["return_mean"] == pytest.approx(np.mean(random_returns))
    assert report["learned"]["labels_used"] <= 60
    assert report["learned"]["return_mean"] > report["random"]["return_mean"] + 10
    saved = json.loads((out / "report.json").read_text())
    assert saved["learned"]["return_mean"] == report["learned"]["return_mean"]
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 3
    assert (out / "reward_ensemble.pt").exists() and (out / "policy_learned_reward.zip").exists()


def test_human_labeler_with_the_feedback_store(tmp_path):
    """The same labeler against the real app store, when it is installed."""
    store_mod = pytest.importorskip("heed.feedback.store")
    env = preference_env("HeedReach1D-v0", 20, render=True)
    env.seed(0)
    env.reset()
    for _ in range(20):
        env.step(np.stack([env.action_space.sample()]))
    pairs = sample_pairs(list(env.episodes), 2, 6, np.random.default_rng(0))
    store = store_mod.Store(tmp_path / "feedback.db")
    labeler = HumanLabeler(store, tmp_path / "clips")
    labeler.submit(pairs)
    item, order = store.next_item("ann")
    assert item["responses"][0]["media"].endswith(".gif")
    store.submit("ann", item["id"], {"choice": "A"})  # A is the clip shown first: original index order[0]
    ((got, mu),) = labeler.collect()
    i = [it["id"] for it in store.all_items()].index(item["id"])
    assert mu[0] == (1.0 if order[0] == 0 else 0.0)
    assert np.array_equal(got.obs0[0], pairs.obs0[i]) and labeler.pending == 1


def test_human_labeler_recovers_queries_sent_after_the_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    frames = [np.zeros((3, 4, 4, 3), dtype=np.uint8)] * 2
    pairs = ClipPairs(rng.normal(size=(2, 3, 1)), rng.normal(size=(2, 3, 1)), rng.normal(size=(2, 3, 1)),
                      rng.normal(size=(2, 3, 1)), np.zeros(2), np.ones(2), frames, frames)
    store = FakeStore()
    first = HumanLabeler(store, tmp_path)
    first.submit(pairs.take([0]))
    state = first.state()  # the checkpoint
    first.submit(pairs.take([1]))  # asked, then the run is killed before the next checkpoint
    again = HumanLabeler(store, tmp_path)
    assert again.load_state(state) == 1 and again.pending == 2
    store.answer(store.items[1]["id"], "1")
    ((got, mu),) = again.collect()
    assert mu[0] == 0.0 and np.allclose(got.obs0[0], pairs.obs0[1])


@pytest.mark.slow
@pytest.mark.parametrize("agent", [{}, {"algo": "ppo", "n_envs": 2, "normalize": True,
                                       "rl_kwargs": "{n_steps: 50, batch_size: 50, n_epochs: 2}"}],
                         ids=["sac", "ppo-2-envs-normalized"])
def test_killed_run_resumes(tmp_path, monkeypatch, agent):
    from heed.control.train import Checkpoint

    cfg = ControlTrainConfig(env="HeedReach1D-v0", out=str(tmp_path), total_timesteps=700, initial_steps=100,
                             round_steps=200, labels=30, clip_length=5, eval_every=400, eval_episodes=2,
                             baseline=False, rm_initial_steps=20, rm_steps=10, net_arch=[16, 16], **agent)
    real_save = Checkpoint.save

    def save_then_die(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    state = Checkpoint.load(tmp_path / "checkpoint_learned")
    labels_then = len(state.comparisons)
    assert 0 < labels_then < 30
    assert (tmp_path / "checkpoint_learned" / "vec_normalize.pkl").exists() == bool(agent)
    monkeypatch.setattr(Checkpoint, "save", real_save)
    report = train(cfg)
    assert report["learned"]["env_steps"] == 700 and report["learned"]["labels_used"] == 30
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "learned/wall_s" in r]
    assert steps == sorted(set(steps))  # no round logged twice
    with pytest.raises(Exception, match="different settings"):
        train(ControlTrainConfig(**{**dataclasses.asdict(cfg), "labels": 40}))


def test_vectorised_recorder_keeps_each_copys_episodes_and_batches_the_learned_reward():
    env = preference_env("HeedReach1D-v0", 20, n_envs=3)
    calls = []

    def reward_fn(obs, act):
        calls.append(len(obs))
        return obs[:, 0] + act[:, 0]  # any function of (obs, action), per row

    env.reward_fn = reward_fn
    env.seed(0)
    obs = env.reset()
    rng = np.random.default_rng(0)
    for _ in range(20):
        act = rng.uniform(-1, 1, size=(3, 1)).astype(np.float32)
        new_obs, rewards, dones, infos = env.step(act)
        assert np.allclose(rewards, obs[:, 0] + act[:, 0])  # the learned reward, in place of the true one
        assert all("true_reward" in i for i in infos)
        obs = new_obs
    assert calls == [3] * 20  # one call per step for all copies
    assert env.steps == 60 and env.episodes_done == 3 and len(env.episodes) == 3
    assert all(ep.end_step == 60 and len(ep.obs) == 20 for ep in env.episodes)
    starts = [ep.obs[0, 0] for ep in env.episodes]
    assert len(set(starts)) == 3  # three copies, three different episodes
    for ep in env.episodes:  # each episode is one copy's own trajectory: x moves by 0.25 * action
        moved = np.clip(ep.obs[:-1, 0] + 0.25 * ep.actions[:-1, 0], -2, 2)
        assert np.allclose(moved, ep.obs[1:, 0], atol=1e-5)
        assert np.allclose(ep.true_rewards[:-1], -np.abs(ep.obs[1:, 0] - 1.0), atol=1e-5)


def test_environment_defaults_sit_under_yaml_and_flags(tmp_path):
    from heed import config

    cheetah = config.build(ControlTrainConfig, {"env": "HalfCheetah-v5"})
    assert cheetah.algo == "ppo" and cheetah.normalize and cheetah.labels == 1400 and cheetah.n_envs > 1
    assert config.build(ControlTrainConfig, {"env": "HalfCheetah-v5", "algo": "sac", "labels": 700}).algo == "sac"
    plain = config.build(ControlTrainConfig, {"env": "Pendulum-v1"})
    assert plain == ControlTrainConfig(env="Pendulum-v1")  # other environments keep the dataclass defaults
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("env: HalfCheetah-v5\nn_envs: 2\n")
    import argparse

    ns = argparse.Namespace(config=str(yaml_file), total_timesteps=5000)
    cfg = config.from_namespace(ControlTrainConfig, ns)
    assert (cfg.n_envs, cfg.total_timesteps, cfg.algo) == (2, 5000, "ppo")


def test_rl_kwargs_reach_the_agent_and_bad_ones_are_named():
    from heed.control.train import _make_agent
    from heed.utils import HeedError

    env = preference_env("HeedReach1D-v0", 20, n_envs=2)
    cfg = ControlTrainConfig(env="HeedReach1D-v0", algo="ppo", n_envs=2,
                             rl_kwargs="{n_steps: 16, batch_size: 32, gamma: 0.9, "
                                       "policy_kwargs: {activation_fn: relu}}")
    agent = _make_agent(cfg, env, 0)
    assert agent.n_steps == 16 and agent.gamma == 0.9 and agent.policy.activation_fn is torch.nn.ReLU
    for bad, said in (("{n_stepz: 3}", "n_stepz"), ("[1, 2]", "mapping"), ("{a: [", "not YAML"),
                      ("{policy_kwargs: {activation_fn: swish}}", "swish")):
        with pytest.raises(HeedError, match=said):
            _make_agent(dataclasses.replace(cfg, rl_kwargs=bad), env, 0)
