"""`heed demo`: the whole RLHF pipeline on the embedded world, with a report.

 1. world     knowledge base, corpus, demonstrations, train and held-out prompts
 2. pretrain  tokenizer + tiny causal LM on the corpus
 3. sft       fine-tune on the demonstrations
 4. sample    several responses per training prompt from the SFT policy
 5. label     the simulated labeler compares them in pairs (noisy, like people)
 6. rm        reward model on those labels, normalised on SFT samples
 7. ppo       PPO against the reward model, KL-tethered to the SFT policy (and, with
              --algos, DPO on the labels and REBEL, GRPO, RLOO on the reward model)
 8. eval      base, SFT and every trained policy on held-out prompts, judged by the gold oracle
 9. report    DIR/report.json and DIR/report.html

Every stage writes its own directory under --out and is skipped when already
done, so a killed demo rerun with the same command picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from heed.algos.dpo import DPOConfig, run as dpo_run
from heed.algos.grpo import GRPOConfig, RLOOConfig, run_grpo
from heed.algos.ppo import PPOConfig, run as ppo_run
from heed.algos.pretrain import PretrainConfig, run as pretrain_run
from heed.algos.rebel import REBELConfig, run as rebel_run
from heed.algos.reward import RewardTrainConfig, train as rm_train
from heed.algos.sft import SFTConfig, run as sft_run
from heed.config import option
from heed.data import read_prompts, write_jsonl
from heed.evaluate import criteria_lost, gold_scores, kl_to, mean_se, summarize, win_rate
from heed.generate import generate
from heed.label_oracle import group_by_prompt, label
from heed.models import load_policy
from heed.report import render_html, training_plots
from heed.utils import HeedError, PeakMemory, atomic_write_text, read_metrics
from heed.world import SimulatedLabeler, write_world

ALGOS = ("ppo", "dpo", "rebel", "grpo", "rloo")


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "directory for every stage's output and the report")
    quick: bool = option(False, "tiny budgets everywhere: a smoke test of the whole pipeline in a couple of minutes")
    seed: int = option(0, "seed of the world and every stage")
    habits: str = option("demonstrators", "who wrote the world's demonstrations: 'demonstrators' (people with "
                                          "habits that feedback can fix) or 'none' (flawless: the control)",
                         choices=("demonstrators", "none"))
    preset: str = option("tiny", "model preset for the pretrained base")
    pretrain_steps: int = option(600, "pretraining steps")
    sft_epochs: float = option(6.0, "SFT passes over the demonstrations")
    samples_per_prompt: int = option(4, "SFT responses sampled per training prompt; the labeler compares them "
                                        "in pairs (1-2, 3-4, ...), skipping identical ones")
    label_budget: int = option(4000, "pairs labelled by the simulated labeler for the reward model")
    rm_epochs: float = option(3.0, "reward-model passes over the labels")
    rm_lr: float = option(3e-4, "reward-model learning rate")
    ppo_steps: int = option(60, "PPO iterations (64 prompts each)")
    ppo_lr: float = option(3e-5, "PPO learning rate")
    algos: list[str] = option(["ppo"], "policy optimisers to train from the same SFT model and labels: "
                                       "ppo, dpo, rebel, grpo, rloo")
    eval_prompts: int = option(600, "held-out prompts for the final evaluation")
    eval_split: str = option("heldout", "prompts to evaluate on: 'heldout' (the final evaluation) or 'valid' "
                                        "(validation groups, for tuning without looking at held-out prompts)",
                             choices=("heldout", "valid"))
    bf16: bool = option(False, "bf16 autocast in every training stage")


def train_algo(name: str, *, sft_dir, world_dir, labels_path, rm_dir, out_dir, seed: int = 0,
               quick: bool = False) -> Path:
    """Train `name` (dpo, rebel, grpo or rloo) at the default budgets into `out_dir`; return it.

    Every algorithm starts from the same SFT policy and sees the same human data: DPO trains
    on the labelled pairs directly; REBEL, GRPO and RLOO optimise the reward model trained
    on those same labels, on the world's training prompts, with the gold oracle logged as
    their monitor. `quick` is a smoke-test budget that runs in seconds. A directory that
    already holds a finished run is returned as it is, so a rerun of the demo resumes.
    """
    out = Path(out_dir)
    prompts = str(Path(world_dir) / "prompts_train.jsonl")
    common = dict(policy=str(sft_dir), out=str(out), seed=seed)
    online = dict(prompts=prompts, reward=[str(rm_dir)], monitor=["heed.rules:gold"], **common)
    if name == "dpo":
        cfg = DPOConfig(data=[str(labels_path)], **common)
        if quick:
            cfg.limit, cfg.epochs, cfg.batch_size, cfg.micro_batch_size = 64, 1.0, 16, 16
        dpo_run(cfg)
    elif name == "rebel":
        cfg = REBELConfig(**online)
        if quick:
            cfg.iterations, cfg.prompts_per_iteration, cfg.n, cfg.max_new_tokens = 2, 8, 2, 16
        rebel_run(cfg)
    elif name in ("grpo", "rloo"):
        cfg = (GRPOConfig if name == "grpo" else RLOOConfig)(**online)
        if quick:
            cfg.steps, cfg.prompts_per_iteration, cfg.n, cfg.max_new_tokens = 2, 4, 2, 16
            cfg.mini_batch_size = cfg.micro_batch_size = 8
        run_grpo(cfg)
    else:
        raise ValueError(f"unknown algorithm {name!r} (choose from dpo, rebel, grpo, rloo)")
    return out


def _quick(cfg: DemoConfig) -> DemoConfig:
    """The smoke-test budgets (`--quick`)."""
    return DemoConfig(out=cfg.out, quick=True, seed=cfg.seed, habits=cfg.habits, preset=cfg.preset,
                      pretrain_steps=20,
                      sft_epochs=1.0, samples_per_prompt=2, label_budget=120, rm_epochs=1.0, rm_lr=cfg.rm_lr,
                      ppo_steps=3, ppo_lr=cfg.ppo_lr, eval_prompts=40, eval_split=cfg.eval_split, algos=cfg.algos,
                      bf16=cfg.bf16)


class Stages:
    """Prints a numbered header per stage and records each stage's wall time."""

    def __init__(self, total: int):
        self.total, self.n, self.t0, self.walls = total, 0, time.time(), {}

    def start(self, name: str, what: str) -> float:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {name}: {what}  (t = {time.time() - self.t0:.0f}s)", flush=True)
        return time.time()

    def done(self, name: str, started: float) -> None:
        self.walls[name] = round(time.time() - started, 1)


