"""Fuzzed readers (issue 19, "nothing lost, nothing let in"): property-based tests over every
reader of user files.

Two kinds of property:

* Any input: any byte string written as a file (JSONL, .jsonl.gz, Parquet, a saved dataset
  directory, plain text, YAML) either loads or stops with `HeedError` naming the file. Any other
  exception is a failure.
* An oracle: a file of N rows, each generated valid (with the value heed must load from it) or
  mutated into a definitely invalid form (a field dropped or of the wrong type, a NaN, inf,
  huge or negative number, a bool for a number, a ranking that is not a permutation, a lone
  surrogate, invalid UTF-8 bytes, a line that is not a JSON object, JSON nested too deep, a
  truncated final line), laid out with a BOM, CRLF, blank lines, in plain or gzipped JSONL.
  Without skip_invalid the read stops at the first invalid row with "FILE:LINE: field 'x': ..."
  (line and field the ones mutated); with it, exactly the mutated rows are skipped, each named
  on stderr, their number printed and counted, and the valid rows load with exactly their
  values.

The default profile ("ci", registered in conftest.py) is small, fixed and derandomized; run
`pytest tests/test_fuzz_readers.py --hypothesis-profile=long` for the long search
(docs/reward-models.md, "Fuzzed readers").
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import assume, given, note, strategies as st

from heed.config import build, load_yaml, option
from heed.data import (
    Marked,
    Pair,
    Ranking,
    Rating,
    Span,
    Thumb,
    read_demos,
    read_feedback,
    read_prompts,
    read_reward_pairs,
    read_texts,
)
from heed.feedback.cli import read_queue
from heed.feedback.store import DEFAULT_SPAN_LABELS
from heed.utils import HeedError

DROP = object()  # a mutation that removes the field

# ---------------------------------------------------------------------------
# Checking a HeedError
# ---------------------------------------------------------------------------


def assert_names(err: HeedError, path: Path, line: int | None = None, field: str | None = None) -> None:
    """The message is heed's: it begins with the file (and line), and names the field."""
    msg = str(err)
    prefix = f"{path}:{line}:" if line is not None else f"{path}"
    assert msg.startswith(prefix), f"expected the message to start with {prefix!r}: {msg!r}"
    if field is not None:
        assert re.search(rf"field '{re.escape(field)}([\[.][^']*)?'", msg), f"field {field!r} not named: {msg!r}"


def read_quietly(fn: Callable[[], Any]) -> tuple[Any, str, str]:
    """(result or the HeedError raised, stdout, stderr); any other exception propagates (a failure)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = fn()
        except HeedError as e:
            result = e
    return result, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def workdir():
    """A fresh directory per example (Hypothesis reuses function-scoped fixtures across examples)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

texts = st.text(max_size=12)
nonempty = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())
ROLES = ("system", "user", "assistant")
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}), min_size=1, max_size=3)
prompts = st.one_of(nonempty, messages)
# finite numbers float32 holds
numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e30, 1e30, allow_nan=False))
# any JSON value, nested, with the numbers JSON writers produce at the edges (NaN, inf, huge)
json_junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**40, 10**40), st.floats(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8)
# extra columns readers ignore; "x_" keeps them clear of every format's own column names
extras = st.dictionaries(st.text(max_size=6).map(lambda s: "x_" + s), json_junk, max_size=2)

SURROGATE = "\ud800"
not_str = st.one_of(st.none(), st.booleans(), numbers, st.lists(st.integers(), max_size=2),
                    st.dictionaries(texts, st.integers(), max_size=2))
blank = st.text(alphabet=" \t\n\u3000", max_size=3)  # str.strip() removes all of these
bad_number = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), True, False, 10**39, -10**39,
                                        1e39, 10**400, "1", "", [1], {"a": 1}]),
                       st.text(max_size=4))
bad_message = st.sampled_from([
    [], {"role": "user", "content": "x"}, [{"role": "robot", "content": "x"}], [{"role": "user"}],
    [{"content": "x"}], [{"role": "user", "content": 5}], [{"role": None, "content": "x"}], ["user: x"],
    [{"role": "user", "content": "ok"}, 7], [{"role": "user", "content": "a" + SURROGATE}]])
bad_prompt = st.one_of(not_str.filter(lambda v: not isinstance(v, list)), blank, bad_message,
                       st.just("ok" + SURROGATE))
bad_text = st.one_of(not_str, st.just(SURROGATE + "x"))           # a string field that may be empty
bad_nonempty = st.one_of(not_str, blank, st.just(SURROGATE + "x"))  # one that may not
bad_flag = st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.lists(st.booleans(), max_size=1))


def with_surrogate(value: Any) -> bool:
    return SURROGATE in json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------
# Readers: a valid row with the value it must load as, and the mutations that make it invalid
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    name: str
    read: Callable[..., Any]      # (path, skip_invalid) -> the rows read; may raise HeedError
    valid: Callable               # draw -> (row, expected value, or None for a valid row that loads nothing)
    bad: dict                     # field -> strategy of invalid values (DROP: remove the field)
    skipped: Callable = None      # the result -> the number of rows skipped, where it says so
    feedback: bool = False


