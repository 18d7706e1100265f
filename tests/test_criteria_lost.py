"""criteria_lost: per criterion of the gold oracle, the share of responses losing points,
counted on crafted responses; and the report's table of it. No model is trained."""

from __future__ import annotations

import math
import random

import pytest

from heed.evaluate import criteria_lost
from heed.report import render_html
from heed.utils import HeedError
from heed.world import kb, responses, tasks
from heed.world.oracle import WEIGHTS

NAME = kb.ENTITIES[0].name
DESCRIBE = f"Describe the {NAME}."
GOOD = responses.good(tasks.universe()[DESCRIBE], random.Random(0))
HARSH = GOOD + " It is awful."                     # tone
REPEATED = " ".join([GOOD] * 4)                    # repetition, and too long
CUT = GOOD.rstrip(".").rsplit(" ", 1)[0]            # ends mid-sentence, no final period
NONE_LOST = dict.fromkeys(WEIGHTS, 0.0)


def lost_by(response: str, prompt: str = DESCRIBE) -> set[str]:
    return {c for c, share in criteria_lost([prompt], [response]).items() if share}


def test_each_crafted_response_loses_what_it_should():
    assert criteria_lost([DESCRIBE], [GOOD]) == NONE_LOST  # a perfect response loses nothing
    assert lost_by(HARSH) == {"tone"}
    assert lost_by(REPEATED) == {"repetition", "length"}
    assert lost_by(CUT) == {"termination"}


def test_shares_are_counted_over_responses_in_weights_order():
    prompts = [DESCRIBE] * 4
    shares = criteria_lost(prompts, [GOOD, HARSH, REPEATED, CUT])
    assert list(shares) == list(WEIGHTS)
    assert shares == {"relevance": 0.0, "correctness": 0.0, "tone": 0.25, "length": 0.25,
                      "repetition": 0.25, "termination": 0.25}
    # a second over-long response: 2 of 4 lose length, 1 of 4 repetition
    long = GOOD + " Many people have seen one near here, though few could say where exactly that was."
    assert lost_by(long) == {"length"}
    shares = criteria_lost(prompts, [GOOD, long, REPEATED, REPEATED + " It is awful"])
    assert shares["length"] == 0.75 and shares["repetition"] == 0.5
    assert shares["tone"] == 0.25 and shares["termination"] == 0.25
    assert shares["relevance"] == shares["correctness"] == 0.0
    shares = criteria_lost(prompts, [GOOD, long, REPEATED, GOOD])
    assert shares["length"] == 0.5 and shares["repetition"] == 0.25


def test_mixed_prompts_and_task_types():
    yes_no = next(p for p in tasks.universe() if p.startswith(f"Is the {NAME} ") and p.endswith("?"))
    truth = tasks.universe()[yes_no]
    right = responses.good(truth, random.Random(0))
    assert criteria_lost([yes_no], [right]) == NONE_LOST
    other = kb.ENTITIES[1].name
    off_topic = f"The {other} is nice."  # names another entity only: relevance and correctness
    assert {"relevance", "correctness"} <= lost_by(off_topic)
    shares = criteria_lost([DESCRIBE, yes_no, DESCRIBE, yes_no], [GOOD, right, off_topic, right])
    assert shares["relevance"] == 0.25 and shares["termination"] == 0.0


def test_non_world_prompts_and_empty_input():
    with pytest.raises(HeedError, match="embedded world"):
        criteria_lost(["Write a poem about the sea."], ["The sea is blue."])
    assert all(math.isnan(v) for v in criteria_lost([], []).values())


def _report(**extra) -> dict:
    return {"elapsed_s": 1.0, "quick": True, "eval": {"n_prompts": 4, "temperature": 1.0},
            "stages": {"base": {"gold_mean": 0.1, "gold_se": 0.01}, "sft": {"gold_mean": 0.5, "gold_se": 0.01},
                       "ppo": {"gold_mean": 0.6, "gold_se": 0.01}},
            "win_rates": {"sft_vs_base": 0.8, "ppo_vs_sft": 0.6}, "reward_model": {"n_labels": 10}, **extra}


def test_report_shows_the_table():
    lost = {"base": criteria_lost([DESCRIBE] * 4, [HARSH, REPEATED, CUT, CUT]),
            "sft": criteria_lost([DESCRIBE] * 4, [GOOD, GOOD, HARSH, CUT]),
            "<ppo>": criteria_lost([DESCRIBE] * 4, [GOOD] * 4)}
    page = render_html(_report(criteria_lost=lost), [], [])
    assert "What feedback changed: share of held-out responses losing points, per criterion of the gold oracle" \
        in page
    table = page.split("What feedback changed")[1].split("</table>")[0]
    assert "".join(f"<th>{c}</th>" for c in WEIGHTS) in table
    assert ("<tr><td>base</td><td>0.0%</td><td>0.0%</td><td>25.0%</td><td>25.0%</td><td>25.0%</td>"
            "<td>50.0%</td></tr>") in table
    assert "<tr><td>sft</td><td>0.0%</td><td>0.0%</td><td>25.0%</td><td>0.0%</td><td>0.0%</td><td>25.0%</td>" \
        in table
    assert "&lt;ppo&gt;" in table and "<ppo>" not in page  # escaped like the rest of the report


def test_report_without_the_key_has_no_table():
    page = render_html(_report(), [], [])
    assert "What feedback changed" not in page and "Training curves" in page


def test_heed_eval_result_has_criteria_lost(monkeypatch):
    import heed.evaluate as evaluate
    from heed.generate import Sample

    answers = {"policy": [GOOD, HARSH], "baseline": [CUT, REPEATED]}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        return [Sample(prompt=p, response=r, response_ids=[1], logprobs=[0.0], finished=True, prompt_ids=[1])
                for p, r in zip(prompts, answers[model])]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    result = evaluate.compare("policy", "baseline", None, [DESCRIBE] * 2, with_kl=False)
    assert result["criteria_lost"]["policy"] == {**NONE_LOST, "tone": 0.5}
    assert result["criteria_lost"]["baseline"] == {**NONE_LOST, "termination": 0.5, "repetition": 0.5,
                                                   "length": 0.5}
