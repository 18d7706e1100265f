"""Spans items in the labelling app, without a browser: the queue and its labels, the form and
API paths, what is refused (and that nothing is stored then), the admin view, and the export
read back by `heed.data` with offsets that survive astral characters, hidden characters,
carriage returns and newlines. The browser path is in test_feedback_e2e.py."""

import json
import re

import pytest
from test_feedback_app import client, client_for, form_of

from heed import cli
from heed.data import FieldError, read_feedback
from heed.feedback import cli as label_cli
from heed.feedback.app import create_app, visible
from heed.feedback.store import DEFAULT_SPAN_LABELS, Store, parse_item

# An emoji (2 UTF-16 units, 1 code point), a zero-width space, a CRLF and a newline, all before
# the words marked, so any offset counted in other units than Python's would be off.
RESPONSE = "The mill 🏭 was\u200b built in 1850.\r\nIt grinds rubber, not grain.\nThanks for asking!"
LABELS = ["wrong", "irrelevant", "rude", "good"]


def at(part: str) -> tuple[int, int]:
    """`part`'s offsets in RESPONSE, as Python counts them."""
    start = RESPONSE.index(part)
    assert RESPONSE.count(part) == 1
    return start, start + len(part)


@pytest.fixture
def spans_env(tmp_path, db_url):
    store = Store(db_url)
    store.add_items([{"id": "marks", "kind": "spans", "prompt": "Tell me about the <mill>.",
                      "responses": [RESPONSE], "labels": LABELS, "overlap": 2}])
    tokens = {"admin": store.add_user("boss", admin=True), "ann": store.add_user("ann")}
    yield store, create_app(store), tokens
    store.close()


def notice(page: str) -> str:
    import html
    return html.unescape(re.search(r'<p class="notice" role="status">(.*?)</p>', page, re.S).group(1))


def test_the_queue_gives_spans_items_their_labels(tmp_path, capsys):
    db = str(tmp_path / "q.db")
    queue = tmp_path / "queue.jsonl"
    queue.write_text("\n".join(json.dumps(row) for row in [
        {"kind": "spans", "prompt": "p1", "responses": ["r1"]},
        {"kind": "spans", "prompt": "p2", "responses": ["r2"], "labels": ["ok", "off topic"]},
        {"kind": "thumbs", "prompt": "p3", "responses": ["r3"]}]) + "\n")
    assert cli.main(["label", "add", "--db", db, "--queue", str(queue), "--labels", "wrong,rude, good"]) == 0
    assert "3 items, 3 new" in capsys.readouterr().out
    items = {item["prompt"]: item for item in Store(db).all_items()}
    assert items["p1"]["labels"] == ["wrong", "rude", "good"]           # --labels
    assert items["p2"]["labels"] == ["ok", "off topic"]                 # the row's own
    assert items["p3"]["labels"] is None                                # other kinds have none
    # without --labels: the default set, which is the simulated labeler's
    assert cli.main(["label", "add", "--db", str(tmp_path / "d.db"), "--queue", str(queue)]) == 0
    assert Store(tmp_path / "d.db").all_items()[0]["labels"] == list(DEFAULT_SPAN_LABELS)
    from heed.world.oracle import SPAN_LABELS
    assert DEFAULT_SPAN_LABELS == SPAN_LABELS
    assert ",".join(DEFAULT_SPAN_LABELS) in label_cli.LABELS_HELP  # what --help says is what it does
    # a bad label set is refused before anything is added, saying why
    for bad, why in (("a,a", "each label once"), (",".join("abcdefghij"), "1 to 9 labels")):
        assert cli.main(["label", "add", "--db", str(tmp_path / "e.db"), "--queue", str(queue), "--labels", bad]) == 2
        assert "--labels: " in (err := capsys.readouterr().err) and why in err


def test_spans_items_are_validated_like_every_item():
    ok = parse_item({"kind": "spans", "prompt": "p", "responses": ["r"]})
    assert ok["labels"] == list(DEFAULT_SPAN_LABELS)
    for row, field in (({"kind": "spans", "prompt": "p", "responses": ["a", "b"]}, "responses"),
                       ({"kind": "spans", "prompt": "p", "responses": [{"media": "a.png"}]}, "responses[0]"),
                       ({"kind": "spans", "prompt": "p", "responses": ["r"], "labels": "wrong,good"}, "labels"),
                       ({"kind": "spans", "prompt": "p", "responses": ["r"], "labels": ["a,b"]}, "labels"),
                       ({"kind": "spans", "prompt": "p", "responses": ["r"], "labels": [" pad"]}, "labels"),
                       ({"kind": "spans", "prompt": "p", "responses": ["r"], "labels": []}, "labels"),
                       ({"kind": "thumbs", "prompt": "p", "responses": ["r"], "labels": ["a"]}, "labels")):
        with pytest.raises(FieldError) as e:
            parse_item(row)
        assert e.value.field == field, row
    # other kinds' content-addressed ids are as they were before spans existed
    import hashlib
    thumb = parse_item({"kind": "thumbs", "prompt": "p", "responses": ["r"]})
    body = json.dumps(["thumbs", "p", ["r"]], sort_keys=True, ensure_ascii=False)
    assert thumb["id"] == "h" + hashlib.sha256(body.encode()).hexdigest()[:20]
    # a spans item's labels are part of it: the same text under other labels is another item
    assert parse_item({"kind": "spans", "prompt": "p", "responses": ["r"], "labels": ["x"]})["id"] != ok["id"]


