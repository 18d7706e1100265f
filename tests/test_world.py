"""The embedded world: determinism, the held-out split, each oracle criterion, the labeler's noise."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

import pytest

from heed.template import EOS_TOKEN
from heed.world import SimulatedLabeler, World, gold_preference, score, score_breakdown, write_world
from heed.world.kb import ATTRIBUTES, ENTITIES
from heed.world.lexicon import article, words
from heed.world.oracle import FLOOR, PERFECT
from heed.world.responses import BEHAVIOURS
from heed.world.tasks import universe

E = ENTITIES[0]
OTHER = next(e for e in ENTITIES if e.kind != E.kind and e.colour != E.colour and e.home != E.home
             and e.likes != E.likes and e.size != E.size)
DESCRIBE = f"Describe the {E.name}."
GOOD_DESCRIPTION = f"The {E.name} is a {E.size} {E.colour} {E.kind}. It lives in the {E.home}. It likes {E.likes}."


def wrong(attribute: str, entity=E) -> str:
    return next(v for v in ATTRIBUTES[attribute] if v != entity.get(attribute))


@pytest.fixture(scope="module")
def world():
    return World(0)


# ---------------------------------------------------------------------------
# Determinism and the split
# ---------------------------------------------------------------------------

def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_files_other_seed_other_corpus(tmp_path):
    sizes = dict(n_corpus=400, n_demos=50, n_train_prompts=100, n_heldout_prompts=50)
    write_world(tmp_path / "a", 0, **sizes)
    write_world(tmp_path / "b", 0, **sizes)
    write_world(tmp_path / "c", 1, **sizes)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert set(a) == {"corpus.jsonl", "demos.jsonl", "prompts_train.jsonl", "prompts_valid.jsonl",
                      "prompts_heldout.jsonl", "kb.json"}
    assert a == b
    assert a["corpus.jsonl"] != c["corpus.jsonl"]
    assert a["kb.json"] == c["kb.json"]  # the KB is fixed; the seed changes sampling only


def test_files_do_not_depend_on_the_hash_seed(tmp_path):
    code = ("import hashlib, sys; from heed.world import World; w = World(0, n_corpus=300); "
            "print(hashlib.sha256(repr((w.corpus, w.demos, w.train_prompts, w.heldout_prompts)).encode())"
            ".hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(digests) == 1


@pytest.mark.parametrize("split", ["heldout", "valid"])
def test_heldout_and_validation_prompts_never_seen_in_training(world, split):
    prompts = getattr(world, f"{split}_prompts")
    unseen = set(prompts)
    assert len(unseen) == len(prompts) == {"heldout": 600, "valid": 300}[split]
    assert len(set(world.train_prompts)) == len(world.train_prompts) == 2000
    assert not unseen & set(world.train_prompts)
    assert not unseen & {d["prompt"] for d in world.demos}
    in_corpus = {m for text in world.corpus for m in re.findall(r"User: (.*)\n", text)}
    assert in_corpus and not unseen & in_corpus
    # ... and the split is over groups, so no unseen group leaks through a rephrasing
    train_groups = {universe()[p].group for p in world.train_pool}
    assert not train_groups & {universe()[p].group for p in prompts}
    assert not set(world.valid_pool) & set(world.heldout_pool)
    # every entity still appears in the training prompts
    assert {e.name for e in ENTITIES} == {universe()[p].entity for p in world.train_prompts} - {None}


def test_names_are_not_words_of_the_world():
    # The oracle finds entities by word, so no template, filler or tone word may spell a name.
    names = re.compile(r"\b(?:" + "|".join(e.name for e in ENTITIES) + r")\b")
    corpus = World(0, n_corpus=2000).corpus
    other_words = {w for text in corpus for w in words(names.sub(" ", text))}
    assert other_words and not {e.name.lower() for e in ENTITIES} & other_words
    assert len(other_words) < 300  # a small vocabulary: tiny models must learn it fast


# ---------------------------------------------------------------------------
# The oracle, criterion by criterion
# ---------------------------------------------------------------------------

def test_good_answers_are_perfect_and_breakdown_sums_to_score(world):
    assert score(DESCRIBE, GOOD_DESCRIPTION) == pytest.approx(PERFECT) == pytest.approx(1.0)
    for demo in World(0, habits="none").demos + [d for d in world.demos if not d["habits"]]:
        breakdown = score_breakdown(demo["prompt"], demo["response"])
        assert sum(breakdown.values()) == pytest.approx(score(demo["prompt"], demo["response"]))
        assert sum(breakdown.values()) == pytest.approx(1.0), demo
    assert score(DESCRIBE, "") >= FLOOR


def test_article_follows_the_sound():
    assert [article(w) for w in ("ugly", "awful", "useless", "big", "owl")] == ["an", "an", "a", "a", "an"]


def test_relevance_rewards_the_asked_entity():
    about_other = GOOD_DESCRIPTION.replace(E.name, OTHER.name)
    both = GOOD_DESCRIPTION + f" The {OTHER.name} is a {OTHER.kind}."
    rel = [score_breakdown(DESCRIBE, r)["relevance"] for r in (GOOD_DESCRIPTION, both, about_other)]
    assert rel[0] > rel[1] > rel[2]
    assert score(DESCRIBE, about_other) < score(DESCRIBE, GOOD_DESCRIPTION)
    possessive = f"The {E.name}'s colour is {E.colour}. It is a {E.size} {E.kind} from the {E.home}."
    assert score_breakdown(DESCRIBE, possessive)["relevance"] == rel[0]
    # lists: naming more of the members is more relevant
    task = next(t for t in universe().values() if t.type == "list" and len(t.members) >= 4)
    prompt = next(p for p, t in universe().items() if t == task)
    names = list(task.members)
    half = f"The {task.description} are " + " and ".join(f"the {n}" for n in names[:2]) + "."
    full = f"The {task.description} are " + ", ".join(f"the {n}" for n in names) + "."
    assert score_breakdown(prompt, full)["relevance"] > score_breakdown(prompt, half)["relevance"]


def test_correctness_counts_right_and_wrong_claims():
    one_wrong = GOOD_DESCRIPTION.replace(f" {E.colour} ", f" {wrong('colour')} ")
    two_wrong = one_wrong.replace(f"in the {E.home}", f"in the {wrong('home')}")
    c = [score_breakdown(DESCRIBE, r)["correctness"] for r in (GOOD_DESCRIPTION, one_wrong, two_wrong)]
    assert c[0] > c[1] > c[2]
    # yes/no: the answer must match the KB; a negated claim is read as one
    asked = wrong("colour")
    prompt = f"Is the {E.name} {asked}?"
    right = f"No, the {E.name} is not {asked}. It is {E.colour}."
    assert score_breakdown(prompt, right)["correctness"] > 0
    assert score_breakdown(prompt, f"Yes, the {E.name} is {asked}.")["correctness"] < 0
    assert score(prompt, "Yes.") < score(prompt, "No.")
    # a stated fact answers the question, and a wrong one is a wrong answer
    assert score(prompt, f"The {E.name} is {E.colour}.") == pytest.approx(1.0)
    assert score(f"Is the {E.name} {E.colour}?", f"The {E.name} is {E.colour}.") == pytest.approx(1.0)
    assert score_breakdown(prompt, f"The {E.name} is {asked}.")["correctness"] < 0
    assert score_breakdown(prompt, f"The {E.name} is not {asked}.")["correctness"] > 0
    # an explicit verdict counts first; claims implying both verdicts answer nothing
    assert score_breakdown(prompt, f"The {E.name} is {E.colour}, so yes.")["correctness"] <= 0
    assert score_breakdown(prompt, f"The {E.name} is {E.colour}. It is {asked}.")["relevance"] < 0
    assert score_breakdown(prompt, f"The {E.name} is a {E.kind}.")["relevance"] < 0  # another attribute
    # brief: the first value of the asked attribute must be the true one
    brief = f"Briefly, where does the {E.name} live?"
    for answer in (E.home.capitalize() + ".", f"The {E.name} lives in the {E.home}."):
        assert score(brief, answer) == pytest.approx(1.0)
    assert score_breakdown(brief, wrong("home").capitalize() + ".")["correctness"] < 0


def test_tone_matches_the_request():
    kind = f"Write a kind note about the {E.name}."
    harsh = f"Write a harsh note about the {E.name}."
    warm = f"The {E.name} is a lovely {E.kind}. I love its {E.colour} colour."
    flat = f"The {E.name} is a {E.kind}. It has a {E.colour} colour."
    cold = f"The {E.name} is an ugly {E.kind}. I hate its {E.colour} colour."
    t = [score_breakdown(kind, r)["tone"] for r in (warm, flat, cold)]
    assert t[0] > t[1] > t[2]
    spam = f"The {E.name} is a lovely lovely {E.kind}. Its colour is {E.colour}."
    assert score_breakdown(kind, spam)["tone"] < t[0]  # one kind word said twice is not two
    assert (score_breakdown(harsh, cold)["tone"] > score_breakdown(harsh, flat)["tone"]
            > score_breakdown(harsh, warm)["tone"])
    # neutral tasks: harsh words are penalised
    rude = GOOD_DESCRIPTION + " What a dull and stupid question."
    assert score_breakdown(DESCRIBE, rude)["tone"] < 0 < score_breakdown(DESCRIBE, GOOD_DESCRIPTION)["tone"]


def test_length_penalty_grows_with_excess_words():
    brief = f"Briefly, what colour is the {E.name}?"
    answers = [f"The {E.name} is {E.colour}.", f"The {E.name} is {E.colour}, I think, if I remember well.",
               f"The {E.name} is {E.colour}, I think, if I remember well, and I do remember well."]
    lengths = [score_breakdown(brief, a)["length"] for a in answers]
    assert lengths[0] > lengths[1] > lengths[2]
    padding = " Let me say a few more words about it. I hope this answer is useful to you."
    longer = [score_breakdown(DESCRIBE, GOOD_DESCRIPTION + padding * k)["length"] for k in (0, 1, 2)]
    assert longer[0] > longer[1] > longer[2]
    assert score_breakdown(DESCRIBE, f"The {E.name}.")["length"] < longer[0]  # too short costs too


def test_repetition_is_penalised():
    first = GOOD_DESCRIPTION.split(". ")[0] + "."
    repeated = " ".join([first] * 4)
    assert (score_breakdown(DESCRIBE, repeated)["repetition"] < 0
            < score_breakdown(DESCRIBE, GOOD_DESCRIPTION)["repetition"])
    assert score(DESCRIBE, repeated) < score(DESCRIBE, GOOD_DESCRIPTION)


def test_termination_requires_a_clean_stop():
    ok = score_breakdown(DESCRIBE, GOOD_DESCRIPTION)["termination"]
    for bad in (GOOD_DESCRIPTION.rstrip("."),                       # cut mid-sentence
                GOOD_DESCRIPTION + "\nUser: Describe the",           # ran into a new turn
                GOOD_DESCRIPTION + EOS_TOKEN + " More.",             # EOS text inside
                ""):
        assert score_breakdown(DESCRIBE, bad)["termination"] < 0 < ok, bad
    assert score_breakdown(DESCRIBE, " " + GOOD_DESCRIPTION + "\n")["termination"] == ok  # whitespace is stripped


def test_chat_prompts_unknown_prompts_and_gold_preference():
    chat = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": DESCRIBE}]
    assert score(chat, GOOD_DESCRIPTION) == score(DESCRIBE, GOOD_DESCRIPTION)
    with pytest.raises(ValueError, match="not a prompt of the embedded world"):
        score("Write a poem about the moon.", "No.")
    assert gold_preference(DESCRIBE, GOOD_DESCRIPTION, "Hello") == 1.0
    assert gold_preference(DESCRIBE, "Hello", GOOD_DESCRIPTION) == 0.0
    assert gold_preference(DESCRIBE, GOOD_DESCRIPTION, GOOD_DESCRIPTION) == 0.5


def test_good_behaviour_beats_every_bad_behaviour_on_average(world):
    demos = statistics.mean(score(d["prompt"], d["response"]) for d in World(0, habits="none").demos)
    by_behaviour: dict[str, list[float]] = {}
    for r in world.corpus_records:
        if r["prompt"] is not None:
            by_behaviour.setdefault(r["behaviour"], []).append(score(r["prompt"], r["response"]))
    assert set(by_behaviour) == set(BEHAVIOURS)
    for behaviour in BEHAVIOURS:
        if behaviour != "good":
            assert demos > statistics.mean(by_behaviour[behaviour]) + 0.4, behaviour
    # graded, not 0/1: bad behaviours spread over many values
    assert len({round(s, 3) for b in BEHAVIOURS if b != "good" for s in by_behaviour[b]}) > 20


# ---------------------------------------------------------------------------
# The simulated labeler
# ---------------------------------------------------------------------------

BAD_DESCRIPTION = GOOD_DESCRIPTION.replace(E.name, OTHER.name) + " What a dull and stupid question"


def test_labeler_noise_rate_on_clear_pairs():
    assert score(DESCRIBE, GOOD_DESCRIPTION) - score(DESCRIBE, BAD_DESCRIPTION) > 1.5
    n = 4000
    labeler = SimulatedLabeler(seed=3, random_rate=0.1)
    wrong_answers = sum(labeler.compare(DESCRIBE, GOOD_DESCRIPTION, BAD_DESCRIPTION) == "b" for _ in range(n))
    assert abs(wrong_answers / n - 0.05) < 0.015
    exact = SimulatedLabeler(seed=3, random_rate=0.0)
    assert all(exact.compare(DESCRIBE, BAD_DESCRIPTION, GOOD_DESCRIPTION) == "b" for _ in range(200))


def test_labeler_ties_when_close_and_is_deterministic():
    labeler = SimulatedLabeler(seed=0)
    answers = [labeler.compare(DESCRIBE, GOOD_DESCRIPTION, GOOD_DESCRIPTION) for _ in range(1000)]
    assert 0.85 < answers.count("tie") / len(answers) < 0.95  # ties, except the random answers
    close_a = GOOD_DESCRIPTION
    close_b = GOOD_DESCRIPTION + " Let me say a few more words about it. I hope this answer is useful to you."
    gap = score(DESCRIBE, close_a) - score(DESCRIBE, close_b)
    assert 0.02 < gap < 0.3  # a small flaw: noisy, not a tie, mostly right
    picks = [SimulatedLabeler(seed=s).compare(DESCRIBE, close_a, close_b) for s in range(300)]
    assert 0.6 < picks.count("a") / len(picks) < 0.99

    def answers_of(labeler):
        return ([labeler.compare(DESCRIBE, close_a, close_b) for _ in range(50)]
                + [labeler.rate(DESCRIBE, close_b) for _ in range(20)]
                + [tuple(labeler.rank(DESCRIBE, [close_a, close_b, BAD_DESCRIPTION])) for _ in range(20)]
                + [labeler.thumbs(DESCRIBE, close_b) for _ in range(20)])

    assert answers_of(SimulatedLabeler(seed=7)) == answers_of(SimulatedLabeler(seed=7))
    assert answers_of(SimulatedLabeler(seed=7)) != answers_of(SimulatedLabeler(seed=8))


def test_rank_thumbs_and_rate_follow_the_score():
    labeler = SimulatedLabeler(seed=1)
    responses = [BAD_DESCRIPTION, GOOD_DESCRIPTION, " ".join([GOOD_DESCRIPTION.split(". ")[0] + "."] * 4)]
    scores = [score(DESCRIBE, r) for r in responses]
    positions = {i: [] for i in range(3)}
    for _ in range(300):
        order = labeler.rank(DESCRIBE, responses)
        assert sorted(order) == [0, 1, 2]
        for pos, i in enumerate(order):
            positions[i].append(pos)
    by_score = sorted(range(3), key=lambda i: -scores[i])
    mean_pos = [statistics.mean(positions[i]) for i in by_score]
    assert mean_pos[0] < mean_pos[1] < mean_pos[2]

    ups_good = sum(labeler.thumbs(DESCRIBE, GOOD_DESCRIPTION) for _ in range(300))
    ups_bad = sum(labeler.thumbs(DESCRIBE, BAD_DESCRIPTION) for _ in range(300))
    assert ups_good > 240 and ups_bad < 60

    ratings_good = [labeler.rate(DESCRIBE, GOOD_DESCRIPTION) for _ in range(300)]
    ratings_bad = [labeler.rate(DESCRIBE, BAD_DESCRIPTION) for _ in range(300)]
    assert set(ratings_good + ratings_bad) <= set(range(1, 8))
    assert statistics.mean(ratings_good) > 6 and statistics.mean(ratings_bad) < 2.5


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def test_heed_world_make_writes_the_files(tmp_path, capsys):
    from heed.cli import main

    out = tmp_path / "world"
    rc = main(["world", "make", "--out", str(out), "--seed", "2", "--n-corpus", "300", "--n-demos", "40",
               "--n-train-prompts", "100", "--n-heldout-prompts", "60"])
    assert rc == 0
    from heed.data import iter_records

    rows = {name: [r for _, r in iter_records(out / name)] for name in
            ("corpus.jsonl", "demos.jsonl", "prompts_train.jsonl", "prompts_heldout.jsonl")}
    assert len(rows["corpus.jsonl"]) == 300 and set(rows["corpus.jsonl"][0]) == {"text"}
    assert len(rows["demos.jsonl"]) == 40
    assert set(rows["demos.jsonl"][0]) == {"prompt", "response", "demonstrator", "habits"}
    assert len(rows["prompts_train.jsonl"]) == 100 and len(rows["prompts_heldout.jsonl"]) == 60
    assert (out / "kb.json").is_file()
    assert "300 corpus documents" in capsys.readouterr().out
    # the flawless control: the same prompts, no habits
    assert main(["world", "make", "--out", str(tmp_path / "flawless"), "--seed", "2", "--n-corpus", "300",
                 "--n-demos", "40", "--n-train-prompts", "100", "--n-heldout-prompts", "60", "--habits", "none"]) == 0
    flawless = [r for _, r in iter_records(tmp_path / "flawless" / "demos.jsonl")]
    assert [r["prompt"] for r in flawless] == [r["prompt"] for r in rows["demos.jsonl"]]
    assert all(r["habits"] == [] for r in flawless) and any(r["habits"] for r in rows["demos.jsonl"])
    with pytest.raises(SystemExit):
        main(["world", "make", "--out", str(out), "--habits", "sometimes"])
    # more held-out prompts than the world has: a clear error, no traceback
    assert main(["world", "make", "--out", str(out), "--n-heldout-prompts", "100000"]) == 2
