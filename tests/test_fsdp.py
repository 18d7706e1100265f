"""FSDP (examples/accelerate/fsdp.yaml) and DeepSpeed ZeRO-2/3 (zero2.yaml, zero3.yaml; skipped where
deepspeed is not installed) on two CPU processes over gloo: under FSDP and ZeRO-3 each process holds
half the weights; each run follows one process's loss trajectory to the same weights; a run stopped
dead after a sharded checkpoint resumes to the same end; online stages refuse sharded weights.

Tolerances. Two processes sum each step's loss and gradients in a different order than one, so
the numbers differ by float rounding (about 1e-7 relative per step); Adam divides by sqrt(v), so a
gradient element that is zero up to rounding can move its weight by up to a step of lr (the same
argument as tests/test_train.py's DDP test). Measured here: losses within 2e-5 relative (1e-7
absolute), weights within 6e-5, 99.9997% of elements within 1e-5. The bounds below are 5-20x
those; a wrong loss scale, an optimiser state lost on resume, or each process training alone
moves nearly every weight by about lr (1e-3) and fails them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heed.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "accelerate" / "fsdp.yaml"
SCRIPT = Path(__file__).with_name("fsdp_script.py")


def launch(args: list[str], info: Path, stop_after: int = 0, config: Path = CONFIG) -> subprocess.CompletedProcess:
    """heed ARGS on two processes under an examples/accelerate/ config (no --cpu: accelerate would then
    drop the FSDP and DeepSpeed settings; heed trains on the CPU when there is no GPU). For FSDP the
    decoder layer class is named because DPO's wrapper hides the model's own `_no_split_modules`:
    one FSDP unit per layer."""
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, HEED_QUIET="1", OMP_NUM_THREADS="1")
    fsdp = ["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"] if config == CONFIG else []
    return subprocess.run([launcher, "launch", "--config_file", str(config), "--num_processes", "2",
                           "--main_process_port", "0", *fsdp, str(SCRIPT), str(info), str(stop_after), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_sharded(info: Path, engine: str = "FSDP", weights_split: bool = True) -> None:
    """Both processes trained under `engine`; with `weights_split`, each held about half of every
    weight (FSDP: together exactly all of it; ZeRO-3 pads its partitions to equal size)."""
    ranks = [json.loads((info / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["distributed_type"] == f"DistributedType.{engine}" and r["processes"] == 2, r
        if weights_split:
            assert 0 < r["local_numel"] < 0.55 * r["numel"], f"not sharded: {r}"
    if weights_split and engine == "FSDP":
        assert sum(r["local_numel"] for r in ranks) == ranks[0]["numel"]


def assert_same_run(one: Path, two: Path) -> None:
    """The same loss every step (and held-out loss where logged) and the same final weights."""
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("train/loss", "eval/loss"):
            if key in x:
                assert math.isclose(x[key], y[key], rel_tol=2e-4, abs_tol=1e-6), (x["step"], key, x[key], y[key])
    single, sharded = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(single) == sorted(sharded), "the gathered model saves other tensors than one process's"
    close = total = 0
    for name, p in single.items():
        assert float((p - sharded[name]).abs().max()) < 1e-3, name
        close += int(torch.isclose(p, sharded[name], atol=1e-5, rtol=1e-4).sum())
        total += p.numel()
    assert close / total > 0.999, f"only {close / total:.4%} of weights match one process"


def sft_args(tiny_base, world_dir) -> list[str]:
    return ["sft", "--model", str(tiny_base), "--data", str(world_dir / "demos.jsonl"), "--batch-size", "8",
            "--micro-batch-size", "2", "--epochs", "0.6", "--eval-every", "4", "--save-every", "3"]


@pytest.fixture(scope="module")
def sft_one(tiny_base, world_dir, tmp_path_factory) -> Path:
    """SFT on one process: 9 steps, held-out loss at steps 4, 8 and 9 (checkpoints change nothing)."""
    out = tmp_path_factory.mktemp("sft_one") / "one"
    assert main(sft_args(tiny_base, world_dir) + ["--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_fsdp_sft_follows_one_process(tiny_base, world_dir, sft_one, tmp_path):
    r = launch(sft_args(tiny_base, world_dir) + ["--out", str(tmp_path / "two")], tmp_path / "info")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_sharded(tmp_path / "info")
    assert_same_run(sft_one, tmp_path / "two")
    base = load_file(Path(tiny_base) / "model.safetensors")
    trained = load_file(tmp_path / "two" / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base), "training did not change the weights"


@pytest.mark.slow
def test_fsdp_dpo_stopped_after_a_sharded_checkpoint_resumes_to_one_process_weights(tiny_base, world_dir, tmp_path):
    demos = [json.loads(line) for line in (world_dir / "demos.jsonl").read_text().splitlines()][:48]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": d["prompt"],  # a short answer beats a doubled one
                                         "chosen": d["response"].split(". ")[0].rstrip(".") + ".",
                                         "rejected": d["response"] + " " + d["response"]}) + "\n" for d in demos))
    args = ["dpo", "--policy", str(tiny_base), "--data", str(pairs), "--batch-size", "8", "--micro-batch-size", "2",
            "--lr", "1e-3", "--warmup-steps", "1", "--epochs", "1", "--save-every", "2", "--log-every", "1"]
    two = tmp_path / "two"
    stopped = launch(args + ["--out", str(two)], tmp_path / "info", stop_after=4)
    assert stopped.returncode != 0, "the run was to stop dead after step 4's checkpoint"
    assert json.loads((two / "checkpoint" / "trainer_state.json").read_text()) == {"step": 4}
    assert not (two / "model.safetensors").exists()
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # weights and AdamW moments: a shard per process
        assert {f.name for f in (two / "checkpoint" / part).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    resumed = launch(args + ["--out", str(two)], tmp_path / "info")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {two / 'checkpoint'} at step 4" in resumed.stdout
    assert_sharded(tmp_path / "info")
    steps = [r["step"] for r in metrics(two)]
    assert steps == [1, 2, 3, 4, 5, 6], "every step logged once across the stopped and the resumed run"
    assert not (two / "checkpoint").exists()

    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "one", two)


def test_online_stages_refuse_sharded_weights(tiny_base, world_dir, tmp_path, monkeypatch):
    import heed.algos.online as online
    from heed.algos.ppo import PPOConfig, PPOTrainer
    from heed.utils import HeedError

    monkeypatch.setattr(online, "is_sharded", lambda accelerator: True)
    cfg = PPOConfig(policy=str(tiny_base), prompts=str(world_dir / "prompts_train.jsonl"), reward=["-"],
                    out=str(tmp_path / "ppo"))
    with pytest.raises(HeedError, match="FSDP and DeepSpeed ZeRO-3 shard the weights"):
        PPOTrainer(cfg, reward_fn=lambda ps, rs: [0.0] * len(rs), prompts=["Is the Tigu a cat?"])


def test_a_sharded_model_saves_the_gathered_weights_with_ties_kept(tiny_base, tmp_path):
    """Learner.finish's save path: every module's state_dict() answers from the gathered weights,
    so `save_model(m.policy, ...)` on a wrapper writes them; tied weights are stored once."""
    from heed.algos.common import whole_state_dicts
    from heed.models import TokenLogprobs, load_policy, save_model

    policy, tok = load_policy(tiny_base)
    wrapper = TokenLogprobs(policy)
    # what the ranks gathered: separate tensors, the tied lm_head and embeddings included
    gathered = {k: v.detach().clone() + 0.5 for k, v in wrapper.state_dict().items()}
    with whole_state_dicts(wrapper, gathered):
        save_model(wrapper.policy, tok, tmp_path / "saved")
    assert "state_dict" not in vars(wrapper) and "state_dict" not in vars(policy), "the patch outlived the save"
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    plain = tmp_path / "plain"
    save_model(policy, tok, plain)
    assert sorted(saved) == sorted(load_file(plain / "model.safetensors"))  # the tied lm_head stored once, as usual
    for name, value in saved.items():
        torch.testing.assert_close(value, gathered["policy." + name])
    reloaded, _ = load_policy(tmp_path / "saved")
    torch.testing.assert_close(reloaded.lm_head.weight, gathered["policy.model.embed_tokens.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_follows_one_process_and_resumes(tiny_base, world_dir, sft_one, tmp_path, stage):
    """examples/accelerate/zero{2,3}.yaml on two CPU processes (DeepSpeed's CPU accelerator, gloo):
    stopped dead after step 6's checkpoint, resumed, it ends where one process does."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not a heed dependency (docs/distributed.md)")
    config = ROOT / "examples" / "accelerate" / f"zero{stage}.yaml"
    args, two = sft_args(tiny_base, world_dir), tmp_path / "two"
    stopped = launch(args + ["--out", str(two)], tmp_path / "info", stop_after=6, config=config)
    assert stopped.returncode != 0, "the run was to stop dead after step 6's checkpoint"
    assert {f.name for f in (two / "checkpoint" / "pytorch_model").glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    resumed = launch(args + ["--out", str(two)], tmp_path / "info", config=config)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {two / 'checkpoint'} at step 6" in resumed.stdout
    assert_sharded(tmp_path / "info", "DEEPSPEED", weights_split=stage == 3)
    assert [r["step"] for r in metrics(two)] == list(range(1, 10))
    assert_same_run(sft_one, two)


def test_micro_batches_split_to_the_count_every_process_runs():
    from heed.algos.common import as_many_chunks

    chunks = [[1, 2, 3, 4, 5], [6], [7, 8]]
    split = as_many_chunks(chunks, 5)
    assert len(split) == 5 and sorted(sum(split, [])) == list(range(1, 9)) and all(split)
    assert as_many_chunks(chunks, 3) == chunks
    with pytest.raises(Exception, match="cannot split"):
        as_many_chunks([[1], [2]], 3)
