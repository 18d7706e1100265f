"""What every training loop shares: the accelerator, the optimiser and schedule, checkpoints
that resume, the supervised causal-LM loop that pretraining and SFT both run, and what the
online optimisers (PPO, GRPO, RLOO) share: their common options and how a reward becomes
the score an update sees.

Multi-process runs (`accelerate launch`) split each *global* batch across
processes and scale each local loss by the global token count, so the averaged
gradient is exactly that of one process on the whole global batch.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from heed.config import option, save as save_config
from heed.utils import MetricsLogger, progress


@dataclass(kw_only=True)
class TrainConfig:
    """Fields every training stage has."""

    out: str = option(help="output directory: model, metrics.jsonl, tb/, checkpoint/")
    seed: int = option(0, "random seed (each process adds its rank)")
    lr: float = option(1e-3, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(20, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(32, "global batch size (sequences per optimiser step, all processes)")
    micro_batch_size: int = option(32, "sequences per forward pass (gradient accumulation below this)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    eval_every: int = option(100, "evaluate on held-out data every N steps")
    save_every: int = option(100, "checkpoint every N steps (a killed run resumes from the last)")
    bf16: bool = option(False, "bf16 autocast (for GPUs: on a 2-core CPU it ran 3x slower for the tiny preset)")


@dataclass(kw_only=True)
class RolloutConfig(TrainConfig):
    """Fields of the online optimisers that sample from the policy and score it (PPO, GRPO, RLOO)."""

    policy: str = option(help="the SFT policy to fine-tune: a local Hugging Face causal-LM directory")
    prompts: str = option(help="training prompts: JSONL/Parquet rows with a 'prompt' field")
    reward: list[str] = option(help="reward terms, [WEIGHT*]TARGET: reward-model dirs and/or module:function rules")
    reference: str | None = option(None, "frozen reference model for the KL (default: a copy of --policy)")
    max_new_tokens: int = option(48, "response length limit; responses that hit it never ended")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    temperature: float = option(1.0, "sampling temperature (log-probs use the same)")
    missing_eos_penalty: float = option(1.0, "subtracted from the (normalised) score of responses without EOS")
    normalize_reward: bool = option(True, "fit gain/bias on the first rollout so scores have mean 0, std 1")
    eval_every: int = option(10, "log sample responses every N iterations")
    save_every: int = option(10, "checkpoint every N iterations (a killed run resumes from the last)")


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, norm: dict | None, cfg: RolloutConfig,
                 accelerator) -> tuple[torch.Tensor, dict | None]:
    """The score an update sees, and the normalisation used: the raw reward, normalised with a
    gain and bias fitted on the first rollout (the SFT policy's, gathered over processes) when
    `cfg.normalize_reward`, minus `cfg.missing_eos_penalty` for responses that never ended."""
    scores = raw.clone()
    if cfg.normalize_reward:
        if norm is None:
            everything = accelerator.gather(raw)
            norm = {"bias": float(everything.mean()), "gain": float(everything.std().clamp(min=1e-6))}
        scores = (raw - norm["bias"]) / norm["gain"]
    return scores - cfg.missing_eos_penalty * (~finished.to(scores.device)).float(), norm


def gold_oracle(prompts) -> Callable | None:
    """heed.world's gold score when the prompts are the world's, else None (for logging only:
    the trainers never optimise it)."""
    try:
        from heed.world import score

        score(prompts[0], "x")
    except (ImportError, ValueError):
        return None
    return lambda ps, rs: [score(p, r) for p, r in zip(ps, rs)]


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Without a GPU, accelerate only sets up multi-process (gloo) training when told it is
    # on the CPU; otherwise each process of `accelerate launch` would train alone.
    # Our batches are global (split across processes), so the schedule takes one step per
    # optimiser step; accelerate's default would step it once per process.
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    # A different seed per process (sampling must differ across ranks), same init weights
    # because every rank builds the model before this and DDP broadcasts rank 0's weights.
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:  # linear warm-up, cosine annealing to zero at total_steps
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress_ = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class Checkpointer:
    """`out/checkpoint/`: accelerator state (weights, optimiser, schedule, RNG) plus the step.

    Written to a temporary directory and renamed, so a kill during saving leaves the
    previous checkpoint intact.
    """

    def __init__(self, accelerator, out: str | Path):
        self.accelerator = accelerator
        self.dir = Path(out) / "checkpoint"

    def load(self) -> dict:
        """Restore the last checkpoint if there is one; return its state ({"step": 0} if none)."""
        state = self.dir / "trainer_state.json"
        if not state.exists():
            return {"step": 0}
        self.accelerator.load_state(str(self.dir))
        trainer_state = json.loads(state.read_text())
        self.accelerator.print(f"resuming from {self.dir} at step {trainer_state['step']}")
        return trainer_state

    def save(self, step: int, **state) -> None:
        """Save at `step`; `state` (JSON-serialisable) comes back from load() on resume."""
        tmp = self.dir.with_name("checkpoint.tmp")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
            if self.dir.exists():
                shutil.rmtree(self.dir)
            tmp.rename(self.dir)
        self.accelerator.wait_for_everyone()


def global_batch(rows: list, step: int, batch_size: int, *, seed: int) -> list:
    """The rows of optimiser step `step`: consecutive slices of a seeded shuffle, reshuffled
    each pass. The order depends only on `seed` and `step`, so every process (each then
    takes its share) and a resumed run agree on it."""
    per_pass = max(1, len(rows) // batch_size)
    epoch, k = divmod(step, per_pass)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
    return [rows[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]


# ---------------------------------------------------------------------------
# The supervised causal-LM loop (pretraining and SFT)
# ---------------------------------------------------------------------------

@dataclass
class LMExample:
    """One training sequence: token ids, and which of them the loss is taken on."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is predicted (a response token, or any corpus token)


def collate_lm(examples: list[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors; labels are -100 where no loss is taken."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), ids, torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled tokens, number of such tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


@torch.no_grad()
def evaluate_nll(model, examples: list[LMExample], pad_id: int, batch_size: int) -> float:
    """Mean per-token negative log-likelihood on held-out examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_lm(examples[i:i + batch_size], pad_id).items()}
        nll, n = token_nll(model, batch)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(1, count)


def train_lm(model, tokenizer, train: list[LMExample], heldout: list[LMExample], cfg: TrainConfig,
             total_steps: int, *, stage: str, save: Callable[[object], None]) -> dict:
    """Minimise next-token NLL on `train` for `total_steps` optimiser steps.

    Each step takes the next `cfg.batch_size` examples of a seeded shuffle (a new
    shuffle each pass), split across processes; a killed run resumes from its last
    checkpoint at the same point of the same data order. `save(unwrapped_model)` is
    called on the main process at the end. Returns the final metrics.
    """
    out = Path(cfg.out)
    done_file = out / "trainer_done.json"
    if done_file.exists():
        print(f"{out}: already trained ({done_file.name} exists); delete the directory to train again")
        return json.loads(done_file.read_text())
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    checkpointer = Checkpointer(accelerator, out)
    start = checkpointer.load()["step"]
    logger = MetricsLogger(out, enabled=accelerator.is_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly across {world} processes")

    model.train()
    metrics: dict = {}
    bar = progress(range(start, total_steps), desc=stage, disable=not accelerator.is_main_process,
                   unit="step")
    for step in bar:
        examples = global_batch(train, step, cfg.batch_size, seed=cfg.seed * 1000)
        n_tokens = sum(sum(e.loss_mask[1:]) for e in examples)  # global count: identical on every rank
        local = examples[rank::world]
        micro = [local[i:i + cfg.micro_batch_size] for i in range(0, len(local), cfg.micro_batch_size)]
        loss_sum = 0.0
        for j, chunk in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in collate_lm(chunk, tokenizer.pad_token_id).items()}
            sync = j == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    nll, _ = token_nll(model, batch)
                # DDP averages gradients over ranks: scale so the result is the global token mean.
                accelerator.backward(nll * world / max(1, n_tokens))
            loss_sum += float(nll.detach())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) \
            if cfg.max_grad_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum")) / max(1, n_tokens)
        metrics = {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm)}
        done = step + 1
        if done % cfg.eval_every == 0 or done == total_steps:
            if heldout:
                eval_loss = evaluate_nll(accelerator.unwrap_model(model), heldout, tokenizer.pad_token_id,
                                         cfg.micro_batch_size)
                metrics.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))})
        logger.log(done, **metrics)
        bar.set_postfix(loss=f"{train_loss:.3f}")
        if done % cfg.save_every == 0 and done < total_steps:
            checkpointer.save(done)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save(accelerator.unwrap_model(model))
        done_file.write_text(json.dumps(metrics))
        shutil.rmtree(checkpointer.dir, ignore_errors=True)  # the final model supersedes it
    accelerator.wait_for_everyone()
    logger.close()
    return metrics
