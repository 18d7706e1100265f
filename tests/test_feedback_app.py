"""The web app through its HTTP interface: access, CSRF, escaping, limits, forms, admin, export, CLI."""

import html
import json
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from heed import cli
from heed.feedback.app import create_app
from heed.feedback.store import Store

EVIL = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture
def env(tmp_path, db_url):
    """The app over a store on SQLite, then on PostgreSQL (tests/conftest.py)."""
    Image.new("RGB", (4, 4), "red").save(tmp_path / "clip.png")
    store = Store(db_url)
    store.add_items([
        {"id": "evil", "prompt": "Say <b>hi</b>", "overlap": 2,
         "responses": [EVIL, "Fine.\n\n```\nif a < b:\n    x\n```"]},
        {"id": "rank", "prompt": "Rank", "kind": "ranking", "responses": ["x", "y", "z"]},
        {"id": "thumb", "prompt": "Thumb", "kind": "thumbs", "responses": ["t"]},
        {"id": "rate", "prompt": "Rate", "kind": "rating", "responses": ["r"]},
        {"id": "clip", "prompt": "Clip", "responses": [{"media": str(tmp_path / "clip.png")}, "text"]},
    ])
    tokens = {"admin": store.add_user("boss", admin=True), "ann": store.add_user("ann")}
    app = create_app(store, guidelines="# Rules\n\nBe **fair**. <script>alert(1)</script>", max_body=4096)
    yield store, app, tokens
    store.close()


BASE = "http://127.0.0.1"  # a Host the app answers to (it refuses others, see test_foreign_host...)


def client(app, **kwargs) -> TestClient:
    return TestClient(app, base_url=BASE, **kwargs)


def log_in(c: TestClient, token: str):
    page = c.get("/login").text
    nonce = re.search(r'name="nonce" value="([^"]+)"', page).group(1)
    return c.post("/login", data={"nonce": nonce, "token": token})


def client_for(app, token=None):
    """A browser: logged in through the form when given a token."""
    c = client(app, follow_redirects=False)
    if token:
        assert log_in(c, token).headers["location"] == "/"
    return c


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


def form_of(page: str) -> dict:
    """The hidden fields a labelling page's form sends back."""
    return {name: html.unescape(re.search(rf'name="{name}" value="([^"]+)"', page).group(1))
            for name in ("csrf", "item_id", "showing")}


def test_every_page_and_call_needs_a_valid_token(env):
    store, app, tokens = env
    # a cookie holds a session id, never the login token: not even a valid token works as one
    for token in (None, "not-a-token", tokens["ann"][:-2], tokens["ann"]):
        c = client(app, follow_redirects=False)
        if token:
            c.cookies.set("heed_session", token)
        for path in ("/", "/guidelines", "/admin", "/admin/export?kind=pairs", "/media/5/0"):
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/login", path
        for path in ("/api/next", "/api/progress", "/api/export"):
            assert c.get(path).status_code == 401
        for path in ("/answer", "/undo", "/logout"):
            r = c.post(path, data={"item_id": "evil", "choice": "A"})
            assert r.status_code == 303 and r.headers["location"] == "/login", path
        for path in ("/api/answer", "/api/undo"):
            assert c.post(path, json={"item_id": "evil", "choice": "A"}).status_code == 401
        if token != tokens["ann"]:
            bearer = client(app).get("/api/next", headers={"Authorization": f"Bearer {token}"})
            assert bearer.status_code == 401
    assert store.answers() == []
    assert client_for(app).get("/login").status_code == 200  # the login form itself is open


def test_login_form_sets_the_session_and_needs_its_nonce(env):
    store, app, tokens = env
    c = client_for(app)
    page = c.get("/login").text
    nonce = re.search(r'name="nonce" value="([^"]+)"', page).group(1)
    r = c.post("/login", data={"nonce": nonce, "token": "wrong"})
    assert r.headers["location"] == "/login?notice=badtoken" and "heed_session" not in c.cookies
    forged = client_for(app).post("/login", data={"nonce": "guess", "token": tokens["ann"]})
    c.cookies.set("heed_login", nonce)
    assert c.post("/login", data={"nonce": "ñ", "token": tokens["ann"]}).headers["location"] == "/login?notice=expired"
    assert forged.headers["location"] == "/login?notice=expired"  # no cookie to match: refused
    r = c.post("/login", data={"nonce": nonce, "token": tokens["ann"]})
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=lax" in r.headers["set-cookie"].lower()
    assert 'data-kind="pair"' in c.get("/").text
    assert c.get("/login").headers["location"] == "/"  # logged in already
    session = c.cookies["heed_session"]
    assert session != tokens["ann"] and store.session_user(session).name == "ann"


