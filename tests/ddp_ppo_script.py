"""Two PPO iterations on a brevity rule (under `accelerate launch` or plain python); saves each rank's weights.

usage: ddp_ppo_script.py POLICY PROMPTS OUT
"""

import sys
from pathlib import Path

import torch

from heed.algos.ppo import PPOConfig, PPOTrainer
from heed.data import read_prompts

policy, prompts_path, out = sys.argv[1:4]
cfg = PPOConfig(policy=policy, prompts=prompts_path, reward=["-"], out=out, steps=2, prompts_per_iteration=8,
                mini_batch_size=4, micro_batch_size=2, ppo_epochs=1, max_new_tokens=12, lr=1e-3)
trainer = PPOTrainer(cfg, reward_fn=lambda ps, rs: [-len(r) / 20 for r in rs], prompts=read_prompts(prompts_path))
trainer.train()
from accelerate import PartialState  # noqa: E402

state = PartialState()  # the processes accelerate actually trained with (2 under the launcher)
rank = state.process_index
(Path(out) / f"processes{rank}.txt").write_text(str(state.num_processes))
weights = trainer.actor_critic.state_dict()
torch.save({k: v.detach().clone() for k, v in weights.items()}, Path(out) / f"rank{rank}.pt")
