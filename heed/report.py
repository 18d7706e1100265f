"""The demo's report: one self-contained HTML file (plots embedded as PNG) beside report.json."""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def training_plots(metrics: Sequence[dict], algo: str = "ppo") -> list[tuple[str, str]]:
    """(title, PNG data URI) for reward and gold against iterations, KL against iterations,
    and proxy reward against gold as KL grows (over-optimisation shows as the two parting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics or not any("reward/score" in m for m in metrics):
        return []
    steps = [m["step"] for m in metrics]
    plots = []
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(steps, [m.get("reward/score", float("nan")) for m in metrics], label="proxy reward (normalised)")
    if any("monitor/score" in m for m in metrics):
        ax.plot(steps, [m.get("monitor/score", float("nan")) for m in metrics],
                label="gold score (not seen in training)")
    ax.set_xlabel(f"{algo} iteration")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"{algo}: reward and gold score of rollouts")
    plots.append((f"{algo}: reward and gold score", _png(fig)))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(steps, [m.get("objective/kl", float("nan")) for m in metrics], color="tab:red", label="KL to reference")
    ax.set_xlabel(f"{algo} iteration")
    ax.set_ylabel("nats per response")
    if any("objective/kl_coef" in m for m in metrics):
        ax2 = ax.twinx()
        ax2.plot(steps, [m.get("objective/kl_coef", float("nan")) for m in metrics], color="tab:gray",
                 linestyle="--", label="KL coefficient")
        ax2.set_ylabel("KL coefficient")
    ax.grid(alpha=0.3)
    ax.set_title(f"{algo}: KL to the reference")
    plots.append((f"{algo}: KL", _png(fig)))

    if any("monitor/score" in m for m in metrics):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        kl = [m.get("objective/kl", float("nan")) for m in metrics]
        ax.scatter(kl, [m.get("reward/score") for m in metrics], s=12, label="proxy reward")
        ax.scatter(kl, [m.get("monitor/score") for m in metrics], s=12, label="gold score")
        ax.set_xlabel("KL to reference (nats)")
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_title(f"{algo}: proxy and gold as KL grows")
        plots.append((f"{algo}: over-optimisation", _png(fig)))
    return plots


def render_html(report: dict, plots: list[tuple[str, str]], examples: list[dict]) -> str:
    esc = html.escape
    stage_rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        f"<td>{s.get('gold_mean', float('nan')):.3f} ± {s.get('gold_se', float('nan')):.3f}</td>"
        f"<td>{_fmt(report['win_rates'].get(f'{name}_vs_sft'))}</td><td>{_fmt(s.get('kl_to_ref'))}</td>"
        f"<td>{_fmt(s.get('length_mean'), 1)}</td><td>{_fmt(s.get('wall_s'), 0)}</td>"
        f"<td>{_fmt(s.get('peak_rss_mib'), 0)}</td></tr>"
        for name, s in report["stages"].items())
    rm = report.get("reward_model", {})
    example_rows = "".join(
        "<tr><td>" + esc(str(e["prompt"])) + "</td>" + "".join(
            f"<td><pre>{esc(e[k])}</pre><span class=s>{e[k + '_score']:.2f}</span></td>" for k in e["models"])
        + "</tr>" for e in examples)
    header = "".join(f"<th>{esc(k)}</th>" for k in (examples[0]["models"] if examples else []))
    split = "validation" if report["eval"].get("split") == "valid" else "held-out"
    criteria_table = _criteria_table(report.get("criteria_lost") or {}, report["eval"]["n_prompts"], split)
    images = "".join(f"<figure><img src='{uri}' alt='{esc(t)}'><figcaption>{esc(t)}</figcaption></figure>"
                     for t, uri in plots)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>heed demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}}
pre{{white-space:pre-wrap;margin:0;font-family:inherit}}.s{{color:#666;font-size:85%}}\
figure{{display:inline-block;margin:0.5em}}
img{{max-width:520px}}</style></head><body>
<h1>heed demo report</h1>
<p>The whole RLHF pipeline on the embedded world in {report['elapsed_s']:.0f} s. Gold scores come from the
world's oracle, which no trainer sees; win rates are judged by it on {report['eval']['n_prompts']} {split}
prompts (ties count half), sampling at temperature {report['eval']['temperature']}.</p>
<h2>Policies</h2>
<table><tr><th>model</th><th>gold score</th><th>win rate vs SFT</th><th>KL to reference</th>\
<th>length</th><th>wall s</th><th>peak MiB</th></tr>
{stage_rows}</table>
<p>Win rate of SFT over the pretrained base: {_fmt(report['win_rates'].get('sft_vs_base'))}.
Reward model: {rm.get('n_labels', '?')} simulated labels; held-out accuracy against the gold oracle's
noiseless preference {_fmt(rm.get('heldout_accuracy_vs_gold'))}.</p>
{criteria_table}<h2>Training curves</h2>{images}
<h2>Sample responses (same {split} prompts)</h2>
<table><tr><th>prompt</th>{header}</tr>{example_rows}</table>
</body></html>"""


def _criteria_table(lost: dict, n_prompts, split: str = "held-out") -> str:
    """report["criteria_lost"] (model -> criterion -> share) as a table; "" when the report has none."""
    if not lost:
        return ""
    esc = html.escape
    criteria = list(dict.fromkeys(c for shares in lost.values() for c in shares))
    header = "".join(f"<th>{esc(c)}</th>" for c in criteria)
    rows = "".join(f"<tr><td>{esc(model)}</td>" + "".join(f"<td>{_pct(shares.get(c))}</td>" for c in criteria)
                   + "</tr>" for model, shares in lost.items())
    return (f"<h2>What feedback changed: share of {split} responses losing points, per criterion of the "
            f"gold oracle</h2>\n<p>A response loses points on a criterion when it earns less than the "
            f"criterion's full weight; over the same {esc(str(n_prompts))} {split} prompts.</p>\n"
            f"<table><tr><th>model</th>{header}</tr>{rows}</table>\n")


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"