def _pair(draw):
    row = {"prompt": draw(prompts), "chosen": draw(texts), "rejected": draw(texts)}
    tie, both_bad = draw(st.booleans()), draw(st.sampled_from([None, False, False, True]))
    margin = 0.0
    if tie:
        row["tie"] = True
        if draw(st.booleans()):
            row["margin"] = draw(st.sampled_from([0, 0.0, None]))
    elif draw(st.booleans()):
        row["margin"] = draw(st.one_of(st.none(), st.integers(0, 10**6), st.floats(0, 1e30)))
        margin = float(row["margin"] or 0.0)
    if both_bad is not None:
        row["both_bad"] = both_bad
    expected = None if both_bad else Pair(row["prompt"], row["chosen"], row["rejected"], margin, tie)
    return row, expected


def hh_text(turns):
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


hh_content = st.text(max_size=10).map(lambda s: s.replace("\n", " ").strip())


def _hh(draw):
    n = draw(st.integers(0, 2))
    prefix = [{"role": "user", "content": draw(hh_content)}]
    for _ in range(n):
        prefix += [{"role": "assistant", "content": draw(hh_content)}, {"role": "user", "content": draw(hh_content)}]
    a, b = draw(hh_content), draw(hh_content)
    row = {"chosen": hh_text(prefix + [{"role": "assistant", "content": a}]),
           "rejected": hh_text(prefix + [{"role": "assistant", "content": b}])}
    return row, Pair(prefix, a, b)


def _chat(draw):
    a, b = draw(texts), draw(texts)
    if draw(st.booleans()):
        prompt = draw(messages) + [{"role": "user", "content": draw(texts)}]
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": a}],
               "rejected": [{"role": "assistant", "content": b}]}
    else:
        prompt = [{"role": "user", "content": draw(texts)}]
        row = {"chosen": prompt + [{"role": "assistant", "content": a}],
               "rejected": prompt + [{"role": "assistant", "content": b}]}
    return row, Pair(prompt, a, b)


def _ranking(draw):
    responses = draw(st.lists(texts, min_size=2, max_size=4))
    ranking = draw(st.permutations(range(len(responses))))
    row = {"prompt": draw(prompts), "responses": responses, "ranking": ranking}
    return row, Ranking(row["prompt"], responses, ranking)


THUMBS = [("up", True), ("UP", True), ("Up", True), ("down", False), ("DOWN", False), (True, True),
          (False, False), (1, True), (0, False), (1.0, True), (0.0, False)]


def _thumb(draw):
    label, up = draw(st.sampled_from(THUMBS))
    row = {"prompt": draw(prompts), "response": draw(texts), "label": label}
    return row, Thumb(row["prompt"], row["response"], up)


def _rating(draw):
    row = {"prompt": draw(prompts), "response": draw(texts), "score": draw(numbers)}
    return row, Rating(row["prompt"], row["response"], float(row["score"]))


