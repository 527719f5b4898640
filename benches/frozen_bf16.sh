#!/usr/bin/env bash
# The quickstart's training step with `[train] frozen_products = "bf16"` (or MODE=int8) against
# the f32 products, measured in the same run: a recipe of the quickstart's shape (LoRA r 8 on all
# projections, the new rows of the tied table, news rows with chain_distill, seq 256 x 2) on
# the quickstart's resized model, STEPS steps, trained ROUNDS times each way, alternated.
# Prints each run's median `step_s` over the steps after the second (the chain teacher's time
# is outside `step_s` and the same either way), the median ratio f32 / bf16, and each run's
# losses (close over the first steps; the runs drift apart after, as runs of different
# rounding do).
#
# Needs runs/quickstart (`bash examples/quickstart.sh`, or PREPARE_ONLY=1 with it) and, for
# bf16, a CPU with AVX512-BF16.   usage: [MODE=bf16|int8] [STEPS=8] [ROUNDS=3] bash benches/frozen_bf16.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/linly-lora}
Q=$(realpath "${Q:-runs/quickstart}")
STEPS=${STEPS:-8}
ROUNDS=${ROUNDS:-3}
MODE=${MODE:-bf16}
[[ "$MODE" == bf16 || "$MODE" == int8 ]] || { echo "frozen_bf16: MODE=$MODE must be bf16 or int8" >&2; exit 1; }
for f in "$BIN" "$Q/resized/config.json" "$Q/tokenizer/vocab_extension.json" "$Q/data/zh_news.txt"; do
  [ -e "$f" ] || { echo "frozen_bf16: $f is missing; build with cargo build --release and run examples/quickstart.sh first" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for mode in f32 $MODE; do
  cat >"$tmp/$mode.toml" <<EOF
[model]
path = "$Q/resized"
[vocab]
extension = "$Q/tokenizer/vocab_extension.json"
[lora]
r = 8
alpha = 16
[trainable]
embed_tokens = "new_rows"
lm_head = "new_rows"
[[data]]
kind = "text"
path = "$Q/data/zh_news.txt"
lang = "zh"
chain_distill = 3.0
[train]
seq_len = 256
batch_size = 2
steps = $STEPS
lr = 2e-3
weight_decay = 0.0
frozen_products = "$mode"
[output]
dir = "$tmp/out-$mode"
save_every = 100000
plots = false
EOF
done
for round in $(seq "$ROUNDS"); do
  for mode in f32 $MODE; do
    rm -rf "$tmp/out-$mode"
    "$BIN" train "$tmp/$mode.toml" >"$tmp/log-$mode" 2>&1 || { cat "$tmp/log-$mode" >&2; exit 1; }
    python3 - "$tmp/out-$mode/metrics.jsonl" "$mode" "$round" >>"$tmp/results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"step_s"' in l]
s = statistics.median(r["step_s"] for r in rows[2:])
print(sys.argv[2], sys.argv[3], f"{s:.3f}", " ".join(f"{r['loss']:.4f}" for r in rows))
EOF
    tail -1 "$tmp/results"
  done
done
python3 - "$tmp/results" "$MODE" <<'EOF'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1])]
mode = sys.argv[2]
f32 = [float(r[2]) for r in runs if r[0] == "f32"]
other = [float(r[2]) for r in runs if r[0] == mode]
ratios = [a / b for a, b in zip(f32, other)]
print(f"student step, median s: f32 {statistics.median(f32):.3f}, {mode} {statistics.median(other):.3f}; "
      f"f32/{mode} per round {' '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f}x")
EOF
