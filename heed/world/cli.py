"""`heed world make`: write the embedded world's files into a directory."""

from __future__ import annotations

from dataclasses import dataclass

from heed.config import option
from heed.utils import HeedError


@dataclass
class MakeConfig:
    out: str = option(help="directory to write corpus.jsonl, demos.jsonl, prompts_*.jsonl and kb.json into")
    seed: int = option(0, "seed for the train/held-out split and all sampling (the KB itself is fixed)")
    n_corpus: int = option(8000, "pretraining documents (about 155 characters each: 8000 make about 1.2M characters)")
    n_demos: int = option(400, "demonstrations for SFT, written by demonstrators with habits (docs/world.md)")
    habits: str = option("demonstrators", "who writes the demonstrations: 'demonstrators' (a pool of people with "
                                          "habits, about two thirds of demonstrations flawed) or 'none' "
                                          "(flawless answers, the control)", choices=("demonstrators", "none"))
    n_train_prompts: int = option(2000, "prompts for RL and labeling")
    n_heldout_prompts: int = option(600, "held-out prompts for evaluation, never seen in training")
    n_valid_prompts: int = option(300, "validation prompts for tuning, from groups no training stage sees")


def make(cfg: MakeConfig) -> dict[str, int]:
    from heed.world.world import write_world

    try:
        summary = write_world(cfg.out, cfg.seed, n_corpus=cfg.n_corpus, n_demos=cfg.n_demos,
                              n_train_prompts=cfg.n_train_prompts, n_heldout_prompts=cfg.n_heldout_prompts,
                              n_valid_prompts=cfg.n_valid_prompts, habits=cfg.habits)
    except ValueError as e:  # more prompts asked for than the world has
        raise HeedError(str(e)) from None
    print(f"wrote the world (seed {cfg.seed}, habits {cfg.habits}) to {cfg.out}: "
          + ", ".join(f"{v:,} {k}" for k, v in summary.items()))
    return summary
