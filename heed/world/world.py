"""The world's data: prompts, demonstrations and the pretraining corpus, from one seed.

`World(seed)` samples everything from the fixed KB and prompt universe (tasks.py).
Each product draws from its own random stream (named after the seed and the
product), so reading `.corpus` before or after `.demos` changes nothing.

The seed decides the train/held-out split (a quarter of each task's prompt
groups is held out), which prompts are sampled, and every corpus document.
Held-out and validation prompts never appear in the train prompts, the
demonstrations or the corpus: all three draw only from the train side of the split.

Demonstrations are written by a pool of demonstrators with habits
(demonstrators.py): each demonstration's row names its demonstrator and the habits
it carries. `habits="none"` writes the same prompts with flawless answers, the
control that shows how little feedback adds when demonstrations are already perfect.

Corpus documents (default shares):
  good 28%, off_topic 9%, wrong_facts 11%, wrong_tone 9%, rambling 9%,
  repetition 9%, no_end 10% — transcripts in the heed template;
  facts 15% — descriptions of 1-3 entities, single facts ("The Tarvo is red."),
  or one list sentence.
Every document ends with EOS except no_end ones, which run on without it.
"""

from __future__ import annotations

import random
from functools import cached_property
from pathlib import Path

from heed.template import EOS_TOKEN, format_transcript
from heed.world import demonstrators
from heed.world.kb import ATTRIBUTES, ENTITIES, Entity, kb_json
from heed.world.responses import describe, fact_sentence, good, respond
from heed.world.tasks import TASK_TYPES, by_stratum, list_tasks, sample_balanced, split_groups, universe

CORPUS_SHARES = {
    "good": 0.28, "off_topic": 0.09, "wrong_facts": 0.11, "wrong_tone": 0.09, "rambling": 0.09,
    "repetition": 0.09, "no_end": 0.10, "facts": 0.15,
}
HABIT_MODES = ("demonstrators", "none")


class World:
    """The embedded assistant world. The KB is fixed; `seed` changes the sampling only."""

    def __init__(self, seed: int = 0, *, n_corpus: int = 8000, n_demos: int = 400,
                 n_train_prompts: int = 2000, n_heldout_prompts: int = 600, n_valid_prompts: int = 300,
                 habits: str = "demonstrators"):
        if habits not in HABIT_MODES:
            raise ValueError(f"habits must be one of {', '.join(HABIT_MODES)}, got {habits!r}")
        self.seed = seed
        self.habits = habits
        self.n_valid_prompts = n_valid_prompts
        self.n_corpus = n_corpus
        self.n_demos = n_demos
        self.n_train_prompts = n_train_prompts
        self.n_heldout_prompts = n_heldout_prompts
        self.kb: tuple[Entity, ...] = ENTITIES

    def _rng(self, product: str) -> random.Random:
        return random.Random(f"heed-world:{self.seed}:{product}")

    @cached_property
    def _split(self) -> tuple[list[str], list[str], list[str]]:
        return split_groups(self.seed)

    @property
    def train_pool(self) -> list[str]:
        """Every prompt on the train side of the split (the corpus and demos draw from these)."""
        return self._split[0]

    @property
    def valid_pool(self) -> list[str]:
        """Every prompt in the validation groups (for tuning; no training stage sees them)."""
        return self._split[1]

    @property
    def heldout_pool(self) -> list[str]:
        """Every prompt on the held-out side of the split."""
        return self._split[2]

    @cached_property
    def train_prompts(self) -> list[str]:
        return sample_balanced(self.train_pool, self.n_train_prompts, self._rng("train_prompts"))

    @cached_property
    def heldout_prompts(self) -> list[str]:
        return sample_balanced(self.heldout_pool, self.n_heldout_prompts, self._rng("heldout_prompts"))

    @cached_property
    def valid_prompts(self) -> list[str]:
        return sample_balanced(self.valid_pool, self.n_valid_prompts, self._rng("valid_prompts"))

    @cached_property
    def demos(self) -> list[dict]:
        """{"prompt", "response", "demonstrator", "habits"} on distinct prompts, strata in equal turns.

        The demonstrators take turns; the good answer comes from the "demos" stream and
        the habits from their own, so `habits="none"` has the same prompts and answers
        minus the habits.
        """
        rng, habit_rng = self._rng("demos"), self._rng("demonstrators")
        names = list(demonstrators.DEMONSTRATORS)
        rows = []
        for i, prompt in enumerate(sample_balanced(self.train_pool, self.n_demos, rng)):
            task = universe()[prompt]
            answer = good(task, rng)
            who = names[i % len(names)]
            habits = demonstrators.draw_habits(who, task, habit_rng) if self.habits == "demonstrators" else ()
            response = demonstrators.write(task, habits, habit_rng, answer) if habits else answer
            rows.append({"prompt": prompt, "response": response,
                         "demonstrator": who if self.habits == "demonstrators" else "flawless",
                         "habits": list(habits)})
        return rows

    @cached_property
    def corpus_records(self) -> list[dict]:
        """Corpus documents with how they were made: {"text", "behaviour", "prompt", "response"}."""
        rng = self._rng("corpus")
        strata = by_stratum(self.train_pool)
        behaviours, shares = zip(*CORPUS_SHARES.items())
        records = []
        for behaviour in rng.choices(behaviours, weights=shares, k=self.n_corpus):
            if behaviour == "facts":
                records.append({"text": _facts_document(rng) + EOS_TOKEN, "behaviour": "facts",
                                "prompt": None, "response": None})
                continue
            task_type = rng.choice(TASK_TYPES)  # equally often; yes/no half yes, half no
            if task_type == "yes_no":
                task_type = rng.choice(("yes_no:yes", "yes_no:no"))
            prompt = rng.choice(strata[task_type])
            response = respond(universe()[prompt], behaviour, rng, self.train_pool)
            text = format_transcript(prompt, response, end=behaviour != "no_end")
            records.append({"text": text, "behaviour": behaviour, "prompt": prompt, "response": response})
        return records

    @property
    def corpus(self) -> list[str]:
        return [r["text"] for r in self.corpus_records]


