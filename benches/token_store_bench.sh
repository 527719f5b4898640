#!/usr/bin/env bash
# Token store and streamed tokenization (issue #23), one run:
#  1. tokenization throughput of `linly-lora data prepare` against HF `tokenizers`' own batch
#     encoding in Python (the peer), same file, same tokenizer.json, all cores;
#  2. peak RSS (/usr/bin/time -v) of `data prepare` and of 20 training steps of the tiny
#     fixture model (its vocabulary grown to the tokenizer's) on a small and a large corpus.
#
#   benches/token_store_bench.sh            # 20 MB vs 2100 MB, 100 MB for throughput
#   BIG_MB=200 benches/token_store_bench.sh # a quicker look
#
# Needs the quickstart downloads (runs/quickstart: data/*.txt, base/tokenizer.json; QS=... to
# point elsewhere) and ../shared/assets/zh. Sets up target/store-bench/venv with `tokenizers`
# (pip). Everything it generates is under target/store-bench; KEEP=1 keeps the corpora.
set -euo pipefail
cd "$(dirname "$0")/.."
QS=${QS:-runs/quickstart}
[ -d "$QS/data" ] || QS=../main/runs/quickstart
ZH=${ZH:-../shared/assets/zh}
SMALL_MB=${SMALL_MB:-20}
BIG_MB=${BIG_MB:-2100}
TPUT_MB=${TPUT_MB:-100}
W=target/store-bench
BIN=target/release/linly-lora
TOK_DIR=$QS/base
mkdir -p "$W"
[ -x "$BIN" ] || cargo build --release
[ -x "$W/venv/bin/python" ] || { python3 -m venv "$W/venv" && "$W/venv/bin/pip" install -q tokenizers; }
SRC=("$QS"/data/*.txt "$ZH/hsk_zh_en.tsv")
corpus() { # name size_mb seed
  [ -s "$W/$1.txt" ] || python3 benches/token_store_corpus.py "$W/$1.txt" "$2" "${SRC[@]}" --seed="$3"
}
corpus small "$SMALL_MB" 24
corpus big "$BIG_MB" 23
corpus tput "$TPUT_MB" 25
[ -d "$W/tiny49k" ] || python3 benches/token_store_tiny_model.py tests/fixtures/tiny_llama/base "$TOK_DIR" "$W/tiny49k"

recipe() { # dir corpus
  mkdir -p "$1"
  cat > "$1/recipe.toml" <<TOML
[model]
path = "$PWD/$W/tiny49k"
[lora]
r = 4
alpha = 8
dropout = 0.0
[[data]]
kind = "text"
path = "$PWD/$W/$2.txt"
[train]
seq_len = 256
batch_size = 4
grad_accum = 1
steps = 20
lr = 1e-3
warmup_ratio = 0.0
schedule = "constant"
seed = 1
[output]
dir = "out"
plots = false
save_every = 1000
TOML
}

# Runs a command under /usr/bin/time -v; prints "<peak RSS MB> <wall s>".
measure() {
  /usr/bin/time -v "$@" > "$W/last.out" 2> "$W/last.err" || { cat "$W/last.err" >&2; exit 1; }
  local kb wall
  kb=$(grep "Maximum resident set size" "$W/last.err" | awk '{print $NF}')
  wall=$(grep "Elapsed (wall clock)" "$W/last.err" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  echo "$((kb / 1024)) $wall"
}

echo "== tokenization throughput ($TPUT_MB MB, $(nproc) cores, tokenizer $TOK_DIR/tokenizer.json)"
rm -rf "$W/tput" && recipe "$W/tput" tput
read -r _ ours_s < <(measure "$BIN" data prepare "$W/tput/recipe.toml")
size=$(stat -c %s "$W/tput.txt")
inner=$(grep -o '([0-9.]* MB/s)' "$W/last.err" | tr -d '(' | awk '{print $1}')
peer=$("$W/venv/bin/python" benches/token_store_tokenize_peer.py "$TOK_DIR/tokenizer.json" "$W/tput.txt")
peer_mb_s=$(echo "$peer" | sed 's/.*peer_mb_s=\([0-9.]*\).*/\1/')
ours_mb_s=$(awk -v b="$size" -v s="$ours_s" 'BEGIN { printf "%.2f", b / 1e6 / s }')
echo "linly-lora data prepare: $ours_mb_s MB/s end to end ($ours_s s: read, tokenize, write and verify the store; $inner MB/s while tokenizing)"
echo "HF tokenizers (Python) : $peer"
awk -v a="$ours_mb_s" -v b="$peer_mb_s" 'BEGIN { printf "ratio (ours / peer)    : %.2fx\n", a / b }'

for size in small big; do
  rm -rf "$W/$size-run" && recipe "$W/$size-run" "$size"
  read -r prss ps < <(measure "$BIN" data prepare --quiet "$W/$size-run/recipe.toml")
  toks=$(grep -o '"tokens": [0-9]*' "$W/last.out" | awk '{print $2}')
  read -r trss ts < <(measure "$BIN" train --quiet "$W/$size-run/recipe.toml")
  tps=$(grep -o '"tokens_per_s": [0-9.]*' "$W/last.out" | awk '{print $2}')
  store=$(du -sm "$W/$size-run/out/token-cache" | awk '{print $1}')
  echo "== $size corpus: $(($(stat -c %s "$W/$size.txt") / 1000000)) MB, $toks tokens, store $store MB"
  echo "data prepare   : peak RSS $prss MB, $ps s"
  echo "train 20 steps : peak RSS $trss MB, $ts s (store reused; $tps tokens/s)"
done
[ "${KEEP:-0}" = 1 ] || rm -rf "$W/small.txt" "$W/big.txt" "$W/tput.txt" "$W/small-run" "$W/big-run" "$W/tput"