def test_model_output_is_escaped_and_no_inline_script_may_run(env):
    _, app, tokens = env
    r = client_for(app, tokens["ann"]).get("/")
    html = r.text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "<script>window" not in html and "<img src=x" not in html
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in html
    assert "if a &lt; b:\n    x</code></pre>" in html  # code block kept, newlines and indentation too
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    # the only script tag on the page is the app's own file
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']
    guide = client_for(app, tokens["ann"]).get("/guidelines").text
    assert "<strong>fair</strong>" in guide and "<script>alert" not in guide


def test_forged_form_posts_without_the_csrf_token_are_refused(env):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    page = c.get("/").text
    item_id = re.search(r'name="item_id" value="([^"]+)"', page).group(1)
    showing = form_of(page)["showing"]
    assert c.post("/answer", data={"item_id": item_id, "choice": "A"}).status_code == 403
    assert c.post("/answer", data={"item_id": item_id, "choice": "A", "csrf": "0" * 64}).status_code == 403
    other = client_for(app, tokens["admin"])
    other_csrf = csrf_of(other.get("/").text)  # a valid token, but for someone else's session
    assert c.post("/answer", data={"item_id": item_id, "choice": "A", "csrf": other_csrf}).status_code == 403
    assert c.post("/answer", data={"item_id": item_id, "choice": "A", "csrf": "é" * 64}).status_code == 403
    assert c.post("/undo", data={}).status_code == 403
    assert c.post("/logout", data={}).status_code == 403
    assert c.post("/api/answer", json={"item_id": item_id, "choice": "A"}).status_code == 403  # cookie, no header
    assert store.answers() == []
    r = c.post("/answer", data={"item_id": item_id, "choice": "A", "csrf": csrf_of(page), "showing": showing})
    assert r.status_code == 303 and len(store.answers()) == 1


def test_bodies_over_the_limit_are_refused(env):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    csrf = csrf_of(c.get("/").text)
    r = c.post("/answer", data={"item_id": "evil", "choice": "A", "csrf": csrf, "comment": "x" * 5000})
    assert r.status_code == 413
    chunks = (b"x" * 1024 for _ in range(10))  # no content-length: counted as it arrives
    r = client(app).post("/api/answer", content=chunks, headers={"Authorization": f"Bearer {tokens['ann']}"})
    assert r.status_code == 413
    assert store.answers() == []


def test_labelling_every_kind_through_the_forms(env):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    seen = []
    while 'id="answer-form"' in (page := c.get("/").text):
        kind = re.search(r'data-kind="(\w+)"', page).group(1)
        form = form_of(page)
        item_id = form["item_id"]
        if kind == "ranking":
            # duplicate ranks: the page comes back saying what is wrong, with the ranks kept
            bad = c.post("/answer", data={**form, "n": "3", "rank_0": "1", "rank_1": "1", "rank_2": "2",
                                          "comment": "kept"})
            assert bad.status_code == 422 and "rank 1 is given to A and B" in bad.text
            assert len(re.findall(r'<option value="1" selected>', bad.text)) == 2
            assert re.search(r'<option value="2" selected>', bad.text) and ">kept</textarea>" in bad.text
            missing = c.post("/answer", data={**form_of(bad.text), "n": "3", "rank_0": "1", "rank_2": "2"})
            assert missing.status_code == 422 and "B has none" in missing.text
            form = {**form_of(missing.text), "rank_0": "2", "rank_1": "3", "rank_2": "1",
                    "comment": "A <b>close</b> one"}
        elif kind == "thumbs":
            form.update(label="up")
        elif kind == "rating":
            form.update(score="6")
        elif item_id == "clip":
            assert re.search(r'<img class="media" src="/media/5/0"', page)
            form.update(choice="skip")
        else:
            form.update(choice="B")
        assert c.post("/answer", data=form).headers["location"] == "/"
        assert c.post("/answer", data=form).headers["location"] == "/?notice=stale"  # a double submit
        seen.append(item_id)
    assert seen == ["evil", "rank", "thumb", "rate", "clip"] and "Nothing left for you" in page
    by_item = {a["item_id"]: a for a in store.answers()}
    rank = by_item["rank"]
    assert (rank["ranking"] == [rank["displayed_order"][p] for p in (2, 0, 1)]
            and rank["comment"] == "A <b>close</b> one")
    assert by_item["thumb"]["label"] == "up" and by_item["rate"]["score"] == 6 and by_item["clip"]["choice"] == "skip"
    # undo brings the last item back
    r = c.post("/undo", data={"csrf": csrf_of(page)})
    assert r.headers["location"] == "/?notice=undone"
    assert 'name="item_id" value="clip"' in c.get("/").text and len(store.answers()) == 4


