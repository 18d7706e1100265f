"""The embedded assistant world: a fixed knowledge base, instruction prompts over it,
a pretraining corpus mixing good and bad behaviour, demonstrations, a gold oracle
and a simulated labeler. Pure Python, seeded, no download. See docs/world.md.

    kb.py         the 48 entities and their attributes (fixed)
    lexicon.py    tone words, filler sentences, text helpers
    tasks.py      the six task types, every prompt, the train/held-out split
    responses.py  the good answer and each bad behaviour
    oracle.py     score / score_breakdown / gold_preference
    labeler.py    SimulatedLabeler: pairs, rankings, thumbs, ratings
    world.py      World(seed) and write_world
    cli.py        `heed world make`
"""

from heed.world.labeler import SimulatedLabeler
from heed.world.oracle import gold_preference, score, score_breakdown
from heed.world.world import World, write_world

__all__ = ["World", "write_world", "score", "score_breakdown", "gold_preference", "SimulatedLabeler"]
