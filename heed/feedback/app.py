"""The labelling web app: FastAPI, server-side Jinja templates, one small script for the keyboard.

Pages (a browser, logged in by a cookie holding the login token):
    GET  /login, POST /login, POST /logout
    GET  /                 the next item to judge, with progress and the keys
    POST /answer, /undo    form posts, CSRF-checked, then redirect back to /
    GET  /guidelines       the Markdown file given at start
    GET  /media/SEQ/K      an item's image or animation
    GET  /admin            progress, agreement, reward-model agreement, export (admins)
    GET  /admin/export     ?kind=pairs|rankings|thumbs|ratings[&majority=1], JSONL
The same as JSON, for scripts (`Authorization: Bearer TOKEN`; a cookie works
too, with the CSRF token in an `X-CSRF-Token` header):
    GET /api/next, POST /api/answer, POST /api/undo, GET /api/progress, GET /api/export

Safety: every page and call needs a valid token (looked up by its SHA-256 and
compared in constant time); model output is only ever rendered through Jinja
autoescaping, and the Content-Security-Policy allows no inline script, so a
response holding <script> shows as text and cannot run; state-changing posts
carry a CSRF token (HMAC of the session under a server secret) and the
session cookie is HttpOnly and SameSite=Lax; request bodies are capped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from heed.feedback.agreement import agreement_report, reward_model_agreement
from heed.feedback.export import EXPORT_KINDS, export_rows
from heed.feedback.store import MAX_COMMENT, MAX_RESPONSES, MEDIA_TYPES, AnswerError, Store, User, hash_token

HERE = Path(__file__).parent
SESSION_COOKIE = "heed_session"
LOGIN_COOKIE = "heed_login"
MAX_BODY_BYTES = 64 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
NOTICES = {
    "undone": "Your last answer was withdrawn: here is that item again.",
    "nothing": "There is no answer to undo.",
    "stale": "That item was already answered or is no longer yours: here is your current one.",
    "incomplete": "Choose an answer before submitting.",
    "loggedout": "You are logged out.",
    "badtoken": "That token is not valid.",
    "expired": "The login form expired; try again.",
}


class NeedLogin(Exception):
    """No valid token: pages redirect to the login form, API calls get 401."""


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------
# Rendering helpers: text stays text
# ---------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def segments(text: str) -> list[dict]:
    """Split text into plain runs and fenced code blocks, keeping every character of each
    (the fence lines themselves become the block's frame). The template escapes them all."""
    out: list[dict] = []
    buf: list[str] = []
    fence: str | None = None
    lang = ""

    def flush(code: bool) -> None:
        body = "".join(buf)
        if code:
            body = body[:-1] if body.endswith("\n") else body
        if body or code:
            out.append({"code": code, "lang": lang if code else "", "text": body})
        buf.clear()

    for line in text.splitlines(keepends=True):
        m = _FENCE.match(line.rstrip("\r\n"))
        if fence is None and m:
            flush(False)
            fence, lang = m.group(1), m.group(2).strip()[:30]
        elif fence is not None and m and m.group(1).startswith(fence[0]) and len(m.group(1)) >= len(fence) \
                and not m.group(2).strip():
            flush(True)
            fence, lang = None, ""
        else:
            buf.append(line)
    flush(fence is not None)
    return out


def render_markdown(text: str) -> str:
    """Guidelines as HTML. Raw HTML in the Markdown is escaped, not passed through."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # markdown-it-py is optional: show the file as text
        return "<pre class=\"plain\">" + str(escape(text)) + "</pre>"
    return MarkdownIt("commonmark", {"html": False}).render(text)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.globals.update(segments=segments, media_type=lambda path: MEDIA_TYPES[Path(path).suffix.lower()],
                       MAX_COMMENT=MAX_COMMENT)
    env.filters["pct"] = lambda x: f"{100 * x:.0f}%"
    env.filters["num"] = lambda x, nd=2: "n/a" if x is None else f"{x:.{nd}f}"
    return Jinja2Templates(env=env)


# ---------------------------------------------------------------------------
# Middleware: body size limit and security headers on every response
# ---------------------------------------------------------------------------

class _TooLarge(Exception):
    pass


class Guard:
    """Refuses request bodies over `max_body` bytes (413) and adds security headers."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._refuse(send_with_headers)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _TooLarge:
            if not started:
                await self._refuse(send_with_headers)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body over {self.max_body} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------

def create_app(store: Store, *, guidelines: str | None = None, reward_model_name: str | None = None,
               scorer=None, secure_cookies: bool = False, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over `store`. `guidelines` is Markdown text; `reward_model_name` says a reward
    model scored the queue (its scores are in the store); `scorer` is its background thread."""
    templates = _templates()
    secret = store.secret()
    guidelines_html = render_markdown(guidelines) if guidelines else None
    app = FastAPI(title="heed labelling", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(Guard, max_body=max_body)

    # -- auth ----------------------------------------------------------------

    def csrf_for(token: str) -> str:
        return hmac.new(secret, b"csrf:" + hash_token(token).encode(), hashlib.sha256).hexdigest()

    def request_token(request: Request) -> tuple[str | None, bool]:
        """(token, came_from_cookie)."""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), False
        return request.cookies.get(SESSION_COOKIE), True

    def user_for(request: Request, *, admin: bool = False) -> tuple[User, str]:
        token, _ = request_token(request)
        user = store.authenticate(token)
        if user is None:
            raise NeedLogin()
        if admin and not user.is_admin:
            raise Refused(403, "admins only")
        return user, token

    def check_csrf(request: Request, token: str, given: str | None) -> None:
        """Only a cookie is sent by the browser on its own; a bearer token is proof enough."""
        _, from_cookie = request_token(request)
        if from_cookie and not (isinstance(given, str)
                                and hmac.compare_digest(given.encode(), csrf_for(token).encode())):
            raise Refused(403, "missing or invalid CSRF token; reload the page and try again")

    @app.exception_handler(NeedLogin)
    async def _need_login(request: Request, _exc: NeedLogin):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "a valid login token is required"}, status_code=401)
        return RedirectResponse("/login", status_code=303)  # nothing was done: a browser logs in

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return templates.TemplateResponse(request, "error.html", {"user": None, "message": exc.message},
                                          status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    # -- login ---------------------------------------------------------------

    @app.get("/login")
    def login_page(request: Request, notice: str = ""):
        if store.authenticate(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse("/", status_code=303)
        nonce = secrets.token_urlsafe(16)
        response = templates.TemplateResponse(request, "login.html",
                                              {"user": None, "nonce": nonce, "notice": NOTICES.get(notice)})
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict",
                            secure=secure_cookies)
        return response

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        nonce, given = request.cookies.get(LOGIN_COOKIE), form.get("nonce")
        if not (nonce and isinstance(given, str) and hmac.compare_digest(nonce.encode(), given.encode())):
            return RedirectResponse("/login?notice=expired", status_code=303)
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else None
        user = await run_in_threadpool(store.authenticate, token)
        if user is None:
            return RedirectResponse("/login?notice=badtoken", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, token, max_age=30 * 24 * 3600, httponly=True, samesite="lax",
                            secure=secure_cookies)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        form = await request.form()
        _, token = await run_in_threadpool(user_for, request)
        check_csrf(request, token, form.get("csrf"))
        response = RedirectResponse("/login?notice=loggedout", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- labelling pages -----------------------------------------------------

    def shown_responses(item: dict, order: list[int]) -> list[dict]:
        """The responses in displayed order, media turned into URLs on this server."""
        out = []
        for pos, k in enumerate(order):
            r = item["responses"][k]
            if isinstance(r, str):
                out.append({"text": r})
            else:
                out.append({"media": f"/media/{item['seq']}/{k}",
                            "type": MEDIA_TYPES[Path(r["media"]).suffix.lower()]})
        return out

    @app.get("/")
    def label_page(request: Request, notice: str = ""):
        user, token = user_for(request)
        nxt = store.next_item(user.name)
        ctx = {"user": user, "csrf": csrf_for(token), "progress": store.progress(user.name),
               "notice": NOTICES.get(notice), "has_guidelines": guidelines_html is not None}
        if nxt is None:
            return templates.TemplateResponse(request, "done.html", ctx)
        item, order = nxt
        ctx.update(item=item, shown=shown_responses(item, order))
        return templates.TemplateResponse(request, "label.html", ctx)

    def form_answer(form) -> dict:
        """Browser form fields -> the displayed-position answer `Store.submit` takes."""
        answer: dict[str, Any] = {"choice": form.get("choice"), "label": form.get("label"),
                                  "comment": form.get("comment")}
        score = form.get("score")
        if isinstance(score, str) and score.isdigit():
            answer["score"] = int(score)
        ranks = {}
        for pos in range(MAX_RESPONSES):
            value = form.get(f"rank_{pos}")
            if isinstance(value, str) and value.isdigit():
                ranks[pos] = int(value)
        if ranks:
            # rank values must be 1..K, each once; otherwise map_answer refuses it
            answer["ranking"] = ([pos for pos, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
                                 if sorted(ranks.values()) == list(range(1, len(ranks) + 1)) else None)
        return answer

    @app.post("/answer")
    async def answer(request: Request):
        form = await request.form()
        user, token = await run_in_threadpool(user_for, request)
        check_csrf(request, token, form.get("csrf"))
        item_id = form.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise Refused(400, "missing item_id")
        try:
            await run_in_threadpool(store.submit, user.name, item_id, form_answer(form))
        except AnswerError as e:
            return RedirectResponse("/?notice=" + ("stale" if e.status == 409 else "incomplete"), status_code=303)
        return RedirectResponse("/", status_code=303)

    @app.post("/undo")
    async def undo(request: Request):
        form = await request.form()
        user, token = await run_in_threadpool(user_for, request)
        check_csrf(request, token, form.get("csrf"))
        undone = await run_in_threadpool(store.undo, user.name)
        return RedirectResponse("/?notice=" + ("undone" if undone else "nothing"), status_code=303)

    @app.get("/guidelines")
    def guidelines_page(request: Request):
        user, token = user_for(request)
        return templates.TemplateResponse(request, "guidelines.html",
                                          {"user": user, "csrf": csrf_for(token), "guidelines": guidelines_html,
                                           "has_guidelines": guidelines_html is not None})

    @app.get("/media/{seq}/{k}")
    def media(request: Request, seq: int, k: int):
        user_for(request)
        item = store.get_item(seq=seq)
        # Only files named by an item are served: the path comes from the database, never the URL.
        if item is None or not 0 <= k < len(item["responses"]) or isinstance(item["responses"][k], str):
            raise Refused(404, "no such media")
        path = Path(item["responses"][k]["media"])
        if not path.is_file():
            raise Refused(404, "the media file has gone missing")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()])

    # -- admin ---------------------------------------------------------------

    @app.get("/admin")
    def admin_page(request: Request):
        user, token = user_for(request, admin=True)
        items = {item["id"]: item for item in store.all_items()}
        answers = store.answers()
        rm = reward_model_agreement(answers, items) if reward_model_name else None
        comments = [a for a in answers if a["comment"]][-20:][::-1]
        ctx = {"user": user, "csrf": csrf_for(token), "overview": store.overview(),
               "agreement": {kind: r for kind, r in agreement_report(answers).items() if r["units"]},
               "rm": rm, "rm_name": reward_model_name,
               "scorer_error": getattr(scorer, "error", None), "comments": comments,
               "kinds": list(EXPORT_KINDS), "has_guidelines": guidelines_html is not None,
               "counts": {kind: sum(a["kind"] == k and a["choice"] != "skip" for a in answers)
                          for kind, k in EXPORT_KINDS.items()}}
        return templates.TemplateResponse(request, "admin.html", ctx)

    def export_response(kind: str, majority: bool) -> Response:
        if kind not in EXPORT_KINDS:
            raise Refused(400, f"kind must be one of {', '.join(EXPORT_KINDS)}")
        items = {item["id"]: item for item in store.all_items()}
        rows = export_rows(items, store.answers(), kind, majority=majority)
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        name = f"heed-{kind}{'-majority' if majority else ''}.jsonl"
        return Response(body, media_type="application/x-ndjson",
                        headers={"content-disposition": f"attachment; filename=\"{quote(name)}\""})

    @app.get("/admin/export")
    def admin_export(request: Request, kind: str = "pairs", majority: bool = False):
        user_for(request, admin=True)
        return export_response(kind, majority)

    # -- JSON API ------------------------------------------------------------

    @app.get("/api/next")
    def api_next(request: Request):
        user, _ = user_for(request)
        nxt = store.next_item(user.name)
        if nxt is None:
            return JSONResponse({"item": None})
        item, order = nxt
        return JSONResponse({"item": {"id": item["id"], "kind": item["kind"], "prompt": item["prompt"],
                                      "responses": shown_responses(item, order)}})

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Refused(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body

    @app.post("/api/answer")
    async def api_answer(request: Request):
        user, token = await run_in_threadpool(user_for, request)
        check_csrf(request, token, request.headers.get("x-csrf-token"))
        body = await json_body(request)
        item_id = body.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise Refused(400, "item_id: expected a string")
        try:
            stored = await run_in_threadpool(store.submit, user.name, item_id, body)
        except AnswerError as e:
            raise Refused(e.status, e.message) from None
        return JSONResponse({"ok": True, "answer": stored})

    @app.post("/api/undo")
    async def api_undo(request: Request):
        user, token = await run_in_threadpool(user_for, request)
        check_csrf(request, token, request.headers.get("x-csrf-token"))
        return JSONResponse({"undone": await run_in_threadpool(store.undo, user.name)})

    @app.get("/api/progress")
    def api_progress(request: Request):
        user, _ = user_for(request)
        return JSONResponse(store.progress(user.name))

    @app.get("/api/export")
    def api_export(request: Request, kind: str = "pairs", majority: bool = False):
        user_for(request, admin=True)
        return export_response(kind, majority)

    return app
