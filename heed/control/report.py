"""report.html: one self-contained file (PNG plots embedded as base64) from report.json and metrics.jsonl."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from heed.utils import atomic_write_text, read_metrics


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if key in r and x in r and r[key] == r[key]]
    return [p[0] for p in pts], [p[1] for p in pts]


def figures(report: dict, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    random_mean = report.get("random", {}).get("return_mean")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run, label in (("learned", "learned reward (preferences)"), ("true", "true reward")):
        xs, ys = _series(rows, f"{run}/return_eval")
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    if random_mean is not None:
        ax.axhline(random_mean, color="grey", ls="--", label="random policy")
    ax.set_xlabel("environment steps"); ax.set_ylabel("true return (evaluation)"); ax.legend(); ax.grid(alpha=.3)
    figs.append(("True return against environment steps", _png(fig))); plt.close(fig)

    curve = report.get("learned", {}).get("curve", [])
    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([c["labels_used"] for c in curve], [c["return_mean"] for c in curve], marker="o")
        if "true" in report:
            ax.axhline(report["true"]["return_mean"], color="C1", ls=":", label="true reward, end of run")
        if random_mean is not None:
            ax.axhline(random_mean, color="grey", ls="--", label="random policy")
        ax.set_xlabel("labels used"); ax.set_ylabel("true return (evaluation)"); ax.legend(); ax.grid(alpha=.3)
        figs.append(("True return against labels used", _png(fig))); plt.close(fig)

    xs, ys = _series(rows, "learned/rm_corr_clip")
    if xs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(xs, ys, marker=".", label="clip sums")
        ax.plot(*_series(rows, "learned/rm_corr_step"), marker=".", label="single steps")
        ax.set_xlabel("environment steps"); ax.set_ylabel("Pearson r, learned vs true"); ax.set_ylim(-1, 1)
        ax.legend(); ax.grid(alpha=.3)
        figs.append(("Learned vs true reward on fresh clips", _png(fig))); plt.close(fig)

    xs, ys = _series(rows, "learned/disagreement_candidates")
    if xs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(xs, ys, marker=".", label="all candidates")
        ax.plot(*_series(rows, "learned/disagreement_asked"), marker=".", label="pairs asked")
        ax.set_yscale("log"); ax.set_xlabel("environment steps")
        ax.set_ylabel("variance of P[clip 0 preferred]"); ax.legend(); ax.grid(alpha=.3)
        figs.append(("Ensemble disagreement", _png(fig))); plt.close(fig)

    xs, ys = _series(rows, "learned/rm_train_loss")
    if xs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(xs, ys, label="train"); ax.plot(*_series(rows, "learned/rm_val_loss"), label="held out")
        ax.set_xlabel("environment steps"); ax.set_ylabel("preference loss"); ax.legend(); ax.grid(alpha=.3)
        figs.append(("Reward-model loss", _png(fig))); plt.close(fig)
    return figs


def write_html(report: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    rows = read_metrics(out_dir)
    esc = html.escape
    table = []
    for run, name in (("learned", "learned reward (preferences)"), ("true", "true reward"),
                      ("random", "random policy")):
        if run in report:
            r = report[run]
            table.append(f"<tr><td>{esc(name)}</td><td>{r['return_mean']:.1f} ± {r['return_std']:.1f}</td>"
                         f"<td>{r.get('labels_used', '')}</td><td>{r.get('env_steps', '')}</td>"
                         f"<td>{r.get('wall_s', '')}</td></tr>")
    summary = ""
    if "normalised_score" in report:
        summary = (f"<p><b>Normalised score</b> (R<sub>learned</sub> − R<sub>random</sub>) / (R<sub>true</sub> − "
                   f"R<sub>random</sub>) = <b>{report['normalised_score']:.3f}</b>; return ratio (1 = parity; "
                   f"R<sub>true</sub>/R<sub>learned</sub> when returns are negative) = "
                   f"{report['return_ratio']:.3f}.</p>")
    imgs = "".join(f"<h2>{esc(t)}</h2><img src='data:image/png;base64,{b}'>" for t, b in figures(report, rows))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>heed control: {esc(report['env'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Preference-based RL on {esc(report['env'])}</h1>
<p>{esc(report['algo'].upper())}, {report['total_timesteps']} environment steps per agent; true return over
{len(report['random']['eval_returns'])} evaluation episodes with the same seeds for every agent.</p>
<table><tr><th>agent</th><th>true return</th><th>labels</th><th>env steps</th><th>wall s</th></tr>
{''.join(table)}</table>{summary}{imgs}
<p style="color:#777">Run in {report.get('wall_s', '?')} s. Every number is in report.json and metrics.jsonl.</p>
</body></html>"""
    path = out_dir / "report.html"
    atomic_write_text(path, doc)
    return path
