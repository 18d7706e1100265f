#!/usr/bin/env bash
# Reward-model accuracy against the gold oracle, on the embedded world (issue 3's measurement).
#
#   bash bench/rm_accuracy.sh [DEMO_DIR] [OUT_DIR]     # defaults: runs/demo, runs/rm_accuracy
#
# Needs a finished `heed demo` in DEMO_DIR (its world and SFT policy). Samples 32
# responses per training prompt from the SFT policy (64,000 samples), lets the
# simulated labeler compare them in pairs (identical pairs skipped), trains a reward
# model on every label, and evaluates it on pairs sampled the same way from the
# world's held-out prompts, labelled by a labeler with another seed. `heed rm eval`
# prints accuracy against the labels and against the gold oracle's preference.
set -euo pipefail
demo=${1:-runs/demo}
out=${2:-runs/rm_accuracy}
mkdir -p "$out"
# each step is skipped when its output exists, so a killed run picks up where it stopped
# (heed rm train resumes from its own checkpoint)
[ -s "$out/train_samples.jsonl" ] || heed sample --model "$demo/sft" --prompts "$demo/world/prompts_train.jsonl" \
    --n 32 --seed 3 --out "$out/train_samples.jsonl"
[ -s "$out/train_pairs.jsonl" ] || heed label oracle --samples "$out/train_samples.jsonl" --kind pairs \
    --out "$out/train_pairs.jsonl"
heed rm train --model "$demo/sft" --data "$out/train_pairs.jsonl" --out "$out/rm" --epochs 3 --lr 3e-4 --oracle heed.rules:gold
[ -s "$out/heldout_samples.jsonl" ] || heed sample --model "$demo/sft" --prompts "$demo/world/prompts_heldout.jsonl" \
    --n 4 --seed 5 --out "$out/heldout_samples.jsonl"
[ -s "$out/heldout_pairs.jsonl" ] || heed label oracle --samples "$out/heldout_samples.jsonl" --kind pairs --seed 1 \
    --out "$out/heldout_pairs.jsonl"
heed rm eval --model "$out/rm" --data "$out/heldout_pairs.jsonl" --oracle heed.rules:gold --out "$out/heldout_eval.json"
