#!/usr/bin/env bash
# Everything a device session needs, made on this machine (which reaches the registries), then
# packed for the device calls: the quickstart's model, data and vocabulary, the GPU recipe's
# extra data, the libtorch build, and by default the shipped adapter to continue.
#
#   bash examples/gpu_prepare.sh                  # continue adapters/smollm2-135m-zh
#   INIT_FROM= bash examples/gpu_prepare.sh       # a fresh run instead
#
# Then make the device calls it prints, back to back. Issue #18's long run needs more tokens
# than one session's device time holds (BENCHMARKS.md, "The GPU run shipped, at rank 16"), so
# each session continues the last one's adapter; ship the result when validation improves.
# Takes ~20 min on a fresh 2-core machine (release build, torch download, libtorch build),
# ~5 min when they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
INIT_FROM=${INIT_FROM-adapters/smollm2-135m-zh}
PREPARE_ONLY=1 bash examples/quickstart.sh
command -v apt-get >/dev/null && { apt-get update -qq >/dev/null 2>&1 || true; }
bash examples/gpu_data.sh
bash scripts/setup-libtorch.sh
# The shipped adapter is most of the tracked tree, and a device call carries the tree beside its
# part: set aside while the calls run, it leaves 3 calls instead of 8 (it travels in the bundle
# when it is INIT_FROM). `git checkout adapters` brings it back.
ASIDE=runs/adapters-aside
if [ -d adapters/smollm2-135m-zh ]; then
  rm -rf $ASIDE && mkdir -p $ASIDE && mv adapters/smollm2-135m-zh $ASIDE/
  echo "gpu_prepare: adapters/smollm2-135m-zh is set aside in $ASIDE for the calls; after them (or if this fails): git checkout adapters"
fi
if [ "$INIT_FROM" = adapters/smollm2-135m-zh ]; then
  INIT_FROM=$ASIDE/smollm2-135m-zh
fi
if [ -n "$INIT_FROM" ]; then
  cmp -s "$INIT_FROM/vocab_extension.json" runs/quickstart/tokenizer/vocab_extension.json \
    || { echo "gpu_prepare: $INIT_FROM is not an adapter of the vocabulary extension that vocab extend made here (runs/quickstart/tokenizer); git checkout adapters" >&2; exit 1; }
fi
INIT_FROM=$INIT_FROM BIN_SRC=target/tch/release/linly-lora bash examples/gpu_pack.sh
