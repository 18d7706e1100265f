"""What does a model know about the embedded world, and can it use it? Three probes.

1. copy: after "User: Describe the Tigu.\\nAssistant: The", is the asked name the most
   likely of the 48 names, and how much probability (among names) does it get?
2. facts: cloze completions of the pretraining corpus' own sentences ("The Tigu lives
   in the ..."): is the true value the most likely of its attribute's values?
3. questions: on the world's held-out one-word and yes/no prompts, is the first answer
   token right (argmax among the attribute's values, or Yes/No), and its probability?

Probe 3 is what a policy (and a reward model built on its trunk) needs; 1 and 2 are
what pretraining gives first. Plain forward passes, no sampling.

    python bench/world_knowledge.py --world runs/demo/world runs/demo/base runs/demo/sft
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from heed.models import load_policy
from heed.template import format_prompt
from heed.world.kb import ATTRIBUTES, BY_NAME, ENTITIES
from heed.world.tasks import parse_prompt

CLOZE = {"kind": "The {n} is a", "colour": "The {n} is a", "size": "The {n} is a",
         "home": "The {n} lives in the", "likes": "The {n} likes"}


@torch.no_grad()
def next_token_probs(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return model(torch.tensor([ids])).logits[0, -1].softmax(-1)


def first_token(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def choose(probs: torch.Tensor, candidates: list[int], truth: int) -> tuple[bool, float]:
    """(is the truth the argmax among candidates, its probability renormalised over them)."""
    p = probs[candidates]
    return int(p.argmax()) == truth, float(p[truth] / p.sum())


def probe(model_dir: str, heldout_prompts: list[str]) -> dict[str, float]:
    model, tok = load_policy(model_dir)
    model.eval()
    out: dict[str, float] = {}

    names = [first_token(tok, e.name) for e in ENTITIES]
    hits = [choose(next_token_probs(model, tok, format_prompt(f"Describe the {e.name}.") + " The"), names, i)
            for i, e in enumerate(ENTITIES)]
    out["copy_accuracy"] = sum(h for h, _ in hits) / len(hits)
    out["copy_probability"] = sum(p for _, p in hits) / len(hits)

    for attribute, values in ATTRIBUTES.items():
        right = 0
        for e in ENTITIES:  # values can span several tokens: score each whole completion
            prefix = CLOZE[attribute].format(n=e.name)
            n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
            scores = []
            for v in values:
                ids = tok(f"{prefix} {v}", add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(n_prefix, len(ids))))
            right += values[max(range(len(values)), key=scores.__getitem__)] == e.get(attribute)
        out[f"facts_{attribute}"] = right / len(ENTITIES)
    out["facts_mean"] = sum(out[f"facts_{a}"] for a in ATTRIBUTES) / len(ATTRIBUTES)

    for task_type in ("brief", "yes_no"):
        prompts = [p for p in heldout_prompts if parse_prompt(p).type == task_type]
        hits = []
        for p in prompts:
            task = parse_prompt(p)
            entity = BY_NAME[task.entity]
            if task_type == "brief":
                values = ATTRIBUTES[task.attribute]
                candidates = [first_token(tok, v.capitalize()) for v in values]
                truth = values.index(entity.get(task.attribute))
            else:
                candidates = [first_token(tok, "Yes"), first_token(tok, "No")]
                truth = 0 if entity.get(task.attribute) == task.value else 1
            hits.append(choose(next_token_probs(model, tok, format_prompt(p)), candidates, truth))
        out[f"{task_type}_accuracy"] = sum(h for h, _ in hits) / max(1, len(hits))
        out[f"{task_type}_probability"] = sum(p for _, p in hits) / max(1, len(hits))
        out[f"{task_type}_prompts"] = len(hits)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="local model directories (base, sft, ppo, ...)")
    parser.add_argument("--world", required=True, help="world directory (from `heed world make`)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    heldout = [json.loads(line)["prompt"] for line in (Path(args.world) / "prompts_heldout.jsonl").open()]
    results = {}
    for model_dir in args.models:
        results[model_dir] = probe(model_dir, heldout)
        print(model_dir, "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in results[model_dir].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
