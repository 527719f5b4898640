#!/usr/bin/env python3
"""How far training moved the new rows of the token table, by how often training showed them.

    python3 benches/row_moves.py --train RUN --resized MODEL
        RUN: a training run's folder (adapter/, metrics.jsonl, token-cache/);
        MODEL: the resized model the run started from (its rows are the initial values).

For each exposure bucket (piece_gap.py's: expected times the piece was a training token) it
prints the median RMS of the rows' change, that RMS over the initial row's, and the median
cosine between a row's change and the mean change of all new rows: near 1 means the rows of
that bucket moved together, by one shared vector, rather than each by what it learned.

    python3 benches/row_moves.py --spelling MODEL
        How well a character's UTF-8 byte rows predict its own row, for the single CJK
        characters the base vocabulary already holds: held-out R^2 of ridge regressions (one
        fifth held out) and of the scaled sub-token mean. Near 0 or below: the spelling carries
        nothing of the row, so no map from spelling can initialise new rows as the base would.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import piece_gap  # noqa: E402

ADAPTER_ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
DTYPES = {"F32": np.float32, "F16": np.float16}


def tensor(path, key):
    """One tensor of a safetensors file, as f32."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))
        if key not in meta:
            sys.exit(f"{path}: no tensor {key}")
        v = meta[key]
        if v["dtype"] not in DTYPES:
            sys.exit(f"{path}: {key} is {v['dtype']}; this script reads F32 and F16")
        start, end = v["data_offsets"]
        f.seek(8 + n + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=DTYPES[v["dtype"]]).reshape(v["shape"]).astype(np.float32)


def moves(train, resized):
    table = tensor(os.path.join(resized, "model.safetensors"), "model.embed_tokens.weight")
    rows = tensor(os.path.join(train, "adapter", "adapter_model.safetensors"), ADAPTER_ROWS)
    old = table.shape[0] - rows.shape[0]
    init = table[old:]
    change = rows - init
    shared = change.mean(0)
    seen = piece_gap.exposures(train)
    buckets = {}
    for i in range(rows.shape[0]):
        buckets.setdefault(piece_gap.exposure_bucket(seen.get(old + i, 0)), []).append(i)
    print(f"{'seen':8s} {'rows':>6s} {'change RMS':>10s} {'/ initial':>9s} {'cos(change, mean change)':>25s}")
    for name in ("<5", "5-20", "20-100", "100-500", ">=500"):
        ix = np.array(buckets.get(name, []), dtype=int)
        if len(ix) == 0:
            continue
        rms = np.sqrt((change[ix] ** 2).mean(1))
        base = np.sqrt((init[ix] ** 2).mean(1))
        cos = change[ix] @ shared / (np.linalg.norm(change[ix], axis=1) * np.linalg.norm(shared) + 1e-12)
        print(f"{name:8s} {len(ix):6d} {np.median(rms):10.4f} {np.median(rms / base):9.2f} {np.median(cos):25.2f}")


def gpt2_bytes():
    """GPT-2's byte-to-character map of byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def spelling(model):
    table = tensor(os.path.join(model, "model.safetensors"), "model.embed_tokens.weight")
    vocab = json.load(open(os.path.join(model, "tokenizer.json"), encoding="utf-8"))["model"]["vocab"]
    b2u = gpt2_bytes()
    u2b = {u: b for b, u in b2u.items()}
    byte_row = {b: table[vocab[u]] for b, u in b2u.items() if u in vocab}
    chars = []
    for piece, i in vocab.items():
        try:
            s = bytes(u2b[c] for c in piece).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if len(s) == 1 and 0x4E00 <= ord(s) <= 0x9FFF and len(s.encode()) == 3:
            chars.append((s, i))
    if len(chars) < 10:
        sys.exit(f"{model}: only {len(chars)} single CJK characters in the vocabulary; too few to fit")
    x = np.stack([np.concatenate([byte_row[b] for b in s.encode()]) for s, _ in chars])
    y = np.stack([table[i] for _, i in chars])
    mean_rows = np.stack([np.mean([byte_row[b] for b in s.encode()], 0) for s, _ in chars])
    perm = np.random.default_rng(0).permutation(len(chars))
    test, fit = perm[: len(chars) // 5], perm[len(chars) // 5:]
    mu = y[fit].mean(0)

    def r2(pred):
        return 1 - ((y[test] - pred) ** 2).sum() / ((y[test] - mu) ** 2).sum()

    print(f"{len(chars)} single CJK characters in the base vocabulary; {len(test)} held out")
    a = (mean_rows[fit] * y[fit]).sum() / (mean_rows[fit] ** 2).sum()
    print(f"sub-token mean x {a:.2f}: held-out R^2 {r2(a * mean_rows[test]):.3f}")
    xm = x[fit].mean(0)
    for lam in (1, 10, 100, 1000):
        d = x[fit] - xm
        w = np.linalg.solve(d.T @ d + lam * np.eye(d.shape[1]), d.T @ (y[fit] - mu))
        print(f"ridge on the three byte rows, lambda {lam}: held-out R^2 {r2((x[test] - xm) @ w + mu):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", help="training run folder (adapter/, metrics.jsonl, token-cache/)")
    ap.add_argument("--resized", help="the resized model the run started from")
    ap.add_argument("--spelling", metavar="MODEL", help="fit byte rows to character rows in MODEL's own vocabulary")
    a = ap.parse_args()
    if a.spelling:
        spelling(a.spelling)
    elif a.train and a.resized:
        moves(a.train, a.resized)
    else:
        ap.error("give --train and --resized, or --spelling MODEL")


if __name__ == "__main__":
    main()
