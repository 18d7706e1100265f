"""The labelling web app: FastAPI, server-side Jinja templates, one small script for the keyboard.

Pages (a browser, logged in by a session cookie; the login token itself is never
put in a cookie):
    GET  /login, POST /login, POST /logout
    GET  /                 the next item to judge, with progress and the keys
    POST /answer, /undo    form posts, CSRF-checked, then redirect back to /
    GET  /guidelines       the Markdown file given at start
    GET  /media/SEQ/K      an item's image or animation
    GET  /admin            progress, agreement, reward-model agreement, export (admins)
    GET  /admin/items, /admin/items/SEQ   every item; who answered one, what, when, how fast
    GET  /admin/export     ?kind=pairs|rankings|thumbs|ratings|spans[&majority=1], JSONL
The same as JSON, for scripts (`Authorization: Bearer TOKEN`; a cookie works
too, with the CSRF token in an `X-CSRF-Token` header):
    GET /api/next, POST /api/answer, POST /api/undo, GET /api/progress, GET /api/export

Safety: every page and call needs a valid token or session (looked up by its
SHA-256 and compared in constant time); a browser session lives in the database,
so logging out or a new token (`--reset-token`) ends it; failed logins are logged
and rate-limited per client; requests naming a Host that is not this server's are
refused (DNS rebinding); model output is only ever rendered through Jinja
autoescaping, with bidirectional and invisible characters shown as visible marks,
and the Content-Security-Policy allows no inline script, so a response holding
<script> shows as text and cannot run; state-changing posts carry a CSRF token
(HMAC of the session under a server secret) and the session cookie is HttpOnly
and SameSite=Lax; request bodies are capped; an answer must come from the page
rendered for that showing of that item (a form restored by the browser's Back
button is refused), and answers given implausibly fast are flagged.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from heed.feedback.agreement import agreement_report, reward_model_agreement
from heed.feedback.export import EXPORT_KINDS, export_rows
from heed.feedback.store import (
    MAX_COMMENT,
    MAX_RESPONSES,
    MEDIA_TYPES,
    SESSION_SECONDS,
    AnswerError,
    Store,
    User,
    hash_token,
)
from heed.utils import HeedError

HERE = Path(__file__).parent
SESSION_COOKIE = "heed_session"
LOGIN_COOKIE = "heed_login"
MAX_BODY_BYTES = 64 * 1024
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LOGIN_FAILURES = 9          # failed logins allowed per client per LOGIN_WINDOW; the next is refused
LOGIN_WINDOW = 60.0         # seconds
FEW_SHARED = 10             # agreement over fewer shared items than this means little
log = logging.getLogger("heed.feedback")
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
    "toomany": "Too many failed logins from here: wait a minute and try again.",
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


@functools.cache
def _hidden_characters(carriage_return: bool = False) -> re.Pattern:
    """Every format (Cf) and control (Cc) character but tab, newline and carriage return:
    bidirectional overrides and isolates, zero-width spaces and joiners, soft hyphens, BOMs.
    With `carriage_return`, carriage returns too (see `visible`)."""
    if carriage_return:
        return re.compile(_hidden_characters().pattern[:-1] + "\\r]")
    hidden = [chr(c) for c in range(0x110000)
              if (cat := unicodedata.category(chr(c))) == "Cf" or (cat == "Cc" and chr(c) not in "\t\n\r")]
    return re.compile("[" + "".join(re.escape(ch) for ch in hidden) + "]")


def _mark(ch: str, at: int | None = None) -> str:
    code = f"U+{ord(ch):04X}"
    name = unicodedata.name(ch, "control character")
    where = "" if at is None else f' data-at="{at}" data-cp="{ord(ch):X}"'
    return f'<span class="cf"{where} title="{code} {escape(name)}">{code}</span>'


def visible(text: str, offsets: bool = False) -> Markup:
    """`text` escaped, with every invisible or direction-changing character shown as a mark
    naming it (U+202E, U+200B, ...), so nothing written is hidden or reordered on screen.

    With `offsets` (a response people mark spans of), every run of text and every mark is an
    element saying where it starts in `text`, in code points (`data-at`), and a mark also which
    code point it stands for (`data-cp`): the page's script maps a selection back to offsets
    into `text` itself, whatever the marks look like. Carriage returns are marked too: the HTML
    parser turns CRLF into one newline, which would shift every offset after it.
    """
    pattern = _hidden_characters(carriage_return=offsets)
    out, start = [], 0

    def run(end: int) -> None:
        if offsets and start < end:
            out.append(f'<span data-at="{start}">{escape(text[start:end])}</span>')
        elif not offsets:
            out.append(str(escape(text[start:end])))

    for m in pattern.finditer(text):
        run(m.start())
        out.append(_mark(m.group(), m.start() if offsets else None))
        start = m.end()
    run(len(text))
    return Markup("".join(out))


def span_parts(text: str, spans: list[dict]) -> list[dict]:
    """`text` cut at an answer's spans (sorted, not overlapping): [{"text", "label"}], label None
    between spans, so a page can show what was marked where."""
    parts, at = [], 0
    for span in spans:
        if span["start"] > at:
            parts.append({"text": text[at:span["start"]], "label": None})
        parts.append({"text": text[span["start"]:span["end"]], "label": span["label"]})
        at = span["end"]
    if at < len(text):
        parts.append({"text": text[at:], "label": None})
    return parts


_SPAN_LINE = re.compile(r"([0-9]{1,9})\s*-\s*([0-9]{1,9})\s+(\S.*)")


def span_lines(text: str) -> tuple[list[dict], str | None]:
    """A form's spans, one "START-END LABEL" per line (what the page's script writes, and what
    someone without the script types) -> (the spans, what is wrong with a line or None)."""
    spans = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SPAN_LINE.fullmatch(line.strip())
        if m is None:
            return spans, (f"Spans, line {n} ({line.strip()[:60]!r}): write START-END LABEL, "
                           "for example 12-30 wrong.")
        spans.append({"start": int(m[1]), "end": int(m[2]), "label": m[3].strip()})
    return spans, None


def render_markdown(text: str) -> str:
    """Guidelines as HTML. Raw HTML in the Markdown is escaped, not passed through, and hidden
    characters are written out (⟨U+202E⟩), as in model output."""
    text = _hidden_characters().sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # markdown-it-py is optional: show the file as text
        return "<pre class=\"plain\">" + str(escape(text)) + "</pre>"
    return MarkdownIt("commonmark", {"html": False}).render(text)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.globals.update(segments=segments, media_type=lambda path: MEDIA_TYPES[Path(path).suffix.lower()],
                       MAX_COMMENT=MAX_COMMENT, span_parts=span_parts)
    env.filters["visible"] = visible
    env.filters["plural"] = plural
    env.filters["pct"] = lambda x: f"{100 * x:.0f}%"
    env.filters["num"] = lambda x, nd=2: "n/a" if x is None else f"{x:.{nd}f}"
    return Jinja2Templates(env=env)


# ---------------------------------------------------------------------------
# Middleware: body size limit and security headers on every response
# ---------------------------------------------------------------------------

class _TooLarge(Exception):
    pass


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Refuses requests whose Host is not one of `allowed_hosts` (400: a page reached through
    someone else's DNS name, as in DNS rebinding) and request bodies over `max_body` bytes
    (413), and adds security headers to every response. `allowed_hosts=None` allows any."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES, allowed_hosts: Sequence[str] | None = LOCAL_HOSTS):
        self.app, self.max_body = app, max_body
        self.allowed = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

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

        headers = dict(scope["headers"])
        if self.allowed is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                log.warning("refused a request for Host %r from %s", host, (scope.get("client") or ["?"])[0])
                return await self._answer(send_with_headers, 400, f"unknown Host {host!r}: this server answers "
                                          "to " + ", ".join(sorted(self.allowed)) + " (see --allowed-hosts)")
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await self._answer(send_with_headers, 400, "malformed Content-Length")
        if length is not None and int(length) > self.max_body:
            return await self._answer(send_with_headers, 413, f"request body over {self.max_body} bytes")
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
                await self._answer(send_with_headers, 413, f"request body over {self.max_body} bytes")

    @staticmethod
    async def _answer(send, status: int, message: str):
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class LoginLimiter:
    """Failed logins per client: after `limit` failures within `window` seconds, further
    attempts from that client are refused until the oldest failure is older than `window`."""

    def __init__(self, limit: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW):
        self.limit, self.window = limit, window
        self._failures: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> collections.deque:
        failures = self._failures.setdefault(client, collections.deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def blocked(self, client: str) -> bool:
        with self._lock:
            blocked = len(self._recent(client, time.time())) >= self.limit
        if blocked:
            log.warning("refused a login attempt from %s: %d failed logins within %.0f s",
                        client, self.limit, self.window)
        return blocked

    def failed(self, client: str) -> None:
        with self._lock:
            now = time.time()
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # forget clients that have gone quiet
                for name in [c for c, f in self._failures.items() if not f or f[-1] <= now - self.window]:
                    del self._failures[name]
        log.warning("failed login from %s", client)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def describe_answer(answer: dict) -> str:
    """A stored answer in words, responses numbered as the item lists them (1, 2, ...)."""
    if answer["choice"] == "skip":
        return "skipped"
    if answer["kind"] == "pair":
        choice = answer["choice"]
        return {"tie": "tie", "both_bad": "both bad"}.get(choice) or f"response {int(choice) + 1} is better"
    if answer["kind"] == "ranking":
        return " > ".join(str(k + 1) for k in answer["ranking"])
    if answer["kind"] == "thumbs":
        return "thumbs " + answer["label"]
    if answer["kind"] == "spans":
        counts = collections.Counter(span["label"] for span in answer["spans"])
        marked = ", ".join(f"{label} {n}" for label, n in counts.items())
        said = f"{plural(len(answer['spans']), 'span')}" + (f" ({marked})" if marked else "")
        return said + ("; corrected" if answer["correction"] is not None else "")
    return f"{answer['score']} of 7"


def rank_problem(ranks: dict[int, int], n: int) -> str | None:
    """What is wrong with ranks given by position (None when they are 1..n, each once)."""
    letters = "ABCDEFGHI"
    missing = [letters[p] for p in range(n) if p not in ranks]
    if missing:
        return f"Give every response a rank: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} none."
    by_rank: dict[int, list[str]] = {}
    for pos, rank in sorted(ranks.items()):
        by_rank.setdefault(rank, []).append(letters[pos])
    twice = [f"rank {r} is given to {' and '.join(who)}" for r, who in sorted(by_rank.items()) if len(who) > 1]
    if twice:
        return "Each rank once: " + "; ".join(twice) + "."
    bad = [r for r in by_rank if not 1 <= r <= n]
    return f"Ranks go from 1 to {n}." if bad else None


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------

def create_app(store: Store, *, guidelines: str | None = None, reward_model_name: str | None = None,
               scorer=None, secure_cookies: bool = False, max_body: int = MAX_BODY_BYTES,
               allowed_hosts: Sequence[str] | None = LOCAL_HOSTS) -> FastAPI:
    """The app over `store`. `guidelines` is Markdown text; `reward_model_name` says a reward
    model scored the queue (its scores are in the store); `scorer` is its background thread;
    `allowed_hosts` the names this server answers to (None: any; keep a list in production)."""
    templates = _templates()
    _hidden_characters()  # built once, now, rather than on the first page shown
    secret = store.secret()
    guidelines_html = render_markdown(guidelines) if guidelines else None
    limiter = LoginLimiter()
    app = FastAPI(title="heed labelling", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(Guard, max_body=max_body, allowed_hosts=allowed_hosts)

    # -- auth ----------------------------------------------------------------
    # A browser holds a session id (cookie); a script sends its login token (bearer). The
    # CSRF token is an HMAC of whichever credential the request carries.

    def csrf_for(credential: str) -> str:
        return hmac.new(secret, b"csrf:" + hash_token(credential).encode(), hashlib.sha256).hexdigest()

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def user_for(request: Request, *, admin: bool = False) -> tuple[User, str]:
        """(user, credential) from the bearer token or the session cookie."""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            credential = auth[7:].strip()
            if limiter.blocked(client_of(request)):
                raise Refused(429, NOTICES["toomany"])
            user = store.authenticate(credential)
            if user is None:
                limiter.failed(client_of(request))
        else:
            credential = request.cookies.get(SESSION_COOKIE) or ""
            user = store.session_user(credential)
        if user is None:
            raise NeedLogin()
        if admin and not user.is_admin:
            raise Refused(403, "admins only")
        return user, credential

    def check_csrf(request: Request, credential: str, given: str | None) -> None:
        """Only a cookie is sent by the browser on its own; a bearer token is proof enough."""
        from_cookie = request.headers.get("authorization", "")[:7].lower() != "bearer "
        if from_cookie and not (isinstance(given, str)
                                and hmac.compare_digest(given.encode(), csrf_for(credential).encode())):
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

    def login_form(request: Request, notice: str, status: int = 200):
        nonce = secrets.token_urlsafe(16)
        response = templates.TemplateResponse(request, "login.html",
                                              {"user": None, "nonce": nonce, "notice": NOTICES.get(notice)},
                                              status_code=status)
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict",
                            secure=secure_cookies)
        return response

    @app.get("/login")
    def login_page(request: Request, notice: str = ""):
        if store.session_user(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse("/", status_code=303)
        return login_form(request, notice)

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        nonce, given = request.cookies.get(LOGIN_COOKIE), form.get("nonce")
        if not (nonce and isinstance(given, str) and hmac.compare_digest(nonce.encode(), given.encode())):
            return RedirectResponse("/login?notice=expired", status_code=303)
        client = client_of(request)
        if limiter.blocked(client):
            return login_form(request, "toomany", status=429)
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else None
        user = await run_in_threadpool(store.authenticate, token)
        if user is None:
            limiter.failed(client)
            return RedirectResponse("/login?notice=badtoken", status_code=303)
        session_id = await run_in_threadpool(store.start_session, user.name)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_id, max_age=SESSION_SECONDS, httponly=True, samesite="lax",
                            secure=secure_cookies)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        form = await request.form()
        _, credential = await run_in_threadpool(user_for, request)
        check_csrf(request, credential, form.get("csrf"))
        if request.cookies.get(SESSION_COOKIE) == credential:
            await run_in_threadpool(store.end_session, credential)  # the cookie is worthless from now on
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
                out.append({"text": r, "chars": len(r), "words": len(r.split())})
            else:
                out.append({"media": f"/media/{item['seq']}/{k}",
                            "type": MEDIA_TYPES[Path(r["media"]).suffix.lower()]})
        return out

    def label_page_for(request: Request, user: User, credential: str, *, notice: str | None = None,
                       given: dict | None = None, status: int = 200):
        shown = store.show_item(user.name)
        ctx = {"user": user, "csrf": csrf_for(credential), "progress": store.progress(user.name),
               "notice": notice, "guidelines": guidelines_html, "has_guidelines": guidelines_html is not None}
        if shown is None:
            return templates.TemplateResponse(request, "done.html", ctx, status_code=status)
        item, order, showing = shown
        if given is not None and given.get("item_id") != item["id"]:
            given = None  # the values were for another item: never carry them over
        kept = {"choice": None, "label": None, "score": None, "comment": "", "ranks": {}, "spans": "",
                "correction": "", **(given or {})}
        ctx.update(item=item, shown=shown_responses(item, order), showing=showing, given=kept)
        return templates.TemplateResponse(request, "label.html", ctx, status_code=status)

    @app.get("/")
    def label_page(request: Request, notice: str = ""):
        user, credential = user_for(request)
        return label_page_for(request, user, credential, notice=NOTICES.get(notice))

    def form_answer(form) -> tuple[dict, str | None]:
        """Browser form fields -> (the displayed-position answer `Store.submit` takes, what is
        wrong with the ranks or the spans' lines if anything)."""
        def small_int(value) -> int | None:  # "1".."999"; anything else is no number at all
            return int(value) if isinstance(value, str) and value.isdecimal() and len(value) <= 3 else None

        answer: dict[str, Any] = {"choice": form.get("choice"), "label": form.get("label"),
                                  "comment": form.get("comment")}
        if (score := small_int(form.get("score"))) is not None:
            answer["score"] = score
        ranks = {}
        for pos in range(MAX_RESPONSES):
            if (rank := small_int(form.get(f"rank_{pos}"))) is not None:
                ranks[pos] = rank
        problem = None
        if ranks:
            n_shown = small_int(form.get("n")) or len(ranks)  # only for the message; map_answer checks
            problem = rank_problem(ranks, n_shown)
            # rank values must be 1..K, each once; otherwise map_answer refuses it
            answer["ranking"] = (None if problem else
                                 [pos for pos, _ in sorted(ranks.items(), key=lambda kv: kv[1])])
        if isinstance(form.get("spans"), str):
            answer["spans"], problem = span_lines(form["spans"])
            if problem:
                answer["spans"] = form["spans"]  # left unparsed: the store refuses it (not a list)
        if isinstance(form.get("correction"), str):
            answer["correction"] = form["correction"].replace("\r\n", "\n")  # a textarea posts CRLF
        return answer, problem

    @app.post("/answer")
    async def answer(request: Request):
        form = await request.form()
        user, credential = await run_in_threadpool(user_for, request)
        check_csrf(request, credential, form.get("csrf"))
        item_id = form.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise Refused(400, "missing item_id")
        showing = form.get("showing")
        if not isinstance(showing, str) or not showing:
            return RedirectResponse("/?notice=stale", status_code=303)  # a form from an older page
        given, problem = form_answer(form)
        try:
            await run_in_threadpool(store.submit, user.name, item_id, given, showing=showing)
        except AnswerError as e:
            if e.status == 409:
                return RedirectResponse("/?notice=stale", status_code=303)
            # Shown again with what they chose kept and what is wrong said (no script needed).
            kept = {"item_id": item_id, "choice": form.get("choice"), "label": form.get("label"),
                    "score": form.get("score"), "comment": form.get("comment") or "",
                    "ranks": {pos: form.get(f"rank_{pos}") for pos in range(MAX_RESPONSES)},
                    "spans": form.get("spans") or "", "correction": form.get("correction") or ""}
            notice = problem or ("Choose an answer before submitting." if "expected" in e.message else e.message)
            return await run_in_threadpool(label_page_for, request, user, credential, notice=notice,
                                           given=kept, status=422)
        return RedirectResponse("/", status_code=303)

    @app.post("/undo")
    async def undo(request: Request):
        form = await request.form()
        user, credential = await run_in_threadpool(user_for, request)
        check_csrf(request, credential, form.get("csrf"))
        undone = await run_in_threadpool(store.undo, user.name)
        return RedirectResponse("/?notice=" + ("undone" if undone else "nothing"), status_code=303)

    @app.get("/guidelines")
    def guidelines_page(request: Request):
        user, credential = user_for(request)
        return templates.TemplateResponse(request, "guidelines.html",
                                          {"user": user, "csrf": csrf_for(credential), "guidelines": guidelines_html,
                                           "has_guidelines": guidelines_html is not None})

    @app.get("/media/{seq}/{k}")
    def media(request: Request, seq: int, k: int):
        user_for(request)
        item = store.get_item(seq=seq) if 0 < seq < 2**62 else None  # beyond a database integer: none
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
        user, credential = user_for(request, admin=True)
        items = {item["id"]: item for item in store.all_items()}
        answers = store.answers()
        rm = reward_model_agreement(answers, items) if reward_model_name else None
        comments = [a for a in answers if a["comment"]][-20:][::-1]
        fast = collections.Counter(a["annotator"] for a in answers if a["flag"] == "fast")
        overlaps = "; ".join(f"{plural(count, 'item')} need{'s' if count == 1 else ''} {plural(overlap, 'answer')}"
                             for overlap, count in sorted(collections.Counter(
                                 item["overlap"] for item in items.values()).items()))
        ctx = {"user": user, "csrf": csrf_for(credential), "overview": store.overview(), "fast": fast,
               "fast_seconds": store.fast_seconds, "overlaps": overlaps,
               "agreement": {kind: r for kind, r in agreement_report(answers).items() if r["units"]},
               "few": FEW_SHARED, "rm": rm, "rm_name": reward_model_name,
               "scorer_error": getattr(scorer, "error", None), "comments": comments,
               "kinds": list(EXPORT_KINDS), "has_guidelines": guidelines_html is not None,
               "counts": {kind: sum(a["kind"] == k and a["choice"] != "skip" for a in answers)
                          for kind, k in EXPORT_KINDS.items()}}
        return templates.TemplateResponse(request, "admin.html", ctx)

    @app.get("/admin/items")
    def admin_items(request: Request, page: int = 1):
        user, credential = user_for(request, admin=True)
        per_page = 100
        everything = store.all_items()
        pages = max(1, -(-len(everything) // per_page))
        page = min(max(page, 1), pages)
        answered = collections.Counter(a["item_id"] for a in store.answers())
        ctx = {"user": user, "csrf": csrf_for(credential), "has_guidelines": guidelines_html is not None,
               "items": everything[(page - 1) * per_page:page * per_page], "answered": answered,
               "page": page, "pages": pages}
        return templates.TemplateResponse(request, "admin_items.html", ctx)

    @app.get("/admin/items/{seq}")
    def admin_item(request: Request, seq: int):
        user, credential = user_for(request, admin=True)
        item = store.get_item(seq=seq) if 0 < seq < 2**62 else None
        if item is None:
            raise Refused(404, "no such item")
        ctx = {"user": user, "csrf": csrf_for(credential), "has_guidelines": guidelines_html is not None,
               "item": item, "answers": store.answers([item["id"]]), "fast_seconds": store.fast_seconds,
               "describe": describe_answer}
        return templates.TemplateResponse(request, "admin_item.html", ctx)

    def export_response(kind: str, majority: bool) -> Response:
        if kind not in EXPORT_KINDS:
            raise Refused(400, f"kind must be one of {', '.join(EXPORT_KINDS)}")
        items = {item["id"]: item for item in store.all_items()}
        try:
            rows = export_rows(items, store.answers(), kind, majority=majority)
        except HeedError as e:  # a majority of spans
            raise Refused(400, str(e)) from None
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
        shown = store.show_item(user.name)
        if shown is None:
            return JSONResponse({"item": None})
        item, order, showing = shown
        labels = {"labels": item["labels"]} if item["kind"] == "spans" else {}
        return JSONResponse({"item": {"id": item["id"], "kind": item["kind"], "prompt": item["prompt"],
                                      "responses": shown_responses(item, order), "showing": showing, **labels}})

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            raise Refused(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body

    @app.post("/api/answer")
    async def api_answer(request: Request):
        user, credential = await run_in_threadpool(user_for, request)
        check_csrf(request, credential, request.headers.get("x-csrf-token"))
        body = await json_body(request)
        item_id, showing = body.get("item_id"), body.get("showing")
        if not isinstance(item_id, str) or not item_id:
            raise Refused(400, "item_id: expected a string")
        if showing is not None and not isinstance(showing, str):
            raise Refused(400, "showing: expected the string /api/next gave")
        try:
            stored = await run_in_threadpool(store.submit, user.name, item_id, body, showing=showing)
        except AnswerError as e:
            raise Refused(e.status, e.message) from None
        return JSONResponse({"ok": True, "answer": stored})

    @app.post("/api/undo")
    async def api_undo(request: Request):
        user, credential = await run_in_threadpool(user_for, request)
        check_csrf(request, credential, request.headers.get("x-csrf-token"))
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
