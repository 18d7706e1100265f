"""The feedback database: validation, serving order, overlap, claims, undo, persistence, concurrency."""

import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text

from heed.feedback.store import AnswerError, Store
from heed.utils import HeedError

ANSWER_KEYS = {"item_id", "annotator", "kind", "choice", "ranking", "label", "score", "spans", "correction", "comment",
               "displayed_order", "created_at", "answered_in", "flag"}


@pytest.fixture
def store(db_url):
    """Every store test runs on SQLite and on a real PostgreSQL (tests/conftest.py)."""
    s = Store(db_url)
    yield s
    s.close()


def pairs(n, overlap=1):
    return [{"id": f"i{k}", "prompt": f"prompt {k}", "responses": [f"a{k}", f"b{k}"], "overlap": overlap}
            for k in range(n)]


def test_add_items_validates_with_the_item_and_field(store, tmp_path):
    bad = [({"prompt": "p", "responses": ["a"]}, "responses"),
           ({"prompt": "p", "responses": ["a", "b"], "kind": "duel"}, "kind"),
           ({"responses": ["a", "b"]}, "prompt"),
           ({"prompt": "p", "responses": ["a", 3]}, "responses[1]"),
           ({"prompt": "p", "responses": ["a", "b"], "overlap": 0}, "overlap"),
           ({"prompt": "p", "responses": ["a", {"media": str(tmp_path / "missing.gif")}]}, "responses[1].media"),
           ({"prompt": "p", "responses": ["a", {"media": str(tmp_path / "x.exe")}]}, "responses[1].media"),
           ({"prompt": "p", "kind": "thumbs", "responses": ["a", "b"]}, "responses")]
    for row, field in bad:
        with pytest.raises(HeedError, match="item 1 field '" + re.escape(field) + "'"):
            store.add_items([{"prompt": "fine", "responses": ["x", "y"]}, row])
    assert store.all_items() == []  # a bad batch adds nothing


def test_add_items_is_idempotent_and_ids_are_stable(store):
    ids = store.add_items([{"prompt": "p", "responses": ["a", "b"]},
                           {"id": "mine", "prompt": "q", "responses": ["c", "d"]}])
    assert ids[1] == "mine" and ids[0].startswith("h")
    assert store.add_items([{"prompt": "p", "responses": ["a", "b"]}]) == ids[:1]
    assert len(store.all_items()) == 2
    with pytest.raises(HeedError, match="different content"):
        store.add_items([{"id": "mine", "prompt": "changed", "responses": ["c", "d"]}])


def test_media_items(store, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "b.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (item_id,) = store.add_items([{"prompt": "which clip?", "responses": [{"media": str(tmp_path / "a.png")},
                                                                          {"media": str(tmp_path / "b.gif")}]}])
    item = store.get_item(item_id)
    assert item["responses"][1] == {"media": str((tmp_path / "b.gif").resolve())}


def test_answers_are_stored_in_original_order(store):
    store.add_items(pairs(40))
    store.add_user("ann")
    flipped = kept = 0
    for _ in range(40):
        item, order = store.next_item("ann")
        assert store.next_item("ann") == (item, order)  # a reload shows the same sides
        stored = store.submit("ann", item["id"], {"choice": "A"})
        assert stored["choice"] == str(order[0])  # "A" is whatever was shown on the left
        flipped += order == [1, 0]
        kept += order == [0, 1]
    assert flipped > 5 and kept > 5  # sides are randomised
    answers = store.answers()
    assert len(answers) == 40 and set(answers[0]) == ANSWER_KEYS
    assert all(a["displayed_order"][0] == int(a["choice"]) for a in answers)
    assert store.next_item("ann") is None


