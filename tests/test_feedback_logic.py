"""Pure parts of the feedback app: agreement statistics, active selection, export formats, text rendering."""

import math
import random

import pytest

from heed.feedback.active import member_disagreement, moment_disagreement, score_items, selection_order
from heed.feedback.agreement import agreement_report, cohen_kappa, krippendorff_alpha, reward_model_agreement
from heed.feedback.app import segments
from heed.feedback.export import export_rows

# -- agreement ---------------------------------------------------------------

def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units,
    # missing values; nominal alpha = 0.743, interval alpha = 0.849.
    N = None
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
              [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
              [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
              [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
    units = [[v for v in col if v is not None] for col in zip(*coders)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_alpha_perfect_and_undefined():
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"], ["a", "a"]]) == pytest.approx(1.0)
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None   # no variation at all
    assert krippendorff_alpha([["a"], ["b"]]) is None             # nobody overlaps


def test_cohen_kappa_by_hand():
    # p_o = 4/5; p_e = (2*1 + 2*3 + 1*1) / 25 = 9/25; kappa = (0.8 - 0.36) / 0.64
    assert cohen_kappa(list("aabbc"), list("abbbc")) == pytest.approx(0.6875)
    assert cohen_kappa(list("ab"), list("ab")) == pytest.approx(1.0)
    assert cohen_kappa(list("aa"), list("aa")) is None


def _answer(item, who, kind="pair", choice=None, **kw):
    return {"item_id": item, "annotator": who, "kind": kind, "choice": choice, "ranking": kw.get("ranking"),
            "label": kw.get("label"), "score": kw.get("score"), "comment": None, "displayed_order": [0, 1],
            "created_at": "2026-01-01T00:00:00.000Z"}


def test_agreement_report_ignores_skips_and_pairs_annotators():
    answers = [_answer("i1", "ann", choice="0"), _answer("i1", "bob", choice="0"),
               _answer("i2", "ann", choice="1"), _answer("i2", "bob", choice="0"),
               _answer("i3", "ann", choice="tie"), _answer("i3", "bob", choice="skip"),
               _answer("r1", "ann", kind="rating", score=6), _answer("r1", "bob", kind="rating", score=5)]
    report = agreement_report(answers)
    assert report["pair"]["units"] == 2
    (pair,) = report["pair"]["pairs"]
    assert (pair["a"], pair["b"], pair["n"]) == ("ann", "bob", 2)
    assert pair["kappa"] == pytest.approx(cohen_kappa(["0", "1"], ["0", "0"]))
    assert "rating" in report


def test_reward_model_agreement_counts_clear_choices_only():
    items = {"i1": {"rm_scores": [1.0, 0.0]}, "i2": {"rm_scores": [0.0, 2.0]}, "i3": {"rm_scores": None},
             "k": {"rm_scores": [0.0, 5.0, 1.0]}}
    answers = [_answer("i1", "ann", choice="0"), _answer("i2", "ann", choice="0"), _answer("i1", "bob", choice="tie"),
               _answer("i3", "bob", choice="1"), _answer("k", "bob", kind="ranking", ranking=[1, 2, 0])]
    out = reward_model_agreement(answers, items)
    assert out["n"] == 3 and out["overall"] == pytest.approx(2 / 3)
    assert out["annotators"]["ann"] == {"agreement": 0.5, "n": 2}


# -- active selection --------------------------------------------------------

def test_member_disagreement_is_the_variance_of_the_preference_probability():
    agree = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    assert member_disagreement(agree) == 0.0
    split = [[2.0, 0.0], [0.0, 2.0]]
    p = 1 / (1 + math.exp(-2.0))
    assert member_disagreement(split) == pytest.approx(((p - 0.5) ** 2 + (1 - p - 0.5) ** 2) / 2)
    # a shared shift of both scores changes nothing: only differences matter
    assert member_disagreement([[s + 3, t + 3] for s, t in split]) == pytest.approx(member_disagreement(split))


def test_moment_disagreement_approximates_the_members():
    rng = random.Random(0)
    for _ in range(20):
        mu, sd = [rng.uniform(-2, 2) for _ in range(2)], [rng.uniform(0.01, 0.1) for _ in range(2)]
        members = [[rng.gauss(mu[k], sd[k]) for k in range(2)] for _ in range(4000)]
        exact = member_disagreement(members)
        assert moment_disagreement(mu, sd) == pytest.approx(exact, rel=0.15)


def test_selection_order_puts_disagreement_first_and_keeps_queue_order_otherwise():
    queue = ["a", "b", "c", "d", "e"]
    fake_members = {"a": [[0.0, 0.0]] * 3,               # all agree: no information
                    "b": [[3.0, 0.0], [0.0, 3.0]],       # members disagree strongly
                    "c": [[1.0, 0.0], [0.0, 1.0]],       # disagree a little
                    "d": [[0.0, 0.0]] * 3}
    disagreement = {k: member_disagreement(v) for k, v in fake_members.items()}  # "e" unscored
    assert selection_order(disagreement, queue) == ["b", "c", "a", "d", "e"]


def test_score_items_uses_the_ensemble_mean_and_std():
    class FakeEnsemble:
        calls = 0

        def score(self, prompts, responses):
            self.calls += 1
            std = {"sure": 0.0, "unsure": 2.0}
            return [float(len(r)) for r in responses], [std[r.split()[0]] for r in responses]

    rm = FakeEnsemble()
    items = [{"id": "x", "prompt": "p", "responses": ["sure a", "sure bb"]},
             {"id": "y", "prompt": "p", "responses": ["unsure a", "unsure b"]},
             {"id": "m", "prompt": "p", "responses": [{"media": "/clip.gif"}, "sure"]}]
    out = score_items(rm, items, batch_size=2)
    assert out["x"] == (0.0, [6.0, 7.0])
    assert out["y"][0] > 0.1 and out["m"] == (0.0, [None, None])
    assert rm.calls == 2  # four text responses in batches of two; media never sent


# -- export ------------------------------------------------------------------

ITEMS = {"p1": {"prompt": "P1", "responses": ["a1", "b1"]},
         "p2": {"prompt": "P2", "responses": ["a2", "b2"]},
         "p3": {"prompt": "P3", "responses": [{"media": "/clips/x.gif"}, {"media": "/clips/y.gif"}]},
         "k1": {"prompt": "K", "responses": ["x", "y", "z"]},
         "t1": {"prompt": "T", "responses": ["t"]},
         "s1": {"prompt": "S", "responses": ["s"]}}


def test_export_pairs_keeps_ties_and_both_bad_and_drops_skips():
    answers = [_answer("p1", "ann", choice="1"), _answer("p2", "ann", choice="tie"),
               _answer("p2", "bob", choice="both_bad"), _answer("p1", "bob", choice="skip"),
               _answer("p3", "ann", choice="0")]
    rows = export_rows(ITEMS, answers, "pairs")
    assert rows == [{"prompt": "P1", "chosen": "b1", "rejected": "a1"},
                    {"prompt": "P2", "chosen": "a2", "rejected": "b2", "tie": True},
                    {"prompt": "P2", "chosen": "a2", "rejected": "b2", "both_bad": True},
                    {"prompt": "P3", "chosen": "/clips/x.gif", "rejected": "/clips/y.gif"}]


def test_export_majority():
    answers = [_answer("p1", "a", choice="1"), _answer("p1", "b", choice="1"), _answer("p1", "c", choice="0"),
               _answer("p2", "a", choice="0"), _answer("p2", "b", choice="1"),
               _answer("k1", "a", kind="ranking", ranking=[2, 0, 1]),
               _answer("k1", "b", kind="ranking", ranking=[0, 2, 1]),
               _answer("k1", "c", kind="ranking", ranking=[2, 1, 0]),
               _answer("t1", "a", kind="thumbs", label="up"), _answer("t1", "b", kind="thumbs", label="down"),
               _answer("s1", "a", kind="rating", score=2), _answer("s1", "b", kind="rating", score=6),
               _answer("s1", "c", kind="rating", score=5)]
    assert export_rows(ITEMS, answers, "pairs", majority=True) == [
        {"prompt": "P1", "chosen": "b1", "rejected": "a1"},
        {"prompt": "P2", "chosen": "a2", "rejected": "b2", "tie": True}]
    assert export_rows(ITEMS, answers, "rankings", majority=True) == [
        {"prompt": "K", "responses": ["x", "y", "z"], "ranking": [2, 0, 1]}]
    assert export_rows(ITEMS, answers, "thumbs", majority=True) == []  # an even split
    assert export_rows(ITEMS, answers, "ratings", majority=True) == [{"prompt": "S", "response": "s", "score": 5}]
    assert export_rows(ITEMS, answers, "ratings") == [{"prompt": "S", "response": "s", "score": s} for s in (2, 6, 5)]
    assert export_rows(ITEMS, answers, "thumbs")[0] == {"prompt": "T", "response": "t", "label": "up"}


# -- rendering text ----------------------------------------------------------

def test_segments_keep_every_character_and_find_code_blocks():
    text = "Intro\n\n```python\nx = '<b>'\n\n  y\n```\nafter\n~~~\nunclosed"
    segs = segments(text)
    assert [(s["code"], s["lang"], s["text"]) for s in segs] == [
        (False, "", "Intro\n\n"), (True, "python", "x = '<b>'\n\n  y"), (False, "", "after\n"), (True, "", "unclosed")]
    assert segments("") == []
    assert segments("a\r\nb") == [{"code": False, "lang": "", "text": "a\r\nb"}]
