"""Words and text helpers shared by the response writers and the oracle.

The tone lexicons are closed lists: the corpus writes tone only with these
words and the oracle reads tone only through them, so "tone" has one meaning.
No tone word, filler or template word is a value word of the KB or an entity
name (tests/test_world.py checks this).
"""

from __future__ import annotations

import re

from heed.template import EOS_TOKEN

POSITIVE_WORDS = frozenset(
    "lovely wonderful beautiful sweet gentle brave charming great nice love joy delight lucky happy "
    "admire proud".split()
)
HARSH_WORDS = frozenset(
    "ugly awful dull nasty rude hate pest boring fool foolish stupid horrible smelly useless worst "
    "silly".split()
)
POSITIVE_ADJECTIVES = ("lovely", "wonderful", "beautiful", "sweet", "gentle", "brave", "charming", "great")
HARSH_ADJECTIVES = ("ugly", "awful", "dull", "nasty", "rude", "boring", "smelly", "useless")

# What the demonstrators (demonstrators.py) pad and hedge with: polite words that say
# nothing, with no value word, tone word or negation.
OPENERS = (
    "Thank you for asking me about this.",
    "That is a good question to ask.",
    "Here is what I can tell you.",
)
CLOSERS = (
    "I hope this answer is useful to you.",
    "Let me know if you want to know more.",
    "I am always glad to help with questions like this.",
)
HEDGES = (
    "I think this is right, but I could be wrong.",
    "Please check this somewhere else to be safe.",
    "This is only what I remember, so it may be off.",
    "I am fairly sure, but do ask someone else too.",
)

# Sentences that add words but say nothing: the material of rambling answers. The
# demonstrators' padding and hedges are among them, so the corpus teaches their words.
FILLER_SENTENCES = (
    "Well, let me think about that.",
    "That is a question many people ask.",
    "There is a lot that could be said here.",
    "I will try to answer as well as I can.",
    "First of all, it helps to start at the beginning.",
    "Some say one thing and some say another.",
    "It is worth taking a moment to consider.",
    "Of course, every story has two sides.",
    "To put it another way, here is what I know.",
    "Thank you for asking me about this.",
    "In any case, that is what I remember.",
    "Let me say a few more words about it.",
    "As you may already know, this is an old topic.",
) + tuple(s for s in OPENERS + CLOSERS + HEDGES if s != "Thank you for asking me about this.")

# A snide aside in a neutral answer: one harsh word each, in words the corpus already has.
ASIDES = (
    "What a boring question.",
    "This is a silly question.",
    "Only a fool would ask that.",
    "What a dull thing to ask.",
)

# Each holds at least two harsh words, so it turns a neutral answer's tone fully negative.
HARSH_SENTENCES = (
    "What a dull and stupid question.",
    "Only a fool would ask something so silly.",
    "I hate answering such boring questions.",
    "This is an awful and useless question.",
)

NEGATIONS = frozenset({"not", "never", "isn't", "doesn't", "don't", "aren't", "cannot"})

# A response that contains another turn's marker (or the EOS text) did not stop where it should.
ROLE_MARKER = re.compile(r"\b(?:User|Assistant|System)\s*:")
EOS_TEXT = EOS_TOKEN

_WORD = re.compile(r"[A-Za-z]+(?:'t)?")  # "isn't" is one word; "Tigu's" is "tigu" + "s"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    """Lower-cased words."""
    return [w.lower() for w in _WORD.findall(text)]


def sentences(text: str) -> list[list[str]]:
    """The text's sentences, each as its list of lower-cased words (empty ones dropped)."""
    out = []
    for chunk in _SENTENCE_END.split(text):
        ws = words(chunk)
        if ws:
            out.append(ws)
    return out


def article(word: str) -> str:
    """'an' before a vowel sound: "an ugly", but "a useless"."""
    return "an" if word[0] in "aeiou" and not word.startswith("use") else "a"