def _marked(draw):
    response = draw(texts)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(response)), max_size=4))))
    spans = [{"start": a, "end": b, "label": draw(st.sampled_from(["wrong", "good"]))}
             for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    row = {"prompt": draw(prompts), "response": response, "spans": spans}
    if draw(st.booleans()):
        row["correction"] = draw(texts)
    return row, Marked(row["prompt"], response, [Span(s["start"], s["end"], s["label"]) for s in spans],
                       row.get("correction"))


def _reward_pair(draw):
    row = {"prompt": draw(prompts), "chosen": draw(texts), "rejected": draw(texts),
           "chosen_reward": draw(numbers), "rejected_reward": draw(numbers)}
    return row, row


def _text(draw):
    row = {"text": draw(nonempty)}
    return row, row["text"]


def _demo(draw):
    if draw(st.booleans()):
        msgs = draw(messages) + [{"role": "assistant", "content": draw(texts)}]
        return {"messages": msgs}, {"prompt": msgs[:-1], "response": msgs[-1]["content"]}
    row = {"prompt": draw(prompts), "response": draw(nonempty)}
    return row, dict(row)


def _prompt(draw):
    row = {"prompt": draw(prompts)}
    return row, row["prompt"]


QUEUE_SIZES = {"pair": (2, 2), "ranking": (2, 9), "thumbs": (1, 1), "rating": (1, 1), "spans": (1, 1)}


def _item(draw):
    kind = draw(st.sampled_from(list(QUEUE_SIZES)))
    lo, hi = QUEUE_SIZES[kind]
    row = {"prompt": draw(texts), "responses": draw(st.lists(texts, min_size=lo, max_size=min(hi, 4)))}
    if kind != "pair" or draw(st.booleans()):
        row["kind"] = kind
    if draw(st.booleans()):
        row["overlap"] = draw(st.integers(1, 100))
    if draw(st.booleans()):
        row["meta"] = draw(st.dictionaries(texts, json_junk, max_size=2))
    if draw(st.booleans()):
        row["id"] = draw(st.text(min_size=1, max_size=12).filter(str.isprintable))
    labels = None
    if kind == "spans":
        labels = list(DEFAULT_SPAN_LABELS)
        if draw(st.booleans()):
            row["labels"] = labels = draw(st.lists(st.sampled_from(["wrong", "good", "off topic"]), min_size=1,
                                                   max_size=3, unique=True))
    expected = {"kind": kind, "prompt": row["prompt"], "responses": row["responses"],
                "overlap": row.get("overlap", 1), "meta": row.get("meta", {}), "labels": labels}
    if "id" in row:
        expected["id"] = row["id"]
    return row, expected


def _feedback_reader(fmt):
    def read(path, skip, auto):
        fb = read_feedback(path, format="auto" if auto else fmt, skip_invalid=skip)
        assert fb.format == fmt
        return fb
    return read


def _queue_rows(items):
    return [{k: v for k, v in item.items() if k != "id"} | ({"id": item["id"]} if "id" in item else {})
            for item in items]


SPECS = {
    "pairs": Spec("pairs", _feedback_reader("pairs"), _pair, feedback=True, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt), "chosen": st.one_of(st.just(DROP), bad_text),
        "rejected": st.one_of(st.just(DROP), bad_text),
        "margin": st.one_of(bad_number.filter(lambda v: v is not None), st.floats(-1e30, -1e-300)),
        "tie": bad_flag, "both_bad": bad_flag}),
    "hh": Spec("hh", _feedback_reader("hh"), _hh, feedback=True, bad={
        "chosen": st.one_of(st.just(DROP), not_str, blank, st.sampled_from([
            "Human: hi\n\nAssistant: yo", "\n\nHuman: hi", "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more",
            "\n\nAssistant: hi", "\n\nHuman: x" + SURROGATE + "\n\nAssistant: y"])),
        "rejected": st.one_of(st.just(DROP), not_str, st.sampled_from([
            "\n\nHuman: hi", "\n\nHuman: something else entirely\n\nAssistant: a", "\n\nAssistant: no"]))}),
    "chat": Spec("chat", _feedback_reader("chat"), _chat, feedback=True, bad={
        "chosen": st.one_of(st.just(DROP), not_str, st.just("Hello."), bad_message,
                            st.just([{"role": "user", "content": "not an answer"}])),
        "rejected": st.one_of(st.just(DROP), not_str, bad_message, st.just([{"role": "system", "content": "x"}])),
        "prompt": st.one_of(not_str, st.just("a string"), bad_message)}),
    "rankings": Spec("rankings", _feedback_reader("rankings"), _ranking, feedback=True, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt),
        "responses": st.one_of(st.just(DROP), not_str, st.lists(texts, max_size=1),
                               st.just(["a", 5]), st.just(["a", "b" + SURROGATE])),
        "ranking": st.one_of(st.just(DROP), st.none(), numbers, st.just("ranking"), st.sampled_from([
            [], [0, 0], [-1, 0], [0, 1, 2, 3, 4, 5, 6], [True, False], [0.0, 1.0], ["0", "1"], [[0], [1]],
            {"0": 0}])),
    }),
    "thumbs": Spec("thumbs", _feedback_reader("thumbs"), _thumb, feedback=True, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt), "response": st.one_of(st.just(DROP), bad_text),
        "label": st.one_of(st.just(DROP), st.none(), st.sampled_from([2, -1, 0.5, float("nan"), "yes", "", " up",
                                                                      "thumbs up", [True], {"up": 1}]))}),
    "ratings": Spec("ratings", _feedback_reader("ratings"), _rating, feedback=True, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt), "response": st.one_of(st.just(DROP), bad_text),
        "score": st.one_of(st.just(DROP), bad_number)}),
    "spans": Spec("spans", _feedback_reader("spans"), _marked, feedback=True, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt), "response": st.one_of(st.just(DROP), bad_text),
        "spans": st.one_of(st.just(DROP), st.none(), st.just("0-3 wrong"), st.sampled_from([
            [{"start": 0, "end": 10**6, "label": "wrong"}], [{"start": 1, "end": 1, "label": "wrong"}],
            [{"start": -1, "end": 1, "label": "wrong"}], [{"start": 0.0, "end": 1, "label": "wrong"}],
            [{"start": True, "end": 1, "label": "wrong"}], [{"start": 0, "end": 1}],
            [{"start": 0, "end": 1, "label": ""}], [{"start": 0, "end": 1, "label": 3}], [[0, 1, "wrong"]]])),
        "correction": bad_text.filter(lambda v: v is not None)}),
    "reward_pairs": Spec("reward_pairs", lambda p, skip, auto: read_reward_pairs(p, skip_invalid=skip),
                         _reward_pair, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt), "chosen": st.one_of(st.just(DROP), bad_text),
        "rejected": st.one_of(st.just(DROP), bad_text),
        "chosen_reward": st.one_of(st.just(DROP), bad_number),
        "rejected_reward": st.one_of(st.just(DROP), bad_number)}),
    "texts": Spec("texts", lambda p, skip, auto: read_texts(p, skip_invalid=skip), _text,
                  bad={"text": st.one_of(st.just(DROP), bad_nonempty)}),
    "demos": Spec("demos", lambda p, skip, auto: read_demos(p, skip_invalid=skip), _demo, bad={
        "prompt": st.one_of(st.just(DROP), bad_prompt), "response": st.one_of(st.just(DROP), bad_nonempty),
        "messages": st.one_of(not_str, bad_message, st.just([{"role": "assistant", "content": "no prompt"}]),
                              st.just([{"role": "user", "content": "no answer"}]))}),
    "prompts": Spec("prompts", lambda p, skip, auto: read_prompts(p, skip_invalid=skip), _prompt,
                    bad={"prompt": st.one_of(st.just(DROP), bad_prompt)}),
    "queue": Spec("queue", lambda p, skip, auto: read_queue(p, skip_invalid=skip), _item, bad={
        "prompt": st.one_of(st.just(DROP), not_str, st.just("p" + SURROGATE)),
        "responses": st.one_of(st.just(DROP), not_str.filter(lambda v: not isinstance(v, list)),
                               st.lists(texts, min_size=10, max_size=11), st.just([5, 6]),
                               st.just(["a", "b" + SURROGATE]),
                               st.sampled_from(["clip.exe", "missing.png", "a\x00.png", SURROGATE + ".png",
                                                "x" * 300 + ".png", "~nobody-heed/a.png", ""])
                               .flatmap(lambda m: st.sampled_from([[{"media": m}], [{"media": m}, "b"]]))),
        "kind": st.one_of(not_str.filter(lambda v: v is not None), st.just("pairs"), st.just(None)),
        "overlap": st.one_of(st.sampled_from([0, 101, -1, True, 1.5, 2.0, "2", None, 10**40])),
        "meta": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=1)),
        "id": st.one_of(st.integers(), st.just(""), st.just("a\nb"), st.just("x" * 201), st.just("i" + SURROGATE))}),
}

