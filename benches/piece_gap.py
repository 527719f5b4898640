#!/usr/bin/env python3
"""Where an extended model loses to its base, piece by piece.

Both models score the same text (`linly-lora eval --text T --window 1024 --json --per-token`);
every token of the extended model is matched with the base tokens that end inside its bytes
(the pieces of one character that the base splits into bytes share that character's span), so
each added piece gets the base's cost of the same bytes. The table buckets the extended
model's targets by kind (old-vocabulary token, added single character, added word) and, with
--train, by how often training showed the piece (counted in the run's token stores and scaled
by the tokens each source gave to training, from metrics.jsonl).

    python3 benches/piece_gap.py --base base.json --ext merged.json \
        --extension TOKENIZER/vocab_extension.json [--train TRAIN_DIR] [--repeats 1000] [--json]

With --repeats N each kind is split by whether the token already occurred in the N tokens
before it: a model that copies well from its context reads a repeated piece much cheaper.

Needs only the standard library. A token whose bytes the base splits across its boundary is
counted with its neighbours under "unaligned" (none on the quickstart's Chinese texts).
"""
import argparse
import bisect
import collections
import glob
import json
import os
import struct
import sys


def per_token(path):
    """The report's per-token scores, checked to add up to its total."""
    r = json.load(open(path, encoding="utf-8"))
    toks = r.get("per_token")
    if not toks or any("span" not in t for t in toks):
        sys.exit(f"{path}: no per-token spans; make it with `linly-lora eval --text T --json --per-token`")
    if abs(sum(t["nll"] for t in toks) - r["total_nll"]) > 1e-3 * len(toks):
        sys.exit(f"{path}: the per-token scores do not add up to total_nll")
    return toks


def store_ids(path):
    """The ids of a token store (src/data/store.rs, format version 1)."""
    b = open(path, "rb").read()
    if b[:8] != b"LLTOKST\x01":
        sys.exit(f"{path}: not a linly-lora token store")
    width = struct.unpack_from("<I", b, 12)[0]
    tokens = struct.unpack_from("<Q", b, 24)[0]
    key_len = struct.unpack_from("<I", b, 40)[0]
    at = 64 + (key_len + 7) // 8 * 8
    return struct.unpack_from("<%d%s" % (tokens, "H" if width == 2 else "I"), b, at)


def exposures(train_dir):
    """Expected times each id was a training token: its count in each source's store, times the
    share of that store the run read."""
    seen = collections.Counter()
    for line in open(os.path.join(train_dir, "metrics.jsonl"), encoding="utf-8"):
        d = json.loads(line)
        for k, v in (d.get("tokens_by_source") or {}).items():
            seen[k.split(":")[-1]] += v
    out = collections.Counter()
    for path in glob.glob(os.path.join(train_dir, "token-cache", "*.tok")):
        name = os.path.basename(path).rsplit("-", 1)[0]
        ids = store_ids(path)
        share = seen.get(name, 0) / max(len(ids), 1)
        for i, n in collections.Counter(ids).items():
            out[i] += n * share
    return out


def exposure_bucket(e):
    for hi, name in ((5, "<5"), (20, "5-20"), (100, "20-100"), (500, "100-500")):
        if e < hi:
            return name
    return ">=500"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="eval --per-token JSON of the base model")
    ap.add_argument("--ext", required=True, help="eval --per-token JSON of the extended model, same text")
    ap.add_argument("--extension", required=True, help="vocab_extension.json of the extended tokenizer")
    ap.add_argument("--train", help="the training run's folder (metrics.jsonl, token-cache/) for exposure buckets")
    ap.add_argument("--repeats", type=int, default=0, metavar="N",
                    help="also split by whether the extended model's token occurred in the N tokens before it (first / repeated)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    ext = json.load(open(a.extension, encoding="utf-8"))
    old, pieces = ext["old_vocab"], ext["pieces"]
    seen = exposures(a.train) if a.train else None
    base, new = per_token(a.base), per_token(a.ext)
    ends = [t["span"][1] for t in base]
    if ends != sorted(ends):
        sys.exit(f"{a.base}: spans out of order")
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])

    def kind(i, at):
        k = "old token" if i < old else "added char" if len(pieces[i - old].strip()) == 1 else "added word"
        if i >= old and seen is not None:
            k += " seen " + exposure_bucket(seen.get(i, 0.0))
        if a.repeats:
            k += " repeated" if i in ids[max(0, at - a.repeats):at] else " first"
        return k

    ids = [t["id"] for t in new]
    lo = 0
    prev_end, prev_key = 0, None
    pending = []  # extended tokens since the last boundary both tokenizations share
    for at, t in enumerate(new):
        end = t["span"][1]
        if not pending and end <= prev_end and prev_key is not None:
            # Another byte piece of the character just counted: the base's bytes of it are in.
            rows[prev_key][1] += t["nll"]
            continue
        pending.append(t)
        hi = bisect.bisect_right(ends, end)
        if hi > lo and ends[hi - 1] == end:
            key = kind(t["id"], at) if len(pending) == 1 else "unaligned"
            r = rows[key]
            r[0] += len(pending)
            r[1] += sum(p["nll"] for p in pending)
            r[2] += sum(b["nll"] for b in base[lo:hi])
            lo, prev_end, prev_key, pending = hi, end, key, []
    gap = sum(r[1] - r[2] for r in rows.values())
    table = [
        {"targets": k, "tokens": n, "ext_nats": e / n, "base_nats": b / n, "excess_nats": e - b, "share_of_gap": (e - b) / gap if gap else 0.0}
        for k, (n, e, b) in sorted(rows.items())
    ]
    if a.json:
        json.dump({"gap_nats": gap, "rows": table}, sys.stdout, indent=1)
        print()
        return
    print(f"{'targets':24} {'tokens':>6} {'ext nats':>9} {'base nats':>9} {'excess':>9} {'share':>7}")
    for r in table:
        print(f"{r['targets']:24} {r['tokens']:6d} {r['ext_nats']:9.2f} {r['base_nats']:9.2f} {r['excess_nats']:9.1f} {100 * r['share_of_gap']:6.1f}%")
    print(f"total excess {gap:.1f} nats over {sum(r['tokens'] for r in table)} targets")


if __name__ == "__main__":
    main()
