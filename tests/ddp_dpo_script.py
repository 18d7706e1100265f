"""A few DPO steps (under `accelerate launch` or plain python) on pairs made from the demos; saves each
rank's weights. The pairs share prompts between chosen and rejected, the path heed's DPO takes.

Used by tests/test_train.py::test_two_process_training_matches_one_process.
usage: ddp_dpo_script.py BASE_MODEL DEMOS OUT
"""

import json
import os
import sys
from pathlib import Path

import torch

import heed.algos.dpo as dpo

base, demos_path, out = sys.argv[1:4]
demos = [json.loads(line) for line in Path(demos_path).read_text().splitlines()][:24]
Path(out).mkdir(parents=True, exist_ok=True)
pairs = Path(out) / f"pairs{os.environ.get('LOCAL_RANK', '0')}.jsonl"  # a copy per process: no race on one file
with open(pairs, "w") as f:
    for d in demos:
        f.write(json.dumps({"prompt": d["prompt"], "chosen": d["response"].split(". ")[0].rstrip(".") + ".",
                            "rejected": d["response"] + " " + d["response"]}) + "\n")
captured = {}
load_policy = dpo.load_policy


def capture(path, **kwargs):  # the policy object run() trains, to read its weights on every rank
    model, tok = load_policy(path, **kwargs)
    captured.setdefault("policy", model)
    return model, tok


dpo.load_policy = capture
dpo.run(dpo.DPOConfig(policy=base, data=[str(pairs)], out=str(Path(out) / "run"), batch_size=8,
                      micro_batch_size=2, lr=1e-3, warmup_steps=1, epochs=1.0, save_every=100, seed=0))
from accelerate import PartialState  # noqa: E402

state = PartialState()  # the processes accelerate actually trained with (2 under the launcher)
rank = state.process_index
(Path(out) / f"processes{rank}.txt").write_text(str(state.num_processes))
torch.save({k: v.detach().clone() for k, v in captured["policy"].state_dict().items()}, Path(out) / f"rank{rank}.pt")
