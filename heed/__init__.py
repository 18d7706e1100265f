"""heed: reinforcement learning from human feedback, whole."""

__version__ = "0.1.0"