def _near_ranking(draw, row):
    """A ranking that is almost a permutation of the responses: a repeat, a gap, one too many or few."""
    r, n = list(row["ranking"]), len(row["responses"])
    how = draw(st.sampled_from(["repeat", "out", "short", "long", "bool", "float"]))
    i = draw(st.integers(0, n - 1))
    if how == "repeat":
        r[i] = r[(i + 1) % n]
    elif how == "out":
        r[i] = draw(st.sampled_from([n, -1, n + 7]))
    elif how == "short":
        r.pop(i)
    elif how == "long":
        r.append(r[i])
    elif how == "bool":
        r = [bool(x) for x in r] if n == 2 else r[:i] + [True] + r[i + 1:]
    else:
        r[i] = float(r[i])
    row["ranking"] = r
    return "ranking"


def _near_hh(draw, row):
    """A transcript that ends with the human's turn, or whose first turn is the assistant's."""
    field = draw(st.sampled_from(["chosen", "rejected"]))
    if draw(st.booleans()):
        row[field] += "\n\nHuman: " + draw(hh_content)
    else:
        row[field] = row[field].replace("\n\nHuman:", "\n\nAssistant:", 1)
    return field


def _near_pair(draw, row):
    """A margin that is nearly right: negative, or given with a tie."""
    if draw(st.booleans()):
        row.pop("tie", None)
        row["margin"] = -draw(st.floats(1e-9, 1e30))
    else:
        row["tie"], row["margin"] = True, draw(st.floats(1e-9, 1e30))
    return "margin"


NON_NUMBERS = [float("nan"), True, float("inf"), 10**39, float("-inf"), False, -1e39, float("-nan")]


def _near_number(*fields):
    """A number field that is NaN, infinite, beyond float32 or a bool."""
    def near(draw, row):
        field = draw(st.sampled_from(fields))
        row[field] = draw(st.sampled_from(NON_NUMBERS))
        return field
    return near


def _near_thumb(draw, row):
    row["label"] = draw(st.sampled_from([2, 0.5, -1, float("nan"), "upp", "thumbs up", None, [1]]))
    return "label"


def _near_text(field):
    """The field made blank (where it may not be) or given a lone surrogate."""
    def near(draw, row):
        if field not in row or not isinstance(row[field], str):
            row[field] = " "
        else:
            row[field] = draw(st.sampled_from([" ", "\t", row[field] + SURROGATE]))
        return field
    return near


def _near_item(draw, row):
    field = draw(st.sampled_from(["overlap", "prompt"]))
    row[field] = draw(st.sampled_from([0, 101, True, 2.5])) if field == "overlap" else row["prompt"] + SURROGATE
    return field


NEAR = {"rankings": _near_ranking, "hh": _near_hh, "pairs": _near_pair, "ratings": _near_number("score"),
        "reward_pairs": _near_number("chosen_reward", "rejected_reward"), "thumbs": _near_thumb,
        "texts": _near_text("text"), "prompts": _near_text("prompt"), "queue": _near_item}


@st.composite
def mutated(draw, spec: Spec):
    """(row or raw line, expected value or None, field the error must name or None, invalid?)"""
    row, expected = spec.valid(draw)
    row = dict(row) | draw(extras)
    how = draw(st.sampled_from(["valid", "near", "valid", "field", "near", "field", "line"]))
    if how == "valid":
        return row, expected, None, False
    if how == "near":  # a mutation made from the row itself: nearly right, still wrong
        near = NEAR.get(spec.name)
        if near is None:
            return row, expected, None, False
        field = near(draw, row)
        return row, None, field, True
    if how == "field":
        fields = list(spec.bad)
        if spec.name == "demos":  # a demonstration is either messages or prompt + response
            fields = ["messages"] if "messages" in row else ["prompt", "response"]
        field = draw(st.sampled_from(fields))
        value = draw(spec.bad[field])
        if value is DROP:
            if field not in row:
                return row, expected, None, False
            row.pop(field)
            return row, None, field, True
        row[field] = value
        return row, None, field, True
    # the whole line
    line = json.dumps(row).encode()
    kind = draw(st.sampled_from(["utf8", "not_object", "garbage", "deep", "digits"]))
    if kind == "utf8":
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80"])) \
            + line[at:]
    elif kind == "not_object":
        line = draw(st.sampled_from([b"[]", b"5", b'"a row"', b"null", b"true", b"[{}]", b"NaN"]))
    elif kind == "garbage":
        line = draw(st.sampled_from([b"{", b"}", b"{'prompt': 'x'}", b"prompt: x", b"{\"a\": 1,}", b"\x00",
                                     b"\x0b", b"\x1c{}", b"{}}"]))
    elif kind == "deep":
        depth = draw(st.integers(2000, 5000))
        line = b'{"x_deep": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        line = line[:-1] + b', "x_big": 1' + b"0" * 5000 + b"}"
    return line, None, None, True


