"""Kill tests: every long stage is started as a process, SIGKILLed mid-run (inside a checkpoint
write, and at a random later moment), and rerun with the same command until it finishes. It must
end with the same result as an uninterrupted run, lose no finished step (metrics: every step
logged exactly once), and never leave a directory that a later run mistakes for finished.

The kill inside a checkpoint write is a real SIGKILL the process sends itself at the worst point
(heed.utils.fault_point: old checkpoint moved aside, new one not yet in place); the other kill is
sent from here, at a random moment after a random number of logged steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from heed.cli import main
from heed.data import write_jsonl

pytestmark = pytest.mark.slow
HEED = [sys.executable, "-m", "heed.cli"]
RULE = "heed.rules:gold"


@pytest.fixture(scope="module")
def inputs(world_dir, tmp_path_factory):
    """Prompts and preference pairs made from the world's demonstrations (nothing sampled)."""
    d = tmp_path_factory.mktemp("kill_inputs")
    demos = [json.loads(line) for line in (world_dir / "demos.jsonl").read_text().splitlines()][:48]
    write_jsonl(d / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["response"],
                                     "rejected": r["response"] + " " + r["response"]} for r in demos])
    return d


def stage_args(stage: str, world: Path, base: Path, inputs: Path) -> list[str]:
    prompts, pairs = str(world / "prompts_train.jsonl"), str(inputs / "pairs.jsonl")
    rollout = ["--prompts", prompts, "--reward", RULE, "--prompts-per-iteration", "8", "--max-new-tokens", "8",
               "--save-every", "1"]
    return {
        "pretrain": ["pretrain", "--corpus", str(world / "corpus.jsonl"), "--steps", "12", "--batch-size", "8",
                     "--micro-batch-size", "8", "--seq-len", "32", "--vocab-size", "400", "--save-every", "2",
                     "--eval-every", "100"],
        "sft": ["sft", "--model", str(base), "--data", str(world / "demos.jsonl"), "--epochs", "1",
                "--batch-size", "12", "--micro-batch-size", "12", "--save-every", "2", "--eval-every", "100"],
        "rm train": ["rm", "train", "--model", str(base), "--data", pairs, "--epochs", "2", "--batch-size", "8",
                     "--micro-batch-size", "8", "--save-every", "2", "--eval-every", "100", "--norm-samples", "4",
                     "--norm-max-new-tokens", "8"],
        "dpo": ["dpo", "--policy", str(base), "--data", pairs, "--epochs", "1", "--batch-size", "8",
                "--micro-batch-size", "8", "--save-every", "2", "--eval-every", "100"],
        "rebel": ["rebel", "--policy", str(base), *rollout, "--iterations", "4", "--n", "2", "--batch-size", "8"],
        "ppo": ["ppo", "--policy", str(base), *rollout, "--steps", "5", "--mini-batch-size", "8",
                "--ppo-epochs", "1"],
        "grpo": ["grpo", "--policy", str(base), *rollout, "--steps", "5", "--n", "2", "--mini-batch-size", "8"],
        "rloo": ["rloo", "--policy", str(base), *rollout, "--steps", "5", "--n", "2", "--mini-batch-size", "8"],
    }[stage]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file a finished run left, by file and name."""
    from safetensors.torch import load_file

    return {f"{f.relative_to(out)}:{k}": v for f in sorted(out.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def logged_steps(out: Path) -> dict[str, list[int]]:
    return {str(f.relative_to(out)): [json.loads(line)["step"] for line in f.read_text().splitlines()]
            for f in sorted(out.rglob("metrics.jsonl"))}


def live_steps(out: Path) -> dict[str, list[int]]:
    """`logged_steps` of a run still going: a checkpoint directory renamed while it is scanned, or
    a line of metrics half written, reads as nothing logged yet (the caller looks again)."""
    try:
        return logged_steps(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def launch(args: list[str], out: Path, log: Path, fault: str | None = None, heed=HEED) -> subprocess.Popen:
    """The stage as its own process, its output going to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "HEED_FAULT"}
    env.update(HEED_QUIET="1", PYTHONUNBUFFERED="1", **({"HEED_FAULT": fault} if fault else {}))
    return subprocess.Popen(heed + args + ["--out", str(out)], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def kill_when_resumed(proc: subprocess.Popen, out: Path, log: Path, steps: int, delay: float) -> int:
    """Once `proc` says where it resumed and has logged `steps` more steps, wait `delay` seconds
    and SIGKILL it. Returns the step it resumed at; the process may finish first."""
    deadline = time.time() + 300
    while " at step " not in log.read_text():
        assert proc.poll() is None, "it did not resume: " + log.read_text()
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)
    resumed_at = int(log.read_text().split(" at step ")[1].split()[0])
    while max([0] + [max(s) for s in live_steps(out).values() if s]) < resumed_at + steps:
        if proc.poll() is not None:
            return resumed_at
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return resumed_at


def assert_same_weights(out: Path, straight: Path) -> None:
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)  # bit-identical


def assert_finished_only_if_whole(out: Path, straight: Path) -> None:
    """A killed run is either unfinished (no trainer_done.json: a rerun resumes it) or was killed
    after finishing (while removing its checkpoint): then its model is whole, the final one."""
    if list(out.rglob("trainer_done.json")):
        assert_same_weights(out, straight)


