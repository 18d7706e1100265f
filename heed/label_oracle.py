"""`heed label oracle`: the embedded world's simulated labeler labels sampled responses.

Input: rows with "prompt" and "response" (what `heed sample --n N` writes);
responses to the same prompt are grouped in file order. Output: feedback rows in
the format `heed rm train` reads (heed/data.py), one kind per run:

    pairs     responses of a prompt taken two at a time (0-1, 2-3, …): {"prompt", "chosen",
              "rejected"}, "tie": true when the labeler calls it a tie; identical texts are skipped
    rankings  groups of --k responses: {"prompt", "responses", "ranking"} (best first)
    thumbs    every response: {"prompt", "response", "label": "up"|"down"}
    ratings   every response: {"prompt", "response", "score": 1..7}
    spans     every response: {"prompt", "response", "spans": [{"start", "end", "label"}],
              "correction"?}: the sentences a person would mark (wrong, irrelevant, rude,
              repeated, good) and, where it helps, a corrected response (--no-corrections: none)

--budget caps the number of labels (rows written), taken in prompt order, so
the same samples give every kind. The labeler (heed.world.SimulatedLabeler) is
seeded: the same input, kind and seed give the same labels.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from heed.config import option
from heed.data import get_prompt, get_str, read_rows, write_jsonl
from heed.template import prompt_key
from heed.utils import HeedError
from heed.world import SimulatedLabeler

KINDS = ("pairs", "rankings", "thumbs", "ratings", "spans")


@dataclass
class OracleLabelConfig:
    samples: str = option(help="JSONL/Parquet rows with 'prompt' and 'response' (e.g. from `heed sample --n 4`)")
    out: str = option(help="output JSONL of feedback rows")
    kind: str = option("pairs", "feedback kind to produce", choices=KINDS)
    k: int = option(4, "responses per ranking (rankings only)")
    budget: int = option(0, "at most this many labels (rows); 0 = label everything")
    seed: int = option(0, "labeler seed")
    temperature: float = option(0.1, "labeler's Bradley-Terry temperature (on the gold score scale)")
    random_rate: float = option(0.1, "probability of a uniformly random answer")
    corrections: bool = option(True, "spans: also write a corrected response where the labeler can improve it")
    skip_invalid: bool = option(False, "skip and count malformed sample rows instead of stopping")


def _parse_sample(row: dict) -> tuple:
    prompt = get_prompt(row)
    return prompt, get_str(row, "response", allow_empty=True)


def group_by_prompt(samples: list[tuple]) -> list[tuple]:
    """[(prompt, [responses…])] in order of each prompt's first appearance."""
    groups: OrderedDict[str, tuple] = OrderedDict()
    for prompt, response in samples:
        groups.setdefault(prompt_key(prompt), (prompt, []))[1].append(response)
    return list(groups.values())


def label(groups: list[tuple], kind: str, labeler, *, k: int = 4, budget: int = 0,
          corrections: bool = True) -> tuple[list[dict], int]:
    """(feedback rows, number of pairs or groups skipped because they could not be labelled)."""
    rows: list[dict] = []
    skipped = 0
    for prompt, responses in groups:
        if kind in ("thumbs", "ratings", "spans"):
            units = [[r] for r in responses]
        else:
            size = 2 if kind == "pairs" else k
            units = [responses[i:i + size] for i in range(0, len(responses) - size + 1, size)]
        for unit in units:
            if budget and len(rows) >= budget:
                return rows, skipped
            if kind == "pairs":
                a, b = unit
                if a == b:  # the same text twice says nothing about preference
                    skipped += 1
                    continue
                choice = labeler.compare(prompt, a, b)
                row = {"prompt": prompt, "chosen": b if choice == "b" else a, "rejected": a if choice == "b" else b}
                if choice == "tie":
                    row["tie"] = True
            elif kind == "rankings":
                row = {"prompt": prompt, "responses": unit, "ranking": labeler.rank(prompt, unit)}
            elif kind == "thumbs":
                row = {"prompt": prompt, "response": unit[0],
                       "label": "up" if labeler.thumbs(prompt, unit[0]) else "down"}
            elif kind == "ratings":
                row = {"prompt": prompt, "response": unit[0], "score": labeler.rate(prompt, unit[0])}
            else:
                row = {"prompt": prompt, "response": unit[0], "spans": labeler.mark(prompt, unit[0])}
                correction = labeler.correct(prompt, unit[0]) if corrections else None
                if correction is not None:
                    row["correction"] = correction
            rows.append(row)
    return rows, skipped


def run(cfg: OracleLabelConfig) -> list[dict]:
    if cfg.kind not in KINDS:
        raise HeedError(f"--kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.kind == "rankings" and cfg.k < 2:
        raise HeedError("--k must be at least 2 for rankings")
    samples = read_rows(cfg.samples, _parse_sample, skip_invalid=cfg.skip_invalid, what="samples")
    groups = group_by_prompt(samples)
    labeler = SimulatedLabeler(cfg.seed, temperature=cfg.temperature, random_rate=cfg.random_rate)
    try:
        rows, skipped = label(groups, cfg.kind, labeler, k=cfg.k, budget=cfg.budget,
                              corrections=cfg.corrections)
    except ValueError as e:  # the oracle only knows the world's prompts
        raise HeedError(f"{cfg.samples}: the simulated labeler only labels the embedded world's prompts: "
                        f"{e}") from None
    if not rows:
        raise HeedError(f"{cfg.samples}: nothing to label as {cfg.kind} (too few responses per prompt?)")
    write_jsonl(cfg.out, rows)
    extra = f"; skipped {skipped} pair(s) of identical responses" if skipped else ""
    print(f"labelled {len(rows)} {cfg.kind} from {len(samples)} samples of {len(groups)} prompts to {cfg.out}{extra}")
    return rows
