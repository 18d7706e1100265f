"""Reading and writing the files stages exchange: corpora, demonstrations, prompts, samples,
and feedback (pairs, HH-RLHF transcripts, chat pairs, rankings, thumbs, ratings; see
`read_feedback` and docs/reward-models.md).

Every reader validates row by row. A bad row raises `HeedError` naming the file,
the line (1-based; for Parquet and dataset directories, the row number) and the
field; with `skip_invalid=True` bad rows are counted and skipped instead.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from heed.template import format_turns, prompt_key
from heed.utils import HeedError

# ---------------------------------------------------------------------------
# Records: JSONL, gzipped JSONL, Parquet, saved Hugging Face dataset directories
# ---------------------------------------------------------------------------

def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, row) from a JSONL(.gz), Parquet file or saved HF dataset directory.

    A JSONL line that is not a JSON value (bad JSON, bad UTF-8, nested too deep) is yielded
    as a `RowError`, so it is reported with its line, or skipped and counted. A file that
    cannot be read on (a corrupt or truncated gzip, a broken Parquet or Arrow file) raises
    HeedError naming the file and the last line read: rows would be lost otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise HeedError(f"{path}: file not found")
    if path.is_dir():
        yield from _iter_arrow_dir(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        yield from _iter_jsonl(path)


_JSON_SPACE = " \t\r\n"
_BLANK = object()


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    import zlib

    line = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            # Bytes, split at b"\n" only: a stray "\r" inside a line is that line's problem, not a
            # new line (text mode would split there and shift every later line number).
            for line, raw in enumerate(f, start=1):
                if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark
                row = _parse_json_line(raw)
                if row is not _BLANK:
                    yield line, row
    except (OSError, EOFError, zlib.error) as e:
        where = f" after line {line}" if line else ""
        what = "corrupt or truncated gzip" if path.suffix == ".gz" else "cannot read"
        raise HeedError(f"{path}: {what}{where} ({e})") from None


def _parse_json_line(raw: bytes) -> Any:
    """A JSONL line's value, a RowError saying what is wrong with it, or _BLANK for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
    if not text.strip(_JSON_SPACE):
        return _BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError(f"not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return RowError("not valid JSON (nested too deep)")
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        return RowError("not valid JSON (an integer with too many digits)")


def _arrow_errors() -> tuple:
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, OverflowError, TypeError, IndexError, KeyError)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except _arrow_errors() as e:
        where = f" after row {n}" if n else ""
        raise HeedError(f"{path}: not a readable Parquet file{where} ({type(e).__name__}: {e})") from None


def _iter_arrow_dir(path: Path) -> Iterator[tuple[int, Any]]:
    """A directory written by `datasets.Dataset.save_to_disk`: arrow stream files in order."""
    import pyarrow as pa

    state = path / "state.json"
    if state.exists():
        try:
            entries = json.loads(state.read_bytes()).get("_data_files", [])
            files = [path / f["filename"] for f in entries]
        except (OSError, ValueError, RecursionError, AttributeError, TypeError, KeyError) as e:
            raise HeedError(f"{state}: not a saved dataset's state.json ({type(e).__name__}: {e})") from None
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise HeedError(f"{path}: a directory, but not a saved dataset (no .arrow files)")
    n = 0
    for file in files:
        try:
            with pa.memory_map(str(file)) as src:
                try:
                    table = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    src.seek(0)
                    table = pa.ipc.open_file(src).read_all()
            batches = table.to_batches()
        except _arrow_errors() as e:
            raise HeedError(f"{file}: not a readable Arrow file ({type(e).__name__}: {e})") from None
        for batch in batches:
            try:
                rows = batch.to_pylist()
            except _arrow_errors() as e:
                raise HeedError(f"{file}: not a readable Arrow file after row {n} ({type(e).__name__}: {e})") from None
            for row in rows:
                n += 1
                yield n, row


@dataclass
class RowError:
    """A row that could not be parsed at all (kept in the stream so its line is reported)."""

    message: str


