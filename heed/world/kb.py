"""The knowledge base: 48 fictional entities, each with five attributes.

The KB is fixed: it is built from a constant seed and does not depend on the
world's seed, so the gold oracle knows one truth for every prompt any world can
produce. `World(seed)` only changes which prompts and documents are sampled.

Attribute values are balanced (each kind has 6 entities, each colour, home and
liking 8, each size 16), so every "list the Xs" question has a handful of
answers. All value words are distinct across attributes, which lets the oracle
read a claim's attribute from the word alone ("red" is always a colour).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import lru_cache

KB_SEED = "heed-world-kb-v1"  # a constant: changing it changes the truth the oracle scores against
N_ENTITIES = 48

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "kind": ("bird", "fish", "tree", "stone", "robot", "cat", "frog", "flower"),
    "colour": ("red", "blue", "green", "yellow", "black", "white"),
    "size": ("small", "big", "huge"),
    "home": ("forest", "sea", "mountain", "desert", "city", "river"),
    "likes": ("rain", "sun", "snow", "music", "stars", "bread"),
}

# Plural forms, used in list prompts ("List the birds.") and recognised by the oracle.
PLURALS = {kind: ("fish" if kind == "fish" else kind + "s") for kind in ATTRIBUTES["kind"]}

# Name syllables: short, pronounceable, and never an English word of the world's vocabulary.
_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "r", "l", "n", "s"]


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    colour: str
    size: str
    home: str
    likes: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)

    def replace(self, **changes: str) -> "Entity":
        """A copy with some attributes changed (the corpus uses it to state wrong facts)."""
        return Entity(**{**asdict(self), **changes})


def _make_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                + rng.choice(_ONSETS) + rng.choice(_VOWELS)).capitalize()
        if name not in names:
            names.append(name)
    return names


def _build_entities() -> tuple[Entity, ...]:
    rng = random.Random(KB_SEED)
    names = _make_names(rng, N_ENTITIES)
    columns = {}
    for attribute, values in ATTRIBUTES.items():
        # Each value used equally often, then shuffled: balanced lists of every size.
        column = [values[i % len(values)] for i in range(N_ENTITIES)]
        rng.shuffle(column)
        columns[attribute] = column
    return tuple(Entity(name, *(columns[a][i] for a in ATTRIBUTES)) for i, name in enumerate(names))


ENTITIES: tuple[Entity, ...] = _build_entities()
BY_NAME: dict[str, Entity] = {e.name: e for e in ENTITIES}
NAMES_LOWER: dict[str, str] = {e.name.lower(): e.name for e in ENTITIES}

# Every word that names an attribute value (plurals included) -> (attribute, value).
VALUE_WORDS: dict[str, tuple[str, str]] = {}
for _attribute, _values in ATTRIBUTES.items():
    for _value in _values:
        VALUE_WORDS[_value] = (_attribute, _value)
for _kind, _plural in PLURALS.items():
    VALUE_WORDS[_plural] = ("kind", _kind)
VALUE_WORDS["star"] = ("likes", "stars")
VALUE_WORDS["mountains"] = ("home", "mountain")


@lru_cache(maxsize=None)
def members(conditions: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """Names of the entities that satisfy every (attribute, value) condition, in KB order."""
    return tuple(e.name for e in ENTITIES if all(e.get(a) == v for a, v in conditions))


def kb_json() -> dict:
    """The KB as written to kb.json."""
    return {
        "seed": KB_SEED,
        "attributes": {a: list(v) for a, v in ATTRIBUTES.items()},
        "entities": [asdict(e) for e in ENTITIES],
    }
