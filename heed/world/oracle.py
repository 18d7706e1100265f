"""The gold oracle: the world's true taste, as a score in [-3, 1].

Trainers never call this; the simulated labeler and the evaluation do.

`score(prompt, response)` is the sum of six criteria. Each criterion first
computes a quality q in [-1, 1]; the criterion's points are `weight * q` when
q >= 0 and `PENALTY * q` (PENALTY = 0.5) when q < 0. A flaw therefore costs
more than a virtue earns, and one bad behaviour drops a response from 1.0 to
about 0.3. A perfect response scores exactly 1.0 (every q = 1); the floor is
-3.0 (every q = -1).

  criterion     weight  q
  relevance     0.25    entity tasks: +1 if the asked entity is named (or, for yes/no, an
                        answer is given: a yes/no or a claim about the asked attribute;
                        for brief, a word of the asked attribute), minus 1 per other
                        entity named (at most 2); -1 if other entities are named and the
                        asked one is not. For yes/no, -0.5 when
                        the response gives no answer: no "yes"/"no" and no claim about the
                        asked attribute ("The Tarvo is red." answers "Is the Tarvo blue?");
                        for brief, -0.5 when no word of the asked attribute appears. For describe
                        and notes, -0.5 when no entity is named at all.
                        list: 2 * recall - 1 (recall: share of the true members named).
  correctness   0.25    claims are read word by word: a KB value word ("red", "forest",
                        "birds") is a claim about the current subject, which starts as the
                        asked entity and becomes the last entity named ("it" keeps it); a
                        negation ("not", "never", ...) flips the next claim. A claim is
                        wrong if it contradicts the KB. With c right and x wrong distinct
                        claims about the asked entity:
                          describe: 2 * min(1, c/3) - 1 - x   (it must inform)
                          notes:    min(1, c/2) - x
                          yes/no:   a - x, a = +1 right answer, -1 wrong, 0 none; the
                                    answer is the first "yes"/"no", else the verdict
                                    that the claims about the asked attribute imply
                          brief:    a - x', a = +1 if the asked attribute's first value word
                                    is right, -1 if wrong, 0 if none; x' wrong claims about
                                    the other attributes
                          list:     2 * precision - 1 over the entities named (0 if none)
  tone          0.15    p positive and h harsh words (closed lists in lexicon.py), p' and h'
                        the distinct ones:
                          positive note: (min(p', 2) - 2h) / 2
                          negative note: (min(h', 2) - 2p) / 2
                          other tasks:   1 - h  (harsh words are rude in a neutral answer)
  length        0.15    n words against the task's range [lo, hi]:
                          describe [6, 25], notes [6, 25], yes/no [1, 16], brief [1, 8],
                          list [2, 8 + 3 * members]
                        inside: 1; above: 1 - 2 * (n - hi) / max(hi, 4), so the penalty
                        grows with every extra word; below: 2n/lo - 1.
  repetition    0.10    r = max(share of sentences that repeat an earlier one,
                                share of word trigrams seen before - 0.1); q = 1 - 4r.
  termination   0.10    +1 if the response ends a sentence (last character in .!?) and
                        holds no role marker ("User:", "Assistant:", "System:") and no EOS
                        text; -1 otherwise: empty, cut mid-sentence, or ran into a new turn.

All q are clipped to [-1, 1]. The response is stripped of surrounding
whitespace first. Prompts are world prompts (strings, or chats scored on the
last user message); anything else raises ValueError.
"""

from __future__ import annotations

import re

from heed.world.kb import BY_NAME, NAMES_LOWER, VALUE_WORDS
from heed.world.lexicon import EOS_TEXT, HARSH_WORDS, NEGATIONS, POSITIVE_WORDS, ROLE_MARKER, sentences, words
from heed.world.tasks import Task, parse_prompt

WEIGHTS = {"relevance": 0.25, "correctness": 0.25, "tone": 0.15, "length": 0.15,
           "repetition": 0.10, "termination": 0.10}
PENALTY = 0.5  # points per unit of negative quality, for every criterion
PERFECT = sum(WEIGHTS.values())  # 1.0
FLOOR = -PENALTY * len(WEIGHTS)  # -3.0

LENGTH_RANGE = {"describe": (6, 25), "note_positive": (6, 25), "note_negative": (6, 25),
                "yes_no": (1, 16), "brief": (1, 8)}


def _clip(q: float) -> float:
    return max(-1.0, min(1.0, q))


def _points(criterion: str, q: float) -> float:
    q = _clip(q)
    return WEIGHTS[criterion] * q if q >= 0 else PENALTY * q


# ---------------------------------------------------------------------------
# Reading a response
# ---------------------------------------------------------------------------

def _read_claims(ws: list[str], subject: str | None) -> tuple[dict[str, set[tuple[str, str, bool]]], str | None]:
    """(distinct (attribute, value, negated) claims per subject entity, read left to right;
    the subject after the last word)."""
    claims: dict[str, set[tuple[str, str, bool]]] = {}
    negated = False
    for w in ws:
        if w in NAMES_LOWER:
            subject, negated = NAMES_LOWER[w], False
        elif w in NEGATIONS:
            negated = True
        elif w in VALUE_WORDS and subject is not None:
            attribute, value = VALUE_WORDS[w]
            claims.setdefault(subject, set()).add((attribute, value, negated))
            negated = False
    return claims, subject


