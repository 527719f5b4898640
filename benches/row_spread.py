#!/usr/bin/env python3
"""New rows that the copying heads can tell apart (BENCHMARKS.md, "Rows that copy").

    python3 benches/row_spread.py --resized MODEL --out DIR --alpha A [--mode spread|cov|iso] [--seed S]
        Writes DIR, a copy of the resized model MODEL (vocab resize's folder) whose new rows E
        become E + A * Z:
          spread: Z = E - mean(E), the new rows' own deviation from their mean;
          cov:    Z ~ N(0, covariance of the old rows);
          iso:    Z ~ isotropic normal with the old rows' mean squared distance from their mean.
        Prints the old and new rows' RMS distance from their own mean.

    python3 benches/row_spread.py --copy-texts DIR --extension vocab_extension.json
        Writes DIR/copy_freq.txt and DIR/copy_rare.txt: 60 random added CJK characters (seeded),
        a newline, the same 60 again. "freq" draws from the extension's first 800 characters,
        "rare" from its ranks 2,500-4,000.

    python3 benches/row_spread.py --copy-score EVAL.json --text copy_freq.txt
        Nats over the second copy, from `linly-lora eval --model M --text copy_freq.txt --json
        --per-token > EVAL.json`: what a model pays for a string it has just read.
"""
import argparse
import json
import os
import random
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from row_moves import tensor  # noqa: E402

TABLE = "model.embed_tokens.weight"


def spread(resized, out, alpha, mode, seed):
    ext = json.load(open(os.path.join(resized, "vocab_extension.json"), encoding="utf-8"))
    src = os.path.join(resized, "model.safetensors")
    table = tensor(src, TABLE).astype(np.float64)
    old, new = table[: ext["old_vocab"]], table[ext["old_vocab"]:]
    centred = old - old.mean(0)
    rng = np.random.default_rng(seed)
    if mode == "spread":
        z = new - new.mean(0)
    elif mode == "cov":
        w, v = np.linalg.eigh(centred.T @ centred / len(old))
        z = rng.standard_normal(new.shape) @ (v * np.sqrt(np.clip(w, 0, None))).T
    else:
        z = rng.standard_normal(new.shape) * np.sqrt((centred ** 2).sum(1).mean() / new.shape[1])
    rms = lambda x: float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))
    print(f"old rows {rms(old):.3f}, new rows {rms(new):.3f}, change {rms(z) if mode != 'spread' else alpha * rms(new):.3f} (RMS distance from their mean)")
    table[ext["old_vocab"]:] = new + alpha * z
    raw = bytearray(open(src, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8 : 8 + n])[TABLE]
    if meta["dtype"] != "F32":
        sys.exit(f"{src}: {TABLE} is {meta['dtype']}; this script writes F32 tables")
    a, b = meta["data_offsets"]
    raw[8 + n + a : 8 + n + b] = table.astype(np.float32).tobytes()
    if os.path.exists(out):
        sys.exit(f"{out} exists; choose a new folder")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in os.listdir(resized):
        if f != "model.safetensors":
            shutil.copy(os.path.join(resized, f), tmp)
    open(os.path.join(tmp, "model.safetensors"), "wb").write(raw)
    os.rename(tmp, out)


def copy_texts(out, extension):
    pieces = json.load(open(extension, encoding="utf-8"))["pieces"]
    chars = [p for p in pieces if len(p) == 1 and "\u4e00" <= p <= "\u9fff"]
    r = random.Random(7)
    os.makedirs(out, exist_ok=True)
    for name, pool in [("freq", chars[:800]), ("rare", chars[2500:4000])]:
        s = "".join(r.sample(pool, 60))
        open(os.path.join(out, f"copy_{name}.txt"), "w", encoding="utf-8").write(s + "\n" + s + "\n")


def copy_score(eval_json, text):
    data = open(text, "rb").read()
    second = data.index(b"\n") + 1
    tokens = json.load(open(eval_json))["per_token"]
    print(f"{sum(t['nll'] for t in tokens if second <= t['span'][0] and t['span'][1] <= len(data) - 1):.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resized")
    p.add_argument("--out")
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--mode", choices=["spread", "cov", "iso"], default="spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-texts")
    p.add_argument("--extension")
    p.add_argument("--copy-score")
    p.add_argument("--text")
    a = p.parse_args()
    if a.resized and a.out:
        spread(a.resized, a.out, a.alpha, a.mode, a.seed)
    elif a.copy_texts and a.extension:
        copy_texts(a.copy_texts, a.extension)
    elif a.copy_score and a.text:
        copy_score(a.copy_score, a.text)
    else:
        p.error("give --resized and --out, --copy-texts and --extension, or --copy-score and --text")


if __name__ == "__main__":
    main()
