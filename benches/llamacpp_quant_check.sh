#!/usr/bin/env bash
# Checks linly-lora's GGUF export and quantized inference against llama.cpp, in one run:
#
#  (a) SmolLM2-135M quantized by `linly-lora quantize` (q8_0, q4_0, q4_k) and a vocabulary-extended
#      SmolLM2 (+2,000 jieba pieces, `vocab extend` + `vocab resize`, q8_0): the folder's model.gguf
#      runs in llama.cpp's `llama-simple`, and its greedy continuation equals `linly-lora generate`
#      on the same folder; prompt tokenization equals `llama-tokenize`'s. The f16 export of the
#      extended model is checked the same way against the f32 folder's tokenizer.
#  (b) Speed at 2 threads: `llama-bench -t 2 -p 128 -n 64` vs `linly-lora bench quant` (pp128 /
#      tg64, same file, interleaved), with the ratios.
#
# Needs llama.cpp binaries (benches/build_llama_cpp.sh builds them from the llama-cpp-python
# sdist) in $LLAMA_BIN (default /work/llama.cpp-build/bin) and the SmolLM2 folder in $SMOL
# (default /work/assets/smollm2-base). Output: a markdown report on stdout, raw JSON in $WORK.
#
#   bash benches/llamacpp_quant_check.sh            # everything
#   SKIP_SPEED=1 bash benches/llamacpp_quant_check.sh      # (a) only
#   SKIP_CHECK=1 THREADS=1 bash benches/llamacpp_quant_check.sh   # (b) only, one thread
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BIN=${LLAMA_BIN:-/work/llama.cpp-build/bin}
SMOL=${SMOL:-/work/assets/smollm2-base}
WORK=${WORK:-runs/llamacpp-quant}
THREADS=${THREADS:-2}
REPS=${REPS:-3}
NGEN=${NGEN:-32}
LL=target/release/linly-lora
for b in llama-simple llama-tokenize llama-bench; do
  [ -x "$LLAMA_BIN/$b" ] || { echo "missing $LLAMA_BIN/$b: run benches/build_llama_cpp.sh" >&2; exit 1; }
done
[ -d "$SMOL" ] || { echo "missing $SMOL (SmolLM2-135M HF folder)" >&2; exit 1; }
nice -n 19 cargo build --release --quiet
mkdir -p "$WORK"

# --- models -------------------------------------------------------------------------------
quant() { # quant SRC FORMAT OUT
  [ -f "$3/model.gguf" ] || $LL quantize --model "$1" --format "$2" --out "$3" >&2
}
for f in q8_0 q4_0 q4_k; do quant "$SMOL" $f "$WORK/smol-$f"; done
if [ ! -d "$WORK/smol-ext" ]; then
  rm -rf "$WORK/ext-tok"
  $LL vocab extend --tokenizer "$SMOL" --wordlist tests/fixtures/zh/jieba_dict.txt --max-new 2000 --out "$WORK/ext-tok" >&2
  $LL vocab resize --model "$SMOL" --extension "$WORK/ext-tok/vocab_extension.json" --out "$WORK/smol-ext" >&2
fi
quant "$WORK/smol-ext" q8_0 "$WORK/smol-ext-q8_0"
[ -f "$WORK/smol-ext-f16.gguf" ] || $LL export gguf --model "$WORK/smol-ext" --type f16 --out "$WORK/smol-ext-f16.gguf" >&2

# --- (a) tokens and greedy text -------------------------------------------------------------
EN="The capital of France is"
ZH="我们在北京学习汉语，因为"
llama_ids() { "$LLAMA_BIN/llama-tokenize" -m "$1" -p "$2" --ids --log-disable 2>/dev/null | tail -1 | tr -d '[] '; }
ours_ids() { $LL vocab encode --tokenizer "$1" --text "$2" | sed -n 's/^ids: *\[\(.*\)\]/\1/p' | tr -d ' '; }
llama_text() { "$LLAMA_BIN/llama-simple" -m "$1" -n "$NGEN" "$2" 2>/dev/null; }
ours_text() { $LL generate --model "$1" --prompt "$2" --max-new-tokens "$NGEN" --greedy 2>/dev/null; }

