"""Dense DPO (RLHF-V): the weighted score against a plain loop, the tokens a correction changed
on heed's own tokenizer, spans files with corrections read as pairs (with pairwise files), and
short `heed dpo` runs on corrections, where gamma = 5 moves the changed tokens of the
corrections more, against the unchanged ones, than plain DPO does."""

from __future__ import annotations

import json

import pytest
import torch

from heed.algos.dpo import (
    CorrectedPair,
    DPOConfig,
    changed_masks,
    changed_ranges,
    changed_tokens,
    read_pairs,
    run,
    sequence_scores,
)
from heed.cli import main
from heed.data import write_jsonl
from heed.losses import dense_dpo_logps
from heed.models import encode_responses, load_policy, load_tokenizer, make_batch, token_logprobs
from heed.utils import HeedError


def dense_by_loop(logps, mask, changed, gamma):
    """RLHF-V eq. 5 for one response at a time: (sum_u log p + gamma sum_c log p) / (|u| + gamma |c|)."""
    out = []
    for row_lp, row_mask, row_changed in zip(logps, mask, changed):
        total = weight = 0.0
        for lp, m, c in zip(row_lp, row_mask, row_changed):
            if m:
                w = gamma if c else 1.0
                total, weight = total + w * lp, weight + w
        out.append(total / weight if weight else 0.0)
    return out