def test_the_page_keeps_offsets_into_the_original_text():
    """Each piece of the response says where it starts, in code points; marks stand for one."""
    page = str(visible(RESPONSE, offsets=True))
    assert "<b>" not in visible("<b>x</b>", offsets=True) and "&lt;b&gt;" in visible("<b>x</b>", offsets=True)
    rebuilt = ""
    for m in re.finditer(r'<span (?:class="cf" )?data-at="(\d+)"(?: data-cp="([0-9A-F]+)")?[^>]*>(.*?)</span>',
                         page, re.S):
        assert int(m[1]) == len(rebuilt)
        rebuilt += chr(int(m[2], 16)) if m[2] else m[3]
    assert rebuilt == RESPONSE  # a CR, hidden in HTML text (CRLF is parsed as one newline), is a mark too
    assert 'data-cp="D"' in page and 'data-cp="200B"' in page


def test_spans_through_the_form_and_the_export(spans_env, tmp_path):
    store, app, tokens = spans_env
    c = client_for(app, tokens["ann"])
    page = c.get("/").text
    assert 'data-kind="spans"' in page and 'data-chars="%d"' % len(RESPONSE) in page
    assert "Tell me about the &lt;mill&gt;." in page and "<mill>" not in page
    assert all(f'data-label="{label}"' in page for label in LABELS)
    assert "<kbd>Shift</kbd>" in page  # the keys are on the page
    wrong, good = at("1850"), at("Thanks for asking!")
    lines = f"{good[0]}-{good[1]} good\r\n\r\n{wrong[0]} - {wrong[1]}  wrong\r\n"  # any order, blank lines, CRLF
    correction = "The mill 🏭 was built in 1905.\r\nIt grinds grain."
    r = c.post("/answer", data={**form_of(page), "spans": lines, "correction": correction, "comment": "ok"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    (answer,) = store.answers()
    assert answer["spans"] == [{"start": wrong[0], "end": wrong[1], "label": "wrong"},
                               {"start": good[0], "end": good[1], "label": "good"}]
    assert answer["correction"] == correction.replace("\r\n", "\n")  # a textarea's CRLF, as typed
    assert answer["annotator"] == "ann" and answer["answered_in"] >= 0 and answer["flag"] == "fast"

    out = tmp_path / "spans.jsonl"
    db = store.engine.url.render_as_string(hide_password=False)
    assert cli.main(["label", "export", "--db", db, "--out", str(out), "--kind", "spans"]) == 0
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row == {"prompt": "Tell me about the <mill>.", "response": RESPONSE, "spans": answer["spans"],
                   "correction": correction.replace("\r\n", "\n")}
    feedback = read_feedback(out)
    assert feedback.format == "spans"
    (marked,) = feedback.rows
    assert [(s.start, s.end, s.label) for s in marked.spans] == [(*wrong, "wrong"), (*good, "good")]
    assert [marked.response[s.start:s.end] for s in marked.spans] == ["1850", "Thanks for asking!"]
    # the same file from the admin page; a majority of spans is refused, not made up
    boss = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    assert [json.loads(x) for x in boss.get("/admin/export?kind=spans").text.splitlines()] == [row]
    refused = boss.get("/api/export?kind=spans&majority=true")
    assert refused.status_code == 400 and "majority is not defined for spans" in refused.json()["error"]
    assert cli.main(["label", "export", "--db", db, "--out", str(out), "--kind", "spans", "--majority"]) == 2


def test_bad_spans_are_refused_saying_why_and_nothing_is_stored(spans_env):
    store, app, tokens = spans_env
    c = client_for(app, tokens["ann"])
    page = c.get("/").text
    n = len(RESPONSE)
    for lines, said in (("0-3 wrong\n2-5 rude", "spans overlap: [0, 3) 'wrong' and [2, 5) 'rude'"),
                        (f"10-{n + 1} wrong", f"is not a non-empty range inside the response's {n} characters"),
                        ("5-5 wrong", "[5, 5) is not a non-empty range"),
                        ("7-3 wrong", "[7, 3) is not a non-empty range"),
                        ("0-3 nasty", "'nasty' is not one of this item's labels (wrong, irrelevant, rude, good)"),
                        ("0-3", "line 1 ('0-3'): write START-END LABEL"),
                        ("0-3 wrong\n1.5-3 wrong", "line 2 ('1.5-3 wrong')"),
                        ("-1-3 wrong", "line 1"),
                        ("", "Mark at least one span or write a correction")):
        r = c.post("/answer", data={**form_of(page), "spans": lines, "correction": "", "comment": "kept"})
        assert r.status_code == 422, lines
        assert said in notice(r.text), (lines, notice(r.text))
        assert ">\n" + lines.replace("'", "&#39;") + "</textarea>" in r.text and ">kept</textarea>" in r.text
        page = r.text
    # the response itself, unchanged (its CRLF as a textarea posts it), is no correction
    r = c.post("/answer", data={**form_of(page), "spans": "", "correction": RESPONSE})
    assert r.status_code == 422 and "Mark at least one span" in notice(r.text)
    assert store.answers() == []

    # the JSON API: the same checks, and non-integer offsets too
    api = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    item = api.get("/api/next").json()["item"]
    assert item["kind"] == "spans" and item["labels"] == LABELS and item["responses"][0]["text"] == RESPONSE
    for spans, said in (([{"start": "0", "end": 3, "label": "wrong"}], "spans[0].start: expected an integer"),
                        ([{"start": 0, "end": 2.5, "label": "wrong"}], "spans[0].end: expected an integer"),
                        ([{"start": True, "end": 3, "label": "wrong"}], "spans[0].start: expected an integer"),
                        ([{"start": 0, "end": 3}], "spans[0].label"),
                        ([{"start": 0, "end": 3, "label": "Wrong"}], "is not one of this item's labels"),
                        ([{"start": 0, "end": 3, "label": "wrong"}, {"start": 1, "end": 4, "label": "good"}],
                         "spans overlap"),
                        ([{"start": 0, "end": n + 1, "label": "wrong"}], "not a non-empty range"),
                        ("0-3 wrong", "spans: expected a list"),
                        ([], "Mark at least one span")):
        r = api.post("/api/answer", json={"item_id": item["id"], "showing": item["showing"], "spans": spans})
        assert r.status_code == 400 and said in r.json()["error"], (spans, r.json())
    r = api.post("/api/answer", json={"item_id": item["id"], "showing": item["showing"], "spans": [],
                                      "correction": 5})
    assert r.status_code == 400 and "correction: expected a string" in r.json()["error"]
    assert [a for a in store.answers() if a["annotator"] == "boss"] == []


def test_a_stale_showing_is_refused_and_skips_and_undo_work(spans_env):
    store, app, tokens = spans_env
    c = client_for(app, tokens["ann"])
    first = form_of(c.get("/").text)
    again = form_of(c.get("/").text)  # shown again: the first page is out of date
    stale = c.post("/answer", data={**first, "spans": "0-3 wrong"})
    assert stale.headers["location"] == "/?notice=stale" and store.answers() == []
    api = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    shown = api.get("/api/next").json()["item"]
    api.get("/api/next")
    r = api.post("/api/answer", json={"item_id": shown["id"], "showing": shown["showing"],
                                      "spans": [{"start": 0, "end": 3, "label": "wrong"}]})
    assert r.status_code == 409 and "out of date" in r.json()["error"] and store.answers() == []
    # a skip needs no spans; undo brings the item back
    assert c.post("/answer", data={**again, "choice": "skip", "spans": ""}).headers["location"] == "/"
    (skip,) = store.answers()
    assert skip["choice"] == "skip" and skip["spans"] is None and skip["correction"] is None
    assert c.post("/undo", data={"csrf": again["csrf"]}).headers["location"] == "/?notice=undone"
    assert store.answers() == []


def test_the_admin_sees_what_was_marked(spans_env):
    store, app, tokens = spans_env
    api = client(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    item = api.get("/api/next").json()["item"]
    spans = [{"start": 0, "end": 3, "label": "rude"}, {"start": at("1850")[0], "end": at("1850")[1],
                                                      "label": "wrong"}]
    r = api.post("/api/answer", json={"item_id": item["id"], "showing": item["showing"], "spans": spans,
                                      "correction": "<i>fixed</i>"})
    assert r.status_code == 200 and r.json()["answer"]["spans"] == spans
    boss = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    page = boss.get("/admin/items/1").text
    assert '<mark class="tagged last l3" data-label="rude">The</mark>' in page
    assert '<mark class="tagged last l1" data-label="wrong">1850</mark>' in page
    assert "2 spans (rude 1, wrong 1); corrected" in page and "&lt;i&gt;fixed&lt;/i&gt;" in page
    assert "<li>0-3 rude</li>" in page and re.search(r"Agreement between annotators is not\s+measured", page)
    admin = boss.get("/admin").text
    assert 'id="spans-agreement"' in admin and 'id="export-spans"' in admin


def test_an_older_database_gets_the_spans_columns(tmp_path):
    path = tmp_path / "old.db"
    Store(path).close()
    import sqlite3
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE items DROP COLUMN labels")
        conn.execute("ALTER TABLE answers DROP COLUMN spans")
        conn.execute("ALTER TABLE answers DROP COLUMN correction")
    store = Store(path)
    store.add_items([{"id": "s", "kind": "spans", "prompt": "p", "responses": ["abc"]}])
    item, _ = store.next_item("ann")
    store.submit("ann", "s", {"spans": [{"start": 0, "end": 1, "label": "good"}]})
    assert store.answers()[0]["spans"] == [{"start": 0, "end": 1, "label": "good"}]
    store.close()