def run(cfg: DemoConfig) -> dict:
    if cfg.eval_split not in ("heldout", "valid"):
        raise HeedError(f"--eval-split must be heldout or valid, got {cfg.eval_split!r}")
    unknown = [a for a in cfg.algos if a not in ALGOS]
    if unknown or not cfg.algos:
        raise HeedError(f"--algos: unknown {unknown} (choose from {', '.join(ALGOS)})")
    if cfg.samples_per_prompt < 2 or cfg.samples_per_prompt % 2:
        raise HeedError(f"--samples-per-prompt must be even and at least 2, got {cfg.samples_per_prompt}")
    if cfg.quick:
        cfg = _quick(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(8 + len(cfg.algos))
    common = dict(seed=cfg.seed, bf16=cfg.bf16)

    t = stages.start("world", "the embedded assistant world")
    world = out / "world"
    sizes = dict(n_corpus=1500, n_demos=120, n_train_prompts=300, n_heldout_prompts=100,
                 n_valid_prompts=50) if cfg.quick else {}
    if not (world / "prompts_heldout.jsonl").exists():
        write_world(world, cfg.seed, habits=cfg.habits, **sizes)
    stages.done("world", t)

    t = stages.start("pretrain", f"a {cfg.preset} causal LM on the corpus ({cfg.pretrain_steps} steps)")
    pretrain_run(PretrainConfig(corpus=str(world / "corpus.jsonl"), out=str(out / "base"), model=cfg.preset,
                                steps=cfg.pretrain_steps, eval_every=max(1, cfg.pretrain_steps // 5),
                                save_every=max(1, cfg.pretrain_steps // 5), **common))
    stages.done("pretrain", t)

    t = stages.start("sft", "supervised fine-tuning on the demonstrations")
    sft_run(SFTConfig(model=str(out / "base"), data=str(world / "demos.jsonl"), out=str(out / "sft"),
                      epochs=cfg.sft_epochs, **common))
    stages.done("sft", t)

    train_prompts = read_prompts(world / "prompts_train.jsonl")
    labels_path = out / "labels.jsonl"
    t = stages.start("sample", f"{cfg.samples_per_prompt} responses per training prompt from the SFT policy")
    samples_path = out / "samples.jsonl"
    if not samples_path.exists():
        sft, tok = load_policy(out / "sft")
        samples = generate(sft, tok, train_prompts, n=cfg.samples_per_prompt, max_new_tokens=48, seed=cfg.seed,
                           desc="sample")
        write_jsonl(samples_path, [{"prompt": s.prompt, "response": s.response, "finished": s.finished}
                                   for s in samples])
    stages.done("sample", t)

    t = stages.start("label", f"the simulated labeler compares up to {cfg.label_budget} pairs")
    if not labels_path.exists():
        rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
        groups = group_by_prompt([(r["prompt"], r["response"]) for r in rows])
        labelled, skipped = label(groups, "pairs", SimulatedLabeler(cfg.seed),
                                  budget=cfg.label_budget)
        write_jsonl(labels_path, labelled)
        print(f"labelled {len(labelled)} pairs ({skipped} identical pairs skipped)")
    n_labels = sum(1 for _ in labels_path.open())
    stages.done("label", t)

    t = stages.start("rm", "reward model on the labels")
    rm_result = rm_train(RewardTrainConfig(model=str(out / "sft"), data=[str(labels_path)], out=str(out / "rm"),
                                           epochs=cfg.rm_epochs, lr=cfg.rm_lr, norm_samples=64 if cfg.quick else 256,
                                           oracle="heed.rules:gold",
                                           **common))
    stages.done("rm", t)

    peaks: dict[str, float] = {}
    for algo in cfg.algos:
        what = f"PPO against the reward model ({cfg.ppo_steps} iterations)" if algo == "ppo" else \
            "on the labels" if algo == "dpo" else "against the reward model"
        t = stages.start(algo, what)
        with PeakMemory() as peak:
            if algo == "ppo":
                ppo_cfg = PPOConfig(policy=str(out / "sft"), prompts=str(world / "prompts_train.jsonl"),
                                    reward=[str(out / "rm")], out=str(out / "ppo"), steps=cfg.ppo_steps,
                                    lr=cfg.ppo_lr, monitor=["heed.rules:gold"], **common)
                if cfg.quick:
                    ppo_cfg.prompts_per_iteration, ppo_cfg.mini_batch_size, ppo_cfg.micro_batch_size = 16, 8, 8
                ppo_run(ppo_cfg)
            else:
                train_algo(algo, sft_dir=out / "sft", world_dir=world, labels_path=labels_path, rm_dir=out / "rm",
                           out_dir=out / algo, seed=cfg.seed, quick=cfg.quick)
        peaks[algo] = peak.peak_mib
        stages.done(algo, t)

    t = stages.start("eval", "every model on held-out prompts, judged by the gold oracle")
    heldout = read_prompts(world / f"prompts_{cfg.eval_split}.jsonl")[:cfg.eval_prompts]
    models = {name: load_policy(out / name) for name in ("base", "sft", *cfg.algos)}
    tok = models["sft"][1]
    samples, scores = {}, {}
    for name, (model, _) in models.items():
        samples[name] = generate(model, tok, heldout, max_new_tokens=48, temperature=1.0, seed=cfg.seed + 1,
                                 desc=f"eval {name}")
        scores[name] = gold_scores(heldout, [s.response for s in samples[name]])
    stage_stats = {name: summarize(samples[name], scores[name]) for name in models}
    lost = {name: criteria_lost(heldout, [s.response for s in samples[name]]) for name in models}
    win_rates = {}
    win_rates["sft_vs_base"], win_rates["sft_vs_base_se"] = win_rate(scores["sft"], scores["base"])
    for algo in cfg.algos:
        kl, kl_se = mean_se(kl_to(models["sft"][0], samples[algo], tok.pad_token_id))
        stage_stats[algo].update(kl_to_ref=kl, kl_to_ref_se=kl_se, wall_s=stages.walls[algo],
                                 peak_rss_mib=peaks[algo])
        win_rates[f"{algo}_vs_sft"], win_rates[f"{algo}_vs_sft_se"] = win_rate(scores[algo], scores["sft"])
    stage_stats["sft"].update(kl_to_ref=0.0, wall_s=stages.walls["sft"])
    stage_stats["base"].update(wall_s=stages.walls["pretrain"])
    stages.done("eval", t)

    t = stages.start("report", f"{out / 'report.json'} and {out / 'report.html'}")
    report = {
        "elapsed_s": round(time.time() - stages.t0, 1),
        "quick": cfg.quick,
        "stages": stage_stats,
        "win_rates": win_rates,
        "reward_model": {"n_labels": n_labels,
                         "heldout_accuracy_vs_gold": rm_result.get("gold_accuracy"),
                         "heldout_accuracy": rm_result.get("accuracy")},
        "eval": {"n_prompts": len(heldout), "split": cfg.eval_split, "temperature": 1.0},
        "criteria_lost": lost,
        "stage_seconds": stages.walls,
    }
    examples = [{"prompt": p, "models": list(models),
                 **{k: samples[k][i].response for k in models}, **{f"{k}_score": scores[k][i] for k in models}}
                for i, p in enumerate(heldout[:12])]
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    plots = [p for algo in cfg.algos for p in training_plots(read_metrics(out / algo), algo)]
    atomic_write_text(out / "report.html", render_html(report, plots, examples))
    print("\nheld-out gold score: " + ", ".join(f"{k} {v['gold_mean']:.3f}" for k, v in stage_stats.items())
          + f" (over {len(heldout)} prompts)")
    print("win rates: " + ", ".join(f"{k} {v:.3f} ± {win_rates[k + '_se']:.3f}" for k, v in win_rates.items()
                                    if not k.endswith("_se")))
    print(f"done in {report['elapsed_s']:.0f}s: {out / 'report.html'}")
    return report
