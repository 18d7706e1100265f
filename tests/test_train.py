"""Pretraining and SFT: they learn, they resume, they run on two processes, they reject bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from heed.cli import main
from heed.models import load_policy

HEED = [sys.executable, "-m", "heed.cli"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_lowers_heldout_perplexity(tiny_base):
    rows = [r for r in metrics(tiny_base) if "eval/loss" in r]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] - 0.3
    assert rows[-1]["step"] == 30


def test_sft_lowers_heldout_loss_on_responses(tiny_base, world_dir, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_base), "--data", str(world_dir / "demos.jsonl"), "--out", str(out),
                 "--epochs", "2", "--batch-size", "16", "--eval-every", "1"]) == 0
    rows = [r for r in metrics(out) if "eval/loss" in r]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]
    model, _ = load_policy(out)
    base, _ = load_policy(tiny_base)
    assert not torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)


@pytest.mark.slow
def test_killed_pretraining_resumes_and_matches_uninterrupted_run(world_dir, tmp_path):
    args = ["pretrain", "--corpus", str(world_dir / "corpus.jsonl"), "--steps", "24", "--batch-size", "8",
            "--micro-batch-size", "8", "--seq-len", "32", "--vocab-size", "400", "--save-every", "4",
            "--eval-every", "100"]
    straight = tmp_path / "straight"
    assert main(args + ["--out", str(straight)]) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, HEED_QUIET="1")
    proc = subprocess.Popen(HEED + args + ["--out", str(killed)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    state = killed / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["step"] >= 8):
        assert proc.poll() is None, "finished before it could be killed: " + proc.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()
    step_at_kill = json.loads(state.read_text())["step"]

    resumed = subprocess.run(HEED + args + ["--out", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed / 'checkpoint'} at step {step_at_kill}" in resumed.stdout
    a, _ = load_policy(straight)
    b, _ = load_policy(killed)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    # every step logged exactly once across the two runs (no finished step lost or redone twice)
    steps = [r["step"] for r in metrics(killed)]
    assert sorted(set(steps)) == list(range(1, 25)) and steps.count(24) == 1

    again = subprocess.run(HEED + args + ["--out", str(killed)], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already trained" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_process_training_matches_one_process(tiny_base, world_dir, tmp_path, stage):
    """SFT (the LM loss, token-count scaling) and DPO (pairs sharing their prompt, row-count scaling)."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("accelerate's launcher is not installed next to this python")
    script = Path(__file__).with_name(f"ddp_{stage}_script.py")
    env = dict(os.environ, HEED_QUIET="1", OMP_NUM_THREADS="1")
    launcher = str(Path(sys.executable).parent / "accelerate")
    two = tmp_path / "two"
    # `--multi_gpu` is accelerate's torchrun launcher; with no GPU each process runs on the CPU (gloo).
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tiny_base),
                        str(world_dir / "demos.jsonl"), str(two)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, str(script), str(tiny_base), str(world_dir / "demos.jsonl"), str(one)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (two / "processes1.txt").read_text() == "2", "accelerate did not train with two processes"
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    single = torch.load(one / "rank0.pt")
    base, _ = load_policy(tiny_base)
    moved = False
    close, total = 0, 0
    for name, p in rank0.items():
        assert torch.equal(p, rank1[name]), f"ranks differ at {name}"
        # Adam divides by sqrt(v): a gradient that is zero up to rounding (summed in another
        # order across two processes) can move one weight by up to a step of lr. So a handful
        # of elements may differ beyond float noise; anything systematic (a wrong loss scale,
        # a schedule stepped per process, each rank training alone) moves nearly all of them.
        assert float((p - single[name]).abs().max()) < 1e-3, name
        close += int(torch.isclose(p, single[name], atol=1e-5, rtol=1e-4).sum())
        total += p.numel()
        moved |= not torch.equal(p, base.state_dict()[name])
    assert close / total > 0.999, f"only {close / total:.4%} of weights match one process"
    assert moved, "training did not change the weights"