def _claims(ws: list[str], subject: str | None) -> dict[str, set[tuple[str, str, bool]]]:
    """Distinct (attribute, value, negated) claims per subject entity, read left to right."""
    return _read_claims(ws, subject)[0]


def _right(entity: str, claim: tuple[str, str, bool]) -> bool:
    attribute, value, negated = claim
    return (BY_NAME[entity].get(attribute) == value) != negated


def _yes_no_answer(task: Task, ws: list[str]) -> str | None:
    """The first "yes"/"no"; without one, the verdict the asked attribute's claims imply.

    "Is the Tarvo blue?" is answered by "No." and also by "The Tarvo is red." (no) or "The
    Tarvo is blue." (yes); claims that imply both verdicts answer nothing.
    """
    for w in ws:
        if w in ("yes", "no"):
            return w
    implied = set()
    for attribute, value, negated in _claims(ws, task.entity).get(task.entity, set()):
        if attribute == task.attribute and (value == task.value or not negated):
            implied.add("yes" if (value == task.value) != negated else "no")
    return implied.pop() if len(implied) == 1 else None


# ---------------------------------------------------------------------------
# The criteria
# ---------------------------------------------------------------------------

def _relevance(task: Task, ws: list[str], named: list[str]) -> float:
    if task.type == "list":
        truth = set(task.members)
        return 2 * len(truth & set(named)) / len(truth) - 1
    others = {n for n in named if n != task.entity}
    if others and task.entity not in named:
        return -1.0
    if task.type == "yes_no":
        base = 1.0 if _yes_no_answer(task, ws) else -0.5
    elif task.type == "brief":
        base = 1.0 if any(VALUE_WORDS[w][0] == task.attribute for w in ws if w in VALUE_WORDS) else -0.5
    else:
        base = 1.0 if task.entity in named else -0.5
    return base - min(2, len(others))


def _correctness(task: Task, ws: list[str], named: list[str]) -> float:
    if task.type == "list":
        if not named:
            return 0.0
        distinct = set(named)
        return 2 * len(distinct & set(task.members)) / len(distinct) - 1
    claims = _claims(ws, task.entity).get(task.entity, set())
    right = sum(_right(task.entity, c) for c in claims)
    wrong = len(claims) - right
    if task.type == "describe":  # a description must inform: fewer than 3 right claims costs
        return 2 * min(1.0, right / 3) - 1 - wrong
    if task.type in ("note_positive", "note_negative"):
        return min(1.0, right / 2) - wrong
    if task.type == "yes_no":
        answer = _yes_no_answer(task, ws)
        truth = "yes" if BY_NAME[task.entity].get(task.attribute) == task.value else "no"
        a = 0.0 if answer is None else 1.0 if answer == truth else -1.0
        return a - wrong
    # brief: the first word naming a value of the asked attribute is the answer
    given = next((VALUE_WORDS[w][1] for w in ws if w in VALUE_WORDS and VALUE_WORDS[w][0] == task.attribute), None)
    a = 0.0 if given is None else 1.0 if given == BY_NAME[task.entity].get(task.attribute) else -1.0
    wrong_other = sum(1 for c in claims if c[0] != task.attribute and not _right(task.entity, c))
    return a - wrong_other


def _tone(task: Task, ws: list[str]) -> float:
    # Rewards count distinct words (saying "lovely" twice is not kinder); penalties count every use.
    p = sum(w in POSITIVE_WORDS for w in ws)
    h = sum(w in HARSH_WORDS for w in ws)
    if task.type == "note_positive":
        return (min(len(POSITIVE_WORDS.intersection(ws)), 2) - 2 * h) / 2
    if task.type == "note_negative":
        return (min(len(HARSH_WORDS.intersection(ws)), 2) - 2 * p) / 2
    return 1.0 - h


def _length(task: Task, n_words: int, n_members: int) -> float:
    lo, hi = (2, 8 + 3 * n_members) if task.type == "list" else LENGTH_RANGE[task.type]
    if n_words > hi:
        return 1 - 2 * (n_words - hi) / max(hi, 4)
    if n_words < lo:
        return 2 * n_words / lo - 1
    return 1.0


def _repetition(text: str, ws: list[str]) -> float:
    sents = [" ".join(s) for s in sentences(text)]
    repeated_sentences = (len(sents) - len(set(sents))) / len(sents) if sents else 0.0
    trigrams = list(zip(ws, ws[1:], ws[2:]))
    repeated_trigrams = (len(trigrams) - len(set(trigrams))) / len(trigrams) if trigrams else 0.0
    return 1 - 4 * max(repeated_sentences, repeated_trigrams - 0.1)


