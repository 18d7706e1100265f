"""Fine-grained feedback: marked spans, the simulated labeler's marks and corrections, and the
token-level reward model (heed rm train --format spans)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from heed.data import FieldError, Span, parse_marked, read_feedback, write_jsonl
from heed.generate import decode_response, response_char_ends
from heed.losses import span_end_rewards, token_tag_loss
from heed.models import encode_responses, load_tokenizer
from heed.reward_model import token_tags
from heed.world import SimulatedLabeler
from heed.world.oracle import judge_spans, score
from heed.world.responses import BEHAVIOURS, respond
from heed.world.tasks import universe

TRICKY = "Héllo 👋 there.\nThe Tarvo is red. Ünïcode ends 🎉."


def test_span_offsets_survive_unicode_and_newlines(tiny_base):
    """Offsets index the response as Python does (code points); the tokens they map to cover
    exactly the marked characters, whatever the tokenizer does with the emoji's bytes."""
    start = TRICKY.index("The Tarvo")
    end = TRICKY.index("red.") + 4
    row = parse_marked({"prompt": "Is the Tarvo red?", "response": TRICKY,
                        "spans": [{"start": start, "end": end, "label": "good"},
                                  {"start": 6, "end": 7, "label": "rude"}]})
    assert [(s.start, s.end) for s in row.spans] == [(6, 7), (start, end)]
    assert TRICKY[row.spans[0].start:row.spans[0].end] == "👋"
    tok = load_tokenizer(tiny_base)
    ids = encode_responses(tok, [TRICKY], 256)[0]
    ends = response_char_ends(tok, ids)
    assert ends[-1] == len(decode_response(tok, ids)) == len(TRICKY)
    assert all(a <= b for a, b in zip(ends, ends[1:]))
    for t in range(len(ids)):  # every prefix decodes to the text up to its end
        prefix = decode_response(tok, ids[:t + 1])
        assert TRICKY.startswith(prefix.rstrip("\ufffd")) and ends[t] <= len(TRICKY)
    labels = ["good", "rude"]
    tags = token_tags(TRICKY, ends, row.spans, labels)
    covered = "".join(TRICKY[(ends[t - 1] if t else 0):ends[t]] for t, g in enumerate(tags) if g in (1, 2))
    assert covered.strip() == "The Tarvo is red."
    assert tags.count(1) == 1 and tags.count(3) == 1  # one beginning per span


def test_bad_spans_are_refused_with_their_field():
    base = {"prompt": "p", "response": "abc\ndef"}
    cases = [([{"start": 0, "end": 9, "label": "wrong"}], "spans[0]"),
             ([{"start": 2, "end": 1, "label": "wrong"}], "spans[0]"),
             ([{"start": 0.5, "end": 2, "label": "wrong"}], "spans[0].start"),
             ([{"start": 0, "end": 2, "label": ""}], "spans[0].label"),
             ([{"start": 0, "end": 3, "label": "a"}, {"start": 2, "end": 5, "label": "b"}], "spans")]
    for spans, field in cases:
        with pytest.raises(FieldError) as e:
            parse_marked({**base, "spans": spans})
        assert e.value.field == field


def test_token_tags_and_span_end_rewards_match_plain_loops():
    text = "aa bb cc dd"
    ends = [2, 5, 8, 11, 11]  # four words and EOS
    spans = [Span(3, 8, "wrong"), Span(9, 11, "good")]
    assert token_tags(text, ends, spans, ["good", "wrong"]) == [0, 3, 4, 1, 0]
    # a span boundary one character into a word still takes the word; a space-only overlap does not
    assert token_tags(text, ends, [Span(2, 4, "good")], ["good"]) == [0, 1, 0, 0, 0]

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 6, 5, generator=g).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float)
    w = torch.tensor([1.0, -2.0])
    got = span_end_rewards(probs, w, mask)
    want = torch.zeros(3, 6)
    for m in range(3):
        for t in range(6):
            if not mask[m, t]:
                continue
            for lab in range(2):
                inside = probs[m, t, 1 + 2 * lab] + probs[m, t, 2 + 2 * lab]
                nxt = probs[m, t + 1, 2 + 2 * lab] if t + 1 < 6 and mask[m, t + 1] else 0.0
                want[m, t] += w[lab] * inside * (1 - nxt)
    assert torch.allclose(got, want, atol=1e-6)

    logits = torch.randn(2, 4, 5, generator=g)
    tags = torch.tensor([[0, 3, 4, -100], [1, -100, -100, -100]])
    loss = token_tag_loss(logits, tags)
    for m in range(2):
        terms = [-logits[m, t].log_softmax(-1)[tags[m, t]] for t in range(4) if tags[m, t] != -100]
        assert torch.allclose(loss[m], sum(terms) / len(terms), atol=1e-6)


def test_the_oracle_marks_each_behaviour_where_it_is():
    rng = random.Random(0)
    prompts = list(universe())
    found = {label: 0 for label in ("wrong", "irrelevant", "rude", "repeated", "good")}
    for p in rng.sample(prompts, 120):
        task = universe()[p]
        for behaviour in BEHAVIOURS:
            r = respond(task, behaviour, rng, prompts)
            spans = judge_spans(p, r)
            labels = {label for _, _, label in spans}
            if behaviour == "good":
                assert labels == {"good"}, (p, r, spans)
            if behaviour == "repetition":
                assert "repeated" in labels
            if behaviour == "rambling":
                assert "irrelevant" in labels
            if behaviour == "no_end" and "User:" in r:
                assert any(label == "irrelevant" and "User:" in r[a:b] for a, b, label in spans)
            for label in labels:
                found[label] += 1
    assert all(n > 20 for n in found.values()), found


