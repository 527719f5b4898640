#!/usr/bin/env python3
"""The peer for the token store's tokenization throughput (issue #23): HF `tokenizers`' own
batch encoding in Python, on the same file and tokenizer.json. Documents are split exactly as
`kind = "text"` reads a .txt (blank-line-separated blocks); the time covers reading, splitting
and encoding (not interpreter start-up or loading the tokenizer), on all cores.

    python3 benches/token_store_tokenize_peer.py TOKENIZER_JSON FILE
Prints `peer_mb_s=<MB/s> docs=<n> tokens=<n>`.
"""
import sys
import time

from tokenizers import Tokenizer


def docs(text):
    cur = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if line.strip():
            cur.append(line)
        elif cur:
            yield "\n".join(cur)
            cur = []
    if cur:
        yield "\n".join(cur)


def main():
    tok = Tokenizer.from_file(sys.argv[1])
    path = sys.argv[2]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    t0 = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    size = len(text.encode("utf-8"))
    n_docs = n_tok = 0
    batch = []
    for d in docs(text):
        batch.append(d)
        if len(batch) == 8192:
            n_tok += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
            n_docs += len(batch)
            batch = []
    if batch:
        n_tok += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
        n_docs += len(batch)
    dt = time.perf_counter() - t0
    print(f"peer_mb_s={size / 1e6 / dt:.2f} docs={n_docs} tokens={n_tok} seconds={dt:.1f} api={encode.__name__}")


if __name__ == "__main__":
    main()
