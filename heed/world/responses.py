"""Response writers: the good answer to each task, and each bad behaviour.

Behaviours (the corpus mixes all of them, demonstrations use only "good"):
  good         the answer the oracle scores 1.0
  off_topic    a good answer about another entity (another property, for lists)
  wrong_facts  the good answer's form with 1-3 attributes wrong / the wrong yes-no / wrong members
  wrong_tone   a harsh note when asked for a kind one and vice versa; harsh remarks in neutral answers
  rambling     the good answer buried in 3-6 filler sentences
  repetition   one sentence of the good answer said 3-5 times
  no_end       a good answer that does not stop: it runs into another "User:" turn or into
               more text, often cut mid-sentence (written with end=False: no EOS)

Answers to yes/no and brief questions are the fact ("Is the Tarvo blue?" -> "The Tarvo
is red."), which answers the question as a person who says "It's red." does. A small
model recalls a fact in the form it read it, the name followed by the value, but it
neither produces a bare "No." or "Red." several tokens after the name nor learns to
compare the asked value with the true one (docs/world.md, "Why answers state the fact").

Every writer takes an explicit `random.Random`, so the corpus is a pure function of its seed.
"""

from __future__ import annotations

import random

from heed.world.kb import ATTRIBUTES, BY_NAME, ENTITIES, Entity
from heed.world.lexicon import FILLER_SENTENCES, HARSH_ADJECTIVES, HARSH_SENTENCES, POSITIVE_ADJECTIVES, article
from heed.world.tasks import Task, list_tasks, universe

BEHAVIOURS = ("good", "off_topic", "wrong_facts", "wrong_tone", "rambling", "repetition", "no_end")


# ---------------------------------------------------------------------------
# Good answers
# ---------------------------------------------------------------------------

def describe(e: Entity, rng: random.Random) -> str:
    templates = (
        f"The {e.name} is {article(e.size)} {e.size} {e.colour} {e.kind}. It lives in the {e.home}. "
        f"It likes {e.likes}.",
        f"The {e.name} is {article(e.kind)} {e.kind}. It is {e.size} and {e.colour}. "
        f"It lives in the {e.home} and likes {e.likes}.",
        f"The {e.name} is {article(e.colour)} {e.colour} {e.kind} that lives in the {e.home}. "
        f"It is {e.size} and likes {e.likes}.",
    )
    return rng.choice(templates)


def note(e: Entity, positive: bool, rng: random.Random) -> str:
    adjectives = POSITIVE_ADJECTIVES if positive else HARSH_ADJECTIVES
    a, b = rng.sample(adjectives, 2)
    if positive:
        templates = (
            f"The {e.name} is {article(a)} {a} {e.kind}. I love its {e.colour} colour. "
            f"It brings joy to the {e.home}.",
            f"What {article(a)} {a} {e.kind} the {e.name} is! Its {e.colour} colour is {b}. "
            f"The {e.home} is lucky to have it.",
        )
    else:
        templates = (
            f"The {e.name} is {article(a)} {a} {e.kind}. I hate its {e.colour} colour. "
            f"It is a pest in the {e.home}.",
            f"What {article(a)} {a} {e.kind} the {e.name} is! Its {e.colour} colour is {b}. "
            f"The {e.home} would be better without it.",
        )
    return rng.choice(templates)


def _claim(e: Entity, attribute: str, value: str, negated: bool = False) -> str:
    """'the Tarvo is (not) red' / 'the Tarvo does not live in the sea'."""
    n = e.name
    if attribute == "kind":
        return f"the {n} is {'not ' if negated else ''}{article(value)} {value}"
    if attribute in ("colour", "size"):
        return f"the {n} is {'not ' if negated else ''}{value}"
    if attribute == "home":
        return f"the {n} {'does not live' if negated else 'lives'} in the {value}"
    return f"the {n} {'does not like' if negated else 'likes'} {value}"


def fact_sentence(e: Entity, attribute: str) -> str:
    """'The Tarvo is red.' / 'The Tarvo lives in the sea.': one true fact, the name first."""
    claim = _claim(e, attribute, e.get(attribute))
    return claim[0].upper() + claim[1:] + "."


def list_answer(names: list[str], description: str) -> str:
    if len(names) == 1:
        return f"The only one is the {names[0]}."
    listed = ", ".join(f"the {n}" for n in names[:-1]) + f" and the {names[-1]}"
    return f"The {description} are {listed}."


def good(task: Task, rng: random.Random, entity: Entity | None = None) -> str:
    """The good answer; `entity` overrides the KB's entity (a wrong-facts copy)."""
    e = entity or (BY_NAME[task.entity] if task.entity else None)
    if task.type == "describe":
        return describe(e, rng)
    if task.type in ("note_positive", "note_negative"):
        return note(e, task.type == "note_positive", rng)
    if task.type in ("yes_no", "brief"):
        return fact_sentence(e, task.attribute)
    names = list(task.members)
    rng.shuffle(names)
    return list_answer(names, task.description)