def read_rows(path: str | Path, parse: Callable[[dict], Any], *, skip_invalid: bool = False,
              what: str = "rows", stats: dict | None = None) -> list:
    """Read every row through `parse(row)`, which raises `FieldError` for a bad field.

    Raises HeedError for an empty file, and for the first bad row unless
    `skip_invalid`, in which case each skipped row's line and reason go to
    stderr, and their number to stdout (and into `stats["skipped"]` when a
    dict is given).
    """
    out, skipped = [], 0
    for line, row in iter_records(path):
        try:
            if isinstance(row, RowError):
                raise FieldError(None, row.message)
            if not isinstance(row, dict):
                raise FieldError(None, f"expected a JSON object, got {type(row).__name__}")
            out.append(parse(row))
        except FieldError as e:
            where = f"{path}:{line}" + (f": field '{e.field}'" if e.field else "")
            if not skip_invalid:
                raise HeedError(f"{where}: {e.message} (use --skip-invalid to skip bad rows)") from None
            print(f"skipped {where}: {e.message}", file=sys.stderr)
            skipped += 1
    if stats is not None:
        stats["skipped"] = skipped
    if skipped:
        print(f"{path}: skipped {skipped} invalid row(s)")
    if not out:
        raise HeedError(f"{path}: no {what} found (the file is empty"
                        + (" or every row was invalid)" if skipped else ")"))
    return out


class FieldError(Exception):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def show(value: Any, limit: int = 60) -> str:
    """repr(value) for an error message, cut short: a bad field may be megabytes long, or (YAML
    aliases) a list of lists of lists whose full repr would take gigabytes."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 5
    r.maxlevel = 2
    return r.repr(value)


def check_text(name: str, value: str) -> str:
    """`value` (a str) unless it is not valid Unicode: a lone surrogate, which JSON's "\\ud800"
    escapes can make, cannot be encoded, and would stop a tokenizer or a database mid-run."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(name, f"not valid Unicode (a lone surrogate {value[e.start]!r} at character "
                               f"{e.start + 1})") from None
    return value


