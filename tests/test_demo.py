"""`heed demo --quick`: the whole pipeline end to end, and what its report promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from heed.cli import main


@pytest.mark.slow
def test_quick_demo_writes_the_promised_report(quick_demo):
    out = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert report["elapsed_s"] > 0 and report["quick"] is True
    for stage in ("base", "sft", "ppo"):
        assert isinstance(report["stages"][stage]["gold_mean"], float)
    assert report["stages"]["ppo"]["kl_to_ref"] == report["stages"]["ppo"]["kl_to_ref"]  # not NaN
    for key in ("sft_vs_base", "ppo_vs_sft"):
        assert 0.0 <= report["win_rates"][key] <= 1.0
    assert report["reward_model"]["n_labels"] > 0
    assert 0.0 <= report["reward_model"]["heldout_accuracy_vs_gold"] <= 1.0
    assert report["eval"]["split"] == "heldout"
    criteria = ("relevance", "correctness", "tone", "length", "repetition", "termination")
    for stage in ("base", "sft", "ppo"):  # what feedback changed, per oracle criterion
        assert tuple(report["criteria_lost"][stage]) == criteria
        assert all(0.0 <= v <= 1.0 for v in report["criteria_lost"][stage].values())
    demos = [json.loads(line) for line in (out / "world" / "demos.jsonl").read_text().splitlines()]
    assert any(d["habits"] for d in demos) and any(not d["habits"] for d in demos)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "<th>ppo</th>" in page
    # every stage left its output, so a rerun skips the work and reproduces the same numbers
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["win_rates"] == report["win_rates"]
    assert again["stage_seconds"]["pretrain"] < report["stage_seconds"]["pretrain"]
    # the headroom bench reads a finished demo; its rows share samples, so they are ordered
    spec = importlib.util.spec_from_file_location("headroom", Path(__file__).parents[1] / "bench" / "headroom.py")
    headroom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headroom)
    headroom.main([str(out), "--k", "4", "--limit", "40"])
    rows = json.loads((out / "headroom.json").read_text())["policies"]
    gold = {k: v["gold_mean"] for k, v in rows.items()}
    assert gold["best-of-2 by gold"] <= gold["best-of-4 by gold"]
    for k in (2, 4):
        assert gold[f"best-of-{k} by the RM"] <= gold[f"best-of-{k} by gold"]
    assert all(0.0 <= v["win_rate_vs_sft"] <= 1.0 for v in rows.values())


def test_demo_rejects_unknown_algorithms(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--algos", "ppo,sac"]) == 2
    assert "unknown ['sac']" in capsys.readouterr().err


def test_demo_rejects_an_odd_number_of_samples_before_any_stage(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--samples-per-prompt", "3"]) == 2
    assert "--samples-per-prompt must be even" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing was built first
