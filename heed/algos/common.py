"""What every training loop shares.

- `Learner.step`: the one accumulate-and-step every loop calls (micro-batches, DDP sync on
  the last only, autocast, backward, clipping, optimiser and schedule step), returning the
  gradient norm; `global_mean` is the loss scaling that makes multi-process gradients exact.
- `train_offline`: the loop over a fixed dataset that pretraining, SFT, DPO and each
  reward-model member run around their own loss (`loss(model, rows)`), with held-out
  evaluation, checkpoints that resume, and one "already trained" mark (`trainer_done.json`).
- `train_lm`: that loop on the causal-LM loss of pretraining and SFT (heed/models.py's
  `LMExample`, `token_nll`).

The online loop PPO, GRPO and RLOO share is heed/algos/online.py.

Multi-process runs (`accelerate launch`) split each *global* batch across processes and
scale each local loss by the global count (of tokens or rows), so the averaged gradient is
exactly that of one process on the whole global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from heed.config import option, save as save_config
from heed.models import LMExample, add_lora, collate_lm, device_of, evaluate_nll, is_peft, token_nll
from heed.utils import HeedError, MetricsLogger, fault_point, progress

DONE_FILE = "trainer_done.json"


@dataclass(kw_only=True)
class TrainConfig:
    """Fields every training stage has."""

    out: str = option(help="output directory: model, metrics.jsonl, tb/, checkpoint/")
    seed: int = option(0, "random seed (each process adds its rank)")
    lr: float = option(1e-3, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(20, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    micro_batch_size: int = option(32, "sequences per forward pass (at most), per process; a batch runs in "
                                                "micro-batches of similar length, gradients accumulated")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    skip_nonfinite: int = option(0, "batches whose loss, gradient norm or rewards are NaN or inf that may be "
                                    "skipped (no update; counted as train/nonfinite_skipped); past that the "
                                    "stage stops, naming the step, the value and the batch's prompts, with the "
                                    "last good checkpoint kept")
    save_every: int = option(100, "checkpoint every N steps (a killed run resumes from the last)")
    bf16: bool = option(False, "bf16 autocast: for GPUs, and CPUs with AMX on models of ~10M parameters and up "
                               "(docs/performance.md)")
    dtype: str = option("fp32", "weights of the trained model: bf16 halves the weights, gradients and AdamW "
                                "moments (every stage); the value and reward heads, LoRA adapters, log-softmax "
                                "and losses stay fp32. Pure-bf16 AdamW drops updates below bf16 precision: "
                                "best with LoRA or large learning rates (docs/scale.md)", choices=("fp32", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass: "
                                                 "less memory, about a third more compute; the shared-prompt "
                                                 "KV path then runs every row in full")
    lora_r: int = option(0, "LoRA rank (0 = off: every weight trains). With LoRA only the adapter (and any "
                            "value or reward head) trains, the reference is the policy with its adapter off, "
                            "and the run saves the adapter (peft format; `heed merge` writes a plain model)")
    lora_alpha: float = option(16.0, "LoRA alpha: the adapter's update is scaled by alpha / r")
    lora_dropout: float = option(0.0, "dropout on the LoRA path (RL stages want 0: log-probs must repeat)")
    lora_target_modules: list[str] = option([], "modules LoRA adapts (default by architecture: q,k,v,o and MLP "
                                                "projections for Llama/Qwen/Mistral/Gemma, c_attn,c_proj,c_fc "
                                                "for GPT-2, else all-linear)")


@dataclass(kw_only=True)
class OfflineConfig(TrainConfig):
    """Fields of the stages that train on a fixed dataset (pretraining, SFT, reward model, DPO)."""

    batch_size: int = option(32, "global batch size (rows per optimiser step, all processes together)")
    eval_every: int = option(100, "evaluate on held-out data every N steps (and at the end)")
    log_every: int = option(1, "log training metrics, averaged over N steps, every N steps")


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype a stage loads its trained model in (--dtype)."""
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def prepare_model(model: torch.nn.Module, cfg: TrainConfig):
    """The one place a stage's trained causal LM (or reward-model trunk) gets the shared memory
    options, before any head or wrapper is put around it: weights in --dtype, gradient
    checkpointing (non-reentrant), and a LoRA adapter (--lora-r; the model comes back wrapped
    by peft, heed/models.py:add_lora). Checkpointing a LoRA model needs the embeddings' output
    to require gradients (peft's `enable_input_require_grads`), as the embeddings are frozen."""
    model.to(weight_dtype(cfg))
    if cfg.gradient_checkpointing:
        # (transformers 5's name for gradient_checkpointing_enable, which it deprecates)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        if is_peft(model):
            raise HeedError("the model has a LoRA adapter already")
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         targets=cfg.lora_target_modules)
    return model


