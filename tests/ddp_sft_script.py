"""Run a few SFT steps (under `accelerate launch` or plain python) and save each rank's weights.

Used by tests/test_train.py::test_two_process_training_matches_one_process.
usage: ddp_sft_script.py BASE_MODEL DEMOS OUT
"""

import sys
from pathlib import Path

import torch

from heed.algos.common import train_lm
from heed.algos.sft import SFTConfig, build_examples
from heed.data import read_demos
from heed.models import load_policy

base, demos_path, out = sys.argv[1:4]
cfg = SFTConfig(model=base, data=demos_path, out=out, batch_size=8, micro_batch_size=2, lr=3e-3,
                warmup_steps=1, eval_every=100, save_every=100, seed=0)
model, tok = load_policy(base)
train = build_examples(tok, read_demos(demos_path)[:32], 64, 64)
train_lm(model, tok, train, [], cfg, total_steps=3, stage="sft", save=lambda m: None)
from accelerate import PartialState  # noqa: E402

state = PartialState()  # the processes accelerate actually trained with (2 under the launcher)
rank = state.process_index
(Path(out) / f"processes{rank}.txt").write_text(str(state.num_processes))
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
