"""Feedback formats: each format read from each container, detection, and every kind of bad row."""

from __future__ import annotations

import gzip
import json

import pytest

from heed.data import FieldError, Pair, Ranking, Rating, Thumb, detect_feedback_format, read_feedback
from heed.utils import HeedError

HH_CHOSEN = ("\n\nHuman: What colour is the Tigu?\n\nAssistant: Black.\n\nHuman: And where does it live?"
             "\n\nAssistant: It lives in the sea.")
HH_REJECTED = ("\n\nHuman: What colour is the Tigu?\n\nAssistant: Black.\n\nHuman: And where does it live?"
               "\n\nAssistant: What a stupid question.")

GOOD = {
    "pairs": [{"prompt": "Is the Tigu a cat?", "chosen": "No.", "rejected": "Yes.", "margin": 1.5},
              {"prompt": "Is the Tigu a cat?", "chosen": "No, it is a fish.", "rejected": "No.", "tie": True},
              {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": ""}],
    "hh": [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}],
    "chat": [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
              "rejected": [{"role": "assistant", "content": "Go away."}]},
             {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
              "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}]}],
    "rankings": [{"prompt": "Describe the Zalko.", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}],
    "thumbs": [{"prompt": "p", "response": "r", "label": "up"}, {"prompt": "p", "response": "s", "label": False},
               {"prompt": "p", "response": "t", "label": 1}, {"prompt": "p", "response": "u", "label": "DOWN"}],
    "ratings": [{"prompt": "p", "response": "r", "score": 6}, {"prompt": "p", "response": "s", "score": -0.5}],
}


def write_jsonl(path, rows, *, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("fmt", list(GOOD))
def test_good_rows_detected_and_parsed(tmp_path, fmt):
    fb = read_feedback(write_jsonl(tmp_path / "f.jsonl", GOOD[fmt]))
    assert fb.format == fmt and len(fb.rows) == len(GOOD[fmt]) and fb.skipped == 0


def test_parsed_values():
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    pairs = read_feedback(write_jsonl(d / "p.jsonl", GOOD["pairs"])).rows
    assert pairs[0] == Pair("Is the Tigu a cat?", "No.", "Yes.", 1.5, False)
    assert pairs[1].tie and pairs[1].margin == 0.0
    assert pairs[2].prompt == [{"role": "user", "content": "Hi"}] and pairs[2].rejected == ""
    (hh,) = read_feedback(write_jsonl(d / "h.jsonl", GOOD["hh"])).rows
    assert hh.prompt == [{"role": "user", "content": "What colour is the Tigu?"},
                         {"role": "assistant", "content": "Black."},
                         {"role": "user", "content": "And where does it live?"}]
    assert (hh.chosen, hh.rejected) == ("It lives in the sea.", "What a stupid question.")
    chat = read_feedback(write_jsonl(d / "c.jsonl", GOOD["chat"])).rows
    assert chat[0] == Pair([{"role": "user", "content": "Hi"}], "Hello.", "Go away.")
    assert chat[1] == Pair([{"role": "user", "content": "Hi"}], "Hello.", "Bye.")
    (rk,) = read_feedback(write_jsonl(d / "r.jsonl", GOOD["rankings"])).rows
    assert rk == Ranking("Describe the Zalko.", ["a", "b", "c"], [2, 0, 1])
    thumbs = read_feedback(write_jsonl(d / "t.jsonl", GOOD["thumbs"])).rows
    assert [t.up for t in thumbs] == [True, False, True, False] and isinstance(thumbs[0], Thumb)
    ratings = read_feedback(write_jsonl(d / "s.jsonl", GOOD["ratings"])).rows
    assert ratings == [Rating("p", "r", 6.0), Rating("p", "s", -0.5)]


def test_containers_gz_parquet_and_dataset_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = GOOD["hh"] * 3
    gz = read_feedback(write_jsonl(tmp_path / "hh.jsonl.gz", rows, gz=True))
    assert gz.format == "hh" and len(gz.rows) == 3
    table = pa.Table.from_pylist(GOOD["rankings"] * 2)
    pq.write_table(table, tmp_path / "r.parquet")
    assert read_feedback(tmp_path / "r.parquet").format == "rankings"
    d = tmp_path / "ds"
    d.mkdir()
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    fb = read_feedback(d)
    assert fb.format == "rankings" and len(fb.rows) == 2


def test_format_override_and_both_bad(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                              {"prompt": "p", "chosen": "a", "rejected": "b", "both_bad": True}])
    fb = read_feedback(path, format="pairs")
    assert len(fb.rows) == 1 and fb.unused == 1
    with pytest.raises(HeedError, match=r"f.jsonl:1: field 'responses': missing"):
        read_feedback(path, format="rankings")
    with pytest.raises(HeedError, match="unknown feedback format"):
        read_feedback(path, format="nope")
    with pytest.raises(FieldError, match="cannot tell"):
        detect_feedback_format({"text": "x"})


BAD = [
    # (format of the good first row, bad row, field named in the error, message fragment)
    ("pairs", {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ("pairs", {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
    ("pairs", {"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin", "finite"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"}, "tie", "true or false"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "tie": True, "margin": 1}, "margin", "tie"),
    ("pairs", {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role",
     "unknown role"),
    ("hh", {"chosen": "Human: hi\n\nAssistant: yo", "rejected": HH_REJECTED}, "chosen", "must start"),
    ("hh", {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: something else\n\nAssistant: no"}, "rejected",
     "does not share"),
    ("hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}, "chosen", "must end with"),
    ("chat", {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "x"}],
              "rejected": [{"role": "assistant", "content": "y"}]}, "chosen", "must end with the assistant"),
    ("chat", {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
              "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
     "rejected", "does not share"),
    ("chat", {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "x", "rejected": []}, "chosen",
     "list of {role, content}"),
    ("rankings", {"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "at least 2"),
    ("rankings", {"prompt": "p", "responses": ["a", 5], "ranking": [0, 1]}, "responses[1]", "expected a string"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking", "exactly once"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}, "ranking", "exactly once"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranking": ["0", "1"]}, "ranking", "integer"),
    ("thumbs", {"prompt": "p", "response": "r", "label": "meh"}, "label", "expected 'up'"),
    ("thumbs", {"prompt": "p", "response": "r", "label": 2}, "label", "expected 'up'"),
    ("thumbs", {"prompt": "p", "label": "up"}, "response", "missing"),
    ("ratings", {"prompt": "p", "response": "r", "score": "7"}, "score", "expected a number"),
    ("ratings", {"prompt": "p", "response": "r", "score": True}, "score", "expected a number"),
    ("ratings", {"prompt": "p", "response": "r", "score": float("inf")}, "score", "finite"),
]


@pytest.mark.parametrize("fmt,bad,field,fragment", BAD)
def test_bad_row_names_file_line_field(tmp_path, fmt, bad, field, fragment):
    path = write_jsonl(tmp_path / "fb.jsonl", [GOOD[fmt][0], bad, GOOD[fmt][0]])
    with pytest.raises(HeedError) as e:
        read_feedback(path)
    msg = str(e.value)
    assert f"fb.jsonl:2: field '{field}'" in msg and fragment in msg and "--skip-invalid" in msg
    fb = read_feedback(path, skip_invalid=True)
    assert fb.format == fmt and len(fb.rows) == 2 and fb.skipped == 1


def test_invalid_json_and_non_object_rows(tmp_path, capsys):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(GOOD["ratings"][0]) + "\n{not json\n[1, 2]\n")
    with pytest.raises(HeedError, match=r"f.jsonl:2: not valid JSON"):
        read_feedback(path)
    fb = read_feedback(path, skip_invalid=True)
    assert fb.skipped == 2 and len(fb.rows) == 1
    assert "skipped 2 invalid row(s)" in capsys.readouterr().out


def test_undetectable_and_empty(tmp_path):
    with pytest.raises(HeedError, match=r"f.jsonl:1: cannot tell the feedback format"):
        read_feedback(write_jsonl(tmp_path / "f.jsonl", [{"text": "hello"}]))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(HeedError, match="no feedback rows found"):
        read_feedback(tmp_path / "e.jsonl")
    with pytest.raises(HeedError, match="file not found"):
        read_feedback(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------
# Pairs whose two dialogues part before the last assistant turn (5 of the 2,312 rows of
# HH-RLHF's harmless-base/test.jsonl.gz, the first at line 844): the shared whole turns
# are the prompt, and each side's remaining turns its response, rendered as the whole
# dialogue would be.
# ---------------------------------------------------------------------------

def hh(*turns: str) -> str:
    """An HH-RLHF transcript from alternating human/assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def chat(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


H1, H2 = "How do I pick a lock?", "I locked myself out of my own house."
# (chosen turns, rejected turns, number of shared turns that form the prompt)
PARTING = {
    "last turn": (("Hi", "Hello.", H1, "I can't help with that."), ("Hi", "Hello.", H1, "Use a tension wrench."), 3),
    "earlier assistant turn": ((H1, "Why do you ask?", H2, "Call a locksmith."),
                               (H1, "Use a tension wrench.", H2, "Then rake the pins."), 1),
    "later human turn": ((H1, "Why do you ask?", H2, "Call a locksmith."),
                         (H1, "Why do you ask?", "Just curious.", "Use a tension wrench."), 1),
    "one side goes on": ((H1, "Why do you ask?"), (H1, "Why do you ask?", H2, "Call a locksmith."), 1),
    "identical": ((H1, "No."), (H1, "No."), 1),
}


@pytest.mark.parametrize("case", list(PARTING))
@pytest.mark.parametrize("fmt", ["hh", "chat", "chat with prompt"])
def test_dialogues_parting_before_the_last_turn(tmp_path, fmt, case):
    from heed.template import format_transcript

    chosen, rejected, n_shared = PARTING[case]
    if fmt == "hh":
        row = {"chosen": hh(*chosen), "rejected": hh(*rejected)}
    elif fmt == "chat":
        row = {"chosen": chat(*chosen), "rejected": chat(*rejected)}
    else:  # the first turn as the explicit prompt column, the rest in chosen/rejected
        row = {"prompt": chat(*chosen)[:1], "chosen": chat(*chosen)[1:],
               "rejected": [{"role": "assistant" if i % 2 == 0 else "user", "content": t}
                            for i, t in enumerate(rejected[1:])]}
    fb = read_feedback(write_jsonl(tmp_path / "f.jsonl", [GOOD["hh"][0] if fmt == "hh" else GOOD["chat"][1], row]))
    assert fb.format == fmt.split()[0] and len(fb.rows) == 2
    pair = fb.rows[1]
    assert pair.prompt == chat(*chosen)[:n_shared]
    if n_shared == len(chosen) - 1 and n_shared == len(rejected) - 1:  # parting at the last turn: as before
        assert (pair.chosen, pair.rejected) == (chosen[-1], rejected[-1])
    # Prompt + response renders to exactly the whole dialogue's text, on both sides.
    for side, response in ((chosen, pair.chosen), (rejected, pair.rejected)):
        whole = chat(*side)
        assert format_transcript(pair.prompt, response) == format_transcript(whole[:-1], whole[-1]["content"])
    if case == "identical":
        assert pair.chosen == pair.rejected == "No."


def test_early_parting_responses_hold_the_later_turns():
    from heed.data import parse_hh

    chosen, rejected, _ = PARTING["earlier assistant turn"]
    pair = parse_hh({"chosen": hh(*chosen), "rejected": hh(*rejected)})
    assert pair.prompt == [{"role": "user", "content": H1}]
    assert pair.chosen == f"Why do you ask?<|endoftext|>\nUser: {H2}\nAssistant: Call a locksmith."
    assert pair.rejected == f"Use a tension wrench.<|endoftext|>\nUser: {H2}\nAssistant: Then rake the pins."


def test_early_parting_tokens_equal_the_whole_dialogues(tmp_path):
    """The tokens the reward model and DPO see (prompt and response encoded apart) are the
    whole dialogue's tokens: the turn boundaries inside a response keep their EOS token."""
    from heed.models import make_batch, train_tokenizer
    from heed.template import format_transcript

    texts = [format_transcript(chat(*c)[:-1], c[-1]) for c, _, _ in PARTING.values()] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    chosen, rejected, _ = PARTING["earlier assistant turn"]
    pair = read_feedback(write_jsonl(tmp_path / "f.jsonl", [{"chosen": hh(*chosen), "rejected": hh(*rejected)}])
                         ).rows[0]
    batch = make_batch(tok, [pair.prompt] * 2, [pair.chosen, pair.rejected], max_prompt_len=512,
                       max_response_len=512)
    for i, side in enumerate((chosen, rejected)):
        whole = chat(*side)
        expected = tok(format_transcript(whole[:-1], whole[-1]["content"]), add_special_tokens=False)["input_ids"]
        got = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert got == expected
        assert got.count(tok.eos_token_id) == 2  # the first assistant turn's end, and the response's


def test_a_released_file_with_early_parting_rows_loads_whole(tmp_path):
    """Like harmless-base/test.jsonl.gz: most rows part at the last turn, a few earlier; the
    whole file loads, for `heed rm train` and for DPO's reader."""
    from heed.algos.dpo import read_pairs

    rows = [{"chosen": hh(*c), "rejected": hh(*r)} for c, r, _ in PARTING.values() if c != r] * 3
    path = write_jsonl(tmp_path / "test.jsonl.gz", rows, gz=True)
    fb = read_feedback(path)
    assert fb.format == "hh" and len(fb.rows) == len(rows) and fb.skipped == 0
    pairs, ties, _ = read_pairs([str(path)])
    assert len(pairs) == len(rows) and ties == 0


EARLY_BAD = [
    # (bad row, field named in the error, message fragment): still malformed, named by line and field
    ({"chosen": hh(H1, "a", H2, "b"), "rejected": hh(H2, "a", H2, "b")}, "rejected", "does not share"),
    ({"chosen": hh(H1, "a", H2, "b"), "rejected": hh(H1, "a", H2)}, "rejected", "must end with"),
    ({"chosen": hh(H1, "a", H2, "b"), "rejected": "Human: x\n\nAssistant: y"}, "rejected", "must start"),
    ({"chosen": hh(H1, "a"), "rejected": None}, "rejected", "expected a string"),
    ({"chosen": chat(H1, "a", H2, "b"), "rejected": chat(H2, "a", H2, "b")}, "rejected", "does not share"),
    ({"chosen": chat(H1, "a", H2, "b"), "rejected": chat(H1, "a", H2)}, "rejected", "must end with"),
    ({"chosen": chat(H1, "a", H2, "b"), "rejected": [{"role": "user", "content": H1}, {"role": "bot"}]},
     "rejected[1]", "expected {"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "prompt", "no messages before"),
]


@pytest.mark.parametrize("bad,field,fragment", EARLY_BAD)
def test_malformed_dialogue_rows_name_line_and_field(tmp_path, bad, field, fragment):
    good = {"chosen": hh(H1, "a", H2, "b"), "rejected": hh(H1, "c", H2, "d")}
    if isinstance(bad["chosen"], list):
        good = {"chosen": chat(H1, "a", H2, "b"), "rejected": chat(H1, "c", H2, "d")}
    path = write_jsonl(tmp_path / "fb.jsonl", [good, good, bad])
    with pytest.raises(HeedError) as e:
        read_feedback(path)
    assert f"fb.jsonl:3: field '{field}'" in str(e.value) and fragment in str(e.value)
    assert len(read_feedback(path, skip_invalid=True).rows) == 2


def test_format_turns_needs_assistant_turns_at_both_ends():
    from heed.template import format_turns

    assert format_turns(chat("q", "a")[1:]) == "a"
    with pytest.raises(ValueError):
        format_turns(chat("q", "a"))
    with pytest.raises(ValueError):
        format_turns([])
