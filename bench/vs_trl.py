"""heed against TRL on the same work, side by side: seconds, peak memory, FLOP/s.

    .venv/bin/python bench/vs_trl.py                                  # ~5M model, fp32: every work
    .venv/bin/python bench/vs_trl.py --sizes 5m,30m --dtypes fp32,bf16 --out docs/vs_trl.json

On first use it makes its own virtual environments, with torch 2.13.0 pinned (never in heed's own
dependencies): bench/.vs_trl/venv-trl with TRL's current release, and for ppo bench/.vs_trl/venv-trl-ppo
with TRL 1.12, the last release with a PPOTrainer. It builds, with heed:
- a byte-level BPE tokenizer (8k) and GPT-2-style causal LMs initialised at random
  (~5M: 256 wide, 4 layers; ~30M: 512 wide, 8 layers);
- preference pairs of realistic length from the embedded world: multi-turn dialogues whose
  prompt and response together are 100-250 tokens, the chosen response a good answer and the
  rejected one a flawed answer to the last question. Both libraries get the same token
  sequences: TRL its pre-tokenised columns, made with heed's tokenisation of the same text.

Each measurement is one process with 2 threads, so its peak RSS is its own:
  rm    one epoch of reward-model training on the pairs, batch 16 (heed rm train; TRL RewardTrainer)
  dpo   one epoch of DPO on the pairs, batch 16, beta 0.1 (heed dpo, which caches the reference's
        log-probs before training; TRL DPOTrainer with its defaults, which runs the reference per step)
  grpo  6 iterations of 16 prompts x 4 samples x 32 new tokens, beta 0.04, two optimiser steps of 32
        each, on a brevity rule (heed grpo; TRL GRPOTrainer with loss_type "grpo")
  rloo  the same work with leave-one-out baselines and beta 0.04 as a KL penalty on the reward
        (heed rloo; TRL RLOOTrainer)
  ppo   6 iterations of 16 prompts x 32 new tokens, 4 epochs of one minibatch of 16, KL coefficient
        0.05 (fixed), a separate value model and an untrained reward model on the same trunk (heed ppo
        with --separate-critic; TRL 1.12's PPOTrainer); heed stops a response at EOS, TRL samples 32
  gen   sampling 64 new tokens for 64 prompts, batch 16, full distribution (heed's KV-cache sampler;
        Hugging Face `generate` in TRL's environment)
It prints a table: seconds, heed / TRL speed, peak RSS and their ratio, and the FLOP/s each
achieved (6 x non-embedding parameters x tokens for training, 2 x for sampling and other forward
passes; the LM head is counted where it is computed; both sides of a row are counted alike) as a
share of this machine's measured GEMM rate for the dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".vs_trl"
TRL_VENV, PPO_VENV = WORK / "venv-trl", WORK / "venv-trl-ppo"
VENVS = {TRL_VENV: "trl", PPO_VENV: "trl==1.12.*"}  # TRL's PPOTrainer (trl.experimental.ppo) ends at 1.12
SIZES = {"5m": dict(n_embd=256, n_layer=4, n_head=4), "30m": dict(n_embd=512, n_layer=8, n_head=8)}
BATCH, MAX_LEN, THREADS = 16, 256, 2
GRPO_ITERATIONS = 6  # 16 prompts x 4 samples x 32 new tokens each, two optimiser steps of 32 (grpo, rloo)
PPO_ITERATIONS = GRPO_ITERATIONS  # 16 prompts x 32 new tokens each, 4 epochs of one minibatch of 16
PPO_EPOCHS = 4


def brevity(prompts, completions, **_) -> list[float]:
    """The rule both GRPO runs optimise: shorter is better (words)."""
    return [-len(c.split()) / 20 for c in completions]


# ---------------------------------------------------------------------------
# set-up: TRL's environment, tokenizer, models, data (heed's environment)
# ---------------------------------------------------------------------------

def ensure_trl_venv(venv: Path = TRL_VENV) -> Path:
    """The Python of `venv`, made on first use: torch 2.13.0 first and pinned (the CPU wheel, no CUDA),
    then its TRL (VENVS) and datasets, with whatever versions of the rest pip chooses."""
    python, trl = venv / "bin" / "python", VENVS[venv]
    if not (venv / ".installed").exists():
        print(f"making {venv} ({trl}, torch 2.13.0)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["torch==2.13.0", trl, "datasets"], check=True)  # torch named again: kept as is
        (venv / ".installed").write_text("")
    return python


def dialogues(n: int, tok, seed: int = 0) -> list[dict]:
    """Pairs whose prompt is a multi-turn dialogue from the world, 100-250 tokens with either response."""
    from heed.models import encode_prompts, encode_responses
    from heed.world import World
    from heed.world.responses import respond
    from heed.world.tasks import universe

    world, tasks, rng = World(0), universe(), random.Random(seed)
    pool, flaws = world.train_pool, ["off_topic", "wrong_facts", "wrong_tone", "rambling", "repetition"]
    rows = []
    while len(rows) < n:
        messages, target = [], rng.randint(100, 250)
        while True:
            question = rng.choice(pool)
            chosen = respond(tasks[question], "good", rng, pool)
            rejected = respond(tasks[question], rng.choice(flaws), rng, pool)
            prompt = messages + [{"role": "user", "content": question}]
            p = encode_prompts(tok, [prompt], 10_000)[0]
            c, r = encode_responses(tok, [chosen, rejected], 10_000)
            if len(p) + max(len(c), len(r)) > MAX_LEN:
                break
            if len(p) + min(len(c), len(r)) >= target:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
                break
            messages = prompt + [{"role": "assistant", "content": chosen}]
    return rows


def build(n_pairs: int, sizes: list[str]) -> dict:
    """Tokenizer, one model directory per size, the pairs (text for heed, token ids for TRL)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from heed.models import save_model, train_tokenizer
    from heed.world import World

    out = WORK / "assets"
    done = out / "assets.json"
    if done.exists() and json.loads(done.read_text())["pairs"] == n_pairs and \
            all((out / f"model-{s}").exists() for s in sizes):
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(World(0, n_corpus=4000).corpus, 8000, out / "tokenizer")
    for size in sizes:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tok), n_positions=512, **SIZES[size], tie_word_embeddings=True,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        save_model(GPT2LMHeadModel(config), tok, out / f"model-{size}")
    rows = dialogues(n_pairs, tok)
    with open(out / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    with open(out / "pairs_ids.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}) + "\n")
    lengths = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    info = {"pairs": n_pairs, "tokens_per_sequence": sum(lengths) / len(lengths), "min": min(lengths),
            "max": max(lengths)}
    done.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------
# workers: one measurement each, in its own process
# ---------------------------------------------------------------------------

def _threads():
    import torch

    torch.set_num_threads(THREADS)
    return torch


def gemm_rate(dtype: str) -> float:
    """FLOP/s of a 2048 x 2048 matrix product, the best of several."""
    torch = _threads()
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def count_flops(model_dir: str, tokens: int, *, lm_head: bool, factor: int) -> float:
    """factor x (non-embedding parameters, plus the LM head when it is computed) x tokens."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    body = 12 * c.n_layer * c.n_embd ** 2
    return factor * (body + (c.n_embd * c.vocab_size if lm_head else 0)) * tokens


def grpo_flops(model_dir: str, ids: list[dict]) -> float:
    """Sampling (2x) then one forward and backward (6x) of the policy and one reference forward
    (2x), over 64 rows of prompt + 32 new tokens per iteration; the LM head on the new tokens."""
    prompt = sum(len(r["prompt_ids"]) for r in ids) / len(ids)
    rows = 64 * GRPO_ITERATIONS
    return (count_flops(model_dir, rows * (prompt + 32), lm_head=False, factor=10)
            + count_flops(model_dir, rows * 32, lm_head=True, factor=10)
            - count_flops(model_dir, rows * 32, lm_head=False, factor=10))


def ppo_flops(model_dir: str, ids: list[dict]) -> float:
    """Per iteration, 16 rows of prompt + 32 new tokens: the policy's sampling (2x), forward and
    backward (6x) per epoch and the reference's forward (2x), the LM head on the new tokens; the value
    model's forward in the rollout (2x) and forward and backward (6x) per epoch; the reward model's
    forward (2x). The value and reward heads are scalars, left out."""
    prompt = sum(len(r["prompt_ids"]) for r in ids) / len(ids)
    rows = 16 * PPO_ITERATIONS
    policy, value, reward = 2 + 6 * PPO_EPOCHS + 2, 2 + 6 * PPO_EPOCHS, 2
    return (count_flops(model_dir, rows * (prompt + 32), lm_head=False, factor=policy + value + reward)
            + count_flops(model_dir, rows * 32, lm_head=True, factor=policy)
            - count_flops(model_dir, rows * 32, lm_head=False, factor=policy))


def worker(args) -> dict:
    torch = _threads()
    a = WORK / "assets"
    model_dir = str(a / f"model-{args.size}")
    bf16 = args.dtype == "bf16"
    ids = [json.loads(line) for line in (a / "pairs_ids.jsonl").read_text().splitlines()]
    train_tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ids)
    result: dict = {}
    t0 = time.perf_counter()
    if args.worker == "heed-rm":
        from heed.algos.reward import RewardTrainConfig, train

        train(RewardTrainConfig(model=model_dir, data=[str(a / "pairs.jsonl")], out=args.tmp, epochs=1.0,
                                batch_size=BATCH, micro_batch_size=BATCH, norm_samples=0, eval_fraction=0.0,
                                max_prompt_len=MAX_LEN, max_response_len=MAX_LEN, warmup_steps=0, bf16=bf16,
                                save_every=10 ** 9, eval_every=10 ** 9))
        result["flops"] = count_flops(model_dir, train_tokens, lm_head=False, factor=6)
    elif args.worker == "trl-rm":
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trl import RewardConfig, RewardTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        data = Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                   "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in ids])
        t0 = time.perf_counter()
        RewardTrainer(model=model, processing_class=tok, train_dataset=data, args=RewardConfig(
            output_dir=args.tmp, per_device_train_batch_size=BATCH, num_train_epochs=1, max_length=MAX_LEN * 2,
            report_to="none", save_strategy="no", logging_steps=10 ** 6, use_cpu=True, bf16=bf16,
            learning_rate=1e-3, warmup_steps=0, dataloader_num_workers=0)).train()
        result["flops"] = count_flops(model_dir, train_tokens, lm_head=False, factor=6)
    elif args.worker == "heed-dpo":
        from heed.algos.dpo import DPOConfig, run

        run(DPOConfig(policy=model_dir, data=[str(a / "pairs.jsonl")], out=args.tmp, epochs=1.0, batch_size=BATCH,
                      micro_batch_size=BATCH, max_prompt_len=MAX_LEN, max_response_len=MAX_LEN, warmup_steps=0,
                      bf16=bf16, save_every=10 ** 9, log_every=10 ** 6))
        # the policy: forward and backward; the reference: one forward, once
        result["flops"] = count_flops(model_dir, train_tokens, lm_head=True, factor=8)
    elif args.worker == "trl-dpo":
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        # TRL's DPO tokenises text itself (prompt + response, EOS added): the same text heed's ids decode to
        data = Dataset.from_list([{"prompt": tok.decode(r["prompt_ids"]), "chosen": tok.decode(r["chosen_ids"][:-1]),
                                   "rejected": tok.decode(r["rejected_ids"][:-1])} for r in ids])
        t0 = time.perf_counter()
        DPOTrainer(model=model, processing_class=tok, train_dataset=data, args=DPOConfig(
            output_dir=args.tmp, per_device_train_batch_size=BATCH, num_train_epochs=1, max_length=MAX_LEN * 2,
            report_to="none", save_strategy="no", logging_steps=10 ** 6, use_cpu=True, bf16=bf16,
            learning_rate=1e-4, warmup_steps=0, beta=0.1, dataloader_num_workers=0)).train()
        result["flops"] = count_flops(model_dir, train_tokens, lm_head=True, factor=8)
    elif args.worker in ("heed-grpo", "heed-rloo"):
        from heed.algos.grpo import GroupTrainer, GRPOConfig, RLOOConfig

        prompts = [json.loads(line)["prompt"] for line in (a / "pairs.jsonl").read_text().splitlines()]
        # RLOO: TRL does not normalise rewards, heed's RLOO does by default
        Config, extra = (GRPOConfig, {}) if args.worker == "heed-grpo" else \
            (RLOOConfig, dict(lr=5e-5, normalize_reward=False))
        cfg = Config(policy=model_dir, prompts="-", reward=["-"], out=args.tmp, steps=GRPO_ITERATIONS,
                     prompts_per_iteration=16, n=4, mini_batch_size=32, micro_batch_size=32, max_new_tokens=32,
                     max_prompt_len=MAX_LEN, kl_coef=0.04, bf16=bf16, save_every=10 ** 9, **extra)
        trainer = GroupTrainer(cfg, reward_fn=brevity, prompts=prompts)
        t0 = time.perf_counter()
        trainer.train()
        result["flops"] = grpo_flops(model_dir, ids)
    elif args.worker in ("trl-grpo", "trl-rloo"):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        Trainer, Config, extra = (GRPOTrainer, GRPOConfig, dict(loss_type="grpo")) if args.worker == "trl-grpo" \
            else (RLOOTrainer, RLOOConfig, {})
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        data = Dataset.from_list([{"prompt": tok.decode(r["prompt_ids"])} for r in ids])
        t0 = time.perf_counter()
        Trainer(model=model, processing_class=tok, train_dataset=data, reward_funcs=brevity, args=Config(
            output_dir=args.tmp, per_device_train_batch_size=32, generation_batch_size=64,
            num_generations=4, max_completion_length=32, beta=0.04, temperature=1.0, top_k=0,
            max_steps=2 * GRPO_ITERATIONS, report_to="none", save_strategy="no", logging_steps=10 ** 6, use_cpu=True,
            bf16=bf16, learning_rate=5e-5, warmup_steps=0, dataloader_num_workers=0, **extra)).train()
        result["flops"] = grpo_flops(model_dir, ids)
    elif args.worker == "heed-ppo":
        from heed.algos.ppo import PPOConfig, PPOTrainer
        from heed.models import load_tokenizer
        from heed.reward_model import RewardMember, RewardModel
        from heed.rules import load_reward

        # an untrained reward model on the same trunk (its head at random), as `heed rm train` saves one
        rm_dir = Path(args.tmp).parent / "rm"
        RewardModel([RewardMember.from_policy(model_dir)], load_tokenizer(model_dir), max_prompt_len=MAX_LEN,
                    max_response_len=MAX_LEN).save(rm_dir)
        prompts = [json.loads(line)["prompt"] for line in (a / "pairs.jsonl").read_text().splitlines()]
        cfg = PPOConfig(policy=model_dir, prompts="-", reward=[str(rm_dir)], out=args.tmp, steps=PPO_ITERATIONS,
                        prompts_per_iteration=16, mini_batch_size=16, micro_batch_size=16, ppo_epochs=PPO_EPOCHS,
                        max_new_tokens=32, max_prompt_len=MAX_LEN, kl_coef=0.05, adaptive_kl=False,
                        separate_critic=True, normalize_reward=False, missing_eos_penalty=0.0, lr=3e-6,
                        bf16=bf16, save_every=10 ** 9)
        trainer = PPOTrainer(cfg, reward_fn=load_reward(cfg.reward), prompts=prompts)
        t0 = time.perf_counter()
        trainer.train()
        result["flops"] = ppo_flops(model_dir, ids)
    elif args.worker == "trl-ppo":
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "left"
        policy, ref = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
        reward, value = (AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1) for _ in range(2))
        for m in (reward, value):
            m.config.pad_token_id = tok.pad_token_id
        data = Dataset.from_list([{"input_ids": r["prompt_ids"]} for r in ids])
        # TRL 1.12's PPOTrainer makes its own Accelerator, which reads mixed precision from here, not from bf16
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
        t0 = time.perf_counter()
        PPOTrainer(model=policy, ref_model=ref, reward_model=reward, value_model=value, processing_class=tok,
                   train_dataset=data, args=PPOConfig(
                       output_dir=args.tmp, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                       num_mini_batches=1, num_ppo_epochs=PPO_EPOCHS, total_episodes=16 * PPO_ITERATIONS,
                       local_rollout_forward_batch_size=16, response_length=32, temperature=1.0, kl_coef=0.05,
                       kl_estimator="k1", num_sample_generations=0, report_to="none", save_strategy="no",
                       logging_steps=10 ** 6, use_cpu=True, bf16=bf16, learning_rate=3e-6, warmup_steps=0,
                       dataloader_num_workers=0)).train()
        result["flops"] = ppo_flops(model_dir, ids)
    elif args.worker in ("heed-gen", "hf-gen"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if bf16 else torch.float32
        if args.worker == "heed-gen":  # as `heed sample` loads a policy
            from heed.models import load_policy

            model, tok = load_policy(model_dir, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(model_dir)
        model.eval()
        prompts = [r["prompt_ids"][-128:] for r in ids[:64]]
        new = 64
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(prompts), BATCH):
                chunk = prompts[i:i + BATCH]
                if args.worker == "heed-gen":
                    from heed.generate import sample_tokens

                    sample_tokens(model, chunk, pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=new,
                                  generator=torch.Generator().manual_seed(i))
                else:
                    P = max(len(p) for p in chunk)
                    x = torch.full((len(chunk), P), tok.pad_token_id)
                    m = torch.zeros((len(chunk), P), dtype=torch.long)
                    for j, p in enumerate(chunk):
                        x[j, P - len(p):], m[j, P - len(p):] = torch.tensor(p), 1
                    model.generate(input_ids=x, attention_mask=m, do_sample=True, top_k=0, top_p=1.0,
                                   max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)
        tokens = sum(len(p) for p in prompts) + new * len(prompts)
        result["flops"] = count_flops(model_dir, tokens, lm_head=True, factor=2)
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_worker(python: Path, name: str, size: str, dtype: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HEED_QUIET": "1", "TQDM_DISABLE": "1",
               "PYTHONPATH": str(HERE.parent)}
        proc = subprocess.run([str(python), __file__, "--worker", name, "--size", size, "--dtype", dtype,
                               "--tmp", str(Path(tmp) / "out")], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="5m")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--works", default="rm,dpo,grpo,rloo,ppo,gen", help="some of rm, dpo, grpo, rloo, ppo, gen")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.worker == "gemm":
            print(json.dumps({"flops_per_s": gemm_rate(args.dtype)}))
        else:
            print(json.dumps(worker(args)))
        return
    sizes, dtypes, works = args.sizes.split(","), args.dtypes.split(","), args.works.split(",")
    # work: (heed's worker, the peer's worker, the environment the peer runs in)
    peers = {"rm": ("heed-rm", "trl-rm", TRL_VENV), "dpo": ("heed-dpo", "trl-dpo", TRL_VENV),
             "grpo": ("heed-grpo", "trl-grpo", TRL_VENV), "rloo": ("heed-rloo", "trl-rloo", TRL_VENV),
             "ppo": ("heed-ppo", "trl-ppo", PPO_VENV), "gen": ("heed-gen", "hf-gen", TRL_VENV)}
    unknown = [w for w in works if w not in peers]
    if unknown:
        p.error(f"unknown works {unknown}: choose from {', '.join(peers)}")
    pythons = {venv: ensure_trl_venv(venv) for venv in dict.fromkeys(peers[w][2] for w in works)}
    info = build(args.pairs, sizes)
    print(f"{args.pairs} pairs, {info['tokens_per_sequence']:.0f} tokens per sequence on average "
          f"({info['min']}-{info['max']}); batch {BATCH}; {THREADS} threads", flush=True)
    rows = []
    for dtype in dtypes:
        gemm = run_worker(Path(sys.executable), "gemm", "5m", dtype)["flops_per_s"]
        print(f"{dtype}: 2048^2 GEMM at {gemm / 1e9:.0f} GFLOP/s", flush=True)
        for size in sizes:
            for work in works:
                ours, theirs, venv = peers[work]
                h = run_worker(Path(sys.executable), ours, size, dtype)
                t = run_worker(pythons[venv], theirs, size, dtype)
                row = {"work": work, "size": size, "dtype": dtype, "gemm_flops_per_s": gemm, "heed": h, "peer": t}
                if "error" not in h and "error" not in t:
                    row["speed_ratio"] = t["seconds"] / h["seconds"]
                    row["memory_ratio"] = h["peak_rss_mib"] / t["peak_rss_mib"]
                rows.append(row)
                print(format_row(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": info, "rows": rows}, indent=2))


def format_row(r: dict) -> str:
    h, t = r["heed"], r["peer"]
    if "error" in h or "error" in t:
        return (f"{r['work']:<4} {r['size']:<4} {r['dtype']:<5} heed: {h.get('error', 'ok')}; "
                f"peer: {t.get('error', 'ok')}")
    share = lambda x: x["flops"] / x["seconds"] / r["gemm_flops_per_s"]  # noqa: E731
    return (f"{r['work']:<4} {r['size']:<4} {r['dtype']:<5} heed {h['seconds']:7.1f} s  peer {t['seconds']:7.1f} s  "
            f"speed {r['speed_ratio']:4.2f}x  memory {h['peak_rss_mib']:5.0f} / {t['peak_rss_mib']:5.0f} MiB "
            f"({r['memory_ratio']:.2f}x)  GEMM share heed {share(h):.0%}, peer {share(t):.0%}")


if __name__ == "__main__":
    main()
