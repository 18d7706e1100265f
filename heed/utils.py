"""Small pieces every stage uses: user errors, seeding, progress bars, metric logs."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np


class HeedError(Exception):
    """A user mistake (bad file, bad flag): the CLI prints the message, no traceback."""


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             disable: bool = False, unit: str = "it"):
    """A tqdm bar with rate and ETA; quiet when HEED_QUIET=1 or on non-main ranks."""
    from tqdm.auto import tqdm

    quiet = disable or os.environ.get("HEED_QUIET") == "1"
    return tqdm(iterable, total=total, desc=desc, disable=quiet, unit=unit, dynamic_ncols=True,
                leave=False)


_FAULTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for the kill tests (tests/test_kill_resume.py): with HEED_FAULT=NAME:N in
    the environment, the N-th time this process reaches the point `name` it SIGKILLs itself:
    a real kill, no cleanup, at the worst moment (inside a checkpoint write). Otherwise nothing."""
    spec = os.environ.get("HEED_FAULT")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target == name:
        _FAULTS[name] = _FAULTS.get(name, 0) + 1
        if _FAULTS[name] == int(n or 1):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one JSON object per step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    Only the main process writes; on a resumed run the JSONL is appended to, so the
    file holds the whole history, each step once (`keep_until` drops what a killed run
    logged after its last checkpoint, which the resumed run logs again).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self._t0 = time.time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency; stay usable without it
                self._tb = None

    def keep_until(self, step: int) -> None:
        """Drop the rows after `step` (and a last line cut short by a kill): a run resuming
        from its checkpoint at `step` logs those steps again."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self._t0, 3)}
        row.update({k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                    for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 50 ms.

    Includes what was already resident when the block started: it answers "how much
    memory did the process need at most during this stage".
    """

    def __init__(self):
        import threading

        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def current_mib() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.current_mib())
            self._stop.wait(0.05)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = round(max(self.peak_mib, self.current_mib()), 1)
