#!/usr/bin/env python3
"""Token pairs that an extended BPE tokenizer never emits side by side (BENCHMARKS.md,
"Mass on pairs the tokenizer never writes").

    python3 -m venv v && v/bin/pip install tokenizers
    v/bin/python benches/canonical_pairs.py --tokenizer runs/quickstart/tokenizer/tokenizer.json \
        --from-merge 48900 --out pairs.json

For BPE, a token sequence is the tokenizer's own (canonical) exactly when each adjacent pair is
(Vieira et al., "Language Models over Canonical Byte-Pair Encodings", ICML 2025): x then y is
non-canonical when encoding text(x) + text(y) does not give [x, y]. Only a merge (a, b) with a on
x's right spine and b on y's left spine can join across the boundary, so the candidates come from
the merges of rank >= --from-merge (the extension's, appended after the base's 48,900) and each
is checked with the real tokenizer. Tokens that do not encode to themselves alone (byte pieces of
a character split across tokens decode to U+FFFD) are left out, so the table is a subset.

Writes {"prev id": [banned next ids, ascending], ...}. `benches/canonical_mass.patch` makes
`eval` renormalise each position's distribution without the banned successors of the token
before it (LINLY_CANON=pairs.json).
"""
import argparse
import collections
import json
import sys

from tokenizers import Tokenizer


def spines(vocab, merges):
    """For every component c: the tokens whose right (left) spine holds c."""
    made_of = collections.defaultdict(list)
    for a, b in merges:
        made_of[a + b].append((a, b))
    memo = {"R": {}, "L": {}}

    def spine(t, side):
        # Iterative: merge chains are as deep as a piece is long in bytes.
        out, stack = set(), [t]
        while stack:
            u = stack.pop()
            if u in out:
                continue
            out.add(u)
            for a, b in made_of.get(u, []):
                stack.append(b if side == "R" else a)
        return out

    in_right, in_left = collections.defaultdict(list), collections.defaultdict(list)
    for t in vocab:
        for c in spine(t, "R"):
            in_right[c].append(t)
        for c in spine(t, "L"):
            in_left[c].append(t)
    return in_right, in_left


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--from-merge", type=int, required=True, help="first merge rank whose pairs are checked")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = json.load(open(args.tokenizer, encoding="utf-8"))["model"]
    vocab = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    in_right, in_left = spines(vocab, merges)
    candidates = sorted({(x, y) for a, b in merges[args.from_merge:] for x in in_right.get(a, []) for y in in_left.get(b, [])})
    print(f"{len(candidates)} candidate pairs", file=sys.stderr)

    tok = Tokenizer.from_file(args.tokenizer)
    ids = sorted({t for pair in candidates for t in pair})
    texts = dict(zip(ids, tok.decode_batch([[vocab[t]] for t in ids], skip_special_tokens=False)))
    alone = {t for t, e in zip(ids, tok.encode_batch([texts[t] for t in ids], add_special_tokens=False)) if e.ids == [vocab[t]]}
    candidates = [(x, y) for x, y in candidates if x in alone and y in alone]
    banned = collections.defaultdict(list)
    for i in range(0, len(candidates), 20000):
        chunk = candidates[i : i + 20000]
        for (x, y), e in zip(chunk, tok.encode_batch([texts[x] + texts[y] for x, y in chunk], add_special_tokens=False)):
            if e.ids != [vocab[x], vocab[y]]:
                banned[vocab[x]].append(vocab[y])
    n = sum(len(v) for v in banned.values())
    print(f"{n} non-canonical pairs after {len(banned)} tokens (at most {max(map(len, banned.values()), default=0)} after one)", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump({str(k): sorted(v) for k, v in sorted(banned.items())}, f)


if __name__ == "__main__":
    main()