STAGES = ["pretrain", "sft", "rm train", "dpo", "rebel", "ppo", "grpo", "rloo"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_killed_stage_resumes_to_the_same_result(stage, world_dir, tiny_base, inputs, tmp_path):
    args = stage_args(stage, world_dir, tiny_base, inputs)
    straight = tmp_path / "straight"
    assert main(args + ["--out", str(straight)]) == 0

    out = tmp_path / "killed"
    # 1. killed by itself inside its second checkpoint write, between the old and the new one
    first = launch(args, out, tmp_path / "log1.txt", fault="checkpoint-swap:2")
    assert first.wait() == -signal.SIGKILL, (tmp_path / "log1.txt").read_text()
    assert not list(out.rglob("trainer_done.json"))
    # 2. rerun: it resumes from what the first kill left; killed again, from outside, at a random
    #    moment after a random number of steps
    rng = random.Random(stage)
    second = launch(args, out, tmp_path / "log2.txt")
    resumed_at = kill_when_resumed(second, out, tmp_path / "log2.txt", steps=rng.randint(1, 2),
                                   delay=rng.uniform(0, 0.3))
    assert resumed_at >= 1  # a whole checkpoint survived the kill mid-swap
    assert_finished_only_if_whole(out, straight)
    # 3. rerun with the same command to the end
    third = subprocess.run(HEED + args + ["--out", str(out)], env=dict(os.environ, HEED_QUIET="1"),
                           capture_output=True, text=True)
    assert third.returncode == 0, third.stdout + third.stderr

    # the same result as the uninterrupted run
    assert_same_weights(out, straight)
    # every step logged exactly once, as in the uninterrupted run
    assert logged_steps(out) == logged_steps(straight)
    assert not [p for p in out.rglob("checkpoint*")]  # a finished run keeps no checkpoint, old or new
    # finished now: a rerun trains nothing and changes nothing
    assert main(args + ["--out", str(out)]) == 0
    assert logged_steps(out) == logged_steps(straight)


def control_args() -> list[str]:
    return ["control", "train", "--env", "HeedReach1D-v0", "--total-timesteps", "700", "--initial-steps", "100",
            "--round-steps", "200", "--labels", "30", "--clip-length", "5", "--eval-every", "400",
            "--eval-episodes", "2", "--no-baseline", "--rm-initial-steps", "20", "--rm-steps", "10",
            "--net-arch", "16,16"]


def test_a_killed_control_run_resumes_to_the_same_result(tmp_path):
    """RL from preferences on a Gymnasium agent: killed inside its second checkpoint swap, rerun.
    Labels, steps and the learned reward's ensemble come out as in an uninterrupted run."""
    import test_control  # noqa: F401  (registers HeedReach1D-v0 here)

    args = control_args()
    straight = tmp_path / "straight"
    assert main(args + ["--out", str(straight)]) == 0
    out = tmp_path / "killed"
    # the toy environment is registered by test_control.py: the process imports it first
    heed = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); import test_control; "
            "from heed.cli import main; sys.exit(main(sys.argv[1:]))", str(Path(__file__).parent)]
    first = launch(args, out, tmp_path / "log1.txt", fault="checkpoint-swap:2", heed=heed)
    assert first.wait() == -signal.SIGKILL, (tmp_path / "log1.txt").read_text()
    assert not (out / "report.json").exists()
    second = launch(args, out, tmp_path / "log2.txt", heed=heed)
    assert second.wait() == 0, (tmp_path / "log2.txt").read_text()
    a, b = (json.loads((d / "report.json").read_text()) for d in (straight, out))
    for key in ("env_steps", "labels_used"):
        assert b["learned"][key] == a["learned"][key], key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["step"] for r in rows if "learned/wall_s" in r]
    assert rounds == sorted(set(rounds))  # no round logged twice


def test_a_killed_demo_resumes_to_the_same_report(quick_demo, tmp_path):
    """`heed demo --quick`, killed inside a checkpoint write and again at a random moment of a later
    stage, then rerun with the same command: the same report as the uninterrupted demo (the
    session's quick_demo)."""
    out = tmp_path / "demo"
    # 1. inside a checkpoint write of pretraining
    first = launch(["demo", "--quick"], out, tmp_path / "log1.txt", fault="checkpoint-swap:3")
    assert first.wait() == -signal.SIGKILL, (tmp_path / "log1.txt").read_text()
    assert not (out / "report.json").exists()
    # 2. from outside, a random moment into the sampling and labelling stages
    second = launch(["demo", "--quick"], out, tmp_path / "log2.txt")
    deadline = time.time() + 600
    while "[4/9]" not in (tmp_path / "log2.txt").read_text():
        assert second.poll() is None and time.time() < deadline, (tmp_path / "log2.txt").read_text()
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.5, 3.0))
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert not (out / "report.json").exists()
    done = subprocess.run(HEED + ["demo", "--quick", "--out", str(out)], env=dict(os.environ, HEED_QUIET="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = (json.loads((d / "report.json").read_text()) for d in (quick_demo, out))
    assert b["win_rates"] == a["win_rates"]
    assert b["reward_model"] == a["reward_model"]
    assert {k: v["gold_mean"] for k, v in b["stages"].items()} == {k: v["gold_mean"] for k, v in a["stages"].items()}
