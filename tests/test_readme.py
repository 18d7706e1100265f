"""The README's Python example runs as written, on the directory `make demo` writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs_as_written(quick_demo, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(quick_demo)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "reward model" in printed and "KL to SFT after 2 iterations" in printed
    assert (tmp_path / "runs" / "ppo_brief" / "model.safetensors").exists()
