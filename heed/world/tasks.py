"""Instruction prompts over the KB: six task types, every phrasing enumerated.

The set of all prompts (the "universe", a few thousand strings) is fixed and
does not depend on any seed, so the oracle can map any world prompt back to
its task by lookup. Task types:

  describe       "Describe the Tarvo."                  -> the entity's attributes
  list           "Which birds live in the sea?"         -> every entity with the property
  note_positive  "Write a kind note about the Tarvo."   -> a note in kind words
  note_negative  "Write a harsh note about the Tarvo."  -> a note in harsh words
  yes_no         "Does the Tarvo like rain?"            -> the fact that answers it, true to the KB
  brief          "Briefly, what colour is the Tarvo?"   -> one short sentence: the fact

Each prompt belongs to a *group*: (task, entity, attribute) for entity tasks,
(list, property) for lists. The train/held-out split is made over groups, so a
held-out prompt is a combination never seen in training, not a rephrasing of
one, while every entity still appears in training through its other groups.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from heed.world.kb import ATTRIBUTES, BY_NAME, ENTITIES, PLURALS, members

TASK_TYPES = ("describe", "list", "note_positive", "note_negative", "yes_no", "brief")
ENTITY_TASKS = ("describe", "note_positive", "note_negative", "yes_no", "brief")


@dataclass(frozen=True)
class Task:
    type: str
    entity: str | None = None           # the asked entity (entity tasks)
    attribute: str | None = None        # yes_no and brief: the attribute asked about
    value: str | None = None            # yes_no: the value asked about ("Is the Tarvo red?")
    conditions: tuple[tuple[str, str], ...] = ()  # list: the property, as (attribute, value) pairs
    description: str = ""               # list: "red birds", "things that live in the sea"

    @property
    def group(self) -> tuple:
        """The unit of the train/held-out split."""
        if self.type == "list":
            return ("list", self.conditions)
        return (self.type, self.entity, self.attribute)

    @property
    def members(self) -> tuple[str, ...]:
        return members(self.conditions)


DESCRIBE = ("Describe the {e}.", "Tell me about the {e}.", "What is the {e} like?",
            "Give a short description of the {e}.")
NOTE_POSITIVE = ("Write a kind note about the {e}.", "Say something nice about the {e}.",
                 "Write a short note praising the {e}.")
NOTE_NEGATIVE = ("Write a harsh note about the {e}.", "Say something mean about the {e}.",
                 "Write a short note mocking the {e}.")
YES_NO = {
    "kind": ("Is the {e} a {v}?", "Is it true that the {e} is a {v}?"),
    "colour": ("Is the {e} {v}?", "Is it true that the {e} is {v}?"),
    "size": ("Is the {e} {v}?", "Is it true that the {e} is {v}?"),
    "home": ("Does the {e} live in the {v}?", "Is it true that the {e} lives in the {v}?"),
    "likes": ("Does the {e} like {v}?", "Is it true that the {e} likes {v}?"),
}
BRIEF_QUESTIONS = {
    "kind": "what is the {e}",
    "colour": "what colour is the {e}",
    "size": "how big is the {e}",
    "home": "where does the {e} live",
    "likes": "what does the {e} like",
}
BRIEF_FRAMES = ("Briefly, {q}?", "Be brief: {q}?", "In a few words, {q}?")


def _list_properties() -> list[tuple[tuple[tuple[str, str], ...], str, str]]:
    """(conditions, description, question) for every property with at least one member."""
    props = []
    for kind in ATTRIBUTES["kind"]:
        props.append(((("kind", kind),), PLURALS[kind], f"Which things are {PLURALS[kind]}?"))
    for colour in ATTRIBUTES["colour"]:
        props.append(((("colour", colour),), f"{colour} things", f"Which things are {colour}?"))
    for home in ATTRIBUTES["home"]:
        props.append(((("home", home),), f"things that live in the {home}", f"Which things live in the {home}?"))
    for liked in ATTRIBUTES["likes"]:
        props.append(((("likes", liked),), f"things that like {liked}", f"Which things like {liked}?"))
    for kind in ATTRIBUTES["kind"]:
        plural = PLURALS[kind]
        for colour in ATTRIBUTES["colour"]:
            props.append(((("kind", kind), ("colour", colour)), f"{colour} {plural}", f"Which {plural} are {colour}?"))
        for home in ATTRIBUTES["home"]:
            props.append(((("kind", kind), ("home", home)), f"{plural} that live in the {home}",
                          f"Which {plural} live in the {home}?"))
    return [p for p in props if members(p[0])]


@lru_cache(maxsize=1)
def universe() -> dict[str, Task]:
    """Every prompt the world can ask, in a fixed order, mapped to its task."""
    prompts: dict[str, Task] = {}
    for entity in ENTITIES:
        e = entity.name
        for t in DESCRIBE:
            prompts[t.format(e=e)] = Task("describe", e)
        for t in NOTE_POSITIVE:
            prompts[t.format(e=e)] = Task("note_positive", e)
        for t in NOTE_NEGATIVE:
            prompts[t.format(e=e)] = Task("note_negative", e)
        for attribute, templates in YES_NO.items():
            for v in ATTRIBUTES[attribute]:
                for t in templates:
                    prompts[t.format(e=e, v=v)] = Task("yes_no", e, attribute, v)
        for attribute, question in BRIEF_QUESTIONS.items():
            for frame in BRIEF_FRAMES:
                prompts[frame.format(q=question.format(e=e))] = Task("brief", e, attribute)
    for conditions, description, question in _list_properties():
        task = Task("list", conditions=conditions, description=description)
        for t in (f"List the {description}.", f"Name all the {description}.", question):
            prompts[t] = task
    return prompts


@lru_cache(maxsize=1)
def list_tasks() -> tuple[Task, ...]:
    """The distinct list tasks (one per property), in universe order."""
    return tuple(dict.fromkeys(t for t in universe().values() if t.type == "list"))


def prompt_text(prompt: str | list[dict]) -> str:
    """The instruction a prompt asks: the string itself, or a chat's last user message."""
    if isinstance(prompt, str):
        return " ".join(prompt.split())
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("chat prompt has no user message; the world scores the last user message")
    return " ".join(str(users[-1].get("content", "")).split())


