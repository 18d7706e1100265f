"""Rollout speed, PPO iteration time and peak memory, per model preset; HF `generate` for comparison.

    .venv/bin/python bench/ppo_speed.py                       # tiny and small presets
    .venv/bin/python bench/ppo_speed.py --presets tiny --batch 32 --out results.json

Each preset runs in its own process, so peak memory (max RSS) is that preset's.
Both samplers generate exactly --new-tokens tokens per sequence (EOS is not allowed to
stop them), with the same batch, prompts and model, so tokens per second compare
like for like. Weights are freshly initialised: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(preset: str, batch: int, new_tokens: int, iters: int) -> dict:
    import torch

    from heed.algos.ppo import PPOConfig, PPOTrainer
    from heed.generate import sample_tokens
    from heed.models import build_model, count_parameters, encode_prompts, save_model, train_tokenizer
    from heed.world import World

    world = World(0, n_corpus=2000)
    tok = train_tokenizer(world.corpus, 1024 if preset == "tiny" else 4096)
    torch.manual_seed(0)
    model = build_model(preset, tok).eval()
    prompts = world.train_prompts[:batch]
    prompt_ids = encode_prompts(tok, prompts, 96)
    result = {"preset": preset, "parameters": count_parameters(model), "batch": batch, "new_tokens": new_tokens}

    def heed_sample():
        return sample_tokens(model, prompt_ids, pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=new_tokens,
                             generator=torch.Generator().manual_seed(0))

    def hf_generate():
        P = max(len(p) for p in prompt_ids)
        ids = torch.full((batch, P), tok.pad_token_id)
        mask = torch.zeros((batch, P), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    with torch.no_grad():
        for name, fn in (("heed", heed_sample), ("hf_generate", hf_generate)):
            fn()  # warm-up
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            seconds = (time.perf_counter() - t) / iters
            result[f"{name}_tokens_per_s"] = round(batch * new_tokens / seconds, 1)

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tok, Path(tmp) / "policy")
        cfg = PPOConfig(policy=str(Path(tmp) / "policy"), prompts="-", reward=["-"], out=str(Path(tmp) / "ppo"),
                        steps=iters + 1, batch_size=batch, mini_batch_size=min(16, batch),
                        micro_batch_size=min(16, batch), max_new_tokens=new_tokens, save_every=10**6,
                        eval_every=10**6)
        trainer = PPOTrainer(cfg, reward_fn=lambda ps, rs: [-len(r) / 50 for r in rs], prompts=world.train_prompts)
        trainer.train()
        rows = [json.loads(line) for line in (Path(tmp) / "ppo" / "metrics.jsonl").read_text().splitlines()][1:]
        result["ppo_iteration_s"] = round(sum(r["perf/iteration_s"] for r in rows) / len(rows), 2)
        result["ppo_rollout_tokens_per_s"] = round(sum(r["perf/rollout_tokens_per_s"] for r in rows) / len(rows), 1)
        result["ppo_response_length"] = round(sum(r["response/length"] for r in rows) / len(rows), 1)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one preset
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.new_tokens, args.iters)))
        return
    results = []
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "--one", preset, "--batch", str(args.batch),
               "--new-tokens", str(args.new_tokens), "--iters", str(args.iters)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={"HEED_QUIET": "1", **__import__("os").environ})
        if proc.returncode != 0:
            sys.exit(f"{preset} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    header = ("preset", "params", "heed tok/s", "HF generate tok/s", "PPO s/iter", "PPO rollout tok/s", "peak MiB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in results:
        print(" | ".join(str(x) for x in (r["preset"], f"{r['parameters'] / 1e6:.1f}M", r["heed_tokens_per_s"],
                                          r["hf_generate_tokens_per_s"], r["ppo_iteration_s"],
                                          r["ppo_rollout_tokens_per_s"], r["peak_rss_mib"])))
    print(f"(batch {args.batch}, {args.new_tokens} new tokens, mean of {args.iters} runs)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