def test_media_is_served_only_for_items(env):
    _, app, tokens = env
    c = client_for(app, tokens["ann"])
    r = c.get("/media/5/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert c.get("/media/5/1").status_code == 404   # a text response
    assert c.get("/media/99/0").status_code == 404
    assert c.get("/media/5/..%2f..%2fetc%2fpasswd").status_code in (404, 422)


def test_animations_are_shown_as_looping_video(tmp_path):
    (tmp_path / "run.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # only the name and type matter here
    store = Store(tmp_path / "db.sqlite")
    store.add_items([{"id": "v", "prompt": "Which run?", "responses": [{"media": str(tmp_path / "run.mp4")}, "text"]}])
    token = store.add_user("ann")
    c = client_for(create_app(store), token)
    page = c.get("/").text
    assert re.search(r'<video class="media" src="/media/1/0" controls autoplay loop muted playsinline', page)
    assert c.get("/media/1/0").headers["content-type"] == "video/mp4"


def test_admin_page_and_export_are_for_admins(env):
    store, app, tokens = env
    ann = client(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    boss = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    for who in (ann, boss):
        item = who.get("/api/next").json()["item"]
        assert item["id"] == "evil" and EVIL in [r["text"] for r in item["responses"]]
        ok = who.post("/api/answer", json={"item_id": "evil", "choice": "tie", "comment": "<i>same</i>"})
        assert ok.status_code == 200 and ok.json()["answer"]["choice"] == "tie"
        assert who.post("/api/answer", json={"item_id": "evil", "choice": "tie"}).status_code == 409
    assert ann.get("/admin").status_code == 403 and ann.get("/api/export").status_code == 403
    page = boss.get("/admin")
    assert page.status_code == 200 and "Krippendorff" in page.text and "&lt;i&gt;same&lt;/i&gt;" in page.text
    rows = [json.loads(line) for line in boss.get("/admin/export?kind=pairs").text.splitlines()]
    assert rows[0]["tie"] is True and rows[0]["prompt"] == "Say <b>hi</b>" and len(rows) == 2
    assert len(boss.get("/api/export?kind=pairs&majority=true").text.splitlines()) == 1
    assert boss.get("/api/export?kind=nonsense").status_code == 400
    # JSON API: validation and undo
    assert ann.post("/api/answer", content=b"[1]").status_code == 400
    assert ann.post("/api/answer", json={"item_id": "rank", "ranking": [0, 1, 2]}).status_code == 409  # not shown yet
    assert ann.get("/api/next").json()["item"]["id"] == "rank"
    assert ann.post("/api/answer", json={"item_id": "rank", "ranking": [0, 1]}).status_code == 400
    assert ann.post("/api/undo").json() == {"undone": "evil"}
    assert ann.get("/api/next").json()["item"]["id"] == "evil"
    assert ann.get("/api/progress").json()["answered"] == 0


def test_cli_user_add_add_and_export(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    assert cli.main(["label", "user", "add", "--db", db, "--name", "ann", "--admin"]) == 0
    token = capsys.readouterr().out.strip()
    assert Store(db).authenticate(token).is_admin
    assert cli.main(["label", "user", "add", "--db", db, "--name", "ann"]) == 2
    queue = tmp_path / "queue.jsonl"
    queue.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                     + '{"prompt": "q", "responses": "ab"}\n')
    assert cli.main(["label", "add", "--db", db, "--queue", str(queue)]) == 2
    assert "queue.jsonl:2: field 'responses'" in capsys.readouterr().err
    assert cli.main(["label", "add", "--db", db, "--queue", str(queue), "--skip-invalid"]) == 0
    said = capsys.readouterr()
    assert f"skipped {queue}:2: field 'responses': expected a list" in said.err  # which row, and why
    assert "skipped 1 invalid row" in said.out
    assert cli.main(["label", "add", "--db", db, "--queue", str(queue), "--skip-invalid"]) == 0
    assert "1 items, 0 new" in capsys.readouterr().out
    store = Store(db)
    item, order = store.next_item("ann")
    store.submit("ann", item["id"], {"choice": "A"})
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["label", "export", "--db", db, "--out", str(out), "--kind", "pairs"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["chosen"] == ["a", "b"][order[0]] and row["prompt"] == "p"
    assert cli.main(["label", "export", "--db", str(tmp_path / "none.db"), "--out", str(out)]) == 2


def test_admin_shows_agreement_between_people_and_with_the_reward_model(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_items([{"id": f"i{k}", "prompt": f"p{k}", "responses": ["good", "bad"], "overlap": 2} for k in range(4)])
    store.set_scores({f"i{k}": (0.0, [1.0, -1.0]) for k in range(4)})  # the model prefers "good"
    admin = store.add_user("boss", admin=True)
    for who in ("ann", "bob"):
        for k in range(4):
            item, order = store.next_item(who)
            good_side = "A" if order[0] == 0 else "B"
            bad_side = "B" if good_side == "A" else "A"
            store.submit(who, item["id"], {"choice": good_side if (who == "ann" or k < 2) else bad_side})
    app = create_app(store, reward_model_name="rm-dir")
    page = client(app, headers={"Authorization": f"Bearer {admin}"}).get("/admin").text
    assert re.search(r'id="alpha-pair">-?0\.\d\d<', page)
    assert "ann · bob" in page
    assert 'id="rm-agreement">75%<' in page  # ann 4/4, bob 2/4


# --- sessions, logins, hosts -------------------------------------------------

def test_logout_and_a_new_token_end_the_session(env, tmp_path):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    old = c.cookies["heed_session"]
    page = c.get("/").text
    assert c.post("/logout", data={"csrf": csrf_of(page)}).headers["location"] == "/login?notice=loggedout"
    stolen = client(app, follow_redirects=False)
    stolen.cookies.set("heed_session", old)  # the cookie as it was before logging out
    assert stolen.get("/").headers["location"] == "/login" and store.session_user(old) is None
    # a new token ends every session of that annotator, on every browser
    first, second = client_for(app, tokens["ann"]), client_for(app, tokens["ann"])
    assert 'data-kind="pair"' in first.get("/").text
    assert cli.main(["label", "user", "add", "--db", env[0].engine.url.render_as_string(hide_password=False),
                     "--name", "ann", "--reset-token"]) == 0
    for browser in (first, second):
        assert browser.get("/").headers["location"] == "/login"
    assert client(app).get("/api/next", headers={"Authorization": f"Bearer {tokens['ann']}"}).status_code == 401


def test_the_tenth_failed_login_in_a_minute_is_refused_and_logged(env, caplog):
    _, app, tokens = env
    c = client_for(app)
    with caplog.at_level("WARNING", logger="heed.feedback"):
        for _ in range(9):
            assert log_in(c, "guess").headers["location"] == "/login?notice=badtoken"
        refused = log_in(c, tokens["ann"])  # even the right token, from this client, for now
    assert refused.status_code == 429 and "Too many failed logins" in refused.text
    assert "heed_session" not in c.cookies
    assert sum("failed login from testclient" in r.message for r in caplog.records) == 9
    assert any("refused a login attempt from testclient" in r.message for r in caplog.records)
    bearer = client(app).get("/api/next", headers={"Authorization": f"Bearer {tokens['ann']}"})
    assert bearer.status_code == 429  # the same client guessing through the API is refused too


def test_a_request_with_a_foreign_host_header_is_refused(env):
    _, app, tokens = env
    c = TestClient(app, base_url="http://attacker.example:8000", follow_redirects=False)
    for path in ("/login", "/", "/api/next"):
        r = c.get(path, headers={"Authorization": f"Bearer {tokens['admin']}"})
        assert r.status_code == 400 and "unknown Host 'attacker.example'" in r.json()["error"]
    for ok in ("http://localhost:8000", "http://127.0.0.1", "http://[::1]:8000"):
        assert TestClient(app, base_url=ok).get("/login").status_code == 200
    named = create_app(env[0], allowed_hosts=["labels.example.org"])
    assert TestClient(named, base_url="https://labels.example.org").get("/login").status_code == 200


# --- no answer nobody gave ----------------------------------------------------

def test_an_answer_from_an_earlier_showing_is_refused_and_fast_ones_are_flagged(env):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    first = form_of(c.get("/").text)
    again = form_of(c.get("/").text)  # the same item shown again (a reload, or Back)
    assert first["item_id"] == again["item_id"] and first["showing"] != again["showing"]
    stale = c.post("/answer", data={**first, "choice": "A"})
    assert stale.headers["location"] == "/?notice=stale" and store.answers() == []
    assert c.post("/answer", data={**{k: v for k, v in again.items() if k != "showing"}, "choice": "A"}
                  ).headers["location"] == "/?notice=stale"  # a form without a showing is refused
    assert c.post("/answer", data={**again, "choice": "A"}).headers["location"] == "/"
    (answer,) = store.answers()
    assert answer["flag"] == "fast" and answer["answered_in"] < 1.0  # no person reads two answers that fast
    boss = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    admin = boss.get("/admin").text
    assert re.search(r'<td>ann</td>.*?<td class="num warn">1</td>', admin, re.S)
    item = boss.get("/admin/items/1").text
    assert "too fast" in item and "<td>ann</td>" in item and re.search(r"response [12] is better", item)
    # through the API: an answer naming a showing must name the current one
    bearer = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    shown = bearer.get("/api/next").json()["item"]
    bearer.get("/api/next")
    r = bearer.post("/api/answer", json={"item_id": shown["id"], "choice": "B", "showing": shown["showing"]})
    assert r.status_code == 409 and "out of date" in r.json()["error"]


def test_invisible_and_bidi_characters_are_shown_as_marks(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    text = "pay \u202eadmin\u202c now\u200bplease " + "x" * 20_000
    store.add_items([{"id": "odd", "prompt": "Which?", "responses": [text, "plain"]}])
    c = client_for(create_app(store), store.add_user("ann"))
    page = c.get("/").text
    assert "\u202e" not in page and "\u200b" not in page  # nothing invisible reaches the screen as such
    assert '<span class="cf" title="U+202E RIGHT-TO-LEFT OVERRIDE">U+202E</span>' in page
    assert '<span class="cf" title="U+200B ZERO WIDTH SPACE">U+200B</span>' in page
    assert "20,023 characters · 4 words" in page  # each response says how long it is


def test_admin_says_when_agreement_rests_on_few_items(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_items([{"id": f"i{k}", "prompt": f"p{k}", "responses": ["a", "b"], "overlap": 2} for k in range(3)])
    admin = store.add_user("boss", admin=True)
    for who in ("ann", "bob"):
        store.add_user(who)
        for _ in range(3):
            item, _ = store.next_item(who)
            store.submit(who, item["id"], {"choice": "A"})
    page = client(create_app(store), headers={"Authorization": f"Bearer {admin}"}).get("/admin").text
    assert 'id="few-pair"' in page and "means little" in page and "(few items)" in page
    assert "3 items need 2 answers" in page
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT[\d:.]+Z">', page)  # shown in local time by the script
    items = client(create_app(store), headers={"Authorization": f"Bearer {admin}"}).get("/admin/items").text
    assert items.count('href="/admin/items/') == 3


def test_heed_label_help_lists_its_commands_and_exits_0(capsys):
    assert cli.main(["label", "--help"]) == 0
    out = capsys.readouterr().out
    assert "label serve" in out and "label export" in out and "ppo" not in out
    assert cli.main(["label", "nonsense"]) == 2
