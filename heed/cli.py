"""The `heed` command: one subcommand per stage, each generated from its config dataclass.

Only the chosen stage's module is imported, so `heed --help` is instant and a
stage that needs an optional extra does not slow down the others.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from heed.utils import HeedError

# command words -> (module, config class, function, one-line summary)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("heed.demo", "DemoConfig", "run", "the whole pipeline on the embedded world, with a report"),
    "world make": ("heed.world.cli", "MakeConfig", "make", "write the embedded world (corpus, demos, prompts)"),
    "pretrain": ("heed.algos.pretrain", "PretrainConfig", "run", "train a tokenizer and a causal LM on a text corpus"),
    "sft": ("heed.algos.sft", "SFTConfig", "run", "supervised fine-tuning on (prompt, response) demonstrations"),
    "sample": ("heed.generate", "SampleConfig", "run", "batched sampling with a KV cache, to JSONL"),
    "eval": ("heed.evaluate", "EvalConfig", "run", "gold score, win rate and KL of a policy against a baseline"),
    "label oracle": ("heed.label_oracle", "OracleLabelConfig", "run", "label samples with the simulated labeler"),
    "label serve": ("heed.feedback.cli", "ServeConfig", "serve", "the web app where people label responses"),
    "label add": ("heed.feedback.cli", "AddConfig", "add", "add items to a running app's queue"),
    "label export": ("heed.feedback.cli", "ExportConfig", "export", "export answers as files `heed rm train` reads"),
    "label user add": ("heed.feedback.cli", "UserAddConfig", "user_add", "add an annotator, print their login token"),
    "rm train": ("heed.algos.reward", "RewardTrainConfig", "train", "train a reward model (or ensemble) on feedback"),
    "rm eval": ("heed.reward_metrics", "RewardEvalConfig", "evaluate", "accuracy and calibration of a reward model"),
    "rm score": ("heed.rules", "RewardScoreConfig", "score", "add a reward column to prompt/response rows"),
    "rm serve": ("heed.reward_server", "RewardServeConfig", "serve", "serve a reward model over HTTP, token required"),
    "ppo": ("heed.algos.ppo", "PPOConfig", "run", "PPO against a reward with a KL penalty to the reference"),
    "dpo": ("heed.algos.dpo", "DPOConfig", "run", "direct preference optimisation on pairs"),
    "filter": ("heed.filter", "FilterConfig", "filter_stage", "dedupe, drop over-long, keep best/worst per prompt"),
    "rebel": ("heed.algos.rebel", "REBELConfig", "run", "REBEL: regress reward gaps onto log-ratio gaps"),
    "grpo": ("heed.algos.grpo", "GRPOConfig", "run_grpo", "GRPO: group-normalised advantages, no critic"),
    "rloo": ("heed.algos.grpo", "RLOOConfig", "run_rloo", "RLOO: leave-one-out baselines, no critic"),
    "merge": ("heed.merge", "MergeConfig", "merge", "fold a LoRA run's adapter into its base: a plain model"),
    "control train": ("heed.control.train", "ControlTrainConfig", "train", "RL from preferences, Gymnasium agents"),
}


def available() -> dict[str, tuple[str, str, str, str]]:
    """The commands whose module is installed (a stage still being built is not listed)."""
    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    return {words: spec for words, spec in COMMANDS.items() if installed(spec[0])}


def _usage(group: str = "") -> str:
    """The commands (those starting with the words `group`, when given), one line each."""
    cmds = {w: spec for w, spec in available().items() if not group or w.startswith(group + " ")}
    lines = [f"usage: heed {group + ' ' if group else ''}COMMAND [options]   "
             "(heed COMMAND --help for its options)", "", "commands:"]
    width = max((len(w) for w in cmds), default=0)
    lines += [f"  {w:<{width}}  {spec[3]}" for w, spec in cmds.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = available()
    words = None
    for n in (3, 2, 1):
        if " ".join(argv[:n]) in cmds:
            words = " ".join(argv[:n])
            break
    if words is None:
        # `heed label --help`: the words so far name a group of commands
        group = next((" ".join(argv[:n]) for n in (2, 1) if argv[:n] and any(
            w.startswith(" ".join(argv[:n]) + " ") for w in cmds)), "")
        print(_usage(group))
        rest = argv[len(group.split()):]
        if not rest or rest[0] in ("-h", "--help"):
            return 0
        print(f"\nerror: unknown command {' '.join(argv[:len(group.split()) + 1])!r}", file=sys.stderr)
        return 2
    module_name, cls_name, fn_name, summary = cmds[words]
    module = importlib.import_module(module_name)
    cls, fn = getattr(module, cls_name), getattr(module, fn_name)

    from heed import config

    parser = argparse.ArgumentParser(prog=f"heed {words}", description=summary)
    config.add_arguments(parser, cls)
    ns = parser.parse_args(argv[len(words.split()):])
    try:
        cfg = config.from_namespace(cls, ns)
        fn(cfg)
    except HeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
