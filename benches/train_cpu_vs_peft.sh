#!/usr/bin/env bash
# CPU training speed and peak memory against PyTorch + PEFT, the two alternating in one session
# so that both see the same machine (issue #5). The workload: LoRA r 8 on all seven projections
# + trainable tied embedding/LM head, AdamW, fp32, batch 4 x seq 256, 2 threads, SmolLM2-135M's
# shape with random weights (`linly-lora bench train` and benches/peft_train_cpu.py).
#
# usage: PYTHON=/path/to/venv/bin/python [ROUNDS=3] [WARMUP=1] [STEPS=3] bash benches/train_cpu_vs_peft.sh
# The venv needs torch, transformers and peft (`pip install torch transformers peft`); this
# script installs nothing. Each round prints both figures and the ratio; read the ratios of
# rounds run on a quiet machine (the load average is printed with each round).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
STEPS=${STEPS:-3}
export RAYON_NUM_THREADS=2
"$PY" -c "import torch, transformers, peft" || { echo "PYTHON=$PY lacks torch/transformers/peft: pip install torch transformers peft in a venv and pass PYTHON=" >&2; exit 2; }
cargo build --release --quiet
BIN=target/release/linly-lora
ours() { "$BIN" bench train --shape smollm2-135m --warmup "$WARMUP" --steps "$STEPS"; }
peer() { "$PY" benches/peft_train_cpu.py "$WARMUP" "$STEPS"; }
for r in $(seq 1 "$ROUNDS"); do
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  # Alternate who goes first, so neither always runs on the warmer (or busier) machine.
  if (( r % 2 )); then o=$(ours); p=$(peer); else p=$(peer); o=$(ours); fi
  python3 - "$r" "$load" "$o" "$p" <<'PYEOF'
import json, sys
r, load, o, p = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"round {r} (load {load}): linly-lora {o['tokens_per_s']:.1f} tok/s, {o['peak_rss_mib']:.0f} MiB | "
      f"PyTorch+PEFT {p['tokens_per_s']:.1f} tok/s, {p['peak_rss_mib']:.0f} MiB "
      f"(fwd {p['forward_s']:.2f} s, bwd {p['backward_s']:.2f} s, opt {p['optimizer_s']:.2f} s) | "
      f"speed ratio {o['tokens_per_s'] / p['tokens_per_s']:.2f}x, RSS ratio {o['peak_rss_mib'] / p['peak_rss_mib']:.2f}x", flush=True)
PYEOF
done
