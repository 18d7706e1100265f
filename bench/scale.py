"""Peak memory and step time of full fine-tuning, LoRA, gradient checkpointing and bf16 weights,
per stage (SFT, reward model, DPO, PPO), on the `small` preset and a ~30M-parameter GPT-2-style model.

    .venv/bin/python bench/scale.py                                   # everything (about 20 minutes on 2 cores)
    .venv/bin/python bench/scale.py --models small --stages sft,dpo --settings full,lora --steps 3

Every (model, stage, setting) runs in its own process, so its peak memory (max RSS, which
includes Python, torch and the data: `rss_start` is the process with everything imported,
before the model loads) is its own. A step is one optimiser step of the stage's own training
code on the same fixed batch:
  sft  16 demonstrations, the response-only next-token loss (heed.models.token_nll)
  rm   16 pairs, Bradley-Terry on a reward member (trunk + head), each prompt run once
  dpo  16 pairs, the DPO loss against reference log-probs computed first (models.Reference)
  ppo  PPOTrainer.step on 16 (prompt, response, reward) triplets: the policy/value pass, the
       reference pass, one PPO epoch (the rollout's sampling is not part of it)
Children run with glibc's MALLOC_MMAP_THRESHOLD_=131072 (unless --glibc-default): every
allocation above 128 KiB is its own mapping, returned to the system when freed, so max RSS
follows the memory tensors really hold. With glibc's default (a threshold that grows as large
blocks are freed), freed activations stay in the heap and max RSS overstates the peak by
different amounts for different settings (LoRA's extra temporaries on the shared-prompt path
showed as +24-37% memory over full fine-tuning; with the fixed threshold it is below it).
The first step is warm-up and not counted; the time is the median of the others. Weights are
freshly initialised (time and memory do not depend on their values); the tokenizer is heed's,
trained on the embedded world's corpus (4096 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "full": {},
    "lora": {"lora_r": 16},
    "gc": {"gradient_checkpointing": True},
    "bf16": {"dtype": "bf16"},
    "lora+gc+bf16": {"lora_r": 16, "gradient_checkpointing": True, "dtype": "bf16"},
}
STAGES = ("sft", "rm", "dpo", "ppo")
BATCH = 16


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(root: Path, models: list[str]) -> None:
    """The tokenizer, the models and the data, once."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from heed.data import write_jsonl
    from heed.models import build_model, save_model, train_tokenizer
    from heed.world import World

    world = World(0, n_corpus=2000, n_demos=64)
    tok = train_tokenizer(world.corpus, 4096)
    demos = world.demos[:BATCH]
    write_jsonl(root / "demos.jsonl", demos)
    for name in models:
        if (root / name / "config.json").exists():
            continue
        torch.manual_seed(0)
        if name == "small":
            model = build_model("small", tok)
        else:  # gpt2-30m: GPT-2's shape at 512 wide and 9 deep (29M parameters with the 4096-token vocabulary)
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=512, n_layer=9, n_head=8,
                                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id))
        save_model(model, tok, root / name)