def shape_multiple(cfg: TrainConfig) -> int:
    """What batch widths are rounded up to: 16 under bf16, where a CPU's oneDNN builds kernels
    for each new shape and varying widths pay for it every step (docs/performance.md); 1 otherwise."""
    return 16 if cfg.bf16 else 1


def already_trained(out: str | Path) -> dict | None:
    """The final state of a finished run in `out` (its trainer_done.json), or None. Every stage
    checks this first, so a rerun of a finished command does nothing."""
    done = Path(out) / DONE_FILE
    if not done.exists():
        return None
    print(f"{out}: already trained ({DONE_FILE} exists); delete the directory to train again")
    return json.loads(done.read_text())


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Without a GPU, accelerate only sets up multi-process (gloo) training when told it is
    # on the CPU; otherwise each process of `accelerate launch` would train alone.
    # Our batches are global (split across processes), so the schedule takes one step per
    # optimiser step; accelerate's default would step it once per process.
    # DeepSpeed is the exception: accelerate hands it the processes only when not told `cpu`, and
    # DeepSpeed's own CPU accelerator then runs them over gloo (docs/distributed.md).
    cpu, extra = not torch.cuda.is_available(), {}
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        cpu, extra = False, {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=cpu,
                              step_scheduler_with_optimizer=False, **extra)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.num_processes > 1:
        fsdp_on_cpu(accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        deepspeed_settings(accelerator, cfg)
    # A different seed per process (sampling must differ across ranks), same init weights
    # because every rank builds the model before this and DDP broadcasts rank 0's weights.
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def fsdp_on_cpu(accelerator) -> None:
    """Take an FSDP config at its word on CPUs too. accelerate 1.15 selects FSDP only on an
    accelerator: told `cpu=True` (as heed does without a GPU) it silently trains with DDP, every
    weight on every process. torch's FSDP2 (`fully_shard`) runs on CPUs over gloo, so select it
    the way accelerate does on GPUs (docs/distributed.md); FSDP1's plugin refuses to exist there."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's environment, as accelerate builds it
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # PartialState's copy too: every AcceleratorState() made later starts from it
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def deepspeed_settings(accelerator, cfg: TrainConfig) -> None:
    """What DeepSpeed's config must hold for heed's loop: the micro-batch size it asks for (heed
    has no dataloader to read it from; it only sizes DeepSpeed's own bookkeeping), one
    accumulation step (Learner.step marks the last micro-batch itself), --max-grad-norm."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0


def is_sharded(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3): then every
    forward pass is a collective that all processes must run, and so is gathering the weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


@contextmanager
def whole_state_dicts(model: torch.nn.Module, full: dict | None):
    """While saving a sharded model on the main process: the `state_dict()` of `model` and of every
    module in it answers from `full`, the whole weights gathered from all processes, so `save`
    callbacks written for plain modules (`save_model(m.policy, ...)`) write whole weights."""
    if full is None:
        yield
        return
    own = model.state_dict(keep_vars=True)  # tied weights: one parameter under two names, so one tensor
    first = {}
    for name, tensor in own.items():
        first.setdefault(id(tensor), name)
    full = {k: full[first[id(own[k])]] if k in own and first[id(own[k])] in full else v for k, v in full.items()}
    modules = [(name + "." if name else "", module) for name, module in model.named_modules()]
    for prefix, module in modules:
        part = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        module.state_dict = lambda *args, _part=part, **kwargs: dict(_part)
    try:
        yield
    finally:
        for _, module in modules:
            del module.state_dict


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

    Written to `checkpoint.tmp` (its trainer_state.json last) and swapped in: the old one
    is renamed to `checkpoint.old`, the new one into place, then the old one removed. A kill
    at any moment leaves a whole checkpoint that `load` finds: the new one, the old one, or
    (killed mid-swap) whichever of `.tmp` and `.old` is complete.
    """

    def __init__(self, accelerator, out: str | Path):
        self.accelerator = accelerator
        self.dir = Path(out) / "checkpoint"

    def load(self) -> dict:
        """Restore the last checkpoint if there is one; return its state ({"step": 0} if none)."""
        state = self.dir / "trainer_state.json"
        if not state.exists() and self.accelerator.is_main_process:
            # killed mid-swap: the new checkpoint is complete in .tmp (its state file is written
            # last), else the previous one is whole in .old
            for spare in (self.dir.with_name("checkpoint.tmp"), self.dir.with_name("checkpoint.old")):
                if (spare / "trainer_state.json").exists():
                    shutil.rmtree(self.dir, ignore_errors=True)
                    spare.rename(self.dir)
                    break
        self.accelerator.wait_for_everyone()
        if not state.exists():
            return {"step": 0}
        self.accelerator.load_state(str(self.dir))
        trainer_state = json.loads(state.read_text())
        self.accelerator.print(f"resuming from {self.dir} at step {trainer_state['step']}")
        return trainer_state

    def remove(self) -> None:
        """Delete the checkpoint and any spare a kill left (`.tmp`, `.old`)."""
        for d in (self.dir, self.dir.with_name("checkpoint.tmp"), self.dir.with_name("checkpoint.old")):
            shutil.rmtree(d, ignore_errors=True)

    def save(self, step: int, **state) -> None:
        """Save at `step`; `state` (JSON-serialisable) comes back from load() on resume."""
        tmp = self.dir.with_name("checkpoint.tmp")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()  # every process's files are in tmp before it is renamed
        if self.accelerator.is_main_process:
            fault_point("checkpoint-write")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
            old = self.dir.with_name("checkpoint.old")
            shutil.rmtree(old, ignore_errors=True)
            if self.dir.exists():
                self.dir.rename(old)
            fault_point("checkpoint-swap")
            tmp.rename(self.dir)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def short_text(prompt, limit: int = 80) -> str:
    """A prompt (text or chat messages) cut to `limit` characters, for messages."""
    text = prompt if isinstance(prompt, str) else " | ".join(str(m.get("content", m)) if isinstance(m, dict)
                                                             else str(m) for m in prompt)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def prompts_of(rows: Sequence) -> list:
    """The prompts of a batch's rows (pairs, rankings, demonstrations, dicts), where they have one."""
    out = []
    for row in rows:
        prompt = row.get("prompt") if isinstance(row, dict) else getattr(row, "prompt", None)
        if prompt is not None:
            out.append(prompt)
    return out


def global_batch(rows: list, step: int, batch_size: int, *, seed: int) -> list:
    """The rows of optimiser step `step`: consecutive slices of a seeded shuffle, reshuffled
    each pass. The order depends only on `seed` and `step`, so every process (each then
    takes its share) and a resumed run agree on it."""
    per_pass = max(1, len(rows) // batch_size)
    epoch, k = divmod(step, per_pass)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
    return [rows[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]


def global_mean(total: torch.Tensor, count: int, world: int) -> torch.Tensor:
    """A process's summed loss as its share of the mean over all processes' rows (or tokens):
    DDP averages gradients over the `world` processes, so total * world / (global count)
    gives exactly the gradient of the global mean."""
    return total * world / max(1, count)


# What each extra micro-batch costs, as a share of the whole batch's padded work: its own
# forward and backward launches, and smaller matrix products.
MICRO_BATCH_OVERHEAD = 0.05


def micro_batches(items: Sequence, size: int, lengths: Sequence[int] | None = None) -> list:
    """`items` in micro-batches of at most `size`: consecutive slices, or, given `lengths` (the
    padded width each item needs), sorted by length and cut where it saves work. A micro-batch
    is padded to its longest item, so it costs its size times that length; each extra one costs
    MICRO_BATCH_OVERHEAD of the batch's unsplit cost; the cuts minimise the total (dynamic
    programming over the sorted items). The step's gradient is the same sum over the same items
    either way; only the padding (and the float rounding of the sum) changes."""
    if lengths is None or len(items) <= 1:
        return [items[i:i + size] for i in range(0, len(items), size)]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    overhead = MICRO_BATCH_OVERHEAD * n * sorted_len[-1]
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[j]: the cheapest split of the first j
    for j in range(1, n + 1):
        for i in range(max(0, j - size), j):
            cost = best[i] + (j - i) * sorted_len[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append([items[k] for k in order[cut[j]:j]])
        j = cut[j]
    return chunks[::-1]


def as_many_chunks(chunks: list, count: int) -> list:
    """`chunks` split until there are `count` of them, the largest first (cut in two): under FSDP and
    DeepSpeed every process must run as many micro-batches as the one with the most. Each process
    holds as many rows as the others, so there are enough; the step's gradient is the same sum."""
    chunks = list(chunks)
    while len(chunks) < count:
        i = max(range(len(chunks)), key=lambda k: len(chunks[k]))
        if len(chunks[i]) < 2:
            raise HeedError(f"cannot split {len(chunks)} micro-batches into {count}")
        half = len(chunks[i]) // 2
        chunks[i:i + 1] = [chunks[i][:half], chunks[i][half:]]
    return chunks


def mean_stats(stats: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


class Learner:
    """A model under training: the accelerator, the model, optimiser and schedule as accelerate
    prepared them, the checkpointer of `run_dir` and the metrics log of `log_dir`."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, *, accelerator=None,
                 run_dir: str | Path | None = None, log_dir: str | Path | None = None):
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        optimizer, scheduler = make_optimizer(model, cfg, total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.run_dir = Path(run_dir or cfg.out)
        self.checkpointer = Checkpointer(self.accelerator, self.run_dir)
        self.logger = MetricsLogger(log_dir or self.run_dir, enabled=self.accelerator.is_main_process)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.sharded = is_sharded(self.accelerator)  # FSDP / ZeRO-3: forward passes and saving are collectives
        # FSDP and DeepSpeed communicate in every backward pass (ZeRO-2 too): every process must
        # run as many micro-batches
        self.lockstep = self.sharded or self.accelerator.state.deepspeed_plugin is not None
        self.nonfinite = 0  # batches skipped for a NaN or inf in this run (--skip-nonfinite)

    def finite(self, what: str, value, *, where: str, prompts: Sequence = ()) -> bool:
        """Whether `value` (a number or tensor) is finite on every process. If not: with
        --skip-nonfinite budget left, count it and return False (the caller skips the batch);
        otherwise stop with a HeedError naming `where`, `what`, the value and a few of the
        batch's `prompts`. Nothing is saved on the way: the last checkpoint stays as it was."""
        values = torch.as_tensor(value, dtype=torch.float32).detach().flatten().cpu()
        bad = ~torch.isfinite(values)
        flag = torch.tensor(float(bad.any()), device=self.accelerator.device)
        if self.world > 1:  # every process skips, or none: they must stay in step
            flag = self.accelerator.reduce(flag, "sum")
        if not flag.item():
            return True
        if self.nonfinite < self.cfg.skip_nonfinite:
            self.nonfinite += 1
            self.accelerator.print(f"{where}: {what} is not finite; batch skipped "
                                   f"({self.nonfinite} of --skip-nonfinite {self.cfg.skip_nonfinite})")
            return False
        shown = (f"{float(values[bad][0])} ({int(bad.sum())} of {values.numel()} values)" if bad.any()
                 else "not finite on another process")
        examples = "; ".join(repr(short_text(p)) for p in list(prompts)[:3]) or "(no prompts: plain text)"
        kept = (f"the last good checkpoint, {self.checkpointer.dir}, is kept and a rerun resumes from it"
                if (self.checkpointer.dir / "trainer_state.json").exists() else "no checkpoint was saved before it")
        raise HeedError(f"{where}: {what} is {shown}; the batch's prompts include {examples}; {kept}. "
                        "Pass --skip-nonfinite N to skip up to N such batches")

    def resume(self) -> dict:
        """Restore the last checkpoint, if any, and return its state ({"step": 0} if none); the
        metrics log drops what was logged after it (those steps run again)."""
        state = self.checkpointer.load()
        self.logger.keep_until(state["step"])
        return state

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, chunks: Sequence, loss: Callable[[Any], torch.Tensor], *, where: str = "a training step",
             prompts: Sequence = ()) -> float | None:
        """One optimiser step over micro-batches: for each chunk, `loss(chunk)` (under autocast)
        and its backward, gradients accumulated and synchronised across processes on the last
        chunk only; then clipping to cfg.max_grad_norm, the optimiser and schedule steps.
        `loss` returns the chunk's share of the step's loss (see `global_mean`). Returns the
        gradient norm before clipping; None when the loss or the gradient norm was NaN or inf
        and the batch was skipped (see `finite`: `where` and `prompts` name it), with no update."""
        acc = self.accelerator
        if self.lockstep and self.world > 1:
            most = acc.gather(torch.tensor([len(chunks)], device=acc.device)).max()
            chunks = as_many_chunks(chunks, int(most))
        values = []
        for j, chunk in enumerate(chunks):
            acc.sync_gradients = j == len(chunks) - 1  # DeepSpeed reads it: steps after the last chunk only
            with nullcontext() if j == len(chunks) - 1 else acc.no_sync(self.model):
                with acc.autocast():
                    value = loss(chunk)
                values.append(value.detach().float().reshape(()))
                acc.backward(value)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        if not (self.finite("the loss", torch.stack(values), where=where, prompts=prompts)
                and self.finite("the gradient norm", grad_norm, where=where, prompts=prompts)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def finish(self, save: Callable[[torch.nn.Module], None], state: dict) -> None:
        """Save the model (main process), mark the run done with `state`, drop the checkpoint."""
        acc = self.accelerator
        acc.wait_for_everyone()
        full = acc.get_state_dict(self.model) if self.sharded else None  # gathered: every process takes part
        if self.is_main:
            with whole_state_dicts(self.unwrapped, full):
                save(self.unwrapped)
            (self.run_dir / DONE_FILE).write_text(json.dumps(state))
            self.checkpointer.remove()  # the final model supersedes it
        acc.wait_for_everyone()
        self.logger.close()


# ---------------------------------------------------------------------------
# The offline loop: pretraining, SFT, DPO, reward-model members
# ---------------------------------------------------------------------------

def train_offline(model: torch.nn.Module, rows: Sequence, cfg: OfflineConfig, total_steps: int, *, stage: str,
                  loss: Callable[[torch.nn.Module, list], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                  save: Callable[[torch.nn.Module], None], data_seed: int,
                  count: Callable[[list], int] = len, length: Callable[[Any], int] | None = None,
                  evaluate: Callable[[torch.nn.Module], dict] | None = None,
                  run_dir: str | Path | None = None, log_dir: str | Path | None = None, tags: dict | None = None,
                  state: dict | None = None, accelerator=None) -> dict:
    """Minimise `loss` over `rows` for `total_steps` optimiser steps; returns the last metrics.

    Each step takes the next `cfg.batch_size` rows of a shuffle seeded by `data_seed` (a new
    shuffle each pass), split across processes, in micro-batches of at most `cfg.micro_batch_size`
    (with `length(row)`, the padded width a row needs, rows of similar length go together).
    `loss(model, chunk)` returns the chunk's summed loss and statistics per row; the step
    minimises the global batch's summed loss divided by `count(global batch)` (rows by
    default; tokens for language modelling), which is also logged as train/loss. Every
    `cfg.log_every` steps the averages since the last log are logged (with `tags`); every
    `cfg.eval_every` steps and at the end, `evaluate(model)` adds held-out metrics.

    A killed run resumes from its last checkpoint at the same point of the same data order.
    `accelerator` (made here by default) lets a stage use it before training: it must exist before
    anything asks accelerate which process it is. At the end `save(model)` runs on the main
    process, and `run_dir/trainer_done.json` (the
    last metrics and `state`) marks the run done: a later call returns it and trains nothing.
    """
    run_dir = Path(run_dir or cfg.out)
    done = already_trained(run_dir)
    if done is not None:
        return done
    learner = Learner(model, cfg, total_steps, run_dir=run_dir, log_dir=log_dir, accelerator=accelerator)
    if learner.world > 1 and cfg.batch_size % learner.world:
        raise HeedError(f"batch_size {cfg.batch_size} must divide evenly across {learner.world} processes")
    if learner.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    start = learner.resume()["step"]
    learner.model.train()
    metrics: dict = {}
    window: dict[str, list[float]] = {}
    bar = progress(range(start, total_steps), desc=stage, disable=not learner.is_main, unit="step")
    for step in bar:
        batch = global_batch(rows, step, cfg.batch_size, seed=data_seed)
        n = count(batch)  # global: identical on every process
        totals: list[torch.Tensor] = []
        step_stats: dict[str, list[float]] = {}

        def chunk_loss(chunk: list) -> torch.Tensor:
            total, stats = loss(learner.model, chunk)
            totals.append(total.detach().float())
            for k, v in stats.items():
                step_stats.setdefault(k, []).extend(v.detach().float().flatten().tolist())
            return global_mean(total, n, learner.world)

        share = batch[learner.rank::learner.world]
        chunks = micro_batches(share, cfg.micro_batch_size, [length(r) for r in share] if length else None)
        grad_norm = learner.step(chunks, chunk_loss, where=f"{stage} step {step + 1}", prompts=prompts_of(share))
        if grad_norm is not None:  # None: a NaN or inf batch, skipped (--skip-nonfinite)
            local = torch.stack(totals).sum().to(learner.accelerator.device)
            window.setdefault("train/loss", []).append(float(learner.accelerator.reduce(local, "sum")) / max(1, n))
            window.setdefault("train/grad_norm", []).append(grad_norm)
            for k, v in step_stats.items():
                window.setdefault(k, []).extend(v)
        done_steps = step + 1
        last = done_steps == total_steps
        evaluating = evaluate is not None and (done_steps % cfg.eval_every == 0 or last)
        if done_steps % cfg.log_every == 0 or last or evaluating:
            metrics = {**(tags or {}), **mean_stats(window), "train/lr": learner.lr}
            if learner.nonfinite:
                metrics["train/nonfinite_skipped"] = learner.nonfinite
            window = {}
            if evaluating and (learner.is_main or learner.sharded):  # sharded: every process runs the forwards
                metrics.update(evaluate(learner.unwrapped))
            learner.logger.log(done_steps, **metrics)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()
                             if k in ("train/loss", "eval/loss", "eval/accuracy", "rewards/accuracy")})
        if done_steps % cfg.save_every == 0 and not last:
            learner.checkpointer.save(done_steps)
    bar.close()
    learner.finish(save, {**metrics, **(state or {})})
    return metrics


# ---------------------------------------------------------------------------
# The causal-LM loop (pretraining and SFT)
# ---------------------------------------------------------------------------

def train_lm(model, tokenizer, train: list[LMExample], heldout: list[LMExample], cfg: OfflineConfig,
             total_steps: int, *, stage: str, save: Callable[[object], None]) -> dict:
    """Minimise the next-token NLL, averaged over the global batch's loss tokens, on `train`
    (the loop of `train_offline`); held-out loss and perplexity on `heldout`."""
    pad = tokenizer.pad_token_id

    def loss(model, chunk: list[LMExample]):
        nll, _ = token_nll(model, {k: v.to(device_of(model)) for k, v in collate_lm(chunk, pad).items()})
        return nll, {}

    def evaluate(model) -> dict:
        eval_loss = evaluate_nll(model, heldout, pad, cfg.micro_batch_size)
        return {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))}

    return train_offline(model, train, cfg, total_steps, stage=stage, loss=loss, save=save,
                         data_seed=cfg.seed * 1000, count=lambda rows: sum(sum(e.loss_mask[1:]) for e in rows),
                         length=lambda e: len(e.input_ids),
                         evaluate=evaluate if heldout else None)
