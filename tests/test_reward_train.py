"""The commands end to end: `heed label oracle`, `heed rm train` (HH-RLHF .jsonl.gz, world pairs,
an ensemble), `heed rm eval`, `heed rm score`; normalisation and ensemble uncertainty."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from heed.cli import main
from heed.data import read_feedback
from heed.reward_model import RewardMember

# Short sequences and a high learning rate keep these runs to seconds on a CPU.
SHORT = ["--max-prompt-len", "40", "--max-response-len", "40", "--lr", "1e-3", "--norm-max-new-tokens", "12"]
BEHAVIOURS = ["good", "good", "off_topic", "wrong_facts", "wrong_tone", "rambling", "repetition", "no_end"]


def world_samples(n_prompts: int, per_prompt: int, seed: int = 0) -> list[dict]:
    """Responses of mixed quality to world prompts, made by the world's own generators (no model)."""
    from heed.world import World
    from heed.world.responses import respond
    from heed.world.tasks import universe

    world = World(0)
    rng = random.Random(seed)
    prompts = rng.sample(world.train_pool, n_prompts)
    return [{"prompt": p, "response": respond(universe()[p], rng.choice(BEHAVIOURS), rng, world.train_pool)}
            for p in prompts for _ in range(per_prompt)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_oracle_every_kind(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", world_samples(10, 4))
    expected = {"pairs": 20, "rankings": 10, "thumbs": 40, "ratings": 40}
    for kind, n in expected.items():
        out = tmp_path / f"{kind}.jsonl"
        assert main(["label", "oracle", "--samples", str(samples), "--out", str(out), "--kind", kind]) == 0
        fb = read_feedback(out)
        assert fb.format == kind and len(fb.rows) <= n and len(fb.rows) >= n - 2  # identical pairs skipped
    # a budget caps the labels; the same seed gives the same labels
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        main(["label", "oracle", "--samples", str(samples), "--out", str(out), "--kind", "thumbs", "--budget", "7"])
    assert a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 7
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Not a world prompt", "response": x} for x in "xy"])
    assert main(["label", "oracle", "--samples", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "only labels the embedded world's prompts" in capsys.readouterr().err


def hh_rows(n: int, seed: int) -> list[dict]:
    """HH-RLHF transcripts: a shared (sometimes two-turn) dialogue, a good and a bad last answer."""
    from heed.world import World
    from heed.world.responses import respond
    from heed.world.tasks import universe

    world = World(0)
    rng = random.Random(seed)
    rows = []
    for p in rng.sample(world.train_pool, n):
        task = universe()[p]
        dialogue = f"\n\nHuman: {p}\n\nAssistant:"
        if rng.random() < 0.3:
            q = rng.choice(world.train_pool)
            dialogue = f"\n\nHuman: {q}\n\nAssistant: {respond(universe()[q], 'good', rng, [])}" + dialogue
        good = respond(task, "good", rng, world.train_pool)
        bad = respond(task, rng.choice(["off_topic", "wrong_tone", "repetition", "no_end"]), rng, world.train_pool)
        rows.append({"chosen": f"{dialogue} {good}", "rejected": f"{dialogue} {bad}"})
    return rows


def test_rm_train_ingests_hh_jsonl_gz(tiny_base, tmp_path, capsys):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh_rows(120, 0))
    out = tmp_path / "rm_hh"
    assert main(["rm", "train", "--model", str(tiny_base), "--data", str(path), "--out", str(out), *SHORT,
                 "--epochs", "3", "--batch-size", "16", "--micro-batch-size", "16", "--eval-fraction", "0.25",
                 "--norm-samples", "16"]) == 0
    printed = capsys.readouterr().out
    assert "hh.jsonl.gz: 120 hh" in printed and "held-out: 30 rows" in printed
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["heldout"]["accuracy"] >= 0.75, meta["heldout"]
    assert meta["trained_on"]["rows"] == {"hh": 120}


@pytest.fixture(scope="module")
def world_rm(tiny_base, tmp_path_factory):
    """A 3-member ensemble trained on labelled world pairs (bootstrap resamples)."""
    d = tmp_path_factory.mktemp("world_rm")
    write_jsonl(d / "samples.jsonl", world_samples(48, 2, seed=1))
    main(["label", "oracle", "--samples", str(d / "samples.jsonl"), "--out", str(d / "pairs.jsonl")])
    write_jsonl(d / "heldout_samples.jsonl", world_samples(24, 2, seed=2))
    main(["label", "oracle", "--samples", str(d / "heldout_samples.jsonl"), "--out", str(d / "heldout.jsonl")])
    assert main(["rm", "train", "--model", str(tiny_base), "--data", str(d / "pairs.jsonl"), "--out", str(d / "rm"),
                 *SHORT, "--ensemble", "3", "--epochs", "1", "--batch-size", "16", "--micro-batch-size", "16",
                 "--eval-data", str(d / "heldout.jsonl"), "--norm-samples", "24", "--oracle", "heed.rules:gold"]) == 0
    return d


def test_ensemble_metrics_and_eval(world_rm, capsys):
    meta = json.loads((world_rm / "rm" / "reward_model.json").read_text())
    assert meta["n_members"] == 3 and len(meta["gain"]) == 3 and meta["heldout"]["gold_pairs"] > 0
    out = world_rm / "eval.json"
    assert main(["rm", "eval", "--model", str(world_rm / "rm"), "--data", str(world_rm / "heldout.jsonl"),
                 "--oracle", "heed.rules:gold", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    overall = result["overall"]
    assert "accuracy vs gold" in printed and result["counts"] == {"pairs": overall["n_rows"]}
    assert overall["gold_accuracy"] == pytest.approx(meta["heldout"]["gold_accuracy"], abs=1e-6)
    assert 0 <= overall["calibration_error"] <= 0.5 and 0.5 < overall["label_gold_agreement"] <= 1


def test_normalization_on_sft_samples(world_rm):
    """Re-drawing the same SFT samples and scoring them gives mean 0, std 1."""
    from heed.algos.reward import RewardTrainConfig, sft_samples
    from heed.config import load_yaml
    from heed.reward_model import load_reward_model

    cfg = RewardTrainConfig(**load_yaml(world_rm / "rm" / "config.yaml"))
    pairs = read_feedback(world_rm / "pairs.jsonl").rows
    prompts, responses = sft_samples(cfg, [r.prompt for r in pairs])
    assert len(responses) == 24
    mean, _ = load_reward_model(world_rm / "rm").score(prompts, responses)
    m = sum(mean) / len(mean)
    sd = (sum((x - m) ** 2 for x in mean) / len(mean)) ** 0.5
    assert abs(m) < 1e-4 and abs(sd - 1) < 1e-4


def test_ensemble_uncertainty_higher_far_from_data(world_rm):
    from heed.reward_model import load_reward_model

    rm = load_reward_model(world_rm / "rm")
    near = [(r.prompt, r.chosen) for r in read_feedback(world_rm / "heldout.jsonl").rows]
    rng = random.Random(0)
    junk = "".join(chr(rng.randrange(0x21, 0x7e)) for _ in range(4000))  # no world words, other characters
    far = [(p, junk[i * 60:(i + 1) * 60]) for i, (p, _) in enumerate(near)]
    _, std_near = rm.score([p for p, _ in near], [r for _, r in near])
    _, std_far = rm.score([p for p, _ in far], [r for _, r in far])
    assert sum(std_far) / len(std_far) > 1.5 * sum(std_near) / len(std_near)


def test_rm_score_adds_columns(world_rm, tmp_path):
    rows = world_samples(3, 2, seed=5)
    rows[0]["extra"] = "kept"
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(world_rm / "rm"), "--data", str(src), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    from heed.reward_model import load_reward_model
    mean, std = load_reward_model(world_rm / "rm").score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [r["reward"] for r in scored] == pytest.approx(mean, abs=1e-5)
    assert [r["reward_std"] for r in scored] == pytest.approx(std, abs=1e-5)
    assert scored[0]["extra"] == "kept"
    # combined with a rule: a total plus each term
    out2 = tmp_path / "scored2.jsonl"
    assert main(["rm", "score", "--reward", f"{world_rm / 'rm'},2*heed.rules:gold", "--data", str(src),
                 "--out", str(out2), "--column", "r"]) == 0
    scored2 = [json.loads(line) for line in out2.read_text().splitlines()]
    from heed.rules import gold
    g = gold([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [r["r"] for r in scored2] == pytest.approx([m + 2 * x for m, x in zip(mean, g)], abs=1e-5)
    assert set(scored2[0]["r_terms"]) == {str(world_rm / "rm"), "heed.rules:gold"}


def test_rm_train_rankings_thumbs_ratings_together(tiny_base, tmp_path):
    """Rankings, thumbs and ratings train together in one run, each through its own loss."""
    src = write_jsonl(tmp_path / "samples.jsonl", world_samples(16, 4, seed=3))
    for kind in ("rankings", "thumbs", "ratings"):
        main(["label", "oracle", "--samples", str(src), "--out", str(tmp_path / f"{kind}.jsonl"), "--kind", kind])
    files = ",".join(str(tmp_path / f"{k}.jsonl") for k in ("rankings", "thumbs", "ratings"))
    out = tmp_path / "rm"
    assert main(["rm", "train", "--model", str(tiny_base), "--data", files, "--out", str(out), *SHORT,
                 "--epochs", "1", "--eval-fraction", "0.25", "--norm-samples", "0"]) == 0
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["trained_on"]["rows"] == {"rankings": 16, "thumbs": 64, "ratings": 64}
    assert meta["gain"] == [1.0] and "normalization" not in meta
    # held out: every pair of each ranking, and thumbs/ratings pairs within a prompt
    assert meta["heldout"]["n_rows"] == 36 and meta["heldout"]["n_comparisons"] > 4 * 6  # rankings give 24


def test_row_losses_dispatch_each_kind():
    """row_losses routes every row to its loss, with ratings standardised."""
    from heed.algos.reward import row_losses
    from heed.data import Pair, Ranking, Rating, Thumb
    from heed.losses import bradley_terry_loss, ranking_loss, rating_loss, thumbs_loss

    rows = [Pair("p", "a", "b", margin=0.5), Thumb("p", "c", True), Ranking("p", ["d", "e", "f"], [2, 0, 1]),
            Rating("p", "g", 6.0), Pair("p", "h", "i", tie=True)]
    r = torch.tensor([1.0, -0.5, 0.3, 0.2, -1.0, 0.7, 0.9, 0.4, 0.4])
    got = row_losses(r, rows, rating_mean=4.0, rating_std=2.0, center_coef=0.1)
    t = torch.tensor
    assert got[0] == pytest.approx(float(bradley_terry_loss(t([1.0]), t([-0.5]), t([0.5]))) + 0.1 * 0.25, abs=1e-6)
    assert got[1] == pytest.approx(float(thumbs_loss(t([0.3]), t([1.0]))), abs=1e-6)
    assert got[2] == pytest.approx(float(ranking_loss(t([[0.2, -1.0, 0.7]]), t([[2, 0, 1]]))) + 0.1 * 0.01, abs=1e-6)
    assert got[3] == pytest.approx(float(rating_loss(t([0.9]), t([1.0]))), abs=1e-6)
    assert got[4] == pytest.approx(float(bradley_terry_loss(t([0.4]), t([0.4]), tie=t([True]))) + 0.1 * 0.64, abs=1e-6)


def test_preferred_responses_of_each_kind():
    """The LM term's responses: a pair's chosen (not a tie's), a ranking's top, a thumbs-up."""
    from heed.algos.reward import preferred_responses
    from heed.data import Pair, Ranking, Rating, Thumb

    rows = [Pair("p", "a", "b"), Thumb("p", "c", False), Ranking("p", ["d", "e", "f"], [2, 0, 1]),
            Rating("p", "g", 6.0), Pair("p", "h", "i", tie=True), Thumb("p", "j", True)]
    assert preferred_responses(rows) == ([0, 2, 5], [0, 5, 9])


def test_rm_train_lm_coef_logs_and_changes_the_trunk(tiny_base, tmp_path):
    """--lm-coef adds the chosen responses' NLL: it is logged, and the trained trunk differs."""
    src = write_jsonl(tmp_path / "samples.jsonl", world_samples(16, 4, seed=3))
    main(["label", "oracle", "--samples", str(src), "--out", str(tmp_path / "pairs.jsonl"), "--kind", "pairs"])
    trunks = {}
    for coef in ("0", "2"):
        out = tmp_path / f"rm{coef}"
        assert main(["rm", "train", "--model", str(tiny_base), "--data", str(tmp_path / "pairs.jsonl"),
                     "--out", str(out), *SHORT, "--epochs", "1", "--norm-samples", "0", "--lm-coef", coef]) == 0
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("train/lm_nll" in row for row in logged) == (coef != "0")
        trunks[coef] = RewardMember.load(out / "member_0").trunk.state_dict()
    assert any(not torch.equal(trunks["0"][k], trunks["2"][k]) for k in trunks["0"])


def test_member_with_lm_head_checkpoint_resumes(tiny_base, tmp_path):
    """A member that keeps its (tied) LM head saves a checkpoint and loads it back exactly."""
    from heed.algos.common import Learner
    from heed.algos.reward import RewardTrainConfig
    from heed.models import load_tokenizer, shared_batch

    cfg = RewardTrainConfig(model=str(tiny_base), data=["-"], out=str(tmp_path), lm_coef=1.0, lr=1e-2)
    tok = load_tokenizer(tiny_base)
    batch = shared_batch(tok, ["Is the Tigu a cat?"], [["Yes.", "No, it is a fish."]], max_prompt_len=32,
                         max_response_len=16)

    def loss(_rows):
        rewards, nll = learner.model(batch, lm_rows=torch.tensor([0]))
        return (rewards[1] - rewards[0]) + nll.sum()

    learner = Learner(RewardMember.from_policy(tiny_base, keep_lm_head=True), cfg, 4, run_dir=tmp_path)
    learner.step([[0]], loss)
    learner.checkpointer.save(1)
    trained = {k: v.clone() for k, v in learner.unwrapped.state_dict().items()}
    fresh = Learner(RewardMember.from_policy(tiny_base, keep_lm_head=True), cfg, 4, run_dir=tmp_path)
    assert fresh.checkpointer.load()["step"] == 1
    restored = fresh.unwrapped.state_dict()
    assert set(restored) == set(trained)
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    assert not torch.equal(trained["head.weight"], RewardMember.from_policy(tiny_base).head.weight)


@pytest.mark.slow
def test_two_process_rm_train_matches_one_process(tiny_base, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) gives the weights one process gives."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.fail("accelerate's launcher is not installed next to this python")
    src = write_jsonl(tmp_path / "samples.jsonl", world_samples(8, 2, seed=7))
    main(["label", "oracle", "--samples", str(src), "--out", str(tmp_path / "pairs.jsonl")])
    script = tmp_path / "rm_cli.py"
    script.write_text("import sys\nfrom heed.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    args = ["rm", "train", "--model", str(tiny_base), "--data", str(tmp_path / "pairs.jsonl"), *SHORT,
            "--batch-size", "4", "--micro-batch-size", "1", "--epochs", "1", "--eval-fraction", "0",
            "--norm-samples", "0"]
    env = dict(os.environ, HEED_QUIET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args, "--out",
                        str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "one")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    base = load_file(str(Path(tiny_base) / "model.safetensors"))
    moved, close, total = False, 0, 0
    for name in ("model.safetensors", "head.safetensors"):
        two = load_file(str(tmp_path / "two" / "member_0" / name))
        one = load_file(str(tmp_path / "one" / "member_0" / name))
        for key, value in one.items():
            # Adam turns gradients that are zero up to rounding (summed in another order across
            # processes) into steps of up to lr: a few elements may differ; a systematic error
            # (wrong scaling, a schedule stepped per process) moves nearly all of them.
            assert float((two[key] - value).abs().max()) < 1e-2, key
            close += int(torch.isclose(two[key], value, atol=1e-5, rtol=1e-4).sum())
            total += value.numel()
            moved |= name == "model.safetensors" and not torch.equal(value, base.get("model." + key, value))
    assert close / total > 0.999, f"only {close / total:.4%} of weights match one process"
    assert moved, "training did not change the trunk"