def get_str(row: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in row:
        raise FieldError(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FieldError(name, "empty")
    return check_text(name, value)


def get_messages(row: dict, name: str) -> list[dict]:
    """A chat-style list of {"role", "content"} messages, validated."""
    value = row.get(name)
    if not isinstance(value, list) or not value:
        raise FieldError(name, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FieldError(f"{name}[{i}]", "expected {\"role\": str, \"content\": str}")
        if m["role"] not in ("system", "user", "assistant"):
            raise FieldError(f"{name}[{i}].role", f"unknown role {show(m['role'])}")
        check_text(f"{name}[{i}].content", m["content"])
    return value


def get_prompt(row: dict, name: str = "prompt"):
    """A prompt: a non-empty string, or a chat list of {role, content} messages."""
    return get_messages(row, name) if isinstance(row.get(name), list) else get_str(row, name)


FLOAT32_MAX = 3.4028234663852886e38  # margins, scores and rewards are trained on as float32


def get_number(row: dict, name: str) -> float:
    """A finite number (not a bool) that float32 holds."""
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(name, f"expected a finite number, got {show(value)}")
    if abs(number) > FLOAT32_MAX:
        raise FieldError(name, f"{show(value)} is too large (beyond float32's ±3.4e38)")
    return number


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write all rows at once through a temporary file, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Corpora, demonstrations, prompts
# ---------------------------------------------------------------------------

def read_texts(path: str | Path, field: str = "text", *, skip_invalid: bool = False) -> list[str]:
    """A pretraining corpus: plain text (documents separated by blank lines) or JSONL with `field`."""
    path = Path(path)
    if path.suffix in (".txt", ".md"):
        if not path.is_file():
            raise HeedError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first document
        except UnicodeDecodeError as e:
            start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
            line = data.count(b"\n", 0, start) + 1
            raise HeedError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[start]:02x})") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise HeedError(f"{path}: no text found (the file is empty)")
        return docs
    return read_rows(path, lambda row: get_str(row, field), skip_invalid=skip_invalid, what="documents")


def parse_demo(row: dict) -> dict:
    """A demonstration: {"prompt", "response"} strings, or {"messages": [...]} ending with the assistant."""
    if "messages" in row:
        messages = get_messages(row, "messages")
        if messages[-1]["role"] != "assistant":
            raise FieldError("messages", "the last message must be the assistant's response")
        if len(messages) < 2:
            raise FieldError("messages", "no messages before the assistant's response (nothing to use as the prompt)")
        return {"prompt": messages[:-1], "response": messages[-1]["content"]}
    return {"prompt": get_prompt(row), "response": get_str(row, "response")}


def read_demos(path: str | Path, *, skip_invalid: bool = False) -> list[dict]:
    return read_rows(path, parse_demo, skip_invalid=skip_invalid, what="demonstrations")


def read_prompts(path: str | Path, *, skip_invalid: bool = False) -> list:
    """Prompts: rows with a "prompt" string (or message list); other fields are ignored."""
    def parse(row: dict):
        return get_prompt(row)
    return read_rows(path, parse, skip_invalid=skip_invalid, what="prompts")


# ---------------------------------------------------------------------------
# Feedback: pairs, rankings, thumbs, ratings
# ---------------------------------------------------------------------------
#
# Formats (`--format`; "auto" tells them apart by their columns):
#   pairs     {"prompt": str, "chosen": str, "rejected": str} + optional "margin": number,
#             "tie": bool (a tie is a 0.5 target), "both_bad": bool (incomparable: not used)
#   hh        {"chosen", "rejected"}: whole Anthropic HH-RLHF transcripts
#             ("\n\nHuman: … \n\nAssistant: …"), each ending with an assistant turn;
#             the whole turns they share, up to a human turn, become a chat prompt, and
#             the rest of each (usually its last turn; several turns where the two part
#             earlier, rendered as in the whole dialogue: see part_dialogues) its response
#   chat      "prompt" (optional), "chosen", "rejected" as lists of {"role", "content"};
#             prompt + chosen and prompt + rejected must end with an assistant message;
#             split into prompt and responses as hh is
#   rankings  {"prompt", "responses": [str, ...], "ranking": [indices of responses, best first]}
#   thumbs    {"prompt", "response", "label": "up"|"down"|true|false|1|0}
#   ratings   {"prompt", "response", "score": number}
#   spans     {"prompt", "response", "spans": [{"start", "end", "label"}, ...], "correction"?,
#             "label_rewards"?: {label: number}}: marked segments of one response, as character
#             offsets (Python string indices: Unicode code points, newlines count one) into the
#             response, end exclusive, not overlapping; "correction" a rewritten response;
#             "label_rewards" each label's reward (sign and weight) where the data sets it
# Prompts of pairs, rankings, thumbs and ratings may also be message lists. Prompts must
# not be empty; responses may be (a policy can answer nothing, and that is worth judging).

FEEDBACK_FORMATS = ("pairs", "hh", "chat", "rankings", "thumbs", "ratings", "spans")
# The kind of supervision each format gives (which loss trains on it).
FEEDBACK_KIND = {"pairs": "pairs", "hh": "pairs", "chat": "pairs", "rankings": "rankings",
                 "thumbs": "thumbs", "ratings": "ratings", "spans": "spans"}


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    margin: float = 0.0  # the chosen response is better by at least this much (Llama 2's margin)
    tie: bool = False    # equally good: the target preference is 0.5


@dataclass
class Ranking:
    prompt: str | list[dict]
    responses: list[str]
    ranking: list[int]   # indices into responses, best first


@dataclass
class Thumb:
    prompt: str | list[dict]
    response: str
    up: bool


@dataclass
class Rating:
    prompt: str | list[dict]
    response: str
    score: float


@dataclass(frozen=True)
class Span:
    start: int   # character offset into the response (a Python string index)
    end: int     # exclusive
    label: str


@dataclass
class Marked:
    """One response with the segments an annotator marked, and optionally their rewrite of it."""

    prompt: str | list[dict]
    response: str
    spans: list[Span]               # sorted by start, not overlapping
    correction: str | None = None   # the annotator's corrected response
    label_rewards: dict[str, float] | None = None  # each label's reward, where the data sets it


@dataclass
class Feedback:
    """The rows of one feedback file, all of one format."""

    path: str
    format: str
    rows: list            # Pair | Ranking | Thumb | Rating | Marked
    skipped: int = 0      # invalid rows skipped (with skip_invalid)
    unused: int = 0       # valid rows that carry no preference (pairs marked both_bad)

    @property
    def kind(self) -> str:
        return FEEDBACK_KIND[self.format]


def responses_of(row: Pair | Ranking | Thumb | Rating | Marked) -> list[str]:
    """The responses a row's loss needs rewards for, in a fixed order."""
    if isinstance(row, Pair):
        return [row.chosen, row.rejected]
    if isinstance(row, Ranking):
        return row.responses
    return [row.response]


def detect_feedback_format(row: dict) -> str:
    """The feedback format a row's columns say it is in."""
    if "responses" in row and "ranking" in row:
        return "rankings"
    if "chosen" in row and "rejected" in row:
        if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
            return "chat"
        return "pairs" if "prompt" in row else "hh"
    if "response" in row and "spans" in row:
        return "spans"
    if "response" in row and "label" in row:
        return "thumbs"
    if "response" in row and "score" in row:
        return "ratings"
    raise FieldError(None, f"cannot tell the feedback format from the columns {sorted(row)}: expected "
                           "prompt/chosen/rejected, chosen/rejected (HH-RLHF), prompt/responses/ranking, "
                           "prompt/response/label, prompt/response/score or prompt/response/spans "
                           "(or pass --format)")


def _flag(row: dict, name: str) -> bool:
    value = row.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(name, f"expected true or false, got {show(value)}")
    return value


def get_margin(row: dict) -> float:
    """A pair's optional margin: a number >= 0 (the chosen response is better by at least it)."""
    if row.get("margin") is None:
        return 0.0
    margin = get_number(row, "margin")
    if margin < 0:
        raise FieldError("margin", f"must not be negative, got {show(row['margin'])}")
    return margin


def parse_pair(row: dict) -> Pair | None:
    """An explicit-prompt pair; None for a valid pair marked both_bad (no preference to learn)."""
    prompt = get_prompt(row)
    chosen, rejected = get_str(row, "chosen", allow_empty=True), get_str(row, "rejected", allow_empty=True)
    tie = _flag(row, "tie")
    margin = get_margin(row)
    if tie and margin:
        raise FieldError("margin", "a tie cannot have a margin")
    if _flag(row, "both_bad"):
        return None
    return Pair(prompt, chosen, rejected, margin, tie)


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def hh_messages(text: str, field: str) -> list[dict]:
    """An HH-RLHF transcript -> its turns as chat messages (Human: user, Assistant: assistant)."""
    import re

    if not text.startswith(HH_HUMAN):
        raise FieldError(field, "an HH-RLHF transcript must start with '\\n\\nHuman:'")
    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", text)[1:]  # [marker, text, marker, text, ...]
    messages = [{"role": "user" if marker == HH_HUMAN else "assistant", "content": body.strip()}
                for marker, body in zip(parts[::2], parts[1::2])]
    if messages[-1]["role"] != "assistant":
        raise FieldError(field, "the transcript must end with an '\\n\\nAssistant:' turn")
    return messages


def part_dialogues(chosen: list[dict], rejected: list[dict], what: str) -> tuple[list[dict], str, str]:
    """(prompt, chosen response, rejected response) of two dialogues, each ending with an
    assistant turn, that begin alike.

    The prompt is the whole turns both share, up to the latest assistant turn both have
    after it: usually everything before the last turn. Where the dialogues part earlier
    (about 1 HH-RLHF row in 500: an earlier assistant turn differs, or a later human one),
    each response is the rest of its dialogue from that assistant turn on, rendered by
    `format_turns`, so that prompt + response reads exactly as the whole dialogue does.
    """
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    cut = next((k for k in range(min(common, len(chosen) - 1, len(rejected) - 1), 0, -1)
                if chosen[k]["role"] == rejected[k]["role"] == "assistant"), 0)
    if not cut:
        if chosen[0]["role"] == "assistant":
            raise FieldError("chosen", "no messages before the assistant's response (nothing to use as the prompt)")
        raise FieldError("rejected", f"does not share the {what} with 'chosen': they part before "
                                     "any assistant turn, so there is no common prompt")
    return chosen[:cut], format_turns(chosen[cut:]), format_turns(rejected[cut:])


def parse_hh(row: dict) -> Pair:
    """A pair of whole transcripts; the dialogue they share (whole turns, up to a human turn) is
    the prompt, and the rest of each transcript its response (see `part_dialogues`)."""
    chosen_text, rejected_text = get_str(row, "chosen"), get_str(row, "rejected")
    prompt, chosen, rejected = part_dialogues(hh_messages(chosen_text, "chosen"),
                                              hh_messages(rejected_text, "rejected"), "dialogue")
    tie = _flag(row, "tie")
    margin = get_margin(row)
    return Pair(prompt, chosen, rejected, margin, tie)


def parse_chat_pair(row: dict) -> Pair | None:
    """Message lists; an optional "prompt" list is put before both chosen and rejected. The
    conversation they share is the prompt, the rest of each its response (see `part_dialogues`)."""
    prompt = get_messages(row, "prompt") if "prompt" in row else []
    full = {}
    for name in ("chosen", "rejected"):
        messages = prompt + get_messages(row, name)
        if messages[-1]["role"] != "assistant":
            raise FieldError(name, "must end with the assistant's response")
        full[name] = messages
    try:
        shared, chosen, rejected = part_dialogues(full["chosen"], full["rejected"], "conversation")
    except FieldError as e:
        if e.field == "chosen" and not prompt:
            raise FieldError("prompt", "no messages before the response") from None
        raise
    tie = _flag(row, "tie")
    margin = get_margin(row)
    if _flag(row, "both_bad"):
        return None
    return Pair(shared, chosen, rejected, margin, tie)


def parse_ranking(row: dict) -> Ranking:
    prompt = get_prompt(row)
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise FieldError("responses", "expected a list of at least 2 responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise FieldError(f"responses[{i}]", f"expected a string, got {type(r).__name__}")
        check_text(f"responses[{i}]", r)
    ranking = row["ranking"]
    if not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking):
        raise FieldError("ranking", "expected a list of integer indices into responses, best first")
    if sorted(ranking) != list(range(len(responses))):
        raise FieldError("ranking", f"expected each index 0..{len(responses) - 1} exactly once, got {show(ranking)}")
    return Ranking(prompt, list(responses), list(ranking))


_THUMBS = {"up": True, "down": False, True: True, False: False}  # 1 and 0 are True and False as keys


def parse_thumb(row: dict) -> Thumb:
    prompt, response = get_prompt(row), get_str(row, "response", allow_empty=True)
    label = row["label"]
    key = label.lower() if isinstance(label, str) else label
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    if not isinstance(key, (str, bool, int)) or key not in _THUMBS:
        raise FieldError("label", f"expected 'up', 'down', true, false, 1 or 0, got {show(label)}")
    return Thumb(prompt, response, _THUMBS[key])


def parse_rating(row: dict) -> Rating:
    return Rating(get_prompt(row), get_str(row, "response", allow_empty=True), get_number(row, "score"))


def get_spans(row: dict, response: str) -> list[Span]:
    """A response's marked spans: character offsets inside it, end exclusive, none overlapping."""
    spans = row["spans"]
    if not isinstance(spans, list):
        raise FieldError("spans", f"expected a list of {{start, end, label}}, got {type(spans).__name__}")
    out = []
    for i, span in enumerate(spans):
        if not isinstance(span, dict):
            raise FieldError(f"spans[{i}]", f"expected {{start, end, label}}, got {show(span)}")
        for name in ("start", "end"):
            value = span.get(name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(f"spans[{i}].{name}", f"expected an integer character offset, got {show(value)}")
        label = span.get("label")
        if not isinstance(label, str) or not label.strip():
            raise FieldError(f"spans[{i}].label", f"expected a non-empty string, got {show(label)}")
        if not 0 <= span["start"] < span["end"] <= len(response):
            raise FieldError(f"spans[{i}]", f"[{span['start']}, {span['end']}) is not a non-empty range inside "
                                            f"the response's {len(response)} characters")
        out.append(Span(span["start"], span["end"], check_text(f"spans[{i}].label", label.strip())))
    out.sort(key=lambda s: s.start)
    for a, b in zip(out, out[1:]):
        if b.start < a.end:
            raise FieldError("spans", f"spans overlap: [{a.start}, {a.end}) {a.label!r} and [{b.start}, {b.end}) "
                                      f"{b.label!r}")
    return out


def parse_marked(row: dict) -> Marked:
    prompt, response = get_prompt(row), get_str(row, "response", allow_empty=True)
    spans = get_spans(row, response)
    correction = get_str(row, "correction", allow_empty=True) if row.get("correction") is not None else None
    rewards = row.get("label_rewards")
    if rewards is not None:
        if not isinstance(rewards, dict):
            raise FieldError("label_rewards", f"expected {{label: number}}, got {show(rewards)}")
        rewards = {str(k): get_number(rewards, k) for k in rewards}
    return Marked(prompt, response, spans, correction, rewards)


FEEDBACK_PARSERS: dict[str, Callable[[dict], Any]] = {
    "pairs": parse_pair, "hh": parse_hh, "chat": parse_chat_pair, "rankings": parse_ranking,
    "thumbs": parse_thumb, "ratings": parse_rating, "spans": parse_marked}


def read_feedback(path: str | Path, *, format: str = "auto", skip_invalid: bool = False) -> Feedback:
    """Read and validate one feedback file (JSONL, .jsonl.gz, Parquet or a saved dataset directory).

    With format "auto" the first row's columns decide the format, and every row must
    then be in it. A bad row raises HeedError naming the file, the line and the field.
    """
    if format != "auto" and format not in FEEDBACK_PARSERS:
        raise HeedError(f"unknown feedback format {format!r} (choose from auto, {', '.join(FEEDBACK_FORMATS)})")
    state = {"format": _first_valid_format(path) if format == "auto" else format, "unused": 0}

    def parse(row: dict):
        if state["format"] is None:
            state["format"] = detect_feedback_format(row)
        parsed = FEEDBACK_PARSERS[state["format"]](row)
        if parsed is None:
            state["unused"] += 1
        return parsed

    stats: dict = {}
    rows = read_rows(path, _missing_field_is_field_error(parse), skip_invalid=skip_invalid,
                     what="feedback rows", stats=stats)
    kept = [r for r in rows if r is not None]
    if not kept:
        raise HeedError(f"{path}: no usable feedback rows (all {len(rows)} were marked both_bad)")
    return Feedback(str(path), state["format"], kept, skipped=stats.get("skipped", 0), unused=state["unused"])


def _first_valid_format(path: str | Path) -> str | None:
    """The format of the first row that is valid in the format its columns say (None if none is).

    Not simply the first row's: a bad first row (a "chosen" that should be a string but is a
    list, a pair without its "prompt") would otherwise decide the format for the whole file,
    and every good row after it would be refused, or skipped, as a row of the wrong format.
    """
    for _, row in iter_records(path):
        if not isinstance(row, dict):
            continue
        try:
            fmt = detect_feedback_format(row)
            _missing_field_is_field_error(FEEDBACK_PARSERS[fmt])(row)
        except FieldError:
            continue
        return fmt
    return None


def _missing_field_is_field_error(parse: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Parsers index row[name] once the format is known; a missing column is that field's error."""
    def wrapped(row: dict):
        try:
            return parse(row)
        except KeyError as e:
            raise FieldError(str(e.args[0]), "missing") from None
    return wrapped


def read_feedback_files(paths: Sequence[str], fmt: str = "auto", skip_invalid: bool = False) -> list[Feedback]:
    """Every file of `--data`, each read with `read_feedback`."""
    if not paths:
        raise HeedError("no feedback files given (--data)")
    return [read_feedback(p, format=fmt, skip_invalid=skip_invalid) for p in paths]


def read_reward_pairs(path: str | Path, skip_invalid: bool = False) -> list[dict]:
    """Pairs with both rewards (the output of `heed filter`); ties are kept (their target is 0)."""
    def parse(row: dict) -> dict:
        get_prompt(row)
        for name in ("chosen", "rejected"):
            get_str(row, name, allow_empty=True)
        for name in ("chosen_reward", "rejected_reward"):
            if name not in row:
                raise FieldError(name, "missing (REBEL needs both rewards: run `heed rm score` and `heed filter`)")
            get_number(row, name)
        return row
    return read_rows(path, parse, skip_invalid=skip_invalid, what="pairs")


def split_by_prompt(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded `fraction` of the distinct prompts, with all their rows, is held out."""
    keys = sorted({prompt_key(r.prompt) for r in rows})
    random.Random(seed).shuffle(keys)
    n = int(round(len(keys) * fraction))
    if fraction > 0 and n == 0 and len(keys) > 1:
        n = 1
    held = set(keys[:n])
    return [r for r in rows if prompt_key(r.prompt) not in held], [r for r in rows if prompt_key(r.prompt) in held]


def describe_feedback(feedbacks: Sequence[Feedback]) -> str:
    """One line: per file, its name, row count and format, and what was skipped or unused."""
    return ", ".join(f"{Path(f.path).name}: {len(f.rows)} {f.format}"
                     + (f" ({f.skipped} skipped)" if f.skipped else "")
                     + (f" ({f.unused} both_bad unused)" if f.unused else "") for f in feedbacks)
