"""`heed rm serve`: a reward model over HTTP, and the client behind `--reward http://HOST:PORT`.

    export HEED_REWARD_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    heed rm serve --model runs/rm --port 8765                         # on the machine with the reward model
    heed ppo --policy runs/sft --prompts p.jsonl --reward http://rm-host:8765 --out runs/ppo   # anywhere else

The policy and the reward model can then run on different machines (or GPUs). A remote
term is a reward model like a local directory: it returns the normalised ensemble mean
and the members' spread, and mixes with rules and other reward models the same way
(`0.5*http://rm-host:8765,my_rules.py:brevity`). The client reads the token from
$HEED_REWARD_TOKEN (another variable: `http://rm-host:8765?token_env=NAME`).

The protocol, JSON both ways; every request carries `Authorization: Bearer TOKEN`:

    GET  /info   -> {"model": name, "n_members": K, "max_batch": N, "max_body_bytes": B}
    POST /score  {"rows": [{"prompt": str | [{"role", "content"}, ...], "response": str}, ...]}
                 -> {"rewards": [float, ...], "stds": [float, ...]}   (RewardModel.score)

Errors are {"error": message} (and "field" when a row is malformed): 400 for a malformed
body, naming the field and the row index ("rows[3].prompt"), 401 without the token or with
a wrong one (compared in constant time), 413 for a body over --max-body-bytes or more than
--max-batch rows. Without a token in the environment the server makes a random one and
prints it; a token shorter than 16 characters is refused.

Departures: plain HTTP, no TLS of its own: the server listens on 127.0.0.1 unless told
otherwise; across machines, put it behind an HTTPS proxy or an SSH tunnel (the token
travels in every request).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
import hmac
import http.client
import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from heed.config import option
from heed.data import FieldError, get_prompt, get_str
from heed.utils import HeedError

TOKEN_ENV = "HEED_REWARD_TOKEN"
MIN_TOKEN_CHARS = 16


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

@dataclass
class RewardServeConfig:
    model: str = option(help="reward model directory to serve (from `heed rm train`)")
    host: str = option("127.0.0.1", "address to listen on; keep the loopback default unless behind an HTTPS "
                                    "proxy or tunnel (the token travels in every request)")
    port: int = option(8765, "port to listen on")
    token_env: str = option(TOKEN_ENV, "environment variable holding the token every request must send "
                                       "(Authorization: Bearer); unset: a random token is made and printed")
    max_batch: int = option(256, "most rows one request may hold (more: 413; clients split their batches)")
    max_body_bytes: int = option(16 * 1024 * 1024, "largest request body accepted, in bytes (more: 413)")
    batch_size: int = option(64, "rows the reward model scores at once within a request")
    device: str = option("auto", "where the reward model runs: cpu, cuda, cuda:1, ...; auto: cuda when available")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def parse_score_body(body: bytes, max_batch: int) -> tuple[list, list[str]]:
    """(prompts, responses) of a /score body, or BadRequest naming the field and row index."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (nested too deep: RecursionError)
        raise BadRequest(400, f"the body is not valid JSON ({type(e).__name__}: {e})") from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise BadRequest(400, "expected {\"rows\": [{\"prompt\": ..., \"response\": ...}, ...]}", "rows")
    if len(rows) > max_batch:
        raise BadRequest(413, f"{len(rows)} rows in one request; this server takes at most {max_batch}", "rows")
    prompts, responses = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(400, f"expected an object with prompt and response, got {type(row).__name__}",
                             f"rows[{i}]")
        try:
            prompts.append(get_prompt(row))
            responses.append(get_str(row, "response", allow_empty=True))
        except FieldError as e:
            raise BadRequest(400, e.message, f"rows[{i}].{e.field}") from None
    return prompts, responses