def _facts_document(rng: random.Random) -> str:
    """Plain knowledge: one list sentence, descriptions of 1-3 entities, or 3-6 single facts."""
    r = rng.random()
    if r < 0.25:
        return good(rng.choice(list_tasks()), rng)
    if r < 0.6:
        return " ".join(describe(e, rng) for e in rng.sample(ENTITIES, rng.randint(1, 3)))
    # "The Tarvo likes rain. The Bimo is red.": the form in which answers state a fact
    return " ".join(fact_sentence(rng.choice(ENTITIES), rng.choice(list(ATTRIBUTES)))
                    for _ in range(rng.randint(3, 6)))


def write_world(out: str | Path, seed: int = 0, *, n_corpus: int = 8000, n_demos: int = 400,
                n_train_prompts: int = 2000, n_heldout_prompts: int = 600, n_valid_prompts: int = 300,
                habits: str = "demonstrators") -> dict[str, int]:
    """Write corpus.jsonl, demos.jsonl, prompts_{train,valid,heldout}.jsonl and kb.json."""
    import json

    from heed.data import write_jsonl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = World(seed, n_corpus=n_corpus, n_demos=n_demos, n_train_prompts=n_train_prompts,
                  n_heldout_prompts=n_heldout_prompts, n_valid_prompts=n_valid_prompts, habits=habits)
    write_jsonl(out / "corpus.jsonl", [{"text": t} for t in world.corpus])
    write_jsonl(out / "demos.jsonl", world.demos)
    write_jsonl(out / "prompts_train.jsonl", [{"prompt": p} for p in world.train_prompts])
    write_jsonl(out / "prompts_valid.jsonl", [{"prompt": p} for p in world.valid_prompts])
    write_jsonl(out / "prompts_heldout.jsonl", [{"prompt": p} for p in world.heldout_prompts])
    (out / "kb.json").write_text(json.dumps(kb_json(), indent=1) + "\n")
    return {
        "corpus documents": len(world.corpus),
        "corpus characters": sum(len(t) for t in world.corpus),
        "demos": len(world.demos),
        "demos with habits": sum(bool(d["habits"]) for d in world.demos),
        "train prompts": len(world.train_prompts),
        "validation prompts": len(world.valid_prompts),
        "held-out prompts": len(world.heldout_prompts),
        "entities": len(world.kb),
    }
