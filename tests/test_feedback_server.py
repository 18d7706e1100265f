"""The real server process: concurrent annotators get every acknowledged answer stored exactly once,
and killing the server mid-run (SIGKILL, no clean shutdown) loses no acknowledged answer."""

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from heed.feedback.store import Store

_spec = importlib.util.spec_from_file_location("label_load", Path(__file__).parents[1] / "bench" / "label_load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules["label_load"] = load  # its dataclasses look themselves up there
_spec.loader.exec_module(load)


@pytest.fixture
def server(tmp_path, db_url):
    """(db, tokens, url, start) with `start()` (re)starting `heed label serve` on one port; the
    database is a SQLite file, then a real PostgreSQL one (tests/conftest.py)."""
    db = db_url
    tokens = load.make_db(db, annotators=8, items=600)
    port = load.free_port()
    url = f"http://127.0.0.1:{port}"
    procs = []
    guide = tmp_path / "guide.md"
    guide.write_text("# Judge by **correctness**\n")

    def start():
        proc = load.start_server(db, port, "--guidelines", str(guide))
        procs.append(proc)
        load.wait_ready(url, proc)
        return proc

    yield db, tokens, url, start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_concurrent_annotators_exactly_once_while_the_queue_grows(server, tmp_path):
    db, tokens, url, start = server
    proc = start()
    result = load.LoadResult()
    runner = threading.Thread(target=load.run_load, args=(url, tokens, 120.0),
                              kwargs={"undo_rate": 0.3, "result": result})
    runner.start()
    # `heed label add` from another process while annotators are at work
    queue = tmp_path / "more.jsonl"
    queue.write_text("".join(json.dumps({"id": f"late-{k}", "prompt": "p", "responses": ["a", "b"]}) + "\n"
                             for k in range(50)))
    added = subprocess.run([sys.executable, "-m", "heed.cli", "label", "add", "--db", str(db), "--queue", str(queue)],
                           capture_output=True, text=True, timeout=60)
    # At least 3 s of load and 40 answers, however busy the machine (capped at 60 s).
    t0 = time.time()
    while time.time() - t0 < 60 and (time.time() - t0 < 3 or result.answers_acked < 40 or not result.undos_acked):
        time.sleep(0.05)
    result.stop = True
    runner.join()
    proc.terminate()
    proc.wait(timeout=10)
    assert added.returncode == 0 and "50 new" in added.stdout, added.stderr
    check = load.check_exactly_once(db, result)
    assert result.answers_acked >= 40 and result.undos_acked > 0 and result.unknown == 0
    assert check["missing"] == check["doubled"] == check["unexplained"] == check["changed"] == 0, check
    assert check["acknowledged"] == check["in_db"]
    assert len(Store(db).all_items()) == 650


def test_killing_the_server_mid_run_loses_no_acknowledged_answer(server):
    db, tokens, url, start = server
    proc = start()
    result = load.LoadResult()
    runner = threading.Thread(target=load.run_load, args=(url, tokens, 60.0),
                              kwargs={"undo_rate": 0.0, "result": result})
    runner.start()
    deadline = time.time() + 90  # however busy the machine
    while result.answers_acked < 30 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-request, no shutdown hooks, no clean close of the database
    proc.wait(timeout=10)
    time.sleep(0.5)
    result.stop = True
    runner.join()
    assert result.answers_acked >= 30 and result.unknown > 0  # it really was killed under load
    check = load.check_exactly_once(db, result)
    assert check["missing"] == 0 and check["doubled"] == 0 and check["changed"] == 0, check
    # An answer the server committed but could not acknowledge before dying may be stored; at
    # most one per annotator can have been in flight.
    assert check["unexplained"] <= len(tokens)

    # Restarted on the same database, it carries on where it stopped.
    start()
    name, token = sorted(tokens.items())[0]
    before = len([a for a in Store(db).answers() if a["annotator"] == name])
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
    assert client.get("/api/progress").json()["answered"] == before
    item = client.get("/api/next").json()["item"]
    assert client.post("/api/answer", json={"item_id": item["id"], "choice": "skip"}).status_code == 200
    assert client.get("/api/progress").json()["answered"] == before + 1
    assert "<strong>correctness</strong>" in client.get("/guidelines").text


def test_one_server_per_database_and_a_port_in_use_stops_before_serving(server, tmp_path):
    db, _, url, start = server
    first = start()
    port = int(url.rsplit(":", 1)[1])

    def serve(db_path, port):
        return subprocess.run([sys.executable, "-m", "heed.cli", "label", "serve", "--db", str(db_path),
                               "--port", str(port)], capture_output=True, text=True, timeout=60)

    second = serve(db, load.free_port())
    assert second.returncode == 2 and "is already being served" in second.stderr
    if "://" not in db:
        assert f"(pid {first.pid})" in second.stderr
    taken = serve(tmp_path / "other.db", port)
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    assert "serving" not in taken.stdout  # it never claimed to serve
    assert httpx.get(url + "/login").status_code == 200  # the first server is untouched
