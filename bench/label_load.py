"""Load test for the labelling app: many annotators at once, and not one answer lost or doubled.

    python bench/label_load.py                       # 20 annotators, 60 s, SQLite
    python bench/label_load.py --annotators 50 --seconds 120 --out runs/label_load.json
    python bench/label_load.py --db postgresql       # on a throwaway PostgreSQL cluster (bench/pg_cluster.py)
    python bench/label_load.py --db postgresql+psycopg://user@host/db   # an empty database of yours

It starts `heed label serve` on 127.0.0.1 (a separate process, as in use), then
runs N simulated annotators concurrently over the JSON API, each looping
"next item -> answer" with no think time, and now and then an undo. Every answer
the server acknowledges (HTTP 200) is recorded, and every acknowledged undo
removes one. At the end the database must hold exactly the acknowledged
answers: none missing, none twice, none unexplained, each with the choice the
server reported. Printed: answers per second, latency percentiles, lost answers.

The same functions drive a 3-second version in tests/test_feedback_server.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from heed.feedback.store import Store  # noqa: E402

# ---------------------------------------------------------------------------
# Set-up: a database with annotators and items, and a server process
# ---------------------------------------------------------------------------

def make_db(path: str | Path, annotators: int, items: int, seed: int = 0) -> dict[str, str]:
    """A fresh database with `items` items (mostly pairs, some of every other kind); returns name -> token."""
    rng = random.Random(seed)
    store = Store(path)
    rows = []
    for k in range(items):
        kind = rng.choices(["pair", "ranking", "thumbs", "rating"], weights=[7, 1, 1, 1])[0]
        n = {"pair": 2, "ranking": rng.randint(3, 4), "thumbs": 1, "rating": 1}[kind]
        rows.append({"id": f"item-{k}", "kind": kind, "prompt": f"Prompt {k}: describe thing {k % 97}.",
                     "responses": [f"Response {j} to {k}:\n" + "words " * rng.randint(5, 60) for j in range(n)],
                     "overlap": rng.choice([1, 1, 2, 3])})
    store.add_items(rows)
    tokens = {f"annotator{a:02d}": store.add_user(f"annotator{a:02d}") for a in range(annotators)}
    store.close()
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str | Path, port: int, *extra: str) -> subprocess.Popen:
    """`heed label serve` in its own process, as people run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "heed.cli", "label", "serve", "--db", str(db),
                             "--host", "127.0.0.1", "--port", str(port), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode(errors='replace')}")
        try:
            if httpx.get(url + "/login", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


# ---------------------------------------------------------------------------
# The annotators
# ---------------------------------------------------------------------------

@dataclass
class LoadResult:
    acked: dict[tuple[str, str], dict] = field(default_factory=dict)  # (item, annotator) -> stored answer
    answer_latency: list[float] = field(default_factory=list)
    next_latency: list[float] = field(default_factory=list)
    answers_acked: int = 0
    undos_acked: int = 0
    unknown: int = 0   # requests with no reply: their effect is unknown, so they are counted
    refused: Counter = field(default_factory=Counter)
    elapsed: float = 0.0
    stop: bool = False  # set from another thread to end the run early


def _answer_for(item: dict, rng: random.Random) -> dict:
    kind = item["kind"]
    if rng.random() < 0.05:
        return {"choice": "skip"}
    if kind == "pair":
        return {"choice": rng.choice(["A", "B", "A", "B", "tie", "both_bad"]), "comment": "load test"}
    if kind == "ranking":
        order = list(range(len(item["responses"])))
        rng.shuffle(order)
        return {"ranking": order}
    if kind == "thumbs":
        return {"label": rng.choice(["up", "down"])}
    return {"score": rng.randint(1, 7)}


async def _annotator(url: str, name: str, token: str, deadline: float, undo_rate: float, result: LoadResult,
                     seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as client:
        while time.perf_counter() < deadline and not result.stop:
            try:
                t0 = time.perf_counter()
                r = await client.get("/api/next")
                result.next_latency.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    result.refused[f"next {r.status_code}"] += 1
                    continue
                item = r.json()["item"]
                if item is None:
                    return
                t0 = time.perf_counter()
                r = await client.post("/api/answer", json={"item_id": item["id"], **_answer_for(item, rng)})
                result.answer_latency.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    result.refused[f"answer {r.status_code}"] += 1
                    continue
                stored = r.json()["answer"]
                key = (stored["item_id"], name)
                if key in result.acked:
                    raise AssertionError(f"the server acknowledged {key} twice")
                result.acked[key] = stored
                result.answers_acked += 1
                if rng.random() < undo_rate:
                    r = await client.post("/api/undo")
                    if r.status_code == 200 and r.json()["undone"] is not None:
                        del result.acked[(r.json()["undone"], name)]
                        result.undos_acked += 1
            except (httpx.TransportError, OSError):
                result.unknown += 1  # the server went away mid-request (the kill test does that)
                await asyncio.sleep(0.05)


def run_load(url: str, tokens: dict[str, str], seconds: float, *, undo_rate: float = 0.05, seed: int = 0,
             result: LoadResult | None = None) -> LoadResult:
    """All annotators at once for `seconds` (or until `result.stop`); returns what the server
    acknowledged and how fast. Pass `result` to watch it fill from another thread."""
    result = result if result is not None else LoadResult()

    async def main():
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*[_annotator(url, name, token, deadline, undo_rate, result, seed + n)
                               for n, (name, token) in enumerate(sorted(tokens.items()))])

    t0 = time.perf_counter()
    asyncio.run(main())
    result.elapsed = time.perf_counter() - t0
    return result


def check_exactly_once(db: str | Path, result: LoadResult) -> dict:
    """Compare the database with what was acknowledged: missing, doubled, unexplained, changed."""
    store = Store(db)
    rows = store.answers()
    store.close()
    counts = Counter((a["item_id"], a["annotator"]) for a in rows)
    stored = {(a["item_id"], a["annotator"]): a for a in rows}
    missing = [k for k in result.acked if k not in stored]
    doubled = [k for k, n in counts.items() if n > 1]
    unexplained = [k for k in stored if k not in result.acked]
    changed = [k for k, a in result.acked.items() if k in stored and
               any(stored[k][f] != a[f] for f in ("choice", "ranking", "label", "score"))]
    return {"acknowledged": len(result.acked), "in_db": len(rows), "missing": len(missing), "doubled": len(doubled),
            "unexplained": len(unexplained), "changed": len(changed)}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--items", type=int, default=30000)
    ap.add_argument("--undo-rate", type=float, default=0.05)
    ap.add_argument("--db", help="database: a SQLite file to create (default: a temporary one), 'postgresql' "
                                 "for a throwaway PostgreSQL cluster, or an empty database's SQLAlchemy URL")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    with contextlib.ExitStack() as stack:
        if args.db == "postgresql":
            from pg_cluster import throwaway_cluster

            db: str | Path = stack.enter_context(throwaway_cluster()).new_database("label_load")
        elif args.db and "://" in args.db:
            db = args.db
        else:
            db = Path(args.db or Path(tmp.name) / "load.db")
            if db.exists():
                raise SystemExit(f"{db} exists; give a new path")
        code = _run(args, db)
    tmp.cleanup()
    return code


def _run(args, db: str | Path) -> int:
    t0 = time.perf_counter()
    tokens = make_db(db, args.annotators, args.items)
    print(f"database: {args.items} items, {args.annotators} annotators ({time.perf_counter() - t0:.1f} s to build)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(db, port)
    try:
        wait_ready(url, proc)
        print(f"{args.annotators} annotators for {args.seconds:.0f} s against {url} ...")
        result = run_load(url, tokens, args.seconds, undo_rate=args.undo_rate)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    check = check_exactly_once(db, result)
    ms = lambda xs, q: round(1000 * percentile(xs, q), 1)  # noqa: E731
    figures = {
        "backend": "sqlite" if isinstance(db, Path) else "postgresql", "annotators": args.annotators,
        "seconds": round(result.elapsed, 1), "cpus": os.cpu_count(),
        "answers_acknowledged": result.answers_acked, "undos_acknowledged": result.undos_acked,
        "answers_per_second": round(result.answers_acked / result.elapsed, 1),
        "answer_latency_ms": {"p50": ms(result.answer_latency, 50), "p95": ms(result.answer_latency, 95),
                              "p99": ms(result.answer_latency, 99)},
        "next_latency_ms": {"p50": ms(result.next_latency, 50), "p95": ms(result.next_latency, 95),
                            "p99": ms(result.next_latency, 99)},
        "requests_without_reply": result.unknown, "refused": dict(result.refused),
        "check": check, "lost_answers": check["missing"],
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    ok = not (check["missing"] or check["doubled"] or check["unexplained"] or check["changed"] or result.unknown)
    print("exactly once: OK" if ok else "exactly once: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