def parse_prompt(prompt: str | list[dict]) -> Task:
    """The task behind a world prompt; ValueError for anything the world never asks."""
    text = prompt_text(prompt)
    task = universe().get(text)
    if task is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(
            f"not a prompt of the embedded world: {shown!r}. The oracle only knows the world's own "
            "prompts (see heed.world.tasks.universe(), e.g. 'Describe the "
            f"{ENTITIES[0].name}.')")
    return task


HELDOUT_GROUP_FRACTION = 0.25  # of each task type's groups
VALID_GROUP_FRACTION = 0.125  # of each task type's groups, carved from the train side


def split_groups(seed: int) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, held-out pools): all prompts, split by group, per task type.

    A quarter of each task type's groups is held out for the final evaluation, and an
    eighth more is set aside for validation (tuning defaults without looking at held-out
    prompts); the rest is the train side. Both set-asides are whole groups, so a
    validation prompt is as new to a trained model as a held-out one.
    """
    rng = random.Random(f"heed-world-split:{seed}")
    by_type: dict[str, dict[tuple, None]] = {t: {} for t in TASK_TYPES}  # ordered sets
    for task in universe().values():
        by_type[task.type][task.group] = None
    heldout_groups, valid_groups = set(), set()
    for groups in by_type.values():
        shuffled = list(groups)
        rng.shuffle(shuffled)
        n_heldout = round(len(shuffled) * HELDOUT_GROUP_FRACTION)
        n_valid = round(len(shuffled) * VALID_GROUP_FRACTION)
        heldout_groups.update(shuffled[:n_heldout])
        valid_groups.update(shuffled[n_heldout:n_heldout + n_valid])
    train, valid, heldout = [], [], []
    for text, task in universe().items():
        pool = heldout if task.group in heldout_groups else valid if task.group in valid_groups else train
        pool.append(text)
    return train, valid, heldout


# Sampling strata: the task types, with yes/no split by its true answer. Most yes/no
# prompts in the universe are "no" (one true colour, five false), and a policy
# should not earn its reward by always saying "No.".
STRATA = ("describe", "list", "note_positive", "note_negative", "yes_no:yes", "yes_no:no", "brief")


def stratum(task: Task) -> str:
    if task.type != "yes_no":
        return task.type
    return "yes_no:yes" if BY_NAME[task.entity].get(task.attribute) == task.value else "yes_no:no"


def by_stratum(pool: list[str]) -> dict[str, list[str]]:
    """The pool's prompts per stratum, in pool order."""
    out: dict[str, list[str]] = {s: [] for s in STRATA}
    for text in pool:
        out[stratum(universe()[text])].append(text)
    return out


def sample_balanced(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """n distinct prompts, taking strata in turn so small ones (describe, list, yes) are not swamped."""
    if n > len(pool):
        raise ValueError(f"asked for {n} prompts but only {len(pool)} are available")
    strata = by_stratum(pool)
    for texts in strata.values():
        rng.shuffle(texts)
    chosen: list[str] = []
    while len(chosen) < n:
        for texts in strata.values():
            if texts and len(chosen) < n:
                chosen.append(texts.pop())
    rng.shuffle(chosen)
    return chosen
