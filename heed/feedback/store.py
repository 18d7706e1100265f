"""The feedback database: items to label, annotators, who is shown what, and every answer.

`Store(url_or_path)` opens (and creates) it: a plain path is a SQLite file, run
in WAL mode; answers, undos, items and users commit with `synchronous=FULL`, so
an answer the server has acknowledged is on disk even if the process (or the
machine) dies the next instant. Claims skip the fsync: losing one costs nothing.
Any other SQLAlchemy URL (`postgresql://...`) works the same way.

Tables:
    items       one row per thing to judge, in queue order (`seq`); `done` counts its
                non-skip answers, `priority` is the active-selection score (0 = queue order);
                a spans item also keeps the labels its spans may be tagged with
    annotators  name, role, and the SHA-256 of the login token (the token itself is never stored)
    claims      the item each annotator is looking at now, with the order its responses
                were displayed in, so a reload shows the same sides and `overlap` is not
                overshot by people labelling at once
    answers     one row per answer, unique per (item, annotator): the database itself
                guarantees an annotator never answers an item twice and a retried
                request is never counted twice
    sessions    browser logins: the SHA-256 of a random session id per login, revoked by
                logout and by a new token (`--reset-token`); the login token itself
                never goes into a cookie
    settings    the server's CSRF secret, so forms stay valid across restarts

Every write is its own transaction. SQLite: `BEGIN IMMEDIATE` and one writer at a
time, so two writers never race on a stale snapshot. PostgreSQL: row locks, so many
annotators work at once: claiming an item locks its row (`FOR UPDATE SKIP LOCKED`:
an item being claimed by someone else is passed over, not waited for) and re-checks
its overlap under that lock; answers are guarded by the unique constraint. Answers are kept in original-response terms:
the displayed order is stored beside them and the mapping is done here, once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from heed.data import FieldError, check_text, get_spans
from heed.utils import HeedError

KINDS = ("pair", "ranking", "thumbs", "rating", "spans")
MEDIA_TYPES = {".png": "image/png", ".gif": "image/gif", ".webp": "image/webp", ".jpg": "image/jpeg",
               ".jpeg": "image/jpeg", ".mp4": "video/mp4", ".webm": "video/webm"}
MAX_RESPONSES = 9          # a ranking is entered with the digit keys 1-9
MAX_TEXT = 100_000         # characters in a prompt or response
MAX_COMMENT = 2000
# What a span can be tagged with, unless the queue says otherwise: the simulated labeler's
# labels (heed.world.oracle.SPAN_LABELS), so people's marks and the oracle's read alike.
DEFAULT_SPAN_LABELS = ("wrong", "irrelevant", "rude", "repeated", "good")
MAX_LABELS = 9             # a span is tagged with the digit keys 1-9
MAX_LABEL_CHARS = 40
CLAIM_SECONDS = 15 * 60    # an item shown to someone is held for them this long
SESSION_SECONDS = 7 * 24 * 3600  # a browser login lasts this long (logout ends it sooner)
FAST_SECONDS = 1.0         # an answer given sooner than this after its page was shown is flagged
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

metadata = MetaData()
items = Table(
    "items", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(200), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("responses", Text, nullable=False),       # JSON: [str | {"media": path}, ...]
    Column("overlap", Integer, nullable=False),
    Column("meta", Text, nullable=False),            # JSON object
    Column("done", Integer, nullable=False, default=0),
    Column("priority", Float, nullable=False, default=0.0),
    Column("rm_scores", Text, nullable=True),        # JSON: reward-model mean score per response
    Column("labels", Text, nullable=True),           # JSON: spans items: the labels a span may have
    Column("created_at", Float, nullable=False),
)
# Open items in serving order; partial, so finished items cost nothing to skip past.
Index("ix_items_open", items.c.priority.desc(), items.c.seq,
      sqlite_where=items.c.done < items.c.overlap, postgresql_where=items.c.done < items.c.overlap)
annotators = Table(
    "annotators", metadata,
    Column("name", String(64), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
)
claims = Table(
    "claims", metadata,
    Column("annotator", String(64), primary_key=True),
    Column("item_id", String(200), nullable=False, index=True),
    Column("displayed_order", Text, nullable=False),  # JSON: original index shown at each position
    Column("shown_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    # Each time the item's page is rendered it gets a new `showing` id, which its form
    # sends back: an answer from a page rendered for another item or an earlier showing
    # is refused, and the time since `rendered_at` tells an implausibly fast answer.
    Column("showing", String(32), nullable=True),
    Column("rendered_at", Float, nullable=True),
)
answers = Table(
    "answers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", String(200), nullable=False),
    Column("annotator", String(64), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("choice", String(16), nullable=True),     # pairs: "0" | "1" | "tie" | "both_bad"; any kind: "skip"
    Column("ranking", Text, nullable=True),          # JSON: original indices, best first
    Column("label", String(8), nullable=True),       # thumbs: "up" | "down"
    Column("score", Integer, nullable=True),         # ratings: 1..7
    Column("spans", Text, nullable=True),            # spans: JSON [{"start", "end", "label"}], code points
    Column("correction", Text, nullable=True),       # spans: the response as the annotator rewrote it
    Column("comment", Text, nullable=True),
    Column("displayed_order", Text, nullable=False),
    Column("shown_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("answered_in", Float, nullable=True),     # seconds from the page being shown to the answer
    Column("flag", String(16), nullable=True),       # "fast": answered in under `fast_seconds`
    UniqueConstraint("item_id", "annotator", name="uq_answer_item_annotator"),
)
sessions = Table(
    "sessions", metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("annotator", String(64), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)
# Columns added since the first release: an older database gets them on open.
_ADDED_COLUMNS = {"items": ("labels",), "claims": ("showing", "rendered_at"),
                  "answers": ("answered_in", "flag", "spans", "correction")}
settings = Table(
    "settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


# The statements on every request, built once (building SQLAlchemy expressions per call
# costs more than running them). Parameters: who, iid, now, expires, delta, digest.
P = bindparam
_CLAIM = select(claims).where(claims.c.annotator == P("who"))
_ITEM = select(items).where(items.c.id == P("iid"))
_ITEM_KIND = select(items.c.kind).where(items.c.id == P("iid"))
_ITEM_TO_MARK = select(items.c.responses, items.c.labels).where(items.c.id == P("iid"))
_EXTEND_CLAIM = update(claims).where(claims.c.annotator == P("who")).values(expires_at=P("expires"))
_RENDER_CLAIM = (update(claims).where(claims.c.annotator == P("who"))
                 .values(expires_at=P("expires"), showing=P("showing"), rendered_at=P("now")))
_DROP_CLAIM = delete(claims).where(claims.c.annotator == P("who"))
_ANSWERED = select(answers.c.id).where(answers.c.item_id == P("iid"), answers.c.annotator == P("who"))
_COUNT_DONE = update(items).where(items.c.id == P("iid")).values(done=items.c.done + P("delta"))
_USER = select(annotators).where(annotators.c.token_hash == P("digest"))
_SESSION_USER = (select(annotators).join(sessions, sessions.c.annotator == annotators.c.name)
                 .where(sessions.c.id_hash == P("digest"), sessions.c.expires_at > P("now")))
_NEXT = (select(items)
         .where(items.c.done < items.c.overlap,
                ~select(answers.c.id).where(answers.c.item_id == items.c.id, answers.c.annotator == P("who")).exists(),
                items.c.done + select(func.count()).select_from(claims)
                .where(claims.c.item_id == items.c.id, claims.c.expires_at > P("now")).scalar_subquery()
                < items.c.overlap)
         .order_by(items.c.priority.desc(), items.c.seq).limit(1)
         # PostgreSQL: an item another annotator is claiming right now is passed over, not waited
         # for (row locks, not a whole-database lock); SQLite has no such clause and needs none
         .with_for_update(of=items, skip_locked=True))
# Re-checked once the item's row is locked: a new statement sees every claim committed before
# it, and any other claim of this item waits for that lock, so an item's overlap is never overshot.
_STILL_OPEN = (select(items.c.id)
               .where(items.c.id == P("iid"),
                      items.c.done + select(func.count()).select_from(claims)
                      .where(claims.c.item_id == items.c.id, claims.c.expires_at > P("now")).scalar_subquery()
                      < items.c.overlap))


class AnswerError(Exception):
    """An answer the app must refuse; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------