def create_app(rm, token: str, *, name: str, max_batch: int = 256, max_body_bytes: int = 16 * 1024 * 1024,
               batch_size: int = 64):
    """The FastAPI app serving `rm` (a RewardModel) to clients holding `token`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="heed reward model", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode()
    lock = threading.Lock()  # one scoring pass at a time: the model's memory is sized for one batch

    def error(status: int, message: str, field: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, **({"field": field} if field else {})}, status_code=status)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, expected):  # constant time: no timing hints about the token
            return error(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        return await call_next(request)

    @app.get("/info")
    async def info():
        return {"model": name, "n_members": rm.n_members, "max_batch": max_batch, "max_body_bytes": max_body_bytes}

    @app.post("/score")
    async def score(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error(413, f"request body over {max_body_bytes} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():  # a body without Content-Length is counted as it comes
                body += chunk
                if len(body) > max_body_bytes:
                    return error(413, f"request body over {max_body_bytes} bytes")
        except ClientDisconnect:  # nobody is left to answer
            return error(400, "the client left before sending the whole body")
        try:
            prompts, responses = parse_score_body(bytes(body), max_batch)
        except BadRequest as e:
            return error(e.status, f"{e.field}: {e.message}" if e.field else e.message, e.field)
        if not prompts:
            return {"rewards": [], "stds": []}

        def run():
            with lock:
                return rm.score(prompts, responses, batch_size=batch_size)

        try:
            rewards, stds = await run_in_threadpool(run)
        except Exception as e:  # the client retries a 5xx, then reports this message
            return error(500, f"scoring failed: {type(e).__name__}: {e}")
        return {"rewards": rewards, "stds": stds}

    return app


def resolve_token(token_env: str) -> str:
    """The token from $token_env; unset, a random one, printed for the clients."""
    token = os.environ.get(token_env, "")
    if not token:
        token = secrets.token_urlsafe(32)
        print(f"${token_env} is not set: clients must send this token (export {token_env}=... where they run):\n"
              f"{token}", flush=True)
    elif not usable_token(token):
        raise HeedError(f"${token_env}: a token must be printable ASCII without spaces (an HTTP header carries it)")
    elif len(token) < MIN_TOKEN_CHARS:
        raise HeedError(f"${token_env} holds a token of {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                        "characters (python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return token


def usable_token(token: str) -> bool:
    """Printable ASCII without spaces: what an Authorization header carries unchanged."""
    return token.isascii() and token.isprintable() and not any(c.isspace() for c in token)


def make_server(cfg: RewardServeConfig):
    """A uvicorn.Server for `cfg`, not yet running: the model loaded, the token resolved."""
    import torch
    import uvicorn

    from heed.reward_model import RewardModel

    if not 0 < cfg.port < 65536:
        raise HeedError(f"--port must be from 1 to 65535, got {cfg.port}")
    if cfg.max_batch < 1 or cfg.max_body_bytes < 1 or cfg.batch_size < 1:
        raise HeedError("--max-batch, --max-body-bytes and --batch-size must be positive")
    rm = RewardModel.load(cfg.model)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    try:
        rm.to(device)
    except (RuntimeError, AssertionError) as e:
        raise HeedError(f"--device {cfg.device}: {e}") from None
    token = resolve_token(cfg.token_env)
    app = create_app(rm, token, name=Path(cfg.model).name, max_batch=cfg.max_batch,
                     max_body_bytes=cfg.max_body_bytes, batch_size=cfg.batch_size)
    print(f"heed rm serve: {cfg.model} ({rm.n_members} member(s), {device}) on http://{cfg.host}:{cfg.port}; "
          f"clients: --reward http://{cfg.host}:{cfg.port} with ${cfg.token_env} set", flush=True)
    if not _is_loopback(cfg.host):
        print("warning: listening beyond this machine over plain HTTP; put HTTPS or an SSH tunnel in front",
              file=sys.stderr)
    return uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                         access_log=False))


def serve(cfg: RewardServeConfig) -> None:
    make_server(cfg).run()


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ---------------------------------------------------------------------------
# The client: a reward term `http://HOST:PORT`
# ---------------------------------------------------------------------------

class RemoteRewardModel:
    """A reward model served by `heed rm serve`, with RewardModel's `score` and `n_members`.

    Requests hold up to the server's --max-batch rows and --max-body-bytes; connection
    errors and 5xx answers are retried `tries` times in all, `backoff_s` seconds after the
    first failure and twice as long after each next one; then a HeedError says why.
    """

    def __init__(self, url: str, *, token_env: str | None = None, tries: int = 4, backoff_s: float = 1.0,
                 timeout_s: float = 600.0):
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        self.token_env = token_env or query.get("token_env", [TOKEN_ENV])[0]
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.tries, self.backoff_s, self.timeout_s = max(1, tries), backoff_s, timeout_s
        token = os.environ.get(self.token_env, "")
        if not token:
            raise HeedError(f"reward server at {self.url}: no token; set ${self.token_env} to the token "
                            "`heed rm serve` was given (or printed)")
        if not usable_token(token):
            raise HeedError(f"reward server at {self.url}: ${self.token_env} must be printable ASCII without "
                            "spaces, as `heed rm serve` requires")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        # no proxies from the environment: the token goes to the reward server and nowhere else
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        info = self._request("/info")
        try:
            self.n_members, self.max_batch = int(info["n_members"]), int(info["max_batch"])
            self.max_body_bytes = int(info["max_body_bytes"])
        except (KeyError, TypeError, ValueError):
            raise HeedError(f"reward server at {self.url}: /info answered {info!r}, not a heed reward server's "
                            "description") from None

    def __repr__(self) -> str:
        return f"RemoteRewardModel({self.url!r})"

    def score(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64
              ) -> tuple[list[float], list[float]]:
        """(mean, std) per (prompt, response), as RewardModel.score, in requests the server takes.
        (`batch_size` is the server's business: its --batch-size.)"""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards: list[float] = []
        stds: list[float] = []
        for rows in self._requests(prompts, responses):
            answer = self._request("/score", b'{"rows": [' + b", ".join(rows) + b"]}")
            got_r, got_s = answer.get("rewards"), answer.get("stds")
            if not (isinstance(got_r, list) and isinstance(got_s, list) and len(got_r) == len(got_s) == len(rows)):
                raise HeedError(f"reward server at {self.url}: /score answered {len(got_r or [])} rewards "
                                f"for {len(rows)} rows")
            rewards += [float(v) for v in got_r]
            stds += [float(v) for v in got_s]
        return rewards, stds

    def _requests(self, prompts: Sequence, responses: Sequence[str]):
        """The rows as JSON, grouped into bodies within the server's limits."""
        room = self.max_body_bytes - 32  # the {"rows": [...]} around them
        rows: list[bytes] = []
        size = 0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            row = json.dumps({"prompt": p, "response": r}, ensure_ascii=False).encode()
            if len(row) + 2 > room:
                raise HeedError(f"reward server at {self.url}: row {i} alone is {len(row)} bytes, over the "
                                f"server's --max-body-bytes {self.max_body_bytes}")
            if rows and (len(rows) == self.max_batch or size + len(row) + 2 > room):
                yield rows
                rows, size = [], 0
            rows.append(row)
            size += len(row) + 2
        if rows:
            yield rows

    def _request(self, path: str, body: bytes | None = None) -> dict:
        """GET (no body) or POST `path`; its JSON answer, after up to `tries` attempts."""
        request = urllib.request.Request(self.url + path, data=body, headers=self._headers,
                                         method="GET" if body is None else "POST")
        for attempt in range(self.tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    text = response.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code == 401:
                    raise HeedError(f"reward server at {self.url} refused the token in ${self.token_env} "
                                    f"({message}); set it to the token `heed rm serve` was given") from None
                if e.code < 500:
                    raise HeedError(f"reward server at {self.url} refused the request: {e.code} {message}") from None
                failure = f"keeps failing ({e.code} {message})"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                failure = f"is gone ({reason})"
                continue
            try:
                answer = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HeedError(f"reward server at {self.url}{path} answered something that is not JSON "
                                f"({text[:80]!r}): is it `heed rm serve`?") from None
            if not isinstance(answer, dict):
                raise HeedError(f"reward server at {self.url}{path} answered {answer!r}")
            return answer
        raise HeedError(f"reward server at {self.url} {failure}: {self.tries} tries failed; is `heed rm serve` "
                        "running there?")


def _error_message(e: urllib.error.HTTPError) -> str:
    """The server's {"error": ...}, or the HTTP reason."""
    try:
        return str(json.loads(e.read()).get("error") or e.reason)
    except (ValueError, AttributeError, OSError):
        return str(e.reason)
