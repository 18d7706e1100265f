"""`heed filter`: scored responses -> one pair per prompt, for REBEL, DPO and `heed rm train`.

Drops over-long prompts and responses (and, by default, responses that never ended),
removes duplicate responses, and keeps one pair per prompt: the best and the worst by
reward (`--select best-random` or `random-pair` for others). The pairs keep both rewards
(`chosen_reward`, `rejected_reward`): REBEL regresses on them; DPO and the reward model read
the file as pairwise feedback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from heed.config import option
from heed.data import FieldError, get_number, get_prompt, get_str, read_rows, write_jsonl
from heed.models import load_tokenizer, render_prompt
from heed.template import prompt_key
from heed.utils import HeedError

SELECTIONS = ("best-worst", "best-random", "random-pair")


@dataclass
class FilterConfig:
    data: str = option(help="scored rows (JSONL/Parquet): prompt, response, a reward column, optional finished")
    out: str = option(help="output JSONL of pairs: prompt, chosen, rejected, chosen_reward, rejected_reward")
    column: str = option("reward", "the reward column to select by")
    model: str | None = option(None, "a model directory whose tokenizer measures lengths (default: words)")
    max_prompt_len: int = option(96, "drop prompts longer than this (tokens with --model, else words)")
    max_response_len: int = option(48, "drop responses longer than this (tokens with --model, else words)")
    drop_unfinished: bool = option(True, "drop responses whose row says finished: false (they hit the length limit)")
    select: str = option("best-worst", "which pair to keep per prompt", choices=SELECTIONS)
    seed: int = option(0, "seed of the random selections")
    skip_invalid: bool = option(False, "skip and count malformed rows instead of stopping")


def filter_rows(rows: Sequence[dict], *, column: str = "reward", max_prompt_len: int = 96,
                max_response_len: int = 48, length: Callable[[object], int] | None = None,
                drop_unfinished: bool = True, select: str = "best-worst", seed: int = 0) -> tuple[list[dict], dict]:
    """Scored rows -> (one pair per prompt, counts of what was dropped).

    `length(text_or_messages)` measures prompts and responses (default: whitespace words).
    A pair's `chosen` is the response with the higher reward; equal rewards make a tie.
    """
    if select not in SELECTIONS:
        raise HeedError(f"unknown selection {select!r} (choose from {', '.join(SELECTIONS)})")
    length = length or (lambda x: len((x if isinstance(x, str) else " ".join(m["content"] for m in x)).split()))
    rng = random.Random(seed)
    stats = {"rows": len(rows), "long_prompt": 0, "long_response": 0, "unfinished": 0, "duplicate": 0,
             "single": 0, "pairs": 0, "ties": 0}
    groups: dict[str, tuple[object, list[dict]]] = {}
    prompt_ok: dict[str, bool] = {}
    for row in rows:
        key = prompt_key(row["prompt"])
        if key not in prompt_ok:
            prompt_ok[key] = length(row["prompt"]) <= max_prompt_len
        if not prompt_ok[key]:
            stats["long_prompt"] += 1
            continue
        if drop_unfinished and row.get("finished") is False:
            stats["unfinished"] += 1
            continue
        if length(row["response"]) > max_response_len:
            stats["long_response"] += 1
            continue
        group = groups.setdefault(key, (row["prompt"], []))[1]
        if any(r["response"].strip() == row["response"].strip() for r in group):
            stats["duplicate"] += 1
            continue
        group.append(row)
    pairs = []
    for prompt, group in groups.values():
        if len(group) < 2:
            stats["single"] += 1
            continue
        ranked = sorted(group, key=lambda r: r[column], reverse=True)  # stable: ties keep file order
        if select == "best-worst":
            a, b = ranked[0], ranked[-1]
        elif select == "best-random":
            a, b = ranked[0], rng.choice(ranked[1:])
        else:
            a, b = rng.sample(ranked, 2)
            if b[column] > a[column]:
                a, b = b, a
        pair = {"prompt": prompt, "chosen": a["response"], "rejected": b["response"],
                "chosen_reward": float(a[column]), "rejected_reward": float(b[column])}
        if a[column] == b[column]:
            pair["tie"] = True
            stats["ties"] += 1
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    return pairs, stats


def read_scored(path: str | Path, column: str, skip_invalid: bool = False) -> list[dict]:
    def parse(row: dict) -> dict:
        get_prompt(row)
        get_str(row, "response", allow_empty=True)
        if column not in row:
            raise FieldError(column, "missing (score the rows first: `heed rm score`)")
        get_number(row, column)
        if "finished" in row and not isinstance(row["finished"], bool):
            raise FieldError("finished", f"expected true or false, got {row['finished']!r}")
        return row
    return read_rows(path, parse, skip_invalid=skip_invalid, what="scored rows")


def token_length(tokenizer) -> Callable[[object], int]:
    def length(x) -> int:
        text = render_prompt(tokenizer, x) if not isinstance(x, str) else x  # the model's own chat template
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return length


def filter_stage(cfg: FilterConfig) -> list[dict]:
    rows = read_scored(cfg.data, cfg.column, cfg.skip_invalid)
    length = None
    if cfg.model:
        length = token_length(load_tokenizer(cfg.model))
    pairs, stats = filter_rows(rows, column=cfg.column, max_prompt_len=cfg.max_prompt_len,
                               max_response_len=cfg.max_response_len, length=length,
                               drop_unfinished=cfg.drop_unfinished, select=cfg.select, seed=cfg.seed)
    if not pairs:
        raise HeedError(f"{cfg.data}: no prompt kept two distinct responses ({describe(stats)})")
    write_jsonl(cfg.out, pairs)
    print(f"filter: {describe(stats)}; wrote {len(pairs)} pairs to {cfg.out}")
    return pairs


def describe(stats: dict) -> str:
    return (f"{stats['rows']} rows; dropped {stats['long_prompt']} with over-long prompts, {stats['unfinished']} "
            f"unfinished, {stats['long_response']} over-long, {stats['duplicate']} duplicates; "
            f"{stats['single']} prompts left with one response; {stats['pairs']} pairs ({stats['ties']} ties)")
