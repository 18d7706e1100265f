"""What does a model know about the embedded world, and can it use it? Three probes.

1. copy: after "User: Describe the Tigu.\\nAssistant: The", is the asked name the most
   likely of the 48 names, and how much probability (among names) does it get?
2. facts: cloze completions of the pretraining corpus' own sentences ("The Tigu lives
   in the ..."): is the true value the most likely of its attribute's values?
3. questions: on the world's held-out brief and yes/no prompts a good answer is the fact
   ("The Tigu lives in the sea."): after its first words ("The Tigu lives in the"), is
   the true value the most likely? And, for yes/no, could the model also say the verdict:
   after the true fact and ", so", is "yes" or "no" the right one of the two? (The world
   leaves the verdict implied because this last probe stays at chance; docs/world.md.)

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
from heed.world.responses import fact_sentence
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
        right = sum(best_value(model, tok, CLOZE[attribute].format(n=e.name), values) == e.get(attribute)
                    for e in ENTITIES)
        out[f"facts_{attribute}"] = right / len(ENTITIES)
    out["facts_mean"] = sum(out[f"facts_{a}"] for a in ATTRIBUTES) / len(ATTRIBUTES)

    # 3. questions: the answer is the fact, its value the last word ("The Tigu lives in the sea.")
    verdict_hits = []
    for task_type in ("brief", "yes_no"):
        prompts = [p for p in heldout_prompts if parse_prompt(p).type == task_type]
        fact_hits = []
        for p in prompts:
            task = parse_prompt(p)
            entity = BY_NAME[task.entity]
            fact = fact_sentence(entity, task.attribute)[:-1]
            prefix = format_prompt(p) + " " + fact.rsplit(" ", 1)[0]
            fact_hits.append(best_value(model, tok, prefix, ATTRIBUTES[task.attribute]) == entity.get(task.attribute))
            if task_type == "yes_no":
                truth = 0 if entity.get(task.attribute) == task.value else 1
                verdict_hits.append(choose(next_token_probs(model, tok, format_prompt(p) + " " + fact + ", so"),
                                           [first_token(tok, "yes"), first_token(tok, "no")], truth))
        out[f"{task_type}_fact_accuracy"] = sum(fact_hits) / max(1, len(fact_hits))
        out[f"{task_type}_prompts"] = len(prompts)
    out["yes_no_verdict_accuracy"] = sum(h for h, _ in verdict_hits) / max(1, len(verdict_hits))
    out["yes_no_verdict_probability"] = sum(p for _, p in verdict_hits) / max(1, len(verdict_hits))
    return out


@torch.no_grad()
def best_value(model, tokenizer, prefix: str, values: tuple[str, ...]) -> str:
    """The value whose whole completion of `prefix` is most likely (values can span several tokens)."""
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    scores = []
    for v in values:
        ids = tokenizer(f"{prefix} {v}", add_special_tokens=False)["input_ids"]
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(n_prefix, len(ids))))
    return values[max(range(len(values)), key=scores.__getitem__)]


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