def assemble(draw, encoded: list[tuple[bytes, bool, str | None]]) -> tuple[bytes, list[int]]:
    """Lines -> file bytes (BOM, CRLF, blank lines, no final newline, maybe a truncated last line),
    and each row's line number."""
    eol = draw(st.sampled_from([b"\n", b"\r\n", "mixed"]))
    out = [b"\xef\xbb\xbf"] if draw(st.booleans()) else []
    numbers, line = [], 0
    for raw, _, _ in encoded:
        for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 4)) == 0 else 0):
            line += 1
            out.append(draw(st.sampled_from([b"", b" ", b"\t", b"  \t "])) +
                       (draw(st.sampled_from([b"\n", b"\r\n"])) if eol == "mixed" else eol))
        line += 1
        numbers.append(line)
        out.append(raw + (draw(st.sampled_from([b"\n", b"\r\n"])) if eol == "mixed" else eol))
    if out and draw(st.booleans()):  # no newline at the end of the last row
        out[-1] = out[-1].rstrip(b"\r\n") if out[-1].strip() else out[-1]
    return b"".join(out), numbers


@st.composite
def feedback_files(draw, spec: Spec):
    """(file bytes, [(line, expected value or None, field, invalid)] per row, gzip?)"""
    rows = draw(st.lists(mutated(spec), min_size=1, max_size=8))
    encoded = []
    for row, expected, field, invalid in rows:
        if isinstance(row, bytes):
            encoded.append((row, invalid, field))
        else:
            ascii_only = draw(st.booleans()) or with_surrogate(row)
            encoded.append((json.dumps(row, ensure_ascii=ascii_only).encode(), invalid, field))
    truncated = draw(st.integers(0, 5)) == 0
    if truncated:  # a last row cut short: a strict prefix of a JSON object is never valid JSON
        row, _ = spec.valid(draw)
        line = json.dumps(row, ensure_ascii=False).encode()
        encoded.append((line[:draw(st.integers(1, len(line) - 1))], True, None))
        rows.append((None, None, None, True))
    data, numbers = assemble(draw, encoded)
    if truncated:
        data = data.rstrip(b"\r\n")
    table = [(n, expected, field, invalid) for n, (_, expected, field, invalid) in zip(numbers, rows)]
    return data, table, draw(st.booleans())


def check_file(spec: Spec, data: bytes, table: list, gz: bool, skip: bool, auto: bool) -> None:
    with workdir() as d:
        path = d / ("rows.jsonl.gz" if gz else "rows.jsonl")
        path.write_bytes(gzip.compress(data) if gz else data)
        note(f"file: {data!r}")
        result, out, err = read_quietly(lambda: spec.read(path, skip, auto))
        valid = [expected for _, expected, _, invalid in table if not invalid]
        loads = [v for v in valid if v is not None]
        bad = [(line, field) for line, _, field, invalid in table if invalid]
        if skip:
            if not loads:
                assert isinstance(result, HeedError), f"nothing valid, yet it loaded {result!r}"
                assert_names(result, path)
                assert ("no" in str(result)) and ("found" in str(result) or "usable" in str(result)), result
                return
            assert not isinstance(result, HeedError), f"{result}"
            rows = result.rows if spec.feedback else result
            assert_loaded(spec, rows, loads)
            named = [int(m) for m in re.findall(rf"^skipped {re.escape(str(path))}:(\d+)", err, re.M)]
            assert named == [line for line, _ in bad], err
            if spec.feedback:
                assert result.skipped == len(bad) and result.unused == len(valid) - len(loads)
            if bad:
                assert f"{path}: skipped {len(bad)} invalid row(s)" in out
            else:
                assert "skipped" not in out
            return
        if not bad:
            if not loads:
                assert isinstance(result, HeedError) and "usable" in str(result), result
                return
            assert not isinstance(result, HeedError), f"{result}"
            assert_loaded(spec, result.rows if spec.feedback else result, loads)
            return
        assert isinstance(result, HeedError), f"rows {bad} are invalid, yet it loaded {result!r}"
        line, field = bad[0]
        # with format auto and no valid row at all, no format is known: the field may be another's
        known_format = not (spec.feedback and auto and not valid)
        assert_names(result, path, line, field if known_format else None)


def assert_loaded(spec: Spec, rows: list, expected: list) -> None:
    if spec.name == "queue":
        rows = [{k: v for k, v in r.items() if k != "id" or "id" in e} for r, e in zip(rows, expected)]
    if spec.name == "reward_pairs":  # the rows themselves, extra columns included
        rows = [{k: v for k, v in r.items() if not k.startswith("x_")} for r in rows]
    assert len(rows) == len(expected)
    assert rows == expected


@pytest.mark.parametrize("name", list(SPECS))
@given(data=st.data())
def test_rows_load_exactly_or_fail_at_the_mutated_line_and_field(name, data):
    spec = SPECS[name]
    content, table, gz = data.draw(feedback_files(spec))
    skip, auto = data.draw(st.booleans(), "skip_invalid"), data.draw(st.booleans(), "auto format")
    check_file(spec, content, table, gz, skip, auto)


# ---------------------------------------------------------------------------
# Any bytes, any container
# ---------------------------------------------------------------------------