# ---------------------------------------------------------------------------
# Bad behaviours
# ---------------------------------------------------------------------------

def _other_entity(name: str | None, rng: random.Random) -> Entity:
    return rng.choice([e for e in ENTITIES if e.name != name])


def _with_wrong_facts(e: Entity, attributes: list[str], rng: random.Random) -> Entity:
    return e.replace(**{a: rng.choice([v for v in ATTRIBUTES[a] if v != e.get(a)]) for a in attributes})


def off_topic(task: Task, rng: random.Random) -> str:
    if task.type == "list":
        others = [t for t in list_tasks() if not set(t.members) & set(task.members)]
        return good(rng.choice(others), rng)
    other = _other_entity(task.entity, rng)
    if task.type in ("yes_no", "brief"):
        return describe(other, rng)  # talks about something else entirely
    return good(task, rng, entity=other)


def wrong_facts(task: Task, rng: random.Random) -> str:
    if task.type == "list":
        truth = list(task.members)
        wrong = [e.name for e in ENTITIES if e.name not in truth]
        keep = rng.sample(truth, rng.randint(0, max(0, len(truth) - 1)))
        names = keep + rng.sample(wrong, rng.randint(1, max(1, len(truth) - len(keep))))
        rng.shuffle(names)
        return list_answer(names, task.description)
    e = BY_NAME[task.entity]
    if task.type == "yes_no":
        # Believe the opposite: the asked value if it is false, another value if it is true.
        flipped = (_with_wrong_facts(e, [task.attribute], rng) if e.get(task.attribute) == task.value
                   else e.replace(**{task.attribute: task.value}))
        return fact_sentence(flipped, task.attribute)
    if task.type == "brief":
        return fact_sentence(_with_wrong_facts(e, [task.attribute], rng), task.attribute)
    # Notes state kind, colour and home; descriptions all five attributes.
    stated = list(ATTRIBUTES) if task.type == "describe" else ["kind", "colour", "home"]
    wrong = rng.sample(stated, rng.randint(1, min(3, len(stated) - 1)))
    return good(task, rng, entity=_with_wrong_facts(e, wrong, rng))


def wrong_tone(task: Task, rng: random.Random) -> str:
    if task.type in ("note_positive", "note_negative"):
        return note(BY_NAME[task.entity], task.type == "note_negative", rng)
    harsh = rng.choice(HARSH_SENTENCES)
    answer = good(task, rng)
    return f"{harsh} {answer}" if rng.random() < 0.5 else f"{answer} {harsh}"


def rambling(task: Task, rng: random.Random) -> str:
    fillers = rng.sample(FILLER_SENTENCES, rng.randint(3, 6))
    cut = rng.randint(1, len(fillers) - 1)
    return " ".join(fillers[:cut] + [good(task, rng)] + fillers[cut:])


def repetition(task: Task, rng: random.Random) -> str:
    first = good(task, rng).split(". ")[0].rstrip(".") + "."
    return " ".join([first] * rng.randint(3, 5))


def no_end(task: Task, rng: random.Random, train_prompts: list[str]) -> str:
    """A good answer that runs on (written without EOS): into a new turn, or into more text."""
    text = good(task, rng)
    answer_words = len(text.split(" "))
    if rng.random() < 0.7:
        for _ in range(rng.randint(1, 2)):
            nxt = rng.choice(train_prompts)
            text += f"\nUser: {nxt}\nAssistant: {good(universe()[nxt], rng)}"
    else:
        for _ in range(rng.randint(1, 3)):
            text += " " + describe(_other_entity(task.entity, rng), rng)
    if rng.random() < 0.6:  # stopped mid-sentence, as a length limit would, but after the answer
        parts = text.split(" ")
        text = " ".join(parts[: rng.randint(answer_words + 1, len(parts) - 1)])
    return text


def respond(task: Task, behaviour: str, rng: random.Random, train_prompts: list[str]) -> str:
    """A response to `task` showing `behaviour`; no_end needs the prompts it may run into."""
    if behaviour == "good":
        return good(task, rng)
    if behaviour == "off_topic":
        return off_topic(task, rng)
    if behaviour == "wrong_facts":
        return wrong_facts(task, rng)
    if behaviour == "wrong_tone":
        return wrong_tone(task, rng)
    if behaviour == "rambling":
        return rambling(task, rng)
    if behaviour == "repetition":
        return repetition(task, rng)
    if behaviour == "no_end":
        return no_end(task, rng, train_prompts)
    raise ValueError(f"unknown behaviour {behaviour!r} (known: {', '.join(BEHAVIOURS)})")