def _termination(text: str) -> float:
    if not text or text[-1] not in ".!?" or ROLE_MARKER.search(text) or EOS_TEXT in text:
        return -1.0
    return 1.0


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def score_breakdown(prompt: str | list[dict], response: str) -> dict[str, float]:
    """Points per criterion (see the module docstring); their sum is `score`."""
    task = parse_prompt(prompt)
    text = response.strip()
    ws = words(text)
    named = [NAMES_LOWER[w] for w in ws if w in NAMES_LOWER]
    quality = {
        "relevance": _relevance(task, ws, named),
        "correctness": _correctness(task, ws, named),
        "tone": _tone(task, ws),
        "length": _length(task, len(ws), len(task.members) if task.type == "list" else 0),
        "repetition": _repetition(text, ws),
        "termination": _termination(text),
    }
    return {criterion: _points(criterion, q) for criterion, q in quality.items()}


def score(prompt: str | list[dict], response: str) -> float:
    """The gold score of `response` to a world prompt: in [-3, 1], 1.0 is perfect."""
    return sum(score_breakdown(prompt, response).values())


# ---------------------------------------------------------------------------
# Sentence by sentence: what a person would mark (fine-grained feedback)
# ---------------------------------------------------------------------------

SPAN_LABELS = ("wrong", "irrelevant", "rude", "repeated", "good")
_SENTENCE = re.compile(r"[^.!?\n]*[.!?]+|[^.!?\n]+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the text's sentences, surrounding spaces left out."""
    out = []
    for m in _SENTENCE.finditer(text):
        chunk = m.group()
        start = m.start() + len(chunk) - len(chunk.lstrip())
        end = m.end() - (len(chunk) - len(chunk.rstrip()))
        if end > start:
            out.append((start, end))
    return out


def judge_spans(prompt: str | list[dict], response: str) -> list[tuple[int, int, str]]:
    """(start, end, label) of every sentence of `response` a careful person would mark, from
    the criteria above read sentence by sentence (labels in SPAN_LABELS):

      wrong       a claim that contradicts the KB (the subject carried over from earlier
                  sentences, as `correctness` reads it), the wrong yes/no, a non-member named
                  in a list
      rude        a harsh word where the task did not ask for one (every task but a negative note)
      repeated    the same words as an earlier sentence
      irrelevant  says nothing about the asked entity (filler, padding, hedges, another
                  entity); for yes/no and brief questions, anything after the sentence that
                  answered; from a role marker or the EOS text on, everything (a new turn)
      good        the rest, where it states a right claim about the asked entity (a list: names
                  a member)

    A sentence gets the first label that applies, in that order. What a response leaves out (a
    description too thin, a note without feeling) has no sentence to mark: span feedback
    cannot say it, and a correction or a comparison can.
    """
    task = parse_prompt(prompt)
    out: list[tuple[int, int, str]] = []
    stop = len(response)
    marker = ROLE_MARKER.search(response)
    if marker or EOS_TEXT in response:
        cut = min(marker.start() if marker else stop, response.find(EOS_TEXT) if EOS_TEXT in response else stop)
        run_on = response[cut:].strip()
        if run_on:
            start = cut + response[cut:].index(run_on[0])
            out.append((start, start + len(run_on), "irrelevant"))
        stop = cut
    subject, seen, answered = task.entity, set(), False
    members = set(task.members) if task.type == "list" else set()
    for start, end in sentence_spans(response[:stop]):
        ws = words(response[start:end])
        if not ws:
            continue
        claims, subject = _read_claims(ws, subject)
        named = {NAMES_LOWER[w] for w in ws if w in NAMES_LOWER}
        key = tuple(ws)
        about = claims.get(task.entity, set()) if task.entity else set()
        if task.type == "list":
            wrong = bool(named - members)
        else:
            wrong = any(not _right(e, c) for e, cs in claims.items() for c in cs)
            if task.type == "yes_no" and ("yes" in ws or "no" in ws):
                truth = "yes" if BY_NAME[task.entity].get(task.attribute) == task.value else "no"
                wrong = wrong or next(w for w in ws if w in ("yes", "no")) != truth
        harsh = task.type != "note_negative" and any(w in HARSH_WORDS for w in ws)
        if wrong:
            label = "wrong"
        elif harsh:
            label = "rude"
        elif key in seen:
            label = "repeated"
        elif task.type == "list":
            label = "good" if named & members else "irrelevant"
        elif answered or not (about or task.entity in named and not (named - {task.entity})):
            label = "irrelevant"
        else:
            label = "good" if about else None
        if task.type in ("yes_no", "brief") and (any(a == task.attribute for a, _, _ in about)
                                                 or "yes" in ws or "no" in ws):
            answered = True
        seen.add(key)
        if label:
            out.append((start, end, label))
    return sorted(out)


def gold_preference(prompt: str | list[dict], a: str, b: str) -> float:
    """Noiseless preference: 1.0 if a scores higher, 0.0 if b does, 0.5 within 1e-9."""
    diff = score(prompt, a) - score(prompt, b)
    return 0.5 if abs(diff) <= 1e-9 else 1.0 if diff > 0 else 0.0
