"""One entry point for the demo's comparison: train DPO, REBEL, GRPO or RLOO at the default budgets.

    policy_dir = train_algo("grpo", sft_dir=..., world_dir=..., labels_path=..., rm_dir=...,
                            out_dir=..., seed=0, quick=False)

Every algorithm starts from the same SFT policy and sees the same human data: DPO trains
on the labelled pairs directly; REBEL, GRPO and RLOO optimise the reward model trained on
those same labels, on the world's training prompts. `quick` is a smoke-test budget that
runs in seconds. The budgets here are the ones docs/algorithms.md measures.
"""

from __future__ import annotations

from pathlib import Path

ALGOS = ("dpo", "rebel", "grpo", "rloo")


def train_algo(name: str, *, sft_dir, world_dir, labels_path, rm_dir, out_dir, seed: int = 0,
               quick: bool = False) -> Path:
    """Train `name` (one of ALGOS) into `out_dir` and return it (a causal-LM directory).

    A directory that already holds a finished run is returned as it is (each stage's run()
    checks its own "done" file), so a rerun of the demo resumes.
    """
    out = Path(out_dir)
    prompts = str(Path(world_dir) / "prompts_train.jsonl")
    common = dict(policy=str(sft_dir), out=str(out), seed=seed)
    online = dict(prompts=prompts, reward=[str(rm_dir)], monitor=["heed.rules:gold"], **common)
    if name == "dpo":
        from heed.algos.dpo import DPOConfig, run

        cfg = DPOConfig(data=[str(labels_path)], **common)
        if quick:
            cfg.limit, cfg.epochs, cfg.batch_size, cfg.micro_batch_size = 64, 1.0, 16, 16
        run(cfg)
    elif name == "rebel":
        from heed.algos.rebel import REBELConfig, run

        cfg = REBELConfig(**online)
        if quick:
            cfg.iterations, cfg.prompts_per_iteration, cfg.n, cfg.max_new_tokens = 2, 8, 2, 16
        run(cfg)
    elif name in ("grpo", "rloo"):
        from heed.algos.grpo import GRPOConfig, RLOOConfig, run_grpo, run_rloo

        cfg = (GRPOConfig if name == "grpo" else RLOOConfig)(**online)
        if quick:
            cfg.steps, cfg.prompts_per_iteration, cfg.n, cfg.max_new_tokens = 2, 4, 2, 16
            cfg.mini_batch_size = cfg.micro_batch_size = 8
        (run_grpo if name == "grpo" else run_rloo)(cfg)
    else:
        raise ValueError(f"unknown algorithm {name!r} (choose from {', '.join(ALGOS)})")
    return out
