"""Preference-based RL for control agents (Christiano et al. 2017, "Deep reinforcement
learning from human preferences").

An agent acts in a Gymnasium environment whose reward it never sees; a labeler (a
synthetic oracle on the true return, or people in the feedback app) compares pairs of
short clips of its behaviour; an ensemble of reward models is fitted to the comparisons;
the agent is trained by RL (Stable-Baselines3) on the learned reward; new queries go
where the ensemble disagrees most.

Files, in the order data flows:
  envs.py          fixed-horizon wrapper, vectorised episode recorder that swaps in the learned reward
  reward_model.py  the clip-sum Bradley-Terry loss and the normalised MLP ensemble
  queries.py       label schedule, clip-pair sampling, disagreement-based selection
  labelers.py      synthetic oracle, and people through the feedback app (animated GIFs)
  train.py         `heed control train`: the loop of the paper, top to bottom
  report.py        report.json and a self-contained report.html
"""
