"""Shared fixtures: a small world, a tokenizer and a tiny model trained for a few steps.

Everything is built by the tests themselves: nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HEED_QUIET", "1")  # no progress bars in test logs


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from heed.world import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(out, 0, n_corpus=1500, n_demos=120, n_train_prompts=300, n_heldout_prompts=100)
    return out


@pytest.fixture(scope="session")
def tiny_base(world_dir, tmp_path_factory):
    """A tiny model pretrained for a handful of steps on the small world corpus."""
    from heed.algos.pretrain import PretrainConfig, run

    out = tmp_path_factory.mktemp("base")
    run(PretrainConfig(corpus=str(world_dir / "corpus.jsonl"), out=str(out), steps=30, batch_size=16,
                       micro_batch_size=16, seq_len=64, vocab_size=600, eval_every=15, save_every=1000,
                       warmup_steps=5))
    return out


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`heed demo --quick` once per session: the directory every stage wrote into."""
    from heed.cli import main

    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out