def measure(root: Path, model_name: str, stage: str, setting: str, steps: int) -> dict:
    import torch

    from heed.algos.common import Learner, prepare_model
    from heed.algos.sft import SFTConfig, build_examples
    from heed.data import read_demos
    from heed.models import count_parameters, load_policy

    rss_start = rss_mib()  # Python, torch, transformers and heed imported; no model yet
    torch.manual_seed(0)
    model_dir = str(root / model_name)
    demos = read_demos(root / "demos.jsonl")
    pairs = [(d["prompt"], d["response"].split(". ")[0].rstrip(".") + ".", d["response"] + " " + d["response"])
             for d in demos]
    out = tempfile.mkdtemp()
    fields = dict(out=out, lr=1e-4, warmup_steps=0, micro_batch_size=BATCH, **SETTINGS[setting])
    cfg = SFTConfig(model=model_dir, data="-", batch_size=BATCH, **fields)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32

    if stage == "ppo":
        from heed.algos.ppo import PPOConfig, PPOTrainer

        ppo_cfg = PPOConfig(policy=model_dir, prompts="-", reward=["-"], ppo_epochs=1, mini_batch_size=BATCH,
                            max_new_tokens=96, **fields)
        trainer = PPOTrainer(ppo_cfg, reward_fn=lambda p, r: [0.0] * len(r), prompts=[])
        model = trainer.actor_critic
        rewards = [float(i % 3 - 1) for i in range(BATCH)]
        step = lambda: trainer.step([d["prompt"] for d in demos], [d["response"] for d in demos], rewards)
    else:
        policy, tok = load_policy(model_dir, dtype=dtype)
        if stage == "sft":
            from heed.models import collate_lm, token_nll

            model = prepare_model(policy, cfg)
            batch = collate_lm(build_examples(tok, demos, 96, 96), tok.pad_token_id)
            loss = lambda m, _: (lambda nll, n: nll / n)(*token_nll(m, batch))
        elif stage == "rm":
            from heed.losses import bradley_terry_loss
            from heed.models import shared_batch
            from heed.reward_model import RewardMember

            model = RewardMember(policy.base_model)
            model.trunk = prepare_model(model.trunk, cfg)
            batch = shared_batch(tok, [p for p, _, _ in pairs], [[c, r] for _, c, r in pairs], max_prompt_len=96,
                                 max_response_len=96)
            zeros = torch.zeros(BATCH)

            def loss(m, _):
                rewards = m(batch)
                return bradley_terry_loss(rewards[0::2], rewards[1::2], zeros, zeros.bool()).mean()
        else:  # dpo
            from heed.losses import dpo_loss
            from heed.models import Reference, TokenLogprobs, batched_pair_logprobs, shared_batch

            policy = prepare_model(policy, cfg)
            with Reference(policy, snapshot=False)() as reference:
                ref_c, ref_r = batched_pair_logprobs(reference, tok, *map(list, zip(*pairs)), max_prompt_len=96,
                                                     max_response_len=96)
            model = TokenLogprobs(policy)
            batch = shared_batch(tok, [p for p, _, _ in pairs], [[c, r] for _, c, r in pairs], max_prompt_len=96,
                                 max_response_len=96)

            def loss(m, _):
                logps = (m(batch) * batch.response_mask).sum(-1)
                return dpo_loss(logps[0::2], logps[1::2], ref_c, ref_r, 0.1).mean()
        learner = Learner(model, cfg, steps + 1, run_dir=out)
        learner.model.train()
        step = lambda: learner.step([None], lambda chunk: loss(learner.model, chunk))

    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    return {"model": model_name, "stage": stage, "setting": setting,
            "parameters_m": round(count_parameters(model) / 1e6, 2),
            "trainable_m": round(sum(p.numel() for p in params if p.requires_grad) / 1e6, 3),
            "step_s": round(statistics.median(times[1:]), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_start_mib": round(rss_start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,gpt2-30m")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--root", default="runs/bench_scale", help="where the models and data are made (once)")
    ap.add_argument("--out", default="runs/bench_scale/results.jsonl")
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's own malloc thresholds")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "STAGE", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.root)
    if args.child:
        print(json.dumps(measure(root, *args.child, args.steps)))
        return
    models = args.models.split(",")
    root.mkdir(parents=True, exist_ok=True)
    prepare(root, models)
    env = dict(os.environ) if args.glibc_default else dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = []
    for model in models:
        for stage in args.stages.split(","):
            for setting in args.settings.split(","):
                r = subprocess.run([sys.executable, __file__, "--root", str(root), "--steps", str(args.steps),
                                    "--child", model, stage, setting], capture_output=True, text=True, env=env)
                if r.returncode:
                    print(f"{model} {stage} {setting}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                results.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("\n| model | stage | setting | trainable (M) | step (s) | x full | peak RSS (MiB) | x full |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        full = next((f for f in results if (f["model"], f["stage"], f["setting"]) == (r["model"], r["stage"], "full")),
                    r)
        time_x, memory_x = r["step_s"] / full["step_s"], r["peak_rss_mib"] / full["peak_rss_mib"]
        print(f"| {r['model']} | {r['stage']} | {r['setting']} | {r['trainable_m']} | {r['step_s']} | "
              f"{time_x:.2f} | {r['peak_rss_mib']} | {memory_x:.2f} |")


if __name__ == "__main__":
    main()
