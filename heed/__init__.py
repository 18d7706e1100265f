"""heed: reinforcement learning from human feedback, whole."""

import os

# OpenMP threads that spin while waiting thrash when another process holds a core
# (measured here: a training step 5-10x slower). Passive waiting costs little when
# the machine is idle. Set before torch loads its OpenMP runtime; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