def test_the_labeler_marks_with_noise_and_corrects_for_the_better():
    rng = random.Random(1)
    prompts = list(universe())
    labeler = SimulatedLabeler(0)
    exact = total = corrections = 0
    for p in rng.sample(prompts, 200):
        r = respond(universe()[p], rng.choice(BEHAVIOURS), rng, prompts)
        truth = judge_spans(p, r)
        marks = labeler.mark(p, r)
        for a, b in zip(marks, marks[1:]):
            assert a["end"] <= b["start"]
        assert all(0 <= m["start"] < m["end"] <= len(r) for m in marks)
        total += len(truth)
        exact += len({(s, e, lab) for s, e, lab in truth} & {(m["start"], m["end"], m["label"]) for m in marks})
        fixed = labeler.correct(p, r)
        if fixed is not None:
            corrections += 1
            assert score(p, fixed) > score(p, r)
    # misses, loose boundaries and random labels: most marks exact, not all
    assert 0.55 < exact / total < 0.9, exact / total
    assert corrections > 50


def test_label_oracle_writes_spans_rows(tmp_path):
    from heed.cli import main

    rng = random.Random(2)
    prompts = list(universe())[:40]
    rows = [{"prompt": p, "response": respond(universe()[p], rng.choice(BEHAVIOURS), rng, prompts)} for p in prompts]
    write_jsonl(tmp_path / "samples.jsonl", rows)
    assert main(["label", "oracle", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "s.jsonl"),
                 "--kind", "spans", "--budget", "30"]) == 0
    feedback = read_feedback(tmp_path / "s.jsonl")
    assert feedback.format == "spans" and len(feedback.rows) == 30
    assert any(row.correction for row in feedback.rows)


@pytest.fixture(scope="module")
def spans_rm(tiny_base, world_dir, tmp_path_factory):
    from heed.cli import main

    d = tmp_path_factory.mktemp("spans_rm")
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "prompts_train.jsonl").read_text().splitlines()]
    rng, labeler = random.Random(0), SimulatedLabeler(0)
    rows = []
    for _ in range(240):
        p = rng.choice(prompts)
        r = respond(universe()[p], rng.choice(BEHAVIOURS), rng, prompts)
        rows.append({"prompt": p, "response": r, "spans": labeler.mark(p, r)})
    write_jsonl(d / "spans.jsonl", rows)
    assert main(["rm", "train", "--model", str(tiny_base), "--data", str(d / "spans.jsonl"), "--out", str(d / "rm"),
                 "--epochs", "2", "--batch-size", "16", "--micro-batch-size", "16", "--norm-samples", "8",
                 "--norm-max-new-tokens", "16", "--eval-every", "1000", "--label-rewards", "rude=-2"]) == 0
    return d


def test_token_level_reward_model_learns_and_scores_densely(spans_rm):
    from heed.reward_model import RewardModel

    metrics = [json.loads(line) for line in (spans_rm / "rm" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    rm = RewardModel.load(spans_rm / "rm")
    assert rm.is_dense and rm.members[0].labels == ["good", "irrelevant", "repeated", "rude", "wrong"]
    assert rm.members[0].label_rewards == [1.0, -1.0, -1.0, -2.0, -1.0]
    held = rm.info["heldout"]
    assert set(held["per_label"]) == set(rm.members[0].labels) and held["n_spans"] > 0
    prompts = ["Is the Tarvo red?", "Tell me about the Tarvo."]
    responses = ["The Tarvo is red. " + TRICKY, "What a boring question."]
    mean, _ = rm.score(prompts, responses)
    dense = rm.dense(prompts, responses)
    for segments, total, response in zip(dense, mean, responses):
        assert sum(v for _, v in segments) == pytest.approx(total, abs=1e-4)
        assert all(0 <= end <= len(response) for end, _ in segments)


def test_rm_eval_reports_per_label_accuracy_on_spans(spans_rm, capsys):
    from heed.cli import main

    assert main(["rm", "eval", "--model", str(spans_rm / "rm"), "--data", str(spans_rm / "spans.jsonl"),
                 "--out", str(spans_rm / "eval.json")]) == 0
    result = json.loads((spans_rm / "eval.json").read_text())
    per_label = next(iter(result["files"].values()))["per_label"]
    assert per_label["irrelevant"]["n"] > 0
    assert "per label" in capsys.readouterr().out


def test_spans_do_not_mix_with_other_feedback_in_one_model(spans_rm, tiny_base, tmp_path, capsys):
    from heed.cli import main

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Is the Tarvo red?", "chosen": "Yes.", "rejected": "No."}])
    rc = main(["rm", "train", "--model", str(tiny_base), "--data",
               f"{spans_rm / 'spans.jsonl'},{tmp_path / 'pairs.jsonl'}", "--out", str(tmp_path / "rm")])
    assert rc != 0 and "token-level reward model on their own" in capsys.readouterr().err