def test_every_kind_and_its_validation(store):
    store.add_items([{"id": "k", "prompt": "p", "kind": "ranking", "responses": ["x", "y", "z"]},
                     {"id": "t", "prompt": "p", "kind": "thumbs", "responses": ["x"]},
                     {"id": "r", "prompt": "p", "kind": "rating", "responses": ["x"]}])
    item, order = store.next_item("ann")
    for bad in ({"ranking": [0, 0, 1]}, {"ranking": [0, 1]}, {"ranking": "012"}, {}):
        with pytest.raises(AnswerError) as e:
            store.submit("ann", "k", bad)
        assert e.value.status == 400
    stored = store.submit("ann", "k", {"ranking": [2, 0, 1], "comment": "  close call  "})
    assert stored["ranking"] == [order[2], order[0], order[1]] and stored["comment"] == "close call"
    store.next_item("ann")
    with pytest.raises(AnswerError):
        store.submit("ann", "t", {"label": "meh"})
    store.submit("ann", "t", {"label": "down"})
    store.next_item("ann")
    for bad in ({"score": 0}, {"score": 8}, {"score": "5"}, {"score": 5, "comment": "x" * 5000}):
        with pytest.raises(AnswerError):
            store.submit("ann", "r", bad)
    store.submit("ann", "r", {"score": 7})
    got = {a["item_id"]: a for a in store.answers()}
    assert got["t"]["label"] == "down" and got["r"]["score"] == 7 and got["t"]["choice"] is None


def test_overlap_and_never_the_same_item_twice(store):
    store.add_items(pairs(3, overlap=2))
    seen = {}
    for who in ("ann", "bob", "cat"):
        seen[who] = []
        while (nxt := store.next_item(who)) is not None:
            seen[who].append(nxt[0]["id"])
            store.submit(who, nxt[0]["id"], {"choice": "B"})
    assert seen["ann"] == seen["bob"] == ["i0", "i1", "i2"]  # queue order
    assert seen["cat"] == []  # two answers each were enough
    with pytest.raises(AnswerError) as e:
        store.submit("ann", "i0", {"choice": "A"})
    assert e.value.status == 409
    assert len(store.answers()) == 6


def test_skips_do_not_count_toward_overlap(store):
    store.add_items(pairs(1))
    item, _ = store.next_item("ann")
    store.submit("ann", item["id"], {"choice": "skip"})
    assert store.next_item("ann") is None  # never shown again to who skipped it
    assert store.next_item("bob")[0]["id"] == item["id"]  # but still wanted


def test_claims_hold_an_item_until_they_expire(tmp_path):
    store = Store(tmp_path / "db.sqlite", claim_seconds=1.0)
    store.add_items(pairs(1))
    assert store.next_item("ann") is not None
    assert store.next_item("bob") is None  # ann is looking at the only slot
    time.sleep(1.05)
    assert store.next_item("bob") is not None  # ann walked away
    store.close()


def test_undo_withdraws_the_last_answer_and_shows_the_item_again(store):
    store.add_items(pairs(3))
    first, order = store.next_item("ann")
    store.submit("ann", first["id"], {"choice": "tie"})
    second, _ = store.next_item("ann")
    assert store.undo("ann") == first["id"]
    assert store.answers() == []
    assert store.next_item("ann") == (store.get_item(first["id"]), order)  # same sides
    store.submit("ann", first["id"], {"choice": "B"})
    assert [a["choice"] for a in store.answers()] == [str(order[1])]
    assert store.undo("bob") is None


def test_restart_loses_nothing_and_uses_wal(tmp_path):
    path = tmp_path / "db.sqlite"
    store = Store(path)
    store.add_items(pairs(5))
    token = store.add_user("ann", admin=True)
    for _ in range(3):
        item, _ = store.next_item("ann")
        store.submit("ann", item["id"], {"choice": "A", "comment": "ok"})
    store.close()
    again = Store(path)
    assert len(again.answers()) == 3
    assert again.authenticate(token).is_admin
    assert again.progress("ann") == {"answered": 3, "skipped": 0, "left": 2, "total": 5, "complete": 3}
    with again.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    again.close()


