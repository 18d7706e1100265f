"""`heed label serve | add | export | user add`: the labelling app from the command line.

    heed label user add --db labels.db --name ana --admin     # prints ana's login token
    heed label serve --db labels.db --queue items.jsonl --guidelines guide.md
    heed label add --db labels.db --queue more.jsonl          # while the server runs
    heed label add --db labels.db --queue marks.jsonl --labels wrong,rude,good
    heed label export --db labels.db --out pairs.jsonl --kind pairs

The queue file is JSONL, one item per line:
    {"id": "optional", "prompt": "...", "responses": ["...", "..."], "kind": "pair",
     "overlap": 1, "meta": {}}
with `kind` one of pair (2 responses), ranking (2-9), thumbs (1), rating (1), spans
(1 text response, whose spans people mark and tag; its "labels" default to --labels);
a response may be {"media": "clip.gif"} (png, gif, webp, jpg, mp4, webm; a relative
path is relative to the queue file).
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from heed.config import option
from heed.data import read_rows, write_jsonl
from heed.feedback.export import EXPORT_KINDS
from heed.utils import HeedError

EXPORT_CHOICES = tuple(EXPORT_KINDS)
LABELS_HELP = ("labels a span may be tagged with, for spans items that do not name theirs "
               "(default: wrong,irrelevant,rude,repeated,good; at most 9, keys 1-9)")


def read_queue(path: str | Path, *, overlap: int = 1, labels: list[str] | None = None,
               skip_invalid: bool = False) -> list[dict]:
    """Items from a queue file, each validated; a bad row names its line and field."""
    from heed.feedback.store import parse_item

    path = Path(path)
    return read_rows(path, lambda row: parse_item(row, base_dir=path.resolve().parent, default_overlap=overlap,
                                                  default_labels=labels),
                     skip_invalid=skip_invalid, what="items")


def _check_overlap(overlap: int) -> None:
    if not 1 <= overlap <= 100:
        raise HeedError(f"--overlap must be from 1 to 100, got {overlap}")


def _check_labels(labels: list[str] | None) -> None:
    """--labels, checked once up front rather than as every spans row's error."""
    from heed.data import FieldError
    from heed.feedback.store import parse_labels

    if labels is not None:
        try:
            parse_labels(labels)
        except FieldError as e:
            raise HeedError(f"--labels: {e.message}") from None


def _add_queue(store, queue: str, overlap: int, labels: list[str] | None, skip_invalid: bool) -> tuple[int, int]:
    """(items in the file, items newly added)."""
    _check_labels(labels)
    parsed = read_queue(queue, overlap=overlap, labels=labels, skip_invalid=skip_invalid)
    before = store.overview()["total"]
    store.add_items(parsed, default_overlap=overlap)
    return len(parsed), store.overview()["total"] - before


