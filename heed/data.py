"""Reading and writing the files stages exchange: corpora, demonstrations, prompts, samples.

Every reader validates row by row. A bad row raises `HeedError` naming the file,
the line (1-based; for Parquet and dataset directories, the row number) and the
field; with `skip_invalid=True` bad rows are counted and skipped instead.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from heed.utils import HeedError


# ---------------------------------------------------------------------------
# Records: JSONL, gzipped JSONL, Parquet, saved Hugging Face dataset directories
# ---------------------------------------------------------------------------

def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, row) from a JSONL(.gz), Parquet file or saved HF dataset directory."""
    path = Path(path)
    if not path.exists():
        raise HeedError(f"{path}: file not found")
    if path.is_dir():
        yield from _iter_arrow_dir(path)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, RowError(f"not valid JSON ({e.msg} at column {e.colno})")
    except (OSError, UnicodeDecodeError) as e:
        raise HeedError(f"{path}: cannot read ({e})") from None


def _iter_arrow_dir(path: Path) -> Iterator[tuple[int, Any]]:
    """A directory written by `datasets.Dataset.save_to_disk`: arrow stream files in order."""
    import pyarrow as pa

    state = path / "state.json"
    if state.exists():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise HeedError(f"{path}: a directory, but not a saved dataset (no .arrow files)")
    n = 0
    for file in files:
        with pa.memory_map(str(file)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(src).read_all()
        for row in table.to_pylist():
            n += 1
            yield n, row


@dataclass
class RowError:
    """A row that could not be parsed at all (kept in the stream so its line is reported)."""

    message: str


def read_rows(path: str | Path, parse: Callable[[dict], Any], *, skip_invalid: bool = False,
              what: str = "rows") -> list:
    """Read every row through `parse(row)`, which raises `FieldError` for a bad field.

    Raises HeedError for an empty file, and for the first bad row unless
    `skip_invalid`, in which case the number skipped is printed.
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
            skipped += 1
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


def get_str(row: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in row:
        raise FieldError(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FieldError(name, "empty")
    return value


def get_messages(row: dict, name: str) -> list[dict]:
    """A chat-style list of {"role", "content"} messages, validated."""
    value = row.get(name)
    if not isinstance(value, list) or not value:
        raise FieldError(name, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FieldError(f"{name}[{i}]", "expected {\"role\": str, \"content\": str}")
        if m["role"] not in ("system", "user", "assistant"):
            raise FieldError(f"{name}[{i}].role", f"unknown role {m['role']!r}")
    return value


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
        if not path.exists():
            raise HeedError(f"{path}: file not found")
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
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
        return {"prompt": messages[:-1], "response": messages[-1]["content"]}
    prompt = get_messages(row, "prompt") if isinstance(row.get("prompt"), list) else get_str(row, "prompt")
    return {"prompt": prompt, "response": get_str(row, "response")}


def read_demos(path: str | Path, *, skip_invalid: bool = False) -> list[dict]:
    return read_rows(path, parse_demo, skip_invalid=skip_invalid, what="demonstrations")


def read_prompts(path: str | Path, *, skip_invalid: bool = False) -> list:
    """Prompts: rows with a "prompt" string (or message list); other fields are ignored."""
    def parse(row: dict):
        return get_messages(row, "prompt") if isinstance(row.get("prompt"), list) else get_str(row, "prompt")
    return read_rows(path, parse, skip_invalid=skip_invalid, what="prompts")