# Items: validation shared by the queue-file reader and `Store.add_items`
# ---------------------------------------------------------------------------

def parse_item(row: dict, *, base_dir: Path | None = None, default_overlap: int = 1,
               default_labels: Sequence[str] | None = None) -> dict:
    """Validate one item; raise FieldError naming the bad field. Relative media paths resolve
    against `base_dir` (the queue file's folder), and must exist. A spans item without its own
    `labels` gets `default_labels` (DEFAULT_SPAN_LABELS when None)."""
    kind = row.get("kind", "pair")
    if kind not in KINDS:
        raise FieldError("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise FieldError("prompt", "missing" if prompt is None else f"expected a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_TEXT:
        raise FieldError("prompt", f"longer than {MAX_TEXT} characters")
    check_text("prompt", prompt)  # a lone surrogate ("\ud800" in JSON) cannot be hashed or stored
    responses = row.get("responses")
    if not isinstance(responses, list):
        raise FieldError("responses", "expected a list of responses")
    want = {"pair": (2, 2), "ranking": (2, MAX_RESPONSES), "thumbs": (1, 1), "rating": (1, 1), "spans": (1, 1)}[kind]
    if not want[0] <= len(responses) <= want[1]:
        n = str(want[0]) if want[0] == want[1] else f"{want[0]} to {want[1]}"
        raise FieldError("responses", f"a {kind} item needs {n} responses, got {len(responses)}")
    clean = []
    for i, r in enumerate(responses):
        if isinstance(r, str):
            if len(r) > MAX_TEXT:
                raise FieldError(f"responses[{i}]", f"longer than {MAX_TEXT} characters")
            clean.append(check_text(f"responses[{i}]", r))
        elif kind == "spans":
            raise FieldError(f"responses[{i}]", "a spans item marks text: expected a string")
        elif isinstance(r, dict) and set(r) == {"media"} and isinstance(r["media"], str):
            check_text(f"responses[{i}].media", r["media"])
            try:
                path = Path(r["media"]).expanduser()
                if not path.is_absolute():
                    path = (base_dir or Path.cwd()) / path
                path = path.resolve()
                found = path.is_file()
            except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, ~nobody
                raise FieldError(f"responses[{i}].media", f"not a usable file path ({e})") from None
            if path.suffix.lower() not in MEDIA_TYPES:
                raise FieldError(f"responses[{i}].media", f"unsupported file type {path.suffix!r} "
                                 f"(use {', '.join(MEDIA_TYPES)})")
            if not found:
                raise FieldError(f"responses[{i}].media", f"file not found: {path}")
            clean.append({"media": str(path)})
        else:
            raise FieldError(f"responses[{i}]", 'expected a string or {"media": "path/to/file"}')
    overlap = row.get("overlap", default_overlap)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 1 <= overlap <= 100:
        raise FieldError("overlap", f"expected an integer from 1 to 100, got {overlap!r}")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise FieldError("meta", "expected a JSON object")
    labels = row.get("labels")
    if kind == "spans":
        if labels is None:
            labels = DEFAULT_SPAN_LABELS if default_labels is None else default_labels
        labels = parse_labels(labels)
    elif labels is not None:
        raise FieldError("labels", "only spans items have labels")
    item_id = row.get("id")
    if item_id is None:
        # Content-addressed, so loading the same queue file twice adds nothing twice. A spans
        # item's labels are part of what it asks (other kinds' ids are as they always were).
        body = json.dumps([kind, prompt, clean] + ([labels] if labels else []), sort_keys=True, ensure_ascii=False)
        item_id = "h" + hashlib.sha256(body.encode()).hexdigest()[:20]
    elif not isinstance(item_id, str) or not 1 <= len(item_id) <= 200 or not item_id.isprintable():
        raise FieldError("id", "expected a printable string of 1 to 200 characters")
    return {"id": item_id, "kind": kind, "prompt": prompt, "responses": clean, "overlap": overlap, "meta": meta,
            "labels": labels}


def parse_labels(labels) -> list[str]:
    """A spans item's label set: 1 to 9 distinct names (one digit key each), each printable,
    without commas (`--labels` is a comma-separated list) or spaces at either end."""
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise FieldError("labels", f"expected a list of 1 to {MAX_LABELS} label names")
    if not 1 <= len(labels) <= MAX_LABELS:
        raise FieldError("labels", f"expected 1 to {MAX_LABELS} labels (one digit key each), got {len(labels)}")
    for label in labels:
        if (not isinstance(label, str) or not label.strip() or label != label.strip() or "," in label
                or len(label) > MAX_LABEL_CHARS or not label.isprintable()):
            raise FieldError("labels", f"{label!r} is not a label name: use 1 to {MAX_LABEL_CHARS} printable "
                                       "characters, no comma, no space at either end")
    if len(set(labels)) != len(labels):
        raise FieldError("labels", f"each label once: {', '.join(labels)}")
    return list(labels)


def map_answer(kind: str, displayed_order: list[int], form: dict, *, response: str = "",
               labels: Sequence[str] = ()) -> dict:
    """An answer given in displayed positions -> the stored answer in original-response terms.

    `form` keys: `choice` ("A" | "B" | "tie" | "both_bad" | "skip" for pairs; "skip" for any
    kind), `ranking` (displayed positions, best first), `label` ("up" | "down"), `score` (1..7),
    `spans` and `correction` (see `check_spans`; `response` and `labels` are the spans item's),
    `comment`. Raises AnswerError for anything malformed.
    """
    out: dict[str, Any] = {"choice": None, "ranking": None, "label": None, "score": None, "spans": None,
                           "correction": None}
    comment = form.get("comment") or None
    if comment is not None:
        if not isinstance(comment, str):
            raise AnswerError("comment: expected a string")
        if len(comment) > MAX_COMMENT:
            raise AnswerError(f"comment: at most {MAX_COMMENT} characters")
        comment = comment.strip() or None
    out["comment"] = comment
    choice = form.get("choice")
    if choice == "skip":
        out["choice"] = "skip"
        return out
    if kind == "pair":
        if choice in ("A", "B"):
            out["choice"] = str(displayed_order[0 if choice == "A" else 1])
        elif choice in ("tie", "both_bad"):
            out["choice"] = choice
        else:
            raise AnswerError("choice: expected A, B, tie, both_bad or skip")
    elif kind == "ranking":
        ranking = form.get("ranking")
        k = len(displayed_order)
        if (not isinstance(ranking, list) or sorted(ranking) != list(range(k))
                or not all(type(r) is int for r in ranking)):
            raise AnswerError(f"ranking: expected each of the {k} responses exactly once, best first")
        out["ranking"] = [displayed_order[r] for r in ranking]
    elif kind == "thumbs":
        if form.get("label") not in ("up", "down"):
            raise AnswerError("label: expected up or down")
        out["label"] = form["label"]
    elif kind == "spans":
        out["spans"], out["correction"] = check_spans(form.get("spans"), form.get("correction"), response, labels)
    else:
        score = form.get("score")
        if type(score) is not int or not 1 <= score <= 7:
            raise AnswerError("score: expected a whole number from 1 to 7")
        out["score"] = score
    return out


def check_spans(spans, correction, response: str, labels: Sequence[str]) -> tuple[list[dict], str | None]:
    """A spans answer, validated: (spans sorted by start, the correction or None).

    Spans are code-point offsets into `response` (Python string indices, end exclusive), as
    `heed.data` reads them, and are checked by the same code; each label must be one of the
    item's. A correction that is blank or the response unchanged (but for line endings) is no
    correction. An answer must mark something or correct something: an empty one is refused,
    not stored as "fine".
    """
    try:
        marked = get_spans({"spans": [] if spans is None else spans}, response)
    except FieldError as e:  # "spans overlap: ..." says its field already
        raise AnswerError(e.message if e.message.startswith(f"{e.field} ") else f"{e.field}: {e.message}") from None
    for span in marked:
        if span.label not in labels:
            raise AnswerError(f"span {span.start}-{span.end}: {span.label!r} is not one of this item's labels "
                              f"({', '.join(labels)})")
    if correction is not None:
        if not isinstance(correction, str):
            raise AnswerError("correction: expected a string")
        if len(correction) > MAX_TEXT:
            raise AnswerError(f"correction: at most {MAX_TEXT} characters")
        try:
            check_text("correction", correction)
        except FieldError as e:
            raise AnswerError(f"correction: {e.message}") from None
        if not correction.strip() or correction.replace("\r\n", "\n") == response.replace("\r\n", "\n"):
            correction = None  # a browser's textarea turns the response's CRLF into LF and back
    if not marked and correction is None:
        raise AnswerError("Mark at least one span or write a correction before submitting (or skip).")
    return [{"start": s.start, "end": s.end, "label": s.label} for s in marked], correction


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------

def _make_engine(url_or_path: str | Path):
    url = str(url_or_path)
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # the driver heed installs (psycopg 3)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True), False
    engine = create_engine(url, pool_size=10, max_overflow=20,
                           connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # an acknowledged answer survives a crash (see _on_begin)
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        options = conn.get_execution_options()
        if options.get("heed_write"):
            # fsync at commit for what must survive anything (answers); a claim may skip it,
            # and the next answer's fsync writes it out too.
            conn.exec_driver_sql("PRAGMA synchronous=" + ("FULL" if options.get("heed_durable") else "NORMAL"))
            # A write takes the lock up front; a deferred transaction that reads and then
            # writes can fail with SQLITE_BUSY_SNAPSHOT in WAL mode instead of waiting.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine, True


class Store:
    """Items, annotators, claims and answers in one database (see the module docstring)."""

    def __init__(self, url_or_path: str | Path, *, claim_seconds: float = CLAIM_SECONDS,
                 fast_seconds: float = FAST_SECONDS):
        self.engine, self.is_sqlite = _make_engine(url_or_path)
        self.name = self.engine.url.render_as_string(hide_password=True)  # for messages
        self.claim_seconds, self.fast_seconds = claim_seconds, fast_seconds
        # SQLite: one writer at a time inside this process, so threads queue here instead
        # of spinning in SQLite's busy handler (other processes still wait on the file lock).
        # PostgreSQL locks rows, not the database: no lock here.
        self._lock: Any = threading.Lock() if self.is_sqlite else nullcontext()
        self._rng = random.SystemRandom()
        metadata.create_all(self.engine)
        self._add_missing_columns()
        self._serve_lock: Any = None

    def _add_missing_columns(self) -> None:
        have = inspect(self.engine)
        for table_name, names in _ADDED_COLUMNS.items():
            present = {c["name"] for c in have.get_columns(table_name)}
            table = metadata.tables[table_name]
            for name in names:
                if name not in present:
                    column = table.c[name]
                    kind = column.type.compile(dialect=self.engine.dialect)
                    with self._write() as conn:
                        conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        if self._serve_lock is not None:
            self._serve_lock.close()
            self._serve_lock = None
        self.engine.dispose()

    def lock_for_serving(self) -> None:
        """Make this process the one server of this database, or raise HeedError naming the
        other. SQLite: an exclusive lock on `DB.serve-lock` beside the file; PostgreSQL: a
        session advisory lock. Either is released when the process ends, however it ends."""
        if self._serve_lock is not None:
            return
        if self.is_sqlite:
            import fcntl

            path = Path(self.engine.url.database).with_name(Path(self.engine.url.database).name + ".serve-lock")
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                other = handle.read().strip() or "another process"
                handle.close()
                raise HeedError(f"{self.name} is already being served ({other}); one server per database") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            self._serve_lock = handle
        elif self.engine.dialect.name == "postgresql":
            conn = self.engine.connect()
            got = conn.exec_driver_sql("SELECT pg_try_advisory_lock(7236371)").scalar()
            conn.commit()
            if not got:
                conn.close()
                raise HeedError(f"{self.name} is already being served by another heed label serve; "
                                "one server per database")
            self._serve_lock = conn

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[Any]:
        with self._lock, self.engine.connect() as conn:
            conn.execution_options(heed_write=True, heed_durable=durable)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- items ---------------------------------------------------------------

    def add_items(self, new_items: list[dict], *, default_overlap: int = 1,
                  default_labels: Sequence[str] | None = None) -> list[str]:
        """Validate and append items to the queue; returns their ids in order.

        An item whose id is already stored with the same content is left as it is (so a
        queue file can be loaded again); the same id with different content is an error.
        """
        parsed = []
        for n, row in enumerate(new_items):
            try:
                if not isinstance(row, dict):
                    raise FieldError(None, f"expected a dict, got {type(row).__name__}")
                parsed.append(parse_item(row, default_overlap=default_overlap, default_labels=default_labels))
            except FieldError as e:
                field = f" field '{e.field}'" if e.field else ""
                raise HeedError(f"item {n}{field}: {e.message}") from None
        return self._insert_items(parsed)

    def _insert_items(self, parsed: list[dict]) -> list[str]:
        now = time.time()
        ids = [p["id"] for p in parsed]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise HeedError(f"item id {dup!r} appears twice in the same batch")
        with self._write() as conn:
            existing: dict[str, tuple] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for row in conn.execute(select(items.c.id, items.c.kind, items.c.prompt, items.c.responses,
                                               items.c.labels).where(items.c.id.in_(chunk))):
                    existing[row.id] = (row.kind, row.prompt, json.loads(row.responses),
                                        None if row.labels is None else json.loads(row.labels))
            rows = []
            for p in parsed:
                if p["id"] in existing:
                    if existing[p["id"]] != (p["kind"], p["prompt"], p["responses"], p["labels"]):
                        raise HeedError(f"item id {p['id']!r} is already in the queue with different content")
                    continue
                rows.append({"id": p["id"], "kind": p["kind"], "prompt": p["prompt"],
                             "responses": json.dumps(p["responses"], ensure_ascii=False),
                             "overlap": p["overlap"], "meta": json.dumps(p["meta"], ensure_ascii=False),
                             "labels": None if p["labels"] is None else json.dumps(p["labels"], ensure_ascii=False),
                             "done": 0, "priority": 0.0, "created_at": now})
            if rows:
                conn.execute(insert(items), rows)
        return ids

    def get_item(self, item_id: str | None = None, *, seq: int | None = None) -> dict | None:
        cond = items.c.id == item_id if seq is None else items.c.seq == seq
        with self._read() as conn:
            row = conn.execute(select(items).where(cond)).first()
        return None if row is None else _item_dict(row)

    def all_items(self) -> list[dict]:
        with self._read() as conn:
            return [_item_dict(r) for r in conn.execute(select(items).order_by(items.c.seq))]

    def unscored_items(self, limit: int = 256) -> list[dict]:
        """Items the active-selection scorer has not seen yet (no reward-model scores)."""
        with self._read() as conn:
            rows = conn.execute(select(items).where(items.c.rm_scores.is_(None))
                                .order_by(items.c.seq).limit(limit))
            return [_item_dict(r) for r in rows]

    def set_scores(self, scored: dict[str, tuple[float, list[float]]]) -> None:
        """item id -> (priority, reward-model mean score per response)."""
        with self._write() as conn:
            for item_id, (priority, scores) in scored.items():
                conn.execute(update(items).where(items.c.id == item_id)
                             .values(priority=float(priority), rm_scores=json.dumps(scores)))

    # -- annotators ----------------------------------------------------------

    def add_user(self, name: str, *, admin: bool = False, reset: bool = False) -> str:
        """Create an annotator (or give an existing one a new token) and return the login token."""
        if not NAME_RE.match(name):
            raise HeedError(f"annotator name {name!r}: use 1-64 letters, digits, or . _ @ -")
        token = secrets.token_urlsafe(24)
        role = "admin" if admin else "annotator"
        with self._write() as conn:
            exists = conn.execute(select(annotators.c.name).where(annotators.c.name == name)).first()
            if exists and not reset:
                raise HeedError(f"annotator {name!r} already exists (use --reset-token for a new token)")
            if exists:
                conn.execute(update(annotators).where(annotators.c.name == name)
                             .values(token_hash=hash_token(token), role=role))
                conn.execute(delete(sessions).where(sessions.c.annotator == name))  # logged out everywhere
            else:
                conn.execute(insert(annotators).values(name=name, token_hash=hash_token(token), role=role,
                                                       created_at=time.time()))
        return token

    def authenticate(self, token: str | None) -> User | None:
        if not token or len(token) > 200:
            return None
        digest = hash_token(token)
        with self._read() as conn:
            row = conn.execute(_USER, {"digest": digest}).first()
        # Looked up by hash, then compared in constant time all the same.
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return User(row.name, row.role)

    def start_session(self, name: str, *, seconds: float = SESSION_SECONDS) -> str:
        """A new browser session for a logged-in annotator; returns its id (for the cookie).
        Only its hash is stored. Expired sessions are cleared out on the way."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        with self._write(durable=False) as conn:
            conn.execute(delete(sessions).where(sessions.c.expires_at <= now))
            conn.execute(insert(sessions).values(id_hash=hash_token(session_id), annotator=name,
                                                 created_at=now, expires_at=now + seconds))
        return session_id

    def session_user(self, session_id: str | None) -> User | None:
        if not session_id or len(session_id) > 200:
            return None
        with self._read() as conn:
            row = conn.execute(_SESSION_USER, {"digest": hash_token(session_id), "now": time.time()}).first()
        return None if row is None else User(row.name, row.role)

    def end_session(self, session_id: str) -> None:
        with self._write() as conn:
            conn.execute(delete(sessions).where(sessions.c.id_hash == hash_token(session_id)))

    def users(self) -> list[User]:
        with self._read() as conn:
            return [User(r.name, r.role) for r in conn.execute(select(annotators).order_by(annotators.c.name))]

    def secret(self) -> bytes:
        """The server's signing secret, created once and kept, so forms outlive a restart."""
        with self._read() as conn:
            row = conn.execute(select(settings.c.value).where(settings.c.key == "secret")).first()
        if row is None:
            with self._write() as conn:
                row = conn.execute(select(settings.c.value).where(settings.c.key == "secret")).first()
                if row is None:
                    conn.execute(insert(settings).values(key="secret", value=secrets.token_hex(32)))
            return self.secret()
        return bytes.fromhex(row.value)

    # -- serving -------------------------------------------------------------

    def next_item(self, annotator: str) -> tuple[dict, list[int]] | None:
        """The item this annotator should see now and its displayed order, or None when done.

        Keeps their current claim if they have one; otherwise claims the first open item
        (highest priority, then queue order) that they have not answered and that others
        are not already filling.
        """
        shown = self._claim_next(annotator, render=False)
        return None if shown is None else shown[:2]

    def show_item(self, annotator: str) -> tuple[dict, list[int], str] | None:
        """`next_item` for a page about to be rendered: also starts a new showing of it, whose
        id the page's form sends back with the answer (see `submit`)."""
        return self._claim_next(annotator, render=True)

    def _claim_next(self, annotator: str, *, render: bool):
        try:
            return self._claim_next_once(annotator, render=render)
        except IntegrityError:  # PostgreSQL: the same annotator's other request claimed first
            return self._claim_next_once(annotator, render=render)

    def _claim_next_once(self, annotator: str, *, render: bool):
        now = time.time()
        who = {"who": annotator}
        showing = secrets.token_hex(8) if render else None
        with self._write(durable=False) as conn:
            claim = conn.execute(_CLAIM, who).first()
            if claim is not None and claim.expires_at > now:
                row = conn.execute(_ITEM, {"iid": claim.item_id}).first()
                if row is not None:
                    params = {**who, "expires": now + self.claim_seconds, "showing": showing, "now": now}
                    conn.execute(_RENDER_CLAIM if render else _EXTEND_CLAIM, params)
                    return _item_dict(row), json.loads(claim.displayed_order), showing or claim.showing
            if claim is not None:
                conn.execute(_DROP_CLAIM, who)
            passed: list[str] = []
            while True:
                query = _NEXT if not passed else _NEXT.where(items.c.id.not_in(passed))
                row = conn.execute(query, {**who, "now": now}).first()
                if row is None:
                    return None
                if conn.execute(_STILL_OPEN, {"iid": row.id, "now": now}).first() is not None:
                    break
                passed.append(row.id)  # filled by a claim committed since the query began
            item = _item_dict(row)
            order = list(range(len(item["responses"])))
            self._rng.shuffle(order)  # sides randomised per item and per annotator
            conn.execute(insert(claims), {"annotator": annotator, "item_id": item["id"],
                                          "displayed_order": json.dumps(order), "shown_at": now,
                                          "expires_at": now + self.claim_seconds,
                                          "showing": showing, "rendered_at": now if render else None})
            return item, order, showing

    def submit(self, annotator: str, item_id: str, form: dict, *, showing: str | None = None) -> dict:
        """Record an answer to the item the annotator was shown, in its own transaction.

        `form` is in displayed positions (see `map_answer`). `showing`, when given, is the id
        `show_item` gave the page the answer comes from. Raises AnswerError: 409 when the item
        was already answered by them, is not the one they were shown, or was shown again since.
        An answer given under `fast_seconds` after its page was shown is stored flagged "fast".
        """
        now = time.time()
        who = {"who": annotator}
        with self._write() as conn:
            claim = conn.execute(_CLAIM, who).first()
            if claim is None or claim.item_id != item_id:
                if conn.execute(_ANSWERED, {**who, "iid": item_id}).first() is not None:
                    raise AnswerError("you have already answered this item", 409)
                raise AnswerError("this item is not the one you were shown; reload to get the current one", 409)
            if showing is not None and not (claim.showing and hmac.compare_digest(claim.showing, showing)):
                raise AnswerError("this page is out of date (the item was shown again since); "
                                  "answer it on the current page", 409)
            kind = conn.execute(_ITEM_KIND, {"iid": item_id}).scalar_one()
            order = json.loads(claim.displayed_order)
            if kind == "spans":  # validated against the response and label set as stored
                responses, labels = conn.execute(_ITEM_TO_MARK, {"iid": item_id}).one()
                answer = map_answer(kind, order, form, response=json.loads(responses)[0], labels=json.loads(labels))
            else:
                answer = map_answer(kind, order, form)
            answered_in = now - (claim.rendered_at if claim.rendered_at is not None else claim.shown_at)
            flag = "fast" if answer["choice"] != "skip" and answered_in < self.fast_seconds else None
            values = dict(item_id=item_id, annotator=annotator, kind=kind,
                          ranking=None if answer["ranking"] is None else json.dumps(answer["ranking"]),
                          choice=answer["choice"], label=answer["label"], score=answer["score"],
                          spans=None if answer["spans"] is None else json.dumps(answer["spans"], ensure_ascii=False),
                          correction=answer["correction"], comment=answer["comment"],
                          displayed_order=claim.displayed_order, shown_at=claim.shown_at, created_at=now,
                          answered_in=answered_in, flag=flag)
            try:
                result = conn.execute(insert(answers), values)
            except IntegrityError:  # defence in depth: the unique constraint is the real guard
                raise AnswerError("you have already answered this item", 409) from None
            if answer["choice"] != "skip":
                conn.execute(_COUNT_DONE, {"iid": item_id, "delta": 1})
            conn.execute(_DROP_CLAIM, who)
            answer_id = result.inserted_primary_key[0]
        return {"id": answer_id, "item_id": item_id, "annotator": annotator, "kind": kind,
                **answer, "displayed_order": order, "created_at": iso(now),
                "answered_in": round(answered_in, 3), "flag": flag}

    def undo(self, annotator: str) -> str | None:
        """Withdraw the annotator's latest answer and show them that item again, same sides.
        Returns the item id, or None when there is nothing to undo."""
        now = time.time()
        with self._write() as conn:
            last = conn.execute(select(answers).where(answers.c.annotator == annotator)
                                .order_by(answers.c.id.desc()).limit(1)).first()
            if last is None:
                return None
            if conn.execute(delete(answers).where(answers.c.id == last.id)).rowcount != 1:
                return None  # a concurrent undo (PostgreSQL) withdrew it first
            if last.choice != "skip":
                conn.execute(_COUNT_DONE, {"iid": last.item_id, "delta": -1})
            conn.execute(_DROP_CLAIM, {"who": annotator})
            conn.execute(insert(claims), {"annotator": annotator, "item_id": last.item_id,
                                          "displayed_order": last.displayed_order, "shown_at": now,
                                          "expires_at": now + self.claim_seconds})
            return last.item_id

    # -- reading answers and progress ----------------------------------------

    def answers(self, item_ids: list[str] | None = None) -> list[dict]:
        """Every stored answer (or those for `item_ids`), oldest first; skips included."""
        query = select(answers).order_by(answers.c.id)
        out = []
        with self._read() as conn:
            if item_ids is None:
                rows = list(conn.execute(query))
            else:
                rows = []
                ids = list(item_ids)
                for start in range(0, len(ids), 500):
                    rows += conn.execute(query.where(answers.c.item_id.in_(ids[start:start + 500])))
                rows.sort(key=lambda r: r.id)
        for r in rows:
            out.append({"item_id": r.item_id, "annotator": r.annotator, "kind": r.kind, "choice": r.choice,
                        "ranking": None if r.ranking is None else json.loads(r.ranking), "label": r.label,
                        "score": r.score, "spans": None if r.spans is None else json.loads(r.spans),
                        "correction": r.correction, "comment": r.comment,
                        "displayed_order": json.loads(r.displayed_order),
                        "created_at": iso(r.created_at),
                        "answered_in": None if r.answered_in is None else round(r.answered_in, 3), "flag": r.flag})
        return out

    def progress(self, annotator: str) -> dict:
        """What one annotator has done and how much is left for them."""
        answered = (select(answers.c.id).where(answers.c.item_id == items.c.id,
                                               answers.c.annotator == annotator).exists())
        with self._read() as conn:
            mine = conn.execute(select(func.count(), func.sum(cast(answers.c.choice == "skip", Integer)))
                                .where(answers.c.annotator == annotator)).one()
            left = conn.execute(select(func.count()).select_from(items)
                                .where(items.c.done < items.c.overlap, ~answered)).scalar_one()
            total = conn.execute(select(func.count(), func.sum(cast(items.c.done >= items.c.overlap, Integer)))
                                 .select_from(items)).one()
        return {"answered": mine[0], "skipped": mine[1] or 0, "left": left,
                "total": total[0], "complete": total[1] or 0}

    def overview(self) -> dict:
        """Overall and per-annotator progress, for the admin page."""
        with self._read() as conn:
            total = conn.execute(select(func.count(), func.sum(cast(items.c.done >= items.c.overlap, Integer)),
                                        func.sum(items.c.overlap),
                                        func.sum(case((items.c.done < items.c.overlap, items.c.done),
                                                      else_=items.c.overlap)))
                                 .select_from(items)).one()
            per = conn.execute(select(answers.c.annotator, func.count(),
                                      func.sum(cast(answers.c.choice == "skip", Integer)),
                                      func.max(answers.c.created_at),
                                      func.avg(answers.c.created_at - answers.c.shown_at))
                               .group_by(answers.c.annotator)).all()
            users = conn.execute(select(annotators.c.name, annotators.c.role).order_by(annotators.c.name)).all()
        stats = {r[0]: r for r in per}
        people = []
        for name, role in users:
            r = stats.get(name)
            people.append({"name": name, "role": role, "answers": r[1] - (r[2] or 0) if r else 0,
                           "skips": (r[2] or 0) if r else 0, "last": iso(r[3]) if r else None,
                           "seconds_per_answer": round(r[4], 1) if r and r[4] is not None else None})
        wanted = total[2] or 0
        return {"total": total[0], "complete": total[1] or 0, "answers_wanted": wanted,
                "answers_collected": total[3] or 0, "fraction": (total[3] or 0) / wanted if wanted else 0.0,
                "annotators": people}


def _item_dict(row) -> dict:
    return {"seq": row.seq, "id": row.id, "kind": row.kind, "prompt": row.prompt,
            "responses": json.loads(row.responses), "overlap": row.overlap, "meta": json.loads(row.meta),
            "done": row.done, "priority": row.priority,
            "rm_scores": None if row.rm_scores is None else json.loads(row.rm_scores),
            "labels": None if row.labels is None else json.loads(row.labels)}

