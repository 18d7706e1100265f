"""The web app through its HTTP interface: access, CSRF, escaping, limits, forms, admin, export, CLI."""

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
def env(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "clip.png")
    store = Store(tmp_path / "labels.db")
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


def client_for(app, token=None):
    client = TestClient(app, follow_redirects=False)
    if token:
        client.cookies.set("heed_session", token)
    return client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


def test_every_page_and_call_needs_a_valid_token(env):
    store, app, tokens = env
    for token in (None, "not-a-token", tokens["ann"][:-2]):
        c = client_for(app, token)
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
        bearer = TestClient(app).get("/api/next", headers={"Authorization": f"Bearer {token}"})
        assert bearer.status_code == 401
    assert store.answers() == []
    assert client_for(app).get("/login").status_code == 200  # the login form itself is open


def test_login_form_sets_the_session_and_needs_its_nonce(env):
    _, app, tokens = env
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
    r = c.post("/answer", data={"item_id": item_id, "choice": "A", "csrf": csrf_of(page)})
    assert r.status_code == 303 and len(store.answers()) == 1


def test_bodies_over_the_limit_are_refused(env):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    csrf = csrf_of(c.get("/").text)
    r = c.post("/answer", data={"item_id": "evil", "choice": "A", "csrf": csrf, "comment": "x" * 5000})
    assert r.status_code == 413
    chunks = (b"x" * 1024 for _ in range(10))  # no content-length: counted as it arrives
    r = TestClient(app).post("/api/answer", content=chunks, headers={"Authorization": f"Bearer {tokens['ann']}"})
    assert r.status_code == 413
    assert store.answers() == []


def test_labelling_every_kind_through_the_forms(env):
    store, app, tokens = env
    c = client_for(app, tokens["ann"])
    seen = []
    while 'id="answer-form"' in (page := c.get("/").text):
        kind = re.search(r'data-kind="(\w+)"', page).group(1)
        item_id = re.search(r'name="item_id" value="([^"]+)"', page).group(1)
        form = {"item_id": item_id, "csrf": csrf_of(page)}
        if kind == "ranking":
            bad = c.post("/answer", data={**form, "rank_0": "1", "rank_1": "1", "rank_2": "2"})
            assert bad.headers["location"] == "/?notice=incomplete"
            form.update(rank_0="2", rank_1="3", rank_2="1", comment="A <b>close</b> one")
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
    ann = TestClient(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    boss = TestClient(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
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
    page = TestClient(app, headers={"Authorization": f"Bearer {admin}"}).get("/admin").text
    assert re.search(r'id="alpha-pair">-?0\.\d\d<', page)
    assert "ann · bob" in page
    assert 'id="rm-agreement">75%<' in page  # ann 4/4, bob 2/4
