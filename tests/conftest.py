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


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster on loopback for the session (bench/pg_cluster.py).
    Skipped where the server is not installed, unless HEED_REQUIRE_POSTGRES=1 (as `.ci/run` sets)."""
    import importlib.util
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from pg_cluster import server_binaries, throwaway_cluster

    missing = ("PostgreSQL's server" if server_binaries() is None else
               "the psycopg driver" if importlib.util.find_spec("psycopg") is None else None)
    if missing:
        message = f"{missing} is not installed (.ci/run installs it)"
        if os.environ.get("HEED_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A new, empty feedback database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    import uuid

    return request.getfixturevalue("pg_cluster").new_database("t" + uuid.uuid4().hex[:16])


# Hypothesis (tests/test_fuzz_readers.py): "ci", the default, is small, fixed and reproducible;
# `pytest --hypothesis-profile=long` searches far wider (docs/reward-models.md, "Fuzzed readers").
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extra not installed: the fuzz tests skip themselves
    pass
else:
    # its example database and caches go to the temp dir, not into the checkout (.hypothesis/)
    import tempfile

    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "heed-hypothesis"))
    settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=1_000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("ci")
