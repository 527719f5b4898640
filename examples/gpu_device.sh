#!/usr/bin/env bash
# On a device machine, the last call after examples/gpu_pack.sh's parts: unpack, run issue
# #18's GPU quickstart (examples/quickstart_gpu.sh), and leave in $OUT what comes back (at
# most 8 files of 16 MiB): log.txt, report.json, results.tar.xz (metrics, evaluations,
# vocabulary statistics) and the trained adapter packed to f16 in pieces (adapter.tar.NN).
#
#   TRAIN_MINUTES=7.5 bash examples/gpu_device.sh
#   INIT_FROM=runs/gpu-init TRAIN_MINUTES=7.5 bash examples/gpu_device.sh   # continue the packed adapter
#
# A call may run 10 minutes. The training takes TRAIN_MINUTES (`[train] minutes`: the run plans
# its steps from its own rate, re-planned every step, so it ends within a step of the budget).
# On an H200 the rest took ~75 s when a 12-step probe sized the run (import 2 s, resize and
# statistics, the probe 27 s, merge, fifteen evaluations, packing), so ~50 s without it:
# TRAIN_MINUTES=7.5 should end near 500 s, leaving 100 s of the call's 600 in reserve.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
bash examples/gpu_unpack.sh
[ -x runs/gpu-bin/linly-lora-gpu ] || { echo "gpu_device: parts are missing (see the counts above)" >&2; exit 1; }
BIN=runs/gpu-bin/linly-lora-gpu
G=runs/quickstart-gpu
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true) | tee "$OUT/log.txt"
set +e
BIN=$BIN TRAIN_MINUTES=${TRAIN_MINUTES:-5} bash examples/quickstart_gpu.sh 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
set -e
[ -f $G/report.json ] && cp $G/report.json "$OUT/"
files=$(cd $G && ls -d vocab_stats.json eval_*.json valid_*.json train/metrics.jsonl train/report.json train/*.png 2>/dev/null || true)
[ -n "$files" ] && tar -C $G -cJf "$OUT/results.tar.xz" $files
if [ -d $G/train/adapter ]; then
  $BIN adapter pack --adapter $G/train/adapter --out $G/adapter-f16 --dtype f16 --force
  tar -C $G -cf - adapter-f16 | split -b 16000k -d -a 2 - "$OUT/adapter.tar."
fi
ls -la "$OUT"
exit "$rc"
