#!/usr/bin/env bash
# The fp16 loss-scaler experiment at the quickstart's real scale, on a GPU: SmolLM2-135M with the
# quickstart's 16.6k new rows, real Chinese/English text, LoRA r 64 + the new table rows, seq 512
# x batch 16 (the regime `linly-lora bench scaler` cannot reach on a CPU). Runs every
# (init, scaler) pair of INITS x {naive, linly}, all at once on the one GPU, and prints a table.
#
#   BIN=target/tch/linly-lora-gpu STEPS=300 BATCH=16 INITS="random subtoken-mean" bash benches/scaler_gpu.sh
#
# naive = GradScaler semantics (halve on every overflow, double after growth_interval clean
# steps, no floor, new rows in fp16); linly = the built-in scaler (new rows in f32, group-aware,
# floored). Needs what examples/quickstart.sh prepares (runs/quickstart/{base,data,tokenizer}).
# RANDOM_STD (default 1.0) is the std of the `random` rows: N(0,1) rows are the
# LLama2-chat-13B-Chinese failure. Output: runs/scaler-gpu/<init>-<scaler>/ and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/tch/linly-lora-gpu}
STEPS=${STEPS:-300}
INITS=${INITS:-random mean subtoken-mean}
RANDOM_STD=${RANDOM_STD:-1.0}
GROWTH=${GROWTH:-50}
BATCH=${BATCH:-16}
SCALERS=${SCALERS:-naive linly}
W=runs/scaler-gpu
SRC=recipes/quickstart-smollm2-gpu.toml
mkdir -p $W
# The per-run recipes live in recipes/ (their relative paths); never leave them behind.
trap 'rm -f recipes/.scaler-gpu-*.toml' EXIT
pids=()
for init in $INITS; do
  for scaler in $SCALERS; do
    name=$init-$scaler
    rm -rf "${W:?}/$name"
    f32rows=$([ $scaler = linly ] && echo true || echo false)
    # The recipe's relative paths are relative to its folder: keep it in recipes/.
    r=recipes/.scaler-gpu-$name.toml
    sed -e "s/^steps = .*/steps = $STEPS/" -e "s/^batch_size = .*/batch_size = $BATCH/" -e "s#^init = .*#init = \"$init\"\ninit_std = $RANDOM_STD#" \
        -e "s#\.\./runs/quickstart-gpu/train#../$W/$name#" -e 's/^eval_every = .*/eval_every = 0/' \
        -e "s/^save_every = .*/save_every = 100000/" \
        -e "s/^dtype = .*/dtype = \"fp16\"\nscaler = \"$scaler\"\ngrowth_interval = $GROWTH\nnew_rows_f32 = $f32rows/" \
        -e '/^\[\[eval\]\]/,/^path/d' $SRC >$r
    ( $BIN train $r >$W/$name.log 2>&1; echo "exit $?" >>$W/$name.log ) &
    pids+=($!)
  done
done
wait "${pids[@]}"
python3 - $W $INITS <<'PY'
import json, os, sys
w, inits = sys.argv[1], sys.argv[2:]
rows = ["| init | scaler | loss (first 10) | loss (last 10) | skipped | non-finite loss | lowest scale | final scale | log2 scale every 25 steps |", "|---|---|---|---|---|---|---|---|---|"]
for init in inits:
    for sc in ("naive", "linly"):
        f = os.path.join(w, f"{init}-{sc}", "metrics.jsonl")
        if not os.path.exists(f):
            rows.append(f"| {init} | {sc} | (no metrics: see {w}/{init}-{sc}.log) |||||||"); continue
        ms = [json.loads(l) for l in open(f) if '"loss"' in l]
        ms = [m for m in ms if "loss" in m]
        import math
        fin = lambda xs: [x for x in xs if x is not None and math.isfinite(x)]
        mean = lambda xs: sum(fin(xs)) / max(1, len(fin(xs)))
        loss = [m["loss"] for m in ms]
        sc_ = [m["loss_scale"] for m in ms]
        traj = " ".join(f"{math.log2(max(s, 1e-30)):.0f}" for s in sc_[::25])
        rows.append(f"| {init} | {sc} | {mean(loss[:10]):.3f} | {mean(loss[-10:]):.3f} | {sum(bool(m.get('skipped')) for m in ms)} | "
                    f"{sum(1 for x in loss if x is None or not math.isfinite(x))} | 2^{math.log2(max(min(sc_), 1e-30)):.0f} | 2^{math.log2(max(sc_[-1], 1e-30)):.0f} | {traj} |")
open(os.path.join(w, "summary.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