READERS = {
    "texts": lambda p, skip: read_texts(p, skip_invalid=skip),
    "demos": lambda p, skip: read_demos(p, skip_invalid=skip),
    "prompts": lambda p, skip: read_prompts(p, skip_invalid=skip),
    "feedback": lambda p, skip: read_feedback(p, skip_invalid=skip),
    **{fmt: (lambda fmt: lambda p, skip: read_feedback(p, format=fmt, skip_invalid=skip))(fmt)
       for fmt in ("pairs", "hh", "chat", "rankings", "thumbs", "ratings")},
    "reward_pairs": lambda p, skip: read_reward_pairs(p, skip_invalid=skip),
    "queue": lambda p, skip: read_queue(p, skip_invalid=skip),
}


def corrupt(draw, data: bytes) -> bytes:
    """Cut `data` short, flip a byte, or append junk (maybe nothing)."""
    how = draw(st.sampled_from(["none", "truncate", "flip", "append"]))
    if how == "truncate" and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=8))
    return data


def some_valid_jsonl(draw) -> bytes:
    spec = SPECS[draw(st.sampled_from(list(SPECS)))]
    rows = draw(st.lists(mutated(spec), min_size=0, max_size=4))
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r, _, _, _ in rows)


@st.composite
def any_file(draw):
    suffix = draw(st.sampled_from([".jsonl", ".jsonl.gz", ".txt", ".json"]))
    data = draw(st.binary(max_size=200)) if draw(st.booleans()) else some_valid_jsonl(draw)
    if suffix.endswith(".gz") and draw(st.booleans()):
        data = corrupt(draw, gzip.compress(data))
    else:
        data = corrupt(draw, data)
    return suffix, data


@pytest.mark.parametrize("reader", list(READERS))
@given(file=any_file(), skip=st.booleans())
def test_any_bytes_load_or_stop_with_heed_error(reader, file, skip):
    suffix, data = file
    with workdir() as d:
        path = d / ("f" + suffix)
        path.write_bytes(data)
        result, _, _ = read_quietly(lambda: READERS[reader](path, skip))
        if isinstance(result, HeedError):
            assert_names(result, path)


@given(rows=st.lists(st.tuples(nonempty, texts), min_size=1, max_size=20), where=st.data())
def test_a_damaged_gzip_loads_every_row_or_stops(rows, where):
    """A corrupt or truncated .jsonl.gz never loads fewer rows silently, or wrong ones."""
    good = [{"prompt": p, "response": r, "score": i} for i, (p, r) in enumerate(rows)]
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in good).encode(), mtime=0)
    damaged = corrupt(where.draw, blob)
    with workdir() as d:
        path = d / "r.jsonl.gz"
        path.write_bytes(damaged)
        result, _, _ = read_quietly(lambda: read_feedback(path, skip_invalid=True))
        if isinstance(result, HeedError):
            assert_names(result, path)
        else:
            assert result.rows == [Rating(r["prompt"], r["response"], float(r["score"])) for r in good]


# ---------------------------------------------------------------------------
# Parquet files and saved dataset directories
# ---------------------------------------------------------------------------

@given(rows=st.lists(st.tuples(st.one_of(st.none(), nonempty), texts,
                               st.one_of(st.none(), st.floats(width=64), st.integers(-10**9, 10**9))),
                     min_size=1, max_size=12),
       container=st.sampled_from(["parquet", "dataset"]), skip=st.booleans())