def test_tokens(store):
    token = store.add_user("ann")
    assert store.authenticate(token).name == "ann"
    for bad in (None, "", token[:-1], token + "x", "x" * 1000):
        assert store.authenticate(bad) is None
    with pytest.raises(HeedError, match="already exists"):
        store.add_user("ann")
    new = store.add_user("ann", reset=True)
    assert store.authenticate(token) is None and store.authenticate(new).name == "ann"
    with pytest.raises(HeedError, match="annotator name"):
        store.add_user("bad name")
    if store.is_sqlite:
        assert new.encode() not in Path(store.engine.url.database).read_bytes()  # only its hash is stored


@pytest.mark.parametrize("overlap", [1, 3])
def test_concurrent_annotators_answer_each_item_exactly_once(store, overlap):
    store.add_items(pairs(120 // overlap, overlap=overlap))
    acked, errors = [], []

    def work(who):
        try:
            while (nxt := store.next_item(who)) is not None:
                acked.append((nxt[0]["id"], who, store.submit(who, nxt[0]["id"], {"choice": "A"})["choice"]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"w{k}",)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stored = [(a["item_id"], a["annotator"], a["choice"]) for a in store.answers()]
    assert sorted(stored) == sorted(acked)
    # each item exactly `overlap` times, by different people: claims never overshoot it
    assert sorted(a[0] for a in stored) == sorted(f"i{k}" for k in range(120 // overlap) for _ in range(overlap))
    assert len(set(stored)) == len(stored)


def test_active_selection_serves_the_most_disagreed_items_first(store):
    from heed.feedback.active import Scorer, score_pending

    class FakeEnsemble:
        """Members disagree on responses containing 'unsure', in proportion to its count."""

        def score(self, prompts, responses):
            return [0.0] * len(responses), [float(r.count("unsure")) for r in responses]

    store.add_items([{"id": "calm", "prompt": "p", "responses": ["a", "b"]},
                     {"id": "wild", "prompt": "p", "responses": ["unsure unsure", "b"]},
                     {"id": "mild", "prompt": "p", "responses": ["unsure", "b"]}])
    assert score_pending(store, FakeEnsemble()) == 3 and score_pending(store, FakeEnsemble()) == 0
    served = []
    while (nxt := store.next_item("ann")) is not None:
        served.append(nxt[0]["id"])
        store.submit("ann", nxt[0]["id"], {"choice": "A"})
    assert served == ["wild", "mild", "calm"]
    # items added while the server runs are scored in the background
    scorer = Scorer(store, FakeEnsemble(), interval=0.05)
    scorer.start()
    store.add_items([{"id": "late", "prompt": "p", "responses": ["unsure", "b"]}])
    deadline = time.time() + 5
    while store.get_item("late")["rm_scores"] is None and time.time() < deadline:
        time.sleep(0.05)
    scorer.stopped.set()
    scorer.join()
    assert store.get_item("late")["priority"] > 0 and scorer.error is None


def test_the_schema_and_queries_compile_for_postgresql():
    """The DDL and the per-request statements as PostgreSQL gets them (the tests above also run
    them on a real server)."""
    from sqlalchemy import create_mock_engine
    from sqlalchemy.dialects import postgresql

    from heed.feedback import store as st

    ddl = []
    engine = create_mock_engine("postgresql+psycopg://",
                                lambda sql, *a, **k: ddl.append(str(sql.compile(dialect=engine.dialect))))
    st.metadata.create_all(engine, checkfirst=False)
    assert any("CREATE INDEX ix_items_open" in d and "WHERE done < overlap" in d for d in ddl)
    for stmt in (st._NEXT, st._CLAIM, st._USER, st._COUNT_DONE, st._ANSWERED, st._STILL_OPEN):
        assert "%(" in str(stmt.compile(dialect=postgresql.dialect()))
    assert str(st._NEXT.compile(dialect=postgresql.dialect())).endswith("FOR UPDATE OF items SKIP LOCKED")
