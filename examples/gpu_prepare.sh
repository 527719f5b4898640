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
if [ -n "$INIT_FROM" ] && ! cmp -s "$INIT_FROM/vocab_extension.json" runs/quickstart/tokenizer/vocab_extension.json; then
  # A continued run reads text as its adapter was trained to: the shipped adapter's extension
  # (16,000 pieces with pairs) is not the one the quickstart makes since 2026-12-05 (28,000
  # without pairs), so its own tokenizer files replace the quickstart's for the device run.
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab_extension.json; do
    [ -f "$INIT_FROM/$f" ] || { echo "gpu_prepare: $INIT_FROM has no $f, so its vocabulary is unknown; git checkout adapters, or INIT_FROM= for a fresh run" >&2; exit 1; }
  done
  cp "$INIT_FROM"/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab_extension.json} runs/quickstart/tokenizer/
  echo "gpu_prepare: runs/quickstart/tokenizer now holds $INIT_FROM's own vocabulary extension (the run continues it); PREPARE_ONLY=1 bash examples/quickstart.sh makes the quickstart's again"
fi
INIT_FROM=$INIT_FROM BIN_SRC=target/tch/release/linly-lora bash examples/gpu_pack.sh
