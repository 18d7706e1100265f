"""`heed merge`: a LoRA run's adapter folded into its base model, written as a plain model directory.

A stage run with `--lora-r` saves only its adapter (peft's format: adapter_config.json, which
names the base model's directory, and adapter_model.safetensors) and the tokenizer. Every heed
stage loads such a directory as the merged model already (heed/models.py:load_policy); `heed
merge` writes that model out, so `transformers.AutoModelForCausalLM.from_pretrained` and any
other tool load it, and the base directory is no longer needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heed.config import option
from heed.models import ADAPTER_CONFIG, load_policy, save_model
from heed.utils import HeedError


@dataclass
class MergeConfig:
    model: str = option(help="a directory with a LoRA adapter (from a stage run with --lora-r)")
    out: str = option(help="where to write the merged model and its tokenizer")


def merge(cfg: MergeConfig) -> Path:
    if not (Path(cfg.model) / ADAPTER_CONFIG).exists():
        raise HeedError(f"{cfg.model}: no LoRA adapter here (no {ADAPTER_CONFIG}); it is a plain model already")
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.model).resolve():
        raise HeedError("--out must differ from --model: the adapter directory is the merge's input")
    model, tokenizer = load_policy(cfg.model)
    save_model(model, tokenizer, out, merged_from=str(Path(cfg.model).resolve()))
    print(f"merge: {cfg.model} folded into its base, saved to {out}")
    return out
