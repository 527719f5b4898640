#!/usr/bin/env python3
"""The tiny fixture model (tests/fixtures/tiny_llama/base) with its vocabulary grown to a real
tokenizer's, so it can train on text for the token store's memory benchmark (issue #23): the
embedding and LM-head rows past the fixture's 320 repeat its rows, everything else is the
fixture unchanged. Standard library only.

    python3 benches/token_store_tiny_model.py FIXTURE_BASE TOKENIZER_DIR OUT_DIR
"""
import json
import shutil
import struct
import sys
from pathlib import Path


def main():
    base, tok_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    tok = json.load(open(tok_dir / "tokenizer.json", encoding="utf-8"))
    vocab = max(tok["model"]["vocab"].values()) + 1
    vocab = max([vocab] + [t["id"] + 1 for t in tok.get("added_tokens", [])])
    raw = (base / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    tensors, blobs, off = {}, [], 0
    for name, t in sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = t["data_offsets"]
        blob, shape = data[a:b], list(t["shape"])
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows, width = shape
            row = len(blob) // rows
            blob = b"".join(blob[(i % rows) * row : (i % rows + 1) * row] for i in range(vocab))
            shape = [vocab, width]
        tensors[name] = {"dtype": t["dtype"], "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    head = json.dumps(tensors).encode()
    head += b" " * (-len(head) % 8)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for b in blobs:
            f.write(b)
    cfg = json.load(open(base / "config.json"))
    cfg["vocab_size"] = vocab
    json.dump(cfg, open(out / "config.json", "w"), indent=2)
    shutil.copy(tok_dir / "tokenizer.json", out / "tokenizer.json")
    print(f"{out}: tiny fixture with {vocab} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
