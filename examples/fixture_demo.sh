#!/usr/bin/env bash
# The pipeline in about a minute on the bundled reference model, with no network (the real
# quickstart, examples/quickstart.sh, teaches SmolLM2 Chinese in about 30 minutes).
#
# It runs on the bundled reference model (tests/fixtures/tiny_llama, produced by HF
# transformers + PEFT): it scores token ids, decodes greedily with the KV cache and checks the
# continuation against the reference, then does the main job in miniature — resize the
# vocabulary, train LoRA + embedding/head from recipes/tiny-cpu.toml, merge, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=./target/release/linly-lora
FIX=tests/fixtures/tiny_llama

echo "== eval: base model on the reference ids"
$BIN eval --model $FIX/base --ids $FIX/expected.safetensors

echo
echo "== generate: greedy, 16 new tokens from the merged model"
OUT=$($BIN generate --model $FIX/merged --prompt-ids 1,82,247,209,68,340,51,84 --greedy --max-new-tokens 16 --print-ids)
echo "$OUT"
WANT="generated_ids: 68,359,359,359,359,359,359,359,359,359,359,359,359,359,359,359"
if grep -q "$WANT" <<<"$OUT"; then
  echo "matches the HF transformers reference (greedy_output)"
else
  echo "MISMATCH with the HF reference: expected $WANT" >&2
  exit 1
fi

echo
echo "== train: recipes/tiny-cpu.toml (vocabulary 320 -> 384, LoRA + embed/lm_head, 20 steps)"
rm -rf runs/tiny-cpu
$BIN train recipes/tiny-cpu.toml --quiet | grep -E '"(first_loss|last_loss|packing_efficiency|adapter_dir)"'

echo
echo "== merge the trained adapter and score the merged model"
$BIN merge --base $FIX/base --adapter runs/tiny-cpu/adapter --out runs/tiny-cpu/merged
$BIN eval --model runs/tiny-cpu/merged --ids $FIX/expected.safetensors
echo "(metrics: runs/tiny-cpu/metrics.jsonl, plots: runs/tiny-cpu/loss.png, loss_scale.png)"

echo
echo "== bench: SmolLM2-135M shape, random weights"
$BIN bench forward --shape smollm2-135m --prompt 128 --decode 32 --reps 2
