"""Answers -> the JSONL rows `heed rm train` reads, one format per feedback kind.

    pairs     {"prompt", "chosen", "rejected"}, plus "tie": true for a tie or
              "both_bad": true when both were bad (chosen/rejected then in original order)
    rankings  {"prompt", "responses": [...], "ranking": [indices into responses, best first]}
    thumbs    {"prompt", "response", "label": "up" | "down"}
    ratings   {"prompt", "response", "score": 1..7}
    spans     {"prompt", "response", "spans": [{"start", "end", "label"}, ...], "correction"
              (only where the annotator wrote one)}: offsets are Python string indices into
              the response (code points, end exclusive), as `heed.data` reads them

Skips are dropped. A media response is written as its file path. By default
there is one row per answer; with `majority=True`, one row per item:
    pairs    the most common answer; when the top count is shared, a tie
    rankings Borda count (mean position), ties broken by original index
    thumbs   the most common label; an even split drops the item
    ratings  the median score (the lower one of an even count)
    spans    none: people mark different spans, and no vote makes one answer of them
             (asking for it is an error)
"""

from __future__ import annotations

from collections import Counter, defaultdict

from heed.utils import HeedError

EXPORT_KINDS = {"pairs": "pair", "rankings": "ranking", "thumbs": "thumbs", "ratings": "rating", "spans": "spans"}


def _text(response) -> str:
    return response if isinstance(response, str) else response["media"]


def _pair_row(item: dict, choice: str) -> dict:
    a, b = (_text(r) for r in item["responses"])
    row = {"prompt": item["prompt"]}
    if choice in ("0", "1"):
        row.update(chosen=a if choice == "0" else b, rejected=b if choice == "0" else a)
    else:
        row.update(chosen=a, rejected=b)
        row[choice] = True  # "tie" or "both_bad"
    return row


def _majority_pair(choices: list[str]) -> str:
    counts = Counter(choices).most_common()
    top = [c for c, n in counts if n == counts[0][1]]
    return top[0] if len(top) == 1 else "tie"


def _borda(rankings: list[list[int]], k: int) -> list[int]:
    position = [0.0] * k
    for ranking in rankings:
        for pos, idx in enumerate(ranking):
            position[idx] += pos
    return sorted(range(k), key=lambda i: (position[i], i))


def export_rows(items_by_id: dict[str, dict], answers: list[dict], kind: str, *, majority: bool = False) -> list[dict]:
    """Rows for one export kind ("pairs", "rankings", "thumbs", "ratings" or "spans")."""
    if majority and kind == "spans":
        raise HeedError("a majority is not defined for spans (people mark different spans): "
                        "export them one row per answer")
    item_kind = EXPORT_KINDS[kind]
    kept = [a for a in answers if a["kind"] == item_kind and a["choice"] != "skip" and a["item_id"] in items_by_id]
    if majority:
        grouped: dict[str, list[dict]] = defaultdict(list)
        for a in kept:
            grouped[a["item_id"]].append(a)
    rows = []
    if kind == "pairs":
        if not majority:
            return [_pair_row(items_by_id[a["item_id"]], a["choice"]) for a in kept]
        return [_pair_row(items_by_id[i], _majority_pair([a["choice"] for a in g])) for i, g in grouped.items()]
    if kind == "rankings":
        def ranking_row(item: dict, ranking: list[int]) -> dict:
            return {"prompt": item["prompt"], "responses": [_text(r) for r in item["responses"]], "ranking": ranking}
        if not majority:
            return [ranking_row(items_by_id[a["item_id"]], a["ranking"]) for a in kept]
        return [ranking_row(items_by_id[i], _borda([a["ranking"] for a in g], len(items_by_id[i]["responses"])))
                for i, g in grouped.items()]
    if kind == "spans":
        for a in kept:
            item = items_by_id[a["item_id"]]
            rows.append({"prompt": item["prompt"], "response": item["responses"][0], "spans": a["spans"]})
            if a["correction"] is not None:
                rows[-1]["correction"] = a["correction"]
        return rows
    field = "label" if kind == "thumbs" else "score"
    if not majority:
        for a in kept:
            item = items_by_id[a["item_id"]]
            rows.append({"prompt": item["prompt"], "response": _text(item["responses"][0]), field: a[field]})
        return rows
    for item_id, group in grouped.items():
        item = items_by_id[item_id]
        values = [a[field] for a in group]
        if kind == "thumbs":
            counts = Counter(values).most_common()
            if len(counts) > 1 and counts[0][1] == counts[1][1]:
                continue  # an even split says nothing about this response
            value = counts[0][0]
        else:
            value = sorted(values)[(len(values) - 1) // 2]
        rows.append({"prompt": item["prompt"], "response": _text(item["responses"][0]), field: value})
    return rows


def export_store(store, kind: str, *, majority: bool = False) -> list[dict]:
    items_by_id = {item["id"]: item for item in store.all_items()}
    return export_rows(items_by_id, store.answers(), kind, majority=majority)
