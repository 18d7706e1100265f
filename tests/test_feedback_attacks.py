"""The labelling app under attack: a scripted list of what a hostile annotator, a hostile
model output or a hostile web page would try, each checked against the real app (SQLite and
PostgreSQL, through the `env` fixture of test_feedback_app.py)."""

import json
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from test_feedback_app import client, client_for, env, form_of, log_in  # noqa: F401  (env is a fixture)

from heed.feedback.app import create_app
from heed.feedback.store import Store

PAYLOADS = ['<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "<svg onload=alert(1)>",
            "javascript:alert(1)", "<iframe src=//evil.example></iframe>", "{{ 7*7 }}{% raw %}",
            "' OR '1'='1'; DROP TABLE answers; --", "\\x00\\u202e\u202e\u200b"]
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


class Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.seen.append((tag, dict(attrs)))


def assert_hardened(response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp, csp


@pytest.fixture
def hostile(tmp_path, db_url):
    """An app whose every text field carries an attack: prompts, responses, ids, guidelines."""
    store = Store(db_url)
    store.add_items([{"id": f"evil{k}-" + "".join(ch for ch in p[:12] if ch.isprintable()),
                      "prompt": f"Prompt {p}", "responses": [p, f"plain {k}"], "overlap": 2, "meta": {"note": p}}
                     for k, p in enumerate(PAYLOADS)])
    tokens = {"admin": store.add_user("boss", admin=True), "ann": store.add_user("ann")}
    guide = "# Guide\n\n" + "\n\n".join(PAYLOADS) + '\n\n<a href="javascript:alert(1)">click</a>'
    yield store, create_app(store, guidelines=guide), tokens
    store.close()


def test_payloads_everywhere_are_shown_as_text_and_stored_as_given(hostile):
    store, app, tokens = hostile
    ann = client_for(app, tokens["ann"])
    pages = []
    while 'id="answer-form"' in (page := ann.get("/").text):
        pages.append(page)
        comment = PAYLOADS[len(pages) % len(PAYLOADS)]
        assert ann.post("/answer", data={**form_of(page), "choice": "A", "comment": comment}
                        ).headers["location"] == "/"
    assert len(pages) == len(PAYLOADS)
    boss = client(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    pages += [boss.get("/admin").text, boss.get("/admin/items").text, ann.get("/guidelines").text]
    pages += [boss.get(f"/admin/items/{k}").text for k in range(1, len(PAYLOADS) + 1)]
    for html in pages:
        # parsed as a browser would: the only script is the app's own, and no tag or attribute
        # from a payload survives (no event handler, no javascript: link, no frame or image)
        tags = Tags()
        tags.feed(html)
        assert [a for t, a in tags.seen if t == "script"] == [{"src": "/static/app.js", "defer": None}]
        assert not [t for t, _ in tags.seen if t in ("img", "svg", "iframe", "object", "embed")]
        assert not [(t, a) for t, a in tags.seen if any(k.startswith("on") for k in a)]
        assert not [(t, a) for t, a in tags.seen if "javascript:" in (a.get("href") or "")]
        assert "\u202e" not in html
    assert any("{{ 7*7 }}" in html for html in pages)  # template syntax in input stays text
    # SQL metacharacters and the rest are stored exactly as given, and the tables are all there
    answers = store.answers()
    assert len(answers) == len(PAYLOADS) and {a["comment"] for a in answers} <= set(PAYLOADS)
    exported = [json.loads(x) for x in boss.get("/api/export?kind=pairs").text.splitlines()]
    assert sorted(r["prompt"] for r in exported) == sorted(f"Prompt {p}" for p in PAYLOADS)


def test_sql_metacharacters_in_ids_tokens_and_names(hostile):
    store, app, tokens = hostile
    for token in ("' OR '1'='1", "x' UNION SELECT token_hash FROM annotators --", "%", "_"):
        assert client(app).get("/api/next", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        assert store.authenticate(token) is None
    ann = client(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    ann.get("/api/next")
    for item_id in ("' OR '1'='1", "evil0%", "evil_", "x'); DELETE FROM answers; --"):
        assert ann.post("/api/answer", json={"item_id": item_id, "choice": "A"}).status_code == 409
    for name in ("ann' --", "a;b", "x" * 65, "<b>"):
        with pytest.raises(Exception, match="annotator name"):
            store.add_user(name)
    assert store.answers() == [] and len(store.all_items()) == len(PAYLOADS)


def test_forged_posts_without_the_csrf_token_are_refused(hostile):
    store, app, tokens = hostile
    ann = client_for(app, tokens["ann"])
    page = ann.get("/").text
    fields = form_of(page)
    forged = {k: v for k, v in fields.items() if k != "csrf"}
    for path, data in (("/answer", {**forged, "choice": "A"}), ("/undo", {}), ("/logout", {})):
        real = fields["csrf"]
        for csrf in (None, "", "0" * 64, real[:-1] + ("1" if real[-1] == "0" else "0")):  # one digit off
            body = data if csrf is None else {**data, "csrf": csrf}
            assert ann.post(path, data=body).status_code == 403, (path, csrf)
    # a cross-site page cannot use the JSON API with the cookie either (no X-CSRF-Token)
    assert ann.post("/api/answer", json={"item_id": fields["item_id"], "choice": "A"}).status_code == 403
    assert ann.post("/api/undo").status_code == 403
    assert store.answers() == []


def test_guessing_tokens_in_a_loop_is_cut_off(hostile):
    _, app, tokens = hostile
    api = client(app)
    codes = [api.get("/api/next", headers={"Authorization": f"Bearer guess{k}"}).status_code for k in range(12)]
    assert codes[:9] == [401] * 9 and set(codes[9:]) == {429}
    c = client_for(app)
    assert log_in(c, tokens["ann"]).status_code == 429  # the form too, from the same client


@pytest.mark.parametrize("path", [
    "/media/1/../../../../etc/passwd", "/media/1/..%2f..%2fetc%2fpasswd", "/media/../store.py", "/media/-1/0",
    "/media/1/-1", "/media/99999999999999999999/0", "/media/1/0%00.png", "/static/../store.py",
    "/static/..%2fapp.py", "/static/%2e%2e/app.py", "/static//etc/passwd", "/media/1/1"])
def test_path_tricks_reach_no_file(hostile, path):
    _, app, tokens = hostile
    r = client(app, headers={"Authorization": f"Bearer {tokens['ann']}"}).get(path)
    assert r.status_code in (400, 404, 422), (path, r.status_code)
    assert "import " not in r.text and "root:" not in r.text
    assert_hardened(r)


def test_oversized_and_malformed_bodies(hostile):
    store, app, tokens = hostile
    api = client(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    api.get("/api/next")
    cases = [
        (b"{" * 100_000, {}, 413),
        (b"[" * 5000 + b"]" * 5000, {}, 400),
        (b'{"item_id": "evil0", "choice": "A"', {}, 400),
        (b"\xff\xfe\x00garbage", {}, 400),
        (json.dumps({"item_id": ["list"], "choice": "A"}).encode(), {}, 400),
        (json.dumps({"item_id": "x", "showing": 7}).encode(), {}, 400),
        (json.dumps({"item_id": "x", "comment": "y" * 70_000}).encode(), {}, 413),
        (b"{}", {"content-length": "-5"}, 400),
        (b"{}", {"content-length": "abc"}, 400),
    ]
    for body, headers, expected in cases:
        r = api.post("/api/answer", content=body, headers={"content-type": "application/json", **headers})
        assert r.status_code == expected, (body[:30], headers, r.status_code, r.text[:200])
        assert_hardened(r)
    ann = client_for(app, tokens["ann"])
    fields = form_of(ann.get("/").text)
    r = ann.post("/answer", files={"comment": ("x.txt", b"x" * 200_000)}, data=fields)
    assert r.status_code == 413  # a multipart upload is counted as it arrives, like any body
    # a 5,000-digit rank on a pair is no rank at all: the pair's choice is what counts, stored once
    r = ann.post("/answer", data={**fields, "choice": "A", "rank_0": "9" * 5000})
    assert r.status_code == 303 and r.headers["location"] == "/"
    (stored,) = store.answers()
    assert stored["item_id"] == fields["item_id"] and stored["ranking"] is None


def test_security_headers_and_cookie_flags(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_items([{"prompt": "p", "responses": ["a", "b"]}])
    token = store.add_user("ann", admin=True)
    for secure in (False, True):
        app = create_app(store, guidelines="# g", secure_cookies=secure)
        # Secure cookies are for HTTPS (behind a TLS proxy): the client only sends them back there
        c = TestClient(app, base_url="https://127.0.0.1" if secure else "http://127.0.0.1", follow_redirects=False)
        login = c.get("/login")
        nonce_cookie = login.headers["set-cookie"].lower()
        assert "httponly" in nonce_cookie and "samesite=strict" in nonce_cookie
        assert ("secure" in nonce_cookie) == secure
        r = log_in(c, token)
        session_cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("heed_session=")][0].lower()
        assert "httponly" in session_cookie and "samesite=lax" in session_cookie
        assert ("secure" in session_cookie) == secure
        for response in (login, r, c.get("/"), c.get("/admin"), c.get("/guidelines"), c.get("/api/progress"),
                         c.get("/static/app.css"), c.get("/nowhere"), c.get("/media/1/0"),
                         TestClient(app, base_url="http://evil.example").get("/")):
            assert_hardened(response)
        assert c.get("/").headers["cache-control"] == "no-store"  # labelled content is never cached
