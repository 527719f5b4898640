#!/usr/bin/env python3
"""A large, varied text corpus for the token store benchmarks (issue #23), from the registry
texts the quickstart downloads: every sentence of the given files goes into one pool, and each
document is 2-12 sentences drawn with a seeded RNG (one paragraph per line, 1-3 lines, documents
separated by blank lines, as `kind = "text"` reads them). Deterministic for a given seed, size
and input files; no two documents are the same file region repeated.

    python3 benches/token_store_corpus.py OUT.txt SIZE_MB FILE... [--seed N]
"""
import random
import re
import sys


def sentences(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    out = []
    for line in text.splitlines():
        # TSV pairs give both sides; everything is cut after sentence-final punctuation.
        for field in line.split("\t"):
            for s in re.split(r"(?<=[。！？!?.；;])\s*", field.strip()):
                s = s.strip()
                if 4 <= len(s) <= 400:
                    out.append(s)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--seed")]
    seed = 23
    for a in sys.argv[1:]:
        if a.startswith("--seed="):
            seed = int(a.split("=", 1)[1])
    out, size_mb, files = args[0], float(args[1]), args[2:]
    pool = []
    for f in files:
        pool.extend(sentences(f))
    if not pool:
        sys.exit("no sentences in the input files")
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    written = 0
    with open(out, "w", encoding="utf-8") as w:
        buf = []
        while written < target:
            lines = []
            for _ in range(rng.randint(1, 3)):
                lines.append("".join(rng.choices(pool, k=rng.randint(2, 5))))
            doc = "\n".join(lines) + "\n\n"
            buf.append(doc)
            written += len(doc.encode("utf-8"))
            if len(buf) >= 4096:
                w.write("".join(buf))
                buf.clear()
        w.write("".join(buf))
    print(f"{out}: {written / 1e6:.1f} MB from {len(pool)} sentences of {len(files)} files (seed {seed})", file=sys.stderr)


if __name__ == "__main__":
    main()