LOGPS = [[-1.0, -2.0, -3.0, -0.5], [-0.5, -4.0, -7.0, -9.0], [-2.0, -1.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
# row 0: two changed tokens and a changed flag on padding (ignored); row 1 none; row 3 no token at all
CHANGED = [[0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("gamma", [5.0, 1.0, 0.5])
def test_dense_dpo_logps_is_rlhf_v_eq5_by_a_plain_loop(gamma):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    scores = dense_dpo_logps(t(LOGPS), t(MASK), t(CHANGED), gamma)
    torch.testing.assert_close(scores, t(dense_by_loop(LOGPS, MASK, CHANGED, gamma)))
    if gamma == 5.0:  # by hand: (-1 + 5 * -2 + 5 * -3) / (1 + 5 + 5), the mean, (-2 * 5 - 1 - 3 - 1 * 5) / 12, 0
        torch.testing.assert_close(scores, t([-26 / 11, -2.25, -19 / 12, 0.0]))
    # the gradient on each token is its weight over N: gamma / N on the changed ones
    lp = t(LOGPS).requires_grad_()
    dense_dpo_logps(lp, t(MASK), t(CHANGED), gamma).sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([1 / (1 + 2 * gamma), gamma / (1 + 2 * gamma),
                                                 gamma / (1 + 2 * gamma), 0.0])


def test_sequence_scores_weigh_only_corrected_pairs():
    """gamma = 1 is plain DPO (sums); otherwise a pair without a correction (mask None) has
    weight 1 everywhere (its mean), a corrected one eq. 5 with its changed tokens."""
    logps, mask = torch.tensor(LOGPS[:2] * 2), torch.tensor(MASK[:2] * 2)
    masks = [None, ([0, 1, 1], [0, 0])]  # pair 0 plain, pair 1 corrected (rows 2, 3)
    torch.testing.assert_close(sequence_scores(logps, mask, masks, 1.0), (logps * mask).sum(-1))
    expected = dense_by_loop(LOGPS[:2] * 2, MASK[:2] * 2, [[0] * 4, [0] * 4, [0, 1, 1, 0], [0] * 4], 5.0)
    torch.testing.assert_close(sequence_scores(logps, mask, masks, 5.0), torch.tensor(expected))


def test_changed_ranges_are_a_word_diff():
    before, after = "The Tigu is red.\nIt eats fish.", "The Tigu is blue café ☕.\nIt eats fish and rice."
    in_before, in_after = changed_ranges(before, after)
    assert [before[a:b] for a, b in in_before] == [" red"]         # replaced whole, not letter by letter
    assert [after[a:b] for a, b in in_after] == [" blue café ☕", " and rice"]  # replaced, inserted
    assert changed_ranges("Same.", "Same.") == ([], [])
    assert changed_ranges("A b c.", "A c.") == ([(1, 3)], [])        # deleted: changes only `before`
    assert changed_ranges("I do not know.", "It is a cat.") == ([(0, 13)], [(0, 11)])  # one rewrite


def test_changed_tokens_on_heeds_tokenizer_with_unicode_and_a_newline(tiny_base):
    """The mask of changed tokens against the tokenizer's own character offsets (an independent
    alignment): a token is changed if its characters meet a changed one. '☕' and 'é' are not in
    the tiny vocabulary, so they are split over several byte tokens, every one of which is changed."""
    tok = load_tokenizer(tiny_base)
    response = "The Tigu is red.\nIt eats fish."
    correction = "The Tigu is blue café ☕.\nIt eats fish."
    in_response, in_correction = changed_ranges(response, correction)
    for text, ranges in ((correction, in_correction), (response, in_response)):
        ids = encode_responses(tok, [text], 64)[0]
        mask = changed_tokens(tok, ids, ranges)
        assert ids[-1] == tok.eos_token_id and mask[-1] == 0 and len(mask) == len(ids)
        enc = tok(" " + text, add_special_tokens=False, return_offsets_mapping=True)  # as encode_responses
        assert enc["input_ids"] == ids[:-1]
        expected = [int(any(a < end - 1 and start - 1 < b for a, b in ranges)) for start, end in enc["offset_mapping"]]
        assert mask[:-1] == expected
        changed_text = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
        unchanged = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=True)
        assert unchanged.endswith(".\nIt eats fish.") and "\n" not in changed_text
    assert len(tok("☕", add_special_tokens=False)["input_ids"]) > 1  # the split the test is about
    correction_ids = encode_responses(tok, [correction], 64)[0]
    mask = changed_tokens(tok, correction_ids, in_correction)
    assert tok.decode([i for i, m in zip(correction_ids, mask) if m]).strip() == "blue café ☕"
    response_ids = encode_responses(tok, [response], 64)[0]
    mask = changed_tokens(tok, response_ids, in_response)
    assert tok.decode([i for i, m in zip(response_ids, mask) if m]).strip() == "red"


def corrected_rows(world_dir, n: int) -> list[dict]:
    """Spans rows whose response opens with a non-answer that the annotator corrects back to the
    demonstration's first sentence: chosen and rejected share the rest of the response."""
    demos = [json.loads(line) for line in (world_dir / "demos.jsonl").read_text().splitlines()][:n]
    rows = []
    for d in demos:
        rest = d["response"].partition(". ")[2]
        rows.append({"prompt": d["prompt"], "response": "I do not know that. " + rest,
                     "spans": [{"start": 0, "end": 19, "label": "unhelpful"}], "correction": d["response"]})
    return rows


def test_read_pairs_takes_corrections_beside_pairwise_files(tmp_path, world_dir):
    rows = corrected_rows(world_dir, 3)
    write_jsonl(tmp_path / "spans.jsonl", rows + [
        {"prompt": "Hi", "response": "Hello.", "spans": [{"start": 0, "end": 5, "label": "curt"}]},
        {"prompt": "Hi", "response": "Hello.", "spans": [], "correction": "Hello."}])
    write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Describe the Tigu.", "chosen": "A cat.", "rejected": "A dog."},
        {"prompt": "Describe the Tigu.", "chosen": "Same.", "rejected": "Same!", "tie": True}])
    pairs, ties, uncorrected = read_pairs([str(tmp_path / "pairs.jsonl"), str(tmp_path / "spans.jsonl")])
    assert (len(pairs), ties, uncorrected) == (4, 1, 2)
    assert not isinstance(pairs[0], CorrectedPair) and all(isinstance(p, CorrectedPair) for p in pairs[1:])
    assert pairs[1].chosen == rows[0]["correction"] and pairs[1].rejected == rows[0]["response"]
    assert [pairs[1].rejected[a:b] for a, b in pairs[1].rejected_changed] == ["I do not know that"]
    write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": "Hi", "response": "Hello.", "label": "up"}])
    with pytest.raises(HeedError, match="DPO trains on pairs"):
        read_pairs([str(tmp_path / "thumbs.jsonl")])
    write_jsonl(tmp_path / "none.jsonl", [{"prompt": "Hi", "response": "Hello.", "spans": []}])
    with pytest.raises(HeedError, match="1 spans rows without a correction"):
        read_pairs([str(tmp_path / "none.jsonl")])


def correction_token_logps(model, tok, pairs):
    """Token log-probs (N, R) of each pair's chosen response (the correction), every row run in full."""
    with torch.no_grad():
        batch = make_batch(tok, [p.prompt for p in pairs], [p.chosen for p in pairs], max_prompt_len=96,
                           max_response_len=48)
        return token_logprobs(model, batch)[:, batch.prompt_len:], batch.response_mask[:, batch.prompt_len:]


@pytest.mark.slow
def test_dense_dpo_run_on_corrections_moves_the_changed_tokens_more(tiny_base, world_dir, tmp_path, capsys):
    rows = corrected_rows(world_dir, 64)
    write_jsonl(tmp_path / "spans.jsonl", rows + [
        {"prompt": "Hi", "response": "Hello.", "spans": [{"start": 0, "end": 5, "label": "curt"}]}])
    data = str(tmp_path / "spans.jsonl")
    base, tok = load_policy(tiny_base)
    pairs = read_pairs([data])[0]
    masks = changed_masks(tok, pairs, 48)
    before, response_mask = correction_token_logps(base, tok, pairs)
    changed = torch.zeros_like(before)
    for i, (chosen, _) in enumerate(masks):
        changed[i, :len(chosen)] = torch.tensor(chosen, dtype=changed.dtype)
    unchanged = response_mask * (1 - changed)
    assert changed.sum() > 400 and unchanged.sum() > 800

    moved, share = {}, {}
    for gamma in (1.0, 5.0):
        out = tmp_path / f"gamma{gamma:g}"
        args = ["dpo", "--policy", str(tiny_base), "--data", data, "--out", str(out), "--beta", "0.5", "--lr", "2e-3",
                "--epochs", "1", "--batch-size", "16", "--micro-batch-size", "16", "--max-response-len", "48",
                "--log-every", "1", "--warmup-steps", "2", "--dense-gamma", str(gamma)]
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert "64 from corrections, 1 spans rows without one skipped" in printed
        assert ("dense DPO gamma 5.0" in printed) == (gamma == 5.0)
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.1
        assert logged[-1]["rewards/margin"] > logged[0]["rewards/margin"] + 0.2
        assert json.loads((out / "trainer_done.json").read_text())["uncorrected_skipped"] == 1
        # the mean change of the corrections' token log-probs, on changed and on unchanged tokens
        delta = correction_token_logps(load_policy(out)[0], tok, pairs)[0] - before
        on_changed, on_unchanged = (delta * changed).sum() / changed.sum(), (delta * unchanged).sum() / unchanged.sum()
        moved[gamma] = float(on_changed - on_unchanged)
        share[gamma] = moved[gamma] / float(on_changed.abs() + on_unchanged.abs())  # scale-free, in [-1, 1]
        print(f"gamma {gamma:g}: changed {float(on_changed):+.3f}, unchanged {float(on_unchanged):+.3f}")

    # the reference's scores were Dense DPO's: eq. 5 over the starting policy's token log-probs
    ref = torch.load(tmp_path / "gamma5" / "reference_logps.pt")
    assert ref["dense_gamma"] == 5.0
    torch.testing.assert_close(ref["chosen"], dense_dpo_logps(before, response_mask, changed, 5.0),
                               rtol=1e-4, atol=1e-4)
    # measured (2026-12-03): moved 0.11 at gamma 1 against 0.47 at gamma 5; share 0.19 against 0.80
    print(f"moved {moved}, share {share}")
    assert moved[5.0] > moved[1.0] + 0.15 and share[5.0] > share[1.0] + 0.3
    # a cache of another gamma is refused rather than mixed into the loss
    (tmp_path / "gamma5" / "trainer_done.json").unlink()
    with pytest.raises(HeedError, match="--dense-gamma 5.0, not 1.0"):
        run(DPOConfig(policy=str(tiny_base), data=[data], out=str(tmp_path / "gamma5"), max_response_len=48))
