"""The demonstrators: their habits show at the documented rates, and each habit costs gold points."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from heed.world import World, score, score_breakdown
from heed.world.demonstrators import APPLIES_TO, DEMONSTRATORS, HABITS, draw_habits, write
from heed.world.kb import NAMES_LOWER, VALUE_WORDS
from heed.world.lexicon import ASIDES, CLOSERS, HARSH_WORDS, HEDGES, NEGATIONS, OPENERS, POSITIVE_WORDS, words
from heed.world.oracle import WEIGHTS
from heed.world.responses import good
from heed.world.tasks import universe

# The criterion through which the oracle sees each habit (the module docstring's table).
CRITERION = {"padding": "length", "hedging": "length", "overlong": "length", "aside": "tone", "flat": "tone",
             "repeat": "repetition", "thin": "correctness"}


@pytest.fixture(scope="module")
def big_world():
    return World(0, n_demos=2600)  # nearly every train-side prompt: counts with small error


def test_habit_rates_match_the_documented_rates(big_world):
    shown, applicable = Counter(), Counter()
    for d in big_world.demos:
        task_type = universe()[d["prompt"]].type
        for habit, rate in DEMONSTRATORS[d["demonstrator"]].items():
            if task_type in APPLIES_TO[habit]:
                applicable[d["demonstrator"], habit] += 1
                shown[d["demonstrator"], habit] += habit in d["habits"]
        assert set(d["habits"]) <= set(DEMONSTRATORS[d["demonstrator"]])  # nobody shows another's habit
    for (who, habit), n in applicable.items():
        rate = DEMONSTRATORS[who][habit]
        assert n >= 20, (who, habit)
        assert abs(shown[who, habit] / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9, (who, habit)
    # docs/world.md: about two thirds of the world's demonstrations carry at least one habit
    for seed in (0, 1, 2):
        demos = World(seed).demos
        assert 0.6 <= sum(bool(d["habits"]) for d in demos) / len(demos) <= 0.7, seed
    assert Counter(d["demonstrator"] for d in big_world.demos).keys() == DEMONSTRATORS.keys()


def test_demonstrations_with_habits_score_below_perfect_and_without_score_one(big_world):
    for d in big_world.demos:
        s = score(d["prompt"], d["response"])
        if d["habits"]:
            assert s < 1.0 - 1e-9, d
            if len(d["habits"]) == 1:  # together, habits can hide each other (thin + hedging fits the length)
                habit = d["habits"][0]
                assert score_breakdown(d["prompt"], d["response"])[CRITERION[habit]] < WEIGHTS[CRITERION[habit]]
        else:
            assert s == pytest.approx(1.0), d


@pytest.mark.parametrize("habit", HABITS)
def test_each_habit_lowers_the_score_of_a_perfect_answer_and_states_no_wrong_fact(habit):
    rng = random.Random(habit)
    checked = 0
    for prompt, task in universe().items():
        if task.type not in APPLIES_TO[habit]:
            continue
        answer = good(task, rng)
        assert score(prompt, answer) == pytest.approx(1.0)
        response = write(task, (habit,), rng, answer)
        points = score_breakdown(prompt, response)
        assert sum(points.values()) < 1.0 - 1e-9, (habit, prompt, response)
        assert points[CRITERION[habit]] < WEIGHTS[CRITERION[habit]] - 1e-9, (habit, prompt, response)
        if habit != "thin":  # habits are not wrong facts: correctness stays full
            assert points["correctness"] == pytest.approx(WEIGHTS["correctness"]), (habit, prompt, response)
        checked += 1
    assert checked > 100


def test_habit_sentences_carry_only_what_they_are_for():
    for sentence in OPENERS + CLOSERS + HEDGES + ASIDES:
        ws = words(sentence)
        assert not set(ws) & (set(VALUE_WORDS) | set(NAMES_LOWER) | NEGATIONS | POSITIVE_WORDS), sentence
        assert sum(w in HARSH_WORDS for w in ws) == (1 if sentence in ASIDES else 0), sentence


def test_flawless_control_has_the_same_prompts_and_no_habits():
    flawed, flawless = World(0).demos, World(0, habits="none").demos
    assert [d["prompt"] for d in flawed] == [d["prompt"] for d in flawless]
    assert all(d["habits"] == [] and d["demonstrator"] == "flawless" for d in flawless)
    assert all(score(d["prompt"], d["response"]) == pytest.approx(1.0) for d in flawless)
    same = [a["response"] == b["response"] for a, b in zip(flawed, flawless) if not a["habits"]]
    assert same and all(same)  # the habits are added to the same answers, nothing else differs
    with pytest.raises(ValueError, match="habits"):
        World(0, habits="some")


def test_draw_habits_only_draws_what_applies():
    rng = random.Random(0)
    brief = next(t for t in universe().values() if t.type == "brief")
    for _ in range(200):
        assert set(draw_habits("dev", brief, rng)) <= {"aside", "overlong"}


def test_the_corpus_teaches_every_word_the_demonstrators_use():
    # A habit written in words the pretraining corpus never had comes out of SFT garbled.
    corpus_words = {w for text in World(0).corpus for w in words(text)}
    for d in World(0).demos:
        assert set(words(d["response"])) <= corpus_words, d
