#!/usr/bin/env bash
# Batched decoding against llama.cpp, in one run: how much more a decode step of B sequences
# costs than a step of one, on the same GGUF file and the same 2 threads.
#
#   llama.cpp: `llama-batched-bench -npp P -ntg G -npl 1,4,8` (B sequences decoded side by side,
#              no sampling); its step time is T_TG / G.
#   linly-lora: `bench serve --clients 1,4,8 --max-tokens G`, whose server counts the wall time
#              of the forward passes that only decoded, per batch size (`/health`
#              `decode_steps`); its step time is that mean.
# The decode-only ratio is B · step(1) / step(B) on each side: the throughput gain of batching
# with prompts and request arrivals left out. Issue #22's serving targets (2.5× at 4 clients,
# 3.5× at 8) are whole-run ratios, which prompts lower further (BENCHMARKS.md).
#
# Needs llama-batched-bench (benches/build_llama_cpp.sh) in $LLAMA_BIN and the quantized folders
# that benches/llamacpp_quant_check.sh makes (runs/llamacpp-quant/smol-q4_0, smol-q8_0).
#
#   bash benches/batched_vs_llamacpp.sh             # q4_0 and q8_0, 3 alternations
#   TYPES=q4_0 REPS=5 bash benches/batched_vs_llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BIN=${LLAMA_BIN:-/work/llama.cpp-build/bin}
WORK=${WORK:-runs/llamacpp-quant}
TYPES=${TYPES:-q4_0 q8_0}
REPS=${REPS:-3}
THREADS=${THREADS:-2}
NPL=${NPL:-1,4,8}
NPP=${NPP:-24}
NTG=${NTG:-64}
LL=target/release/linly-lora
[ -x "$LLAMA_BIN/llama-batched-bench" ] || { echo "missing $LLAMA_BIN/llama-batched-bench: run benches/build_llama_cpp.sh" >&2; exit 1; }
[ -x "$LL" ] || { echo "missing $LL: run cargo build --release" >&2; exit 1; }
for f in $TYPES; do
  [ -f "$WORK/smol-$f/model.gguf" ] || { echo "missing $WORK/smol-$f/model.gguf: linly-lora quantize --model runs/quickstart/base --format $f --out $WORK/smol-$f" >&2; exit 1; }
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for rep in $(seq 1 "$REPS"); do
  for f in $TYPES; do
    # Alternated, so that a slow spell of the shared machine falls on both sides.
    "$LLAMA_BIN/llama-batched-bench" -m "$WORK/smol-$f/model.gguf" -c 4096 -b 512 -ub 512 \
      -npp "$NPP" -ntg "$NTG" -npl "$NPL" -t "$THREADS" --output-format jsonl \
      2>/dev/null | grep '^{' > "$OUT/llama-$f-$rep.jsonl"
    RAYON_NUM_THREADS=$THREADS "$LL" bench serve --model "$WORK/smol-$f" --clients "$NPL" \
      --max-tokens "$NTG" --requests 4 2>/dev/null | grep '^\[' > "$OUT/linly-$f-$rep.json"
  done
done
python3 - "$OUT" "$TYPES" "$REPS" "$NTG" <<'EOF'
import json, statistics, sys
out, types, reps, ntg = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
print("| type | B | llama.cpp step, ms | linly-lora step, ms | llama.cpp decode-only ratio | linly-lora decode-only ratio |")
print("| --- | --- | --- | --- | --- | --- |")
for f in types:
    llama, ours = {}, {}
    for rep in range(1, reps + 1):
        for line in open(f"{out}/llama-{f}-{rep}.jsonl"):
            r = json.loads(line)
            llama.setdefault(r["pl"], []).append(r["t_tg"] / r["tg"] * 1e3)
        for r in json.loads(open(f"{out}/linly-{f}-{rep}.json").read()):
            if r.get("decode_step_ms") is not None:
                ours.setdefault(r["clients"], []).append(r["decode_step_ms"])
    fmt = lambda v: " / ".join(f"{x:.2f}" for x in v)
    for b in sorted(llama):
        l, o = llama[b], ours.get(b, [])
        # Ratios per repetition (same run), then listed.
        lr = [b * l1 / lb for l1, lb in zip(llama[1], l)]
        orr = [b * o1 / ob for o1, ob in zip(ours.get(1, []), o)]
        print(f"| {f} | {b} | {fmt(l)} | {fmt(o)} | {fmt(lr) if b > 1 else '–'} | {fmt(orr) if b > 1 else '–'} |")
EOF
