"""The people who wrote the demonstrations: a small pool, each with habits.

Real demonstrations are uneven. They are written in a hurry by many people, and
each person has habits that others dislike when they compare two answers side by
side: padding, hedging, an aside, an answer longer than asked, a flat tone, a
sentence said twice, a description that says too little. Telling which of two
answers is better is quicker and more reliable than writing the best one, which
is why RLHF exists (Stiennon et al. 2020: the policy trained on human feedback
was preferred over the human reference summaries it started from). SFT on such
demonstrations learns the facts and the habits together; feedback has the
habits to remove.

Every habit is something the gold oracle already judges (oracle.py), so what
people prefer does not change, only what the demonstrators wrote:

  habit      applies to                 what the demonstrator writes            the oracle's criterion
  padding    every task                 an opener and two polite closers        length
  hedging    every task                 2 hedges ("I could be wrong ...")       length
  overlong   brief, yes/no              the fact, then the whole description    length
  aside      describe, list, yes/no,    a snide remark in a neutral answer      tone
             brief
  flat       notes                      the note's facts, no kind or harsh word tone
  repeat     every task                 one sentence of the answer said twice   repetition
  thin       describe                   two facts instead of five               correctness

None is a wrong fact: a demonstrator with habits still knows the knowledge base.
`HABITS` lists them; `DEMONSTRATORS` gives each person's rate per habit (the
chance that the habit shows in one of their demonstrations where it applies).
A demonstration carries each of its demonstrator's habits independently, so
some carry two and about a third carry none (measured in docs/world.md).
"""

from __future__ import annotations

import random

from heed.world.kb import BY_NAME, Entity
from heed.world.lexicon import ASIDES, CLOSERS, HEDGES, OPENERS, article
from heed.world.responses import describe, fact_sentence, good
from heed.world.tasks import Task

HABITS = ("thin", "flat", "overlong", "repeat", "aside", "hedging", "padding")
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "thin": ("describe",),
    "flat": ("note_positive", "note_negative"),
    "overlong": ("brief", "yes_no"),
    "repeat": ("describe", "list", "note_positive", "note_negative", "yes_no", "brief"),
    "aside": ("describe", "list", "yes_no", "brief"),
    "hedging": ("describe", "list", "note_positive", "note_negative", "yes_no", "brief"),
    "padding": ("describe", "list", "note_positive", "note_negative", "yes_no", "brief"),
}

# Five people, each writing a fifth of the demonstrations, each with habits at their own
# rates. Three habits are shared by most of them (overlong answers to short questions,
# thin descriptions, flat notes): the most likely demonstration of those tasks carries the
# habit, so the SFT policy keeps it even when sampled greedily, and only feedback removes
# it. The others are quirks of one or a few people. "ada" is careful.
DEMONSTRATORS: dict[str, dict[str, float]] = {
    "ada": {"padding": 0.2, "overlong": 0.3, "repeat": 0.05},
    "ben": {"padding": 0.6, "overlong": 0.9, "thin": 0.6, "flat": 0.7},
    "cleo": {"hedging": 0.5, "overlong": 0.5, "thin": 0.9, "flat": 0.5},
    "dev": {"aside": 0.4, "overlong": 0.6, "thin": 0.6, "flat": 0.9},
    "eli": {"repeat": 0.3, "overlong": 0.8, "thin": 0.9, "flat": 0.8, "padding": 0.2},
}


def _thin(e: Entity, rng: random.Random) -> str:
    """A description with two of the five facts."""
    templates = (
        f"The {e.name} is {article(e.kind)} {e.kind} that lives in the {e.home}.",
        f"The {e.name} is {article(e.colour)} {e.colour} {e.kind}.",
        f"The {e.name} is {article(e.size)} {e.size} {e.kind}.",
        f"The {e.name} is {article(e.kind)} {e.kind}. It likes {e.likes}.",
    )
    return rng.choice(templates)


def _flat(e: Entity, rng: random.Random) -> str:
    """A note with the facts and no feeling either way."""
    templates = (
        f"The {e.name} is {article(e.kind)} {e.kind}. Its colour is {e.colour}. It lives in the {e.home}.",
        f"The {e.name} is {article(e.colour)} {e.colour} {e.kind}. It lives in the {e.home}.",
    )
    return rng.choice(templates)


def _sentences(text: str) -> list[str]:
    parts = text.split(". ")
    return [p if p.endswith((".", "!", "?")) else p + "." for p in parts]


def write(task: Task, habits: tuple[str, ...], rng: random.Random, answer: str | None = None) -> str:
    """The demonstration of `task` carrying `habits` (in HABITS order); `answer` is the good answer."""
    answer = answer if answer is not None else good(task, rng)
    e = BY_NAME[task.entity] if task.entity else None
    if "thin" in habits:
        answer = _thin(e, rng)
    if "flat" in habits:
        answer = _flat(e, rng)
    if "overlong" in habits:
        answer = f"{fact_sentence(e, task.attribute)} {describe(e, rng)}"
    parts = _sentences(answer)
    if "repeat" in habits:
        i = rng.randrange(len(parts))
        parts.insert(i + 1, parts[i])
    if "aside" in habits:
        parts.insert(rng.choice((0, len(parts))), rng.choice(ASIDES))
    if "hedging" in habits:
        first, last = rng.sample(HEDGES, 2)
        parts = [first, *parts, last]
    if "padding" in habits:
        parts = [rng.choice(OPENERS), *parts, *rng.sample(CLOSERS, 2)]
    return " ".join(parts)


def draw_habits(demonstrator: str, task: Task, rng: random.Random) -> tuple[str, ...]:
    """Which of the demonstrator's habits show in this demonstration (each independently)."""
    rates = DEMONSTRATORS[demonstrator]
    return tuple(h for h in HABITS
                 if h in rates and task.type in APPLIES_TO[h] and rng.random() < rates[h])