def test_bad_demo_row_names_file_line_and_field(tmp_path, tiny_base, capsys):
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "Describe the Buba.", "response": "The Buba is a fish."}\n'
                   '{"prompt": "Is the Febo black?", "respons": "Yes."}\n')
    assert main(["sft", "--model", str(tiny_base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'response': missing" in err and "Traceback" not in err

    bad.write_text('{"prompt": "Describe the Buba.", "response": "The Buba is a fish."}\n{not json\n')
    assert main(["sft", "--model", str(tiny_base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err

    bad.write_text('{"prompt": 3, "response": "x"}\n{"prompt": "Is the Febo black?", "response": "Yes."}\n')
    from heed.data import read_demos
    assert len(read_demos(bad, skip_invalid=True)) == 1
    assert "skipped 1 invalid row" in capsys.readouterr().out


def test_empty_and_missing_files_are_clear(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["pretrain", "--corpus", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no documents found (the file is empty)" in capsys.readouterr().err
    assert main(["pretrain", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    assert main(["sft", "--model", str(tmp_path), "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no demonstrations found" in capsys.readouterr().err


def test_help_comes_from_the_config_and_yaml_sets_fields(tmp_path, capsys, world_dir):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    assert "--seq-len SEQ_LEN" in text and "tokens per packed training sequence (default: 128)" in text
    assert main(["--help"]) == 0 and "pretrain" in capsys.readouterr().out

    from heed.config import build, load_yaml
    from heed.generate import SampleConfig

    yml = tmp_path / "s.yaml"
    yml.write_text("model: m\nprompts: p.jsonl\nout: o.jsonl\ntemperature: 0.5\n")
    cfg = build(SampleConfig, load_yaml(yml))
    assert cfg.temperature == 0.5 and cfg.n == 1
    yml.write_text("model: m\nprompts: p\nout: o\ntemprature: 0.5\n")
    assert main(["sample", "--config", str(yml)]) == 2
    assert "unknown field 'temprature'" in capsys.readouterr().err
    assert main(["sample", "--model", "m", "--prompts", "p", "--out", "o", "--n", "two"]) == 2
    assert "config field 'n': expected int, got 'two'" in capsys.readouterr().err


def test_length_grouped_micro_batches_cover_every_row_save_padding_and_keep_the_gradient(tiny_base):
    """micro_batches(lengths=...) puts rows of similar length together: every row once, none over
    the size, less padded work than consecutive slices, and the summed gradient of a reward
    model's pairs equals that of one micro-batch."""
    import random

    from heed.algos.common import micro_batches
    from heed.models import shared_batch, shared_width
    from heed.reward_model import RewardMember

    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(10, 40), rng.randint(150, 250)]) for _ in range(40)]
    chunks = micro_batches(list(range(40)), 12, lengths)
    assert sorted(i for c in chunks for i in c) == list(range(40)) and max(map(len, chunks)) <= 12

    def work(parts):
        return sum(len(c) * max(lengths[i] for i in c) for c in parts)

    assert work(chunks) < 0.8 * work(micro_batches(list(range(40)), 12))
    assert len(micro_batches(list(range(10)), 4, [7] * 10)) == 3  # equal lengths: as few as possible

    model, tok = load_policy(tiny_base)
    member = RewardMember(model.base_model, seed=0)
    prompts = ["Is the Febo black?", "Describe the Buba, the small fish that lives in the river, please.",
               "Hi.", "List every black robot you know of, with its size and colour, one per line."]
    pairs = [["Yes.", "No, it is not."], ["The Buba is a small fish.", "Fish."], ["Hello!", "Go away."],
             ["The Tarvo and the Febo.", "None."]]
    grads, widths = [], [shared_width(p, r) for p, r in zip(prompts, pairs)]
    for parts in ([list(range(4))], micro_batches(list(range(4)), 4, widths)):
        member.zero_grad()
        for c in parts:
            r = member(shared_batch(tok, [prompts[i] for i in c], [pairs[i] for i in c],
                                    max_prompt_len=64, max_response_len=16))
            (-torch.nn.functional.logsigmoid(r[0::2] - r[1::2])).sum().backward()
        grads.append([p.grad.clone() for p in member.parameters()])
    assert len(parts) > 1
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
