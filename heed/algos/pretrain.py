"""Stage 1: pretraining a causal language model on a text corpus.

1. read the corpus (plain text or JSONL), hold out a fraction of documents
2. train a byte-level BPE tokenizer on it (or reuse a given one)
3. pack all documents into fixed-length sequences, separated by a newline
4. next-token cross-entropy with AdamW, warm-up then cosine annealing to zero;
   held-out perplexity logged; checkpoints resume (heed/algos/common.py)

With --pack, step 3 keeps documents apart instead: each document (cut into --seq-len pieces if
longer) keeps its own positions and attention within a row (models.pack_examples).

Departure from common practice: documents are not separated by EOS, because the
world's corpus uses EOS to mark the end of an assistant's response, and a
response that "never ends" must be learnable as such.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from heed.algos.common import OfflineConfig, prepare_model, train_lm, weight_dtype
from heed.config import option
from heed.data import read_texts
from heed.models import (
    PRESETS,
    LMExample,
    build_model,
    count_parameters,
    load_policy,
    load_tokenizer,
    pack_examples,
    save_model,
    train_tokenizer,
)
from heed.utils import HeedError, seed_everything


@dataclass(kw_only=True)
class PretrainConfig(OfflineConfig):
    corpus: str = option(help="text corpus: .txt (documents separated by blank lines) or JSONL with a text field")
    text_field: str = option("text", "the JSONL field holding each document")
    model: str = option("tiny", "preset (tiny, small) or a local HF model directory to continue training")
    tokenizer: str | None = option(None, "tokenizer directory (default: train a byte-level BPE on the corpus)")
    vocab_size: int = option(0, "BPE vocabulary size when training a tokenizer (0 = the preset's)")
    seq_len: int = option(128, "tokens per packed training sequence")
    steps: int = option(500, "optimiser steps")
    heldout_fraction: float = option(0.02, "fraction of documents held out for perplexity")
    lr: float = option(3e-3, "peak learning rate (AdamW), warmed up then annealed to zero")
    warmup_steps: int = option(30, "linear warm-up steps")
    weight_decay: float = option(0.01, "AdamW weight decay")
    skip_invalid: bool = option(False, "skip and count malformed corpus rows instead of stopping")
    pack: bool = option(False, "pack documents into --seq-len rows with attention and positions kept within each "
                               "document (default: one stream cut into blocks, attention across documents)")


def pack(token_lists: list[list[int]], sep: list[int], seq_len: int) -> list[LMExample]:
    """Concatenate documents (with `sep` between) and cut into seq_len blocks; the tail is dropped."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.extend(sep)
    n = len(stream) // seq_len
    return [LMExample(stream[i * seq_len:(i + 1) * seq_len], [1] * seq_len) for i in range(n)]


def pack_documents(token_lists: list[list[int]], sep: list[int], seq_len: int) -> list[LMExample]:
    """Each document (+ `sep`), cut into pieces of at most seq_len, as its own example, packed
    into rows of seq_len with attention and positions kept within each piece."""
    pieces = [ids[i:i + seq_len] for ids in (t + sep for t in token_lists) for i in range(0, len(ids), seq_len)]
    return pack_examples([LMExample(p, [1] * len(p)) for p in pieces if len(p) > 1], seq_len)


def run(cfg: PretrainConfig) -> dict:
    seed_everything(cfg.seed)
    docs = read_texts(cfg.corpus, cfg.text_field, skip_invalid=cfg.skip_invalid)
    random.Random(cfg.seed).shuffle(docs)
    n_heldout = max(1, int(len(docs) * cfg.heldout_fraction)) if len(docs) > 1 else 0
    heldout_docs, train_docs = docs[:n_heldout], docs[n_heldout:]

    if Path(cfg.model).is_dir():
        model, tokenizer = load_policy(cfg.model, dtype=weight_dtype(cfg))
    else:
        if cfg.lora_r:
            raise HeedError("--lora-r adapts a trained model: give --model a model directory, not a preset")
        if cfg.model not in PRESETS:
            raise HeedError(f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
        if cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer)
        else:
            tokenizer = train_tokenizer(train_docs, cfg.vocab_size or PRESETS[cfg.model]["vocab_size"])
        model = build_model(cfg.model, tokenizer)
    model = prepare_model(model, cfg)
    print(f"pretrain: {len(train_docs)} documents, model {count_parameters(model) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}")

    sep = tokenizer("\n", add_special_tokens=False)["input_ids"]
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    chop = pack_documents if cfg.pack else pack
    train = chop(encode(train_docs), sep, cfg.seq_len)
    heldout = chop(encode(heldout_docs), sep, cfg.seq_len)
    if len(train) < 1:
        raise HeedError(f"{cfg.corpus}: corpus too small for one sequence of {cfg.seq_len} tokens")
    print(f"pretrain: {len(train)} training sequences of {cfg.seq_len} tokens "
          f"({cfg.steps * cfg.batch_size / len(train):.1f} passes), {len(heldout)} held out")
    return train_lm(model, tokenizer, train, heldout, cfg, cfg.steps, stage="pretrain",
                    save=lambda m: save_model(m, tokenizer, cfg.out))