@dataclass
class ServeConfig:
    db: str = option(help="database: a SQLite file path, or an SQLAlchemy URL such as postgresql://...")
    queue: str | None = option(None, "JSONL file of items to add at start (items already stored are kept as they are)")
    host: str = option("127.0.0.1", "address to listen on; keep the loopback default unless behind an HTTPS proxy")
    port: int = option(8000, "port to listen on")
    guidelines: str | None = option(None, "Markdown file with the labelling guidelines, shown to annotators")
    reward_model: str | None = option(None, "reward-model ensemble directory: serve items it disagrees on first")
    overlap: int = option(1, "independent answers wanted per item, for items that do not say")
    labels: list[str] | None = option(None, LABELS_HELP)
    skip_invalid: bool = option(False, "skip invalid queue rows (counted) instead of stopping at the first")
    claim_minutes: float = option(15.0, "minutes an item shown to someone stays reserved for them")
    max_body_kb: int = option(64, "largest request body accepted, in KiB")
    secure_cookies: bool = option(False, "mark cookies Secure (set this when serving through HTTPS)")
    allowed_hosts: list[str] = option([], "host names people reach this server by (the Host header), besides "
                                          "localhost, the --host address and this machine's names; others "
                                          "are refused (DNS rebinding)")
    fast_seconds: float = option(1.0, "flag answers given sooner than this after their item was shown")


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from heed.feedback.app import LOCAL_HOSTS, create_app
    from heed.feedback.store import Store

    _check_overlap(cfg.overlap)
    if not 0 < cfg.port < 65536:
        raise HeedError(f"--port must be from 1 to 65535, got {cfg.port}")
    if cfg.claim_minutes <= 0 or cfg.max_body_kb <= 0 or cfg.fast_seconds < 0:
        raise HeedError("--claim-minutes and --max-body-kb must be positive, --fast-seconds not negative")
    store = Store(cfg.db, claim_seconds=cfg.claim_minutes * 60, fast_seconds=cfg.fast_seconds)
    store.lock_for_serving()  # one server per database: a second one stops here, naming the first
    sock = _bind(cfg.host, cfg.port)  # before saying "serving": a port in use is an error, not a surprise
    if cfg.queue:
        n, added = _add_queue(store, cfg.queue, cfg.overlap, cfg.labels, cfg.skip_invalid)
        print(f"{cfg.queue}: {n} items, {added} new")
    guidelines = None
    if cfg.guidelines:
        path = Path(cfg.guidelines)
        if not path.is_file():
            raise HeedError(f"{path}: guidelines file not found")
        guidelines = path.read_text(encoding="utf-8")
    scorer = None
    if cfg.reward_model:
        scorer = _start_active_selection(store, cfg.reward_model)
    hosts = _allowed_hosts(cfg.host, cfg.allowed_hosts, LOCAL_HOSTS)
    app = create_app(store, guidelines=guidelines, reward_model_name=cfg.reward_model, scorer=scorer,
                     secure_cookies=cfg.secure_cookies, max_body=cfg.max_body_kb * 1024, allowed_hosts=hosts)
    overview = store.overview()
    shown_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"heed label: {overview['total']} items ({overview['complete']} complete), "
          f"{len(overview['annotators'])} annotators; serving http://{shown_host}:{cfg.port}/login", flush=True)
    if not overview["annotators"]:
        print(f"no annotators yet: heed label user add --db {cfg.db} --name NAME [--admin]")
    if not _is_loopback(cfg.host):
        print("warning: listening beyond this machine; put HTTPS in front and pass --secure-cookies, and name "
              f"the host people use with --allowed-hosts (now: {', '.join(hosts)})", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


def _bind(host: str, port: int):
    """A listening socket on (host, port), or a HeedError saying why not."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise HeedError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                        + (" (another server is using that port: choose another with --port)"
                           if e.errno == 98 else "")) from None
    sock.set_inheritable(True)
    return sock


def _allowed_hosts(host: str, extra: list[str], local: tuple[str, ...]) -> list[str]:
    """The names a request's Host header may carry: loopback names, the address listened on
    (unless a wildcard), this machine's names when listening beyond loopback, and `extra`."""
    import socket

    names = list(local)
    if host not in ("0.0.0.0", "::", ""):
        names.append(host)
    if not _is_loopback(host):
        names += [socket.gethostname(), socket.getfqdn()]
    names += extra
    return list(dict.fromkeys(n.lower() for n in names if n))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _start_active_selection(store, path: str):
    """Score the queue with the ensemble now, then keep scoring new items in the background."""
    from heed.feedback.active import Scorer, score_pending

    if not Path(path).is_dir():
        raise HeedError(f"{path}: reward model directory not found")
    try:
        from heed.reward_model import load_reward_model

        rm = load_reward_model(path)
    except ImportError as e:  # the reward-model code is an optional part of an install
        raise HeedError(f"--reward-model needs heed's reward-model code, which failed to import: {e}") from None
    n = score_pending(store, rm, show_progress=True)
    print(f"active selection: scored {n} items with {path}")
    scorer = Scorer(store, rm)
    scorer.start()
    return scorer


@dataclass
class AddConfig:
    db: str = option(help="database the server uses (SQLite path or SQLAlchemy URL)")
    queue: str = option(help="JSONL file of items to append to the queue")
    overlap: int = option(1, "independent answers wanted per item, for items that do not say")
    labels: list[str] | None = option(None, LABELS_HELP)
    skip_invalid: bool = option(False, "skip invalid rows (counted) instead of stopping at the first")


def add(cfg: AddConfig) -> None:
    from heed.feedback.store import Store

    _check_overlap(cfg.overlap)
    store = Store(cfg.db)
    n, added = _add_queue(store, cfg.queue, cfg.overlap, cfg.labels, cfg.skip_invalid)
    print(f"{cfg.queue}: {n} items, {added} new, {n - added} already queued")


@dataclass
class ExportConfig:
    db: str = option(help="database to export from (SQLite path or SQLAlchemy URL)")
    out: str = option(help="JSONL file to write")
    kind: str = option("pairs", "which answers to export", choices=EXPORT_CHOICES)
    majority: bool = option(False, "one row per item by majority (Borda for rankings, median for ratings; "
                                   "not for spans) instead of one row per answer")


def export(cfg: ExportConfig) -> None:
    from heed.feedback.export import export_store
    from heed.feedback.store import Store

    if cfg.kind not in EXPORT_CHOICES:
        raise HeedError(f"--kind must be one of {', '.join(EXPORT_CHOICES)}")
    if "://" not in cfg.db and not Path(cfg.db).is_file():
        raise HeedError(f"{cfg.db}: database not found")
    rows = export_store(Store(cfg.db), cfg.kind, majority=cfg.majority)
    write_jsonl(cfg.out, rows)
    print(f"wrote {len(rows)} {cfg.kind} rows to {cfg.out}")


@dataclass
class UserAddConfig:
    db: str = option(help="database the server uses (SQLite path or SQLAlchemy URL)")
    name: str = option(help="annotator name: letters, digits, . _ @ -")
    admin: bool = option(False, "may see the admin page and export")
    reset_token: bool = option(False, "the annotator exists: issue a new token (the old one stops working)")


def user_add(cfg: UserAddConfig) -> None:
    from heed.feedback.store import Store

    token = Store(cfg.db).add_user(cfg.name, admin=cfg.admin, reset=cfg.reset_token)
    print(f"{'admin' if cfg.admin else 'annotator'} {cfg.name!r}: log in with the token below "
          "(shown once; it is stored only as a hash)", file=sys.stderr)
    print(token)
