#!/usr/bin/env bash
# q4_0 with an importance matrix against f32, in bits/char on the four quality texts of
# BENCHMARKS.md ("Quality"): HSK zh / en (the first 313 / 199 lines of the zh / en columns of
# tests/fixtures/zh/hsk_zh_en.tsv) and the quickstart's held-out Lu Xun / Alice.
#
#   ZH_CHARS=48000 EN_CHARS=1000000 bash benches/q4_0_imatrix_quality.sh
#   GPTQ=1 ZH_CHARS=8000 EN_CHARS=26100 bash benches/q4_0_imatrix_quality.sh
#
# GPTQ=1 quantizes with `quantize --gptq` on the same calibration text (gate/up by GPTQ, the
# other Q4_0 weights by importance-weighted rounding from the same pass) instead of
# `imatrix` + `quantize --imatrix`.
# The calibration text is whole lines from the start of the quickstart's training files, up to
# ZH_CHARS characters of runs/quickstart/data/zh_news.txt and EN_CHARS of en_replay.txt; it
# shares no 20-character substring with the four texts (checked and printed). Needs
# runs/quickstart/{base,data} (examples/quickstart.sh). Writes runs/imatrix/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/linly-lora}
ZH_CHARS=${ZH_CHARS:-48000}
EN_CHARS=${EN_CHARS:-1000000}
W=runs/imatrix
TAG=zh${ZH_CHARS}-en${EN_CHARS}
mkdir -p $W
head -n 313 tests/fixtures/zh/hsk_zh_en.tsv | cut -f1 >$W/hsk_zh.txt
head -n 199 tests/fixtures/zh/hsk_zh_en.tsv | cut -f2 >$W/hsk_en.txt
TEXTS="$W/hsk_zh.txt $W/hsk_en.txt runs/quickstart/data/heldout_zh.txt runs/quickstart/data/heldout_en.txt"
python3 - "$ZH_CHARS" "$EN_CHARS" "$W/calib-$TAG.txt" $TEXTS <<'PY'
import sys
zh_chars, en_chars, out, texts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
def head(path, limit):
    lines, n = [], 0
    for line in open(path, encoding="utf-8"):
        if n + len(line) > limit:
            break
        lines.append(line)
        n += len(line)
    return "".join(lines)
calib = head("runs/quickstart/data/zh_news.txt", zh_chars) + "\n" + head("runs/quickstart/data/en_replay.txt", en_chars)
open(out, "w", encoding="utf-8").write(calib)
for t in texts:
    x = open(t, encoding="utf-8").read()
    grams = {x[i:i + 20] for i in range(len(x) - 20)}
    shared = sum(calib[i:i + 20] in grams for i in range(len(calib) - 20))
    print(f"{t}: {shared} 20-character substrings shared with the calibration text")
    assert shared == 0, "the calibration text overlaps an eval text"
PY
if [ "${GPTQ:-0}" = 1 ]; then
  TAG=gptq-$TAG
  rm -rf $W/q4_0-$TAG
  $BIN quantize --model runs/quickstart/base --format q4_0 --gptq $W/calib-${TAG#gptq-}.txt --calib-window 512 --out $W/q4_0-$TAG
else
  [ -f $W/$TAG.imatrix ] || $BIN imatrix --model runs/quickstart/base --text $W/calib-$TAG.txt --window 512 --out $W/$TAG.imatrix
  rm -rf $W/q4_0-$TAG
  $BIN quantize --model runs/quickstart/base --format q4_0 --imatrix $W/$TAG.imatrix --out $W/q4_0-$TAG
fi
bpc() { $BIN eval --model "$1" --text "$2" --window 1024 --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["bits_per_char"])'; }
printf "%-45s %10s %10s %8s\n" text f32 q4_0 change
for t in $TEXTS; do
  f=$(bpc runs/quickstart/base $t); q=$(bpc $W/q4_0-$TAG $t)
  python3 -c "import sys; f,q=float('$f'),float('$q'); print(f'{sys.argv[1]:<45} {f:10.4f} {q:10.4f} {q/f-1:+8.2%}')" "$t"
done
