"""`heed CLI-ARGS...` under `accelerate launch` (FSDP, DeepSpeed), recording what each process held.

usage: fsdp_script.py INFO_DIR STOP_AFTER CLI-ARGS...
At its first optimiser step each rank writes INFO_DIR/rank{r}.json: the distributed type accelerate
trains with, how many processes, and how many weight elements the rank holds (a DTensor's local
shard, a ZeRO-3 partition padded to equal size) against the model's whole count. Taken before any
forward pass: FSDP2 leaves a unit it does not reshard after forward (accelerate's embedding-and-head
unit) whole after an evaluation's forward pass, until the next backward.
STOP_AFTER > 0: every rank exits abruptly (os._exit, no clean-up, like a kill) right after the
checkpoint of that step is complete.
Used by tests/test_fsdp.py.
"""

import json
import os
import sys
from pathlib import Path

import heed.algos.common as common
from heed.cli import main

info_dir, stop_after, args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
info_dir.mkdir(parents=True, exist_ok=True)
save_checkpoint, learner_step = common.Checkpointer.save, common.Learner.step


def save_then_stop(self, step, **state):
    save_checkpoint(self, step, **state)
    if step == stop_after:
        os._exit(3)


def record_then_step(self, *args, **kwargs):
    if not getattr(self, "recorded", False):
        local = whole = 0
        for p in self.model.parameters():
            if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3: an empty placeholder; the local partition is ds_tensor
                whole, local = whole + p.ds_numel, local + p.ds_tensor.numel()
            else:  # a DTensor's numel is the whole parameter's, to_local() this process's shard
                whole += p.numel()
                local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        (info_dir / f"rank{self.rank}.json").write_text(json.dumps({
            "distributed_type": str(self.accelerator.distributed_type), "processes": self.world,
            "local_numel": local, "numel": whole}))
        self.recorded = True
    return learner_step(self, *args, **kwargs)


common.Checkpointer.save = save_then_stop
common.Learner.step = record_then_step
sys.exit(main(args))
