"""Stage 2: supervised fine-tuning on demonstrations (prompt, response).

1. read demonstrations ({"prompt", "response"} or chat {"messages": [...]})
2. tokenise prompt (template) and response (+ EOS) separately
3. next-token cross-entropy on response tokens only: the prompt is context, not target
4. held-out loss on a split of the demonstrations (or --eval-data)

With --pack, demonstrations are concatenated into rows of --seq-len tokens, each keeping its
own positions and attention (models.pack_examples): the same loss, less padding; --batch-size
then counts packed rows.

The loop is the supervised causal-LM loop of heed/algos/common.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from heed.algos.common import OfflineConfig, prepare_model, train_lm, weight_dtype
from heed.config import option
from heed.data import read_demos
from heed.models import LMExample, encode_prompts, encode_responses, load_policy, pack_examples, save_model
from heed.utils import seed_everything


@dataclass(kw_only=True)
class SFTConfig(OfflineConfig):
    model: str = option(help="the model to fine-tune: a local Hugging Face causal-LM directory")
    data: str = option(help="demonstrations: JSONL/Parquet of {prompt, response} or {messages: [...]}")
    eval_data: str | None = option(None, "held-out demonstrations (default: a split of --data)")
    eval_fraction: float = option(0.1, "fraction of --data held out when --eval-data is not given")
    epochs: float = option(4.0, "passes over the training demonstrations")
    max_prompt_len: int = option(96, "prompt tokens kept (the end of longer prompts)")
    max_response_len: int = option(96, "response tokens kept (EOS included)")
    lr: float = option(1e-3, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(5, "linear warm-up steps")
    eval_every: int = option(20, "evaluate on held-out demonstrations every N steps")
    save_every: int = option(50, "checkpoint every N steps (a killed run resumes from the last)")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")
    pack: bool = option(False, "concatenate demonstrations into rows of --seq-len tokens, attention and positions "
                               "kept within each (the same loss, less padding); --batch-size counts rows")
    seq_len: int = option(0, "tokens per packed row (0 = max-prompt-len + max-response-len)")


def build_examples(tokenizer, demos: list[dict], max_prompt_len: int, max_response_len: int) -> list[LMExample]:
    """Prompt tokens (no loss) followed by response tokens and EOS (loss)."""
    prompts = encode_prompts(tokenizer, [d["prompt"] for d in demos], max_prompt_len)
    responses = encode_responses(tokenizer, [d["response"] for d in demos], max_response_len)
    return [LMExample(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, responses)]


def run(cfg: SFTConfig) -> dict:
    seed_everything(cfg.seed)
    demos = read_demos(cfg.data, skip_invalid=cfg.skip_invalid)
    if cfg.eval_data:
        heldout_demos = read_demos(cfg.eval_data, skip_invalid=cfg.skip_invalid)
        train_demos = demos
    else:
        random.Random(cfg.seed).shuffle(demos)
        k = int(len(demos) * cfg.eval_fraction)
        heldout_demos, train_demos = demos[:k], demos[k:]
    model, tokenizer = load_policy(cfg.model, dtype=weight_dtype(cfg))
    model = prepare_model(model, cfg)
    train = build_examples(tokenizer, train_demos, cfg.max_prompt_len, cfg.max_response_len)
    heldout = build_examples(tokenizer, heldout_demos, cfg.max_prompt_len, cfg.max_response_len)
    n_demos = len(train)
    if cfg.pack:
        train = pack_examples(train, cfg.seq_len or cfg.max_prompt_len + cfg.max_response_len)
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
    print(f"sft: {n_demos} demonstrations" + (f" packed into {len(train)} rows" if cfg.pack else "")
          + f", {len(heldout)} held out, {steps} steps")
    return train_lm(model, tokenizer, train, heldout, cfg, steps, stage="sft",
                    save=lambda m: save_model(m, tokenizer, cfg.out))