# Set before the check so that a speed-only run (SKIP_CHECK=1) can still read them at the end.
fail=0
diverged=0
if [ -z "${SKIP_CHECK:-}" ]; then
echo "## llama.cpp check: tokens and greedy continuations"
echo
echo "| model | prompt | prompt tokens (llama-tokenize = ours) | greedy $NGEN tokens (llama-simple = linly-lora) |"
echo "| --- | --- | --- | --- |"
check() { # check LABEL DIR GGUF PROMPT [GEN]
  local a b ta tb tok gen
  a=$(llama_ids "$3" "$4"); b=$(ours_ids "$2" "$4")
  if [ "$a" = "$b" ]; then tok="equal ($(echo "$a" | tr ',' '\n' | wc -l) ids)"; else tok="DIFFERENT: $a vs $b"; fail=1; fi
  gen="-"
  if [ "${5:-1}" = 1 ]; then
    # llama-simple prints the bytes of a character cut by the token limit; linly-lora holds them back.
    ta=$(llama_text "$3" "$4" | python3 -c 'import sys; print(sys.stdin.buffer.read().decode("utf-8", "ignore").replace("\n", " ").rstrip())')
    tb=$(ours_text "$2" "$4" | python3 -c 'import sys; print(sys.stdin.read().replace("\n", " ").rstrip())')
    printf '%s\n%s\n' "$ta" "$tb" > "$WORK/greedy-$1-$(echo "$4" | md5sum | cut -c1-6).txt"
    if [ "$ta" = "$tb" ]; then
      gen="equal: \`${ta:0:70}…\`"
    else
      # Where the two continuations part: llama-simple keeps its KV cache in f16 (linly-lora in
      # f32) and sums in another order, which can flip a near-tie.
      gen=$(python3 -c 'import sys; a,b,p=sys.argv[1],sys.argv[2],len(sys.argv[3]); n=next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), min(len(a),len(b))); print(f"same for {n-p} of {len(a)-p} generated chars, then `{a[n:n+12]}` vs `{b[n:n+12]}`")' "$ta" "$tb" "$4")
      diverged=1
    fi
  fi
  echo "| $1 | $4 | $tok | $gen |"
}
for f in q8_0 q4_0 q4_k; do
  check "SmolLM2 $f" "$WORK/smol-$f" "$WORK/smol-$f/model.gguf" "$EN"
done
check "SmolLM2 q8_0" "$WORK/smol-q8_0" "$WORK/smol-q8_0/model.gguf" "$ZH"
check "SmolLM2+2k zh q8_0" "$WORK/smol-ext-q8_0" "$WORK/smol-ext-q8_0/model.gguf" "$ZH"
check "SmolLM2+2k zh q8_0" "$WORK/smol-ext-q8_0" "$WORK/smol-ext-q8_0/model.gguf" "$EN"
check "SmolLM2+2k zh f16 export" "$WORK/smol-ext" "$WORK/smol-ext-f16.gguf" "$ZH" 0
echo
fi

# --- (b) speed ------------------------------------------------------------------------------
if [ -z "${SKIP_SPEED:-}" ]; then
  echo "## Speed, $THREADS threads: llama-bench vs linly-lora bench quant (same GGUF, interleaved)"
  echo
  echo "| type | llama.cpp pp128 | linly-lora pp128 | ratio | llama.cpp tg64 | linly-lora tg64 | ratio |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  for f in q8_0 q4_0 q4_k; do
    g="$WORK/smol-$f/model.gguf"
    "$LLAMA_BIN/llama-bench" -m "$g" -t "$THREADS" -p 128 -n 64 -r "$REPS" -o json > "$WORK/llama-bench-$f.json" 2>/dev/null
    $LL bench quant --model "$WORK/smol-$f" --threads "$THREADS" --prompt 128 --gen 64 --reps "$REPS" > "$WORK/linly-bench-$f.json"
    python3 - "$WORK/llama-bench-$f.json" "$WORK/linly-bench-$f.json" "$f" <<'EOF'
import json, sys
lb = json.load(open(sys.argv[1])); ours = json.load(open(sys.argv[2])); f = sys.argv[3]
# llama-bench reports each repetition; take the best, as `bench quant` does.
best = {("pp" if r["n_prompt"] else "tg"): max(r["samples_ts"]) for r in lb}
pp, tg = ours["pp_tokens_per_s"], ours["tg_tokens_per_s"]
print(f"| {f} | {best['pp']:.1f} | {pp:.1f} | {pp / best['pp']:.2f} | {best['tg']:.1f} | {tg:.1f} | **{tg / best['tg']:.2f}** |")
EOF
  done
  echo
  echo "Best of $REPS repetitions on both sides; machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg) at the end."
fi
[ "$diverged" = 0 ] || echo "Some continuations part after a common prefix (see $WORK/greedy-*.txt: llama.cpp first, linly-lora second)."
exit $fail