def test_parquet_and_dataset_rows_with_nulls_and_nans(rows, container, skip):
    """Parquet holds NaN and null natively: such a score or prompt is the row's error, by row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": pa.array([p for p, _, _ in rows], pa.string()),
                      "response": pa.array([r for _, r, _ in rows], pa.string()),
                      "score": pa.array([None if s is None else float(s) for _, _, s in rows], pa.float64())})
    bad = [i for i, (p, _, s) in enumerate(rows, start=1)
           if p is None or s is None or not (abs(float(s)) <= 3.4028234663852886e38)]
    with workdir() as d:
        if container == "parquet":
            path = d / "r.parquet"
            pq.write_table(table, path, row_group_size=3)
        else:
            path = d / "ds"
            path.mkdir()
            with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, table.schema) as writer:
                    writer.write_table(table, max_chunksize=4)
            (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        result, _, err = read_quietly(lambda: read_feedback(path, format="ratings", skip_invalid=skip))
        good = [Rating(p, r, float(s)) for i, (p, r, s) in enumerate(rows, start=1) if i not in bad]
        if skip and good:
            assert result.rows == good and result.skipped == len(bad)
            assert [int(n) for n in re.findall(rf"^skipped {re.escape(str(path))}:(\d+)", err, re.M)] == bad
        elif not bad:
            assert result.rows == good
        else:
            assert isinstance(result, HeedError)
            assert_names(result, path, None if skip else bad[0], None if skip else
                         ("prompt" if rows[bad[0] - 1][0] is None else "score"))


@given(files=st.dictionaries(st.sampled_from(["state.json", "data-00000-of-00001.arrow", "x.arrow", "a/b.arrow"]),
                             st.one_of(st.binary(max_size=64), st.sampled_from([
                                 b'{"_data_files": [{"filename": "missing.arrow"}]}', b'{"_data_files": 5}',
                                 b'{"_data_files": [5]}', b'[]', b'{"_data_files": [{"filename": "x.arrow"}]}',
                                 b'{"_data_files": [{"filename": ["x"]}]}', b'{"_data_files": [{"filename": ""}]}',
                                 b'{"_data_files": [{"filename": "\\u0000"}]}'])), max_size=3),
       parquet=st.binary(max_size=300), tail=st.booleans())
def test_junk_parquet_and_dataset_directories(files, parquet, tail):
    with workdir() as d:
        p = d / "junk.parquet"
        p.write_bytes(parquet + (b"PAR1" if tail else b""))
        result, _, _ = read_quietly(lambda: read_feedback(p, skip_invalid=True))
        assert isinstance(result, HeedError)
        assert_names(result, p)
        ds = d / "ds"
        ds.mkdir()
        for name, content in files.items():
            (ds / name).parent.mkdir(parents=True, exist_ok=True)
            (ds / name).write_bytes(content)
        result, _, _ = read_quietly(lambda: read_feedback(ds, skip_invalid=True))
        assert isinstance(result, HeedError)
        assert str(result).startswith(str(ds)), result


# ---------------------------------------------------------------------------
# Plain-text corpora
# ---------------------------------------------------------------------------

@given(docs=st.lists(st.text(max_size=20).filter(lambda s: s.strip() and "\n\n" not in s.replace("\r", "\n")),
                     min_size=1, max_size=5),
       bom=st.booleans(), crlf=st.booleans(), bad=st.data())
def test_text_corpus_documents_or_the_bad_byte_line(docs, bom, crlf, bad):
    docs = [d.replace("\r", "") for d in docs]
    text = "\n\n".join(docs) + "\n"
    if crlf:
        text = text.replace("\n", "\r\n")
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    broken_at = None
    if bad.draw(st.booleans()):
        at = bad.draw(st.integers(3 if bom else 0, len(data)))
        data = data[:at] + b"\xff" + data[at:]
        broken_at = data.count(b"\n", 0, at) + 1
    with workdir() as d:
        path = d / "corpus.txt"
        path.write_bytes(data)
        result, _, _ = read_quietly(lambda: read_texts(path))
        if broken_at is None:
            assert result == [d.strip() for d in docs if d.strip()]
        else:
            assert isinstance(result, HeedError)
            assert_names(result, path, broken_at)


# ---------------------------------------------------------------------------
# YAML configs
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class FuzzConfig:
    data: str = option(help="required")
    max_steps: int = option(3, "an int")
    lr: float = option(0.1, "a float")
    flag: bool = option(False, "a bool")
    out_dir: str = option("o", "a string")
    maybe: str | None = option(None, "an optional string")
    names: list[str] = option(["a"], "strings")
    ids: list[int] = option([1], "ints")
    mode: str = option("fp32", "a choice", choices=("fp32", "bf16"))


finite = st.floats(allow_nan=False, allow_infinity=False)
VALID = {  # strategy of (raw YAML value, the value the config must hold)
    "data": st.one_of(nonempty.map(lambda s: (s, s)), st.integers().map(lambda i: (i, str(i)))),
    "max_steps": st.one_of(st.integers(-10**12, 10**12).map(lambda i: (i, i)),
                       st.integers(-10**6, 10**6).map(lambda i: (float(i), i)),
                       st.integers(-999, 999).map(lambda i: (str(i), i))),
    "lr": st.one_of(finite.map(lambda f: (f, f)), st.integers(-10**6, 10**6).map(lambda i: (i, float(i))),
                    finite.map(lambda f: (repr(f), f))),
    "flag": st.sampled_from([(True, True), (False, False), ("yes", True), ("off", False), (1, True), (0, False),
                             ("TRUE", True)]),
    "out_dir": st.one_of(texts.map(lambda s: (s, s)), st.integers().map(lambda i: (i, str(i)))),
    "maybe": st.one_of(st.sampled_from([(None, None), ("none", None), ("", None), ("null", None)]),
                       nonempty.filter(lambda s: s.lower() not in ("none", "null")).map(lambda s: (s, s))),
    "names": st.one_of(st.lists(nonempty, max_size=3).map(lambda v: (v, v)),
                       st.lists(st.text("abc ", min_size=1, max_size=3).filter(str.strip), min_size=1, max_size=3)
                       .map(lambda v: (",".join(v), [x.strip() for x in v]))),
    "ids": st.one_of(st.lists(st.integers(), max_size=3).map(lambda v: (v, v)),
                     st.lists(st.integers(0, 99), min_size=1, max_size=3).map(lambda v: (",".join(map(str, v)), v))),
    "mode": st.sampled_from([("fp32", "fp32"), ("bf16", "bf16")]),
}
containers = st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(texts, st.integers(),
                                                                                         min_size=1, max_size=2))
INVALID = {
    "data": st.one_of(st.none(), st.booleans(), containers),
    "max_steps": st.one_of(st.booleans(), st.sampled_from([1.5, -0.25, float("nan"), float("inf"), "many", "1.5", "",
                                                           "nan", None]), containers),
    "lr": st.one_of(st.booleans(), st.sampled_from([float("nan"), float("inf"), float("-inf"), "fast", "nan", "inf",
                                                    10**400, None]), containers),
    "flag": st.one_of(st.sampled_from([2, -1, 0.5, 1.0, "maybe", "", None]), containers),
    "out_dir": st.one_of(st.none(), st.booleans(), containers),
    "maybe": st.one_of(st.booleans(), containers),
    "names": st.one_of(st.booleans(), st.integers(), st.dictionaries(texts, st.integers(), min_size=1, max_size=1),
                       st.just([[1]]), st.just([True]), st.just([None]), st.just([{"a": 1}])),
    "ids": st.one_of(st.just([1.5]), st.just([True]), st.just(["x"]), st.just([None]), st.integers(),
                     st.dictionaries(texts, st.integers(), min_size=1, max_size=1)),
    "mode": st.one_of(st.sampled_from(["fp16", "FP32", "", "bf16 "]), st.booleans(), st.integers()),
}


@st.composite
def configs(draw):
    """(YAML text, what must happen: ("ok", values) or ("error", key, field-message fragment))"""
    items = []
    keys = draw(st.permutations(list(VALID)))
    for key in keys:
        choice = draw(st.sampled_from(["absent", "valid", "valid", "invalid"] if key != "data"
                                      else ["valid", "valid", "valid", "invalid", "absent"]))
        if choice == "absent":
            continue
        spelled = key.replace("_", "-") if draw(st.booleans()) else key
        if choice == "valid":
            raw, value = draw(VALID[key])
            items.append((spelled, raw, ("ok", key, value)))
        else:
            items.append((spelled, draw(INVALID[key]), ("bad", key, None)))
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(items)))
        items.insert(at, (draw(st.sampled_from(["stepz", "learning_rate", "x-y"])), 1, ("unknown", None, None)))
    if draw(st.integers(0, 7)) == 0:
        at = draw(st.integers(0, len(items)))
        items.insert(at, (draw(st.sampled_from([1, True, None, 2.5])), "v", ("key", None, None)))
    mapping = {k: v for k, v, _ in items}
    text = yaml.safe_dump(mapping, sort_keys=False, allow_unicode=draw(st.booleans()),
                          default_flow_style=draw(st.sampled_from([False, None])))
    assume(yaml.safe_load(text) == mapping or any(v != v for v in mapping.values() if isinstance(v, float)))
    for spelled, _, (status, _, _) in items:
        if status == "key":
            return text, ("error", spelled, "field names must be strings")
    for spelled, _, (status, key, _) in items:
        if status == "unknown":
            return text, ("error", spelled, "unknown field")
        if status == "bad":
            return text, ("error", spelled, f"field '{spelled}'")
    values = {key: value for _, _, (status, key, value) in items}
    if "data" not in values:
        return text, ("missing", "data", None)
    return text, ("ok", values, None)


@given(case=configs(), bom=st.booleans(), crlf=st.booleans(), comment=st.booleans())
def test_yaml_config_builds_exactly_or_names_file_line_and_field(case, bom, crlf, comment):
    text, (status, what, fragment) = case
    if comment:
        text = "# a config\n\n" + text
    if crlf:
        text = text.replace("\n", "\r\n")
    with workdir() as d:
        path = d / "c.yaml"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
        note(text)
        result, _, _ = read_quietly(lambda: build(FuzzConfig, load_yaml(path)))
        if status == "ok":
            assert not isinstance(result, HeedError), result
            for key, value in what.items():
                got = getattr(result, key)
                assert got == value and type(got) is type(value), (key, got, value)
            return
        assert isinstance(result, HeedError), f"expected an error for {what!r}, got {result!r}"
        if status == "missing":
            assert "missing required option(s): --data" in str(result)
            return
        m = re.match(rf"{re.escape(str(path))}:(\d+): ", str(result))
        assert m, f"no FILE:LINE in {result}"
        line = text.splitlines()[int(m.group(1)) - 1]
        assert yaml.safe_dump({what: None}).split(": ")[0] in line, (line, what)
        assert fragment in str(result), (fragment, str(result))


YAML_TOKENS = ["1", "-1", "1.5", ".nan", ".inf", "-.inf", "1e999", "0x1F", "0o17", "1_000", "true", "no", "~", "null",
               "2020-01-01", "2020-13-45", "2001-12-14t21:59:43.10-05:00", "!!binary aGk=", "!!binary ###",
               "!!float abc", "!!int x", "!!timestamp 2020-99-99", "!!python/object:os.system x", "&a 1", "*a",
               "*missing", "[1, 2", "{a: 1}", "[[[]]]", "'quoted'", "\"\\ud800\"", "\"\\x00\"", "|\n  block",
               ">-\n  folded", "!!set {a, b}", "!!omap [a: 1]", "!!str 5", "? complex", "<<: *a", "- a", "'"]


@st.composite
def yaml_texts(draw):
    from heed.algos.sft import SFTConfig  # noqa: F401  (the fields below are SFTConfig's)

    names = [f.name for f in dataclasses.fields(SFTConfig)]
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        key = draw(st.one_of(st.sampled_from(names), st.sampled_from(["1", "null", "[a]", "{b: 1}", "? x", "-"])))
        lines.append(f"{key}: {draw(st.sampled_from(YAML_TOKENS))}")
    return "\n".join(lines)


@st.composite
def bombs(draw):
    """"Billion laughs": a few lines of YAML whose value, through aliases, holds 9**levels strings.
    Refusing it must not try to print all of it."""
    levels = draw(st.integers(2, 12))
    items = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return f"{draw(st.sampled_from(['lr', 'data', 'epochs', 'dtype']))}: [{', '.join(items)}]\n".encode()


@given(source=st.one_of(st.binary(max_size=120), yaml_texts().map(str.encode), bombs()))
def test_any_yaml_loads_or_stops_with_heed_error(source):
    from heed.algos.sft import SFTConfig

    with workdir() as d:
        path = d / "c.yaml"
        path.write_bytes(source)
        result, _, _ = read_quietly(lambda: build(SFTConfig, load_yaml(path)))
        if isinstance(result, HeedError):
            assert str(result).startswith((str(path), "missing required")), result
