#!/usr/bin/env python3
"""Compares linly-lora's perplexity with llama.cpp's `llama-perplexity` on the same text and GGUF.

Not part of CI. Needs the llama.cpp tools from benches/build_llama_cpp.sh and a linly-lora
release binary; Python 3 standard library only.

The two tools do not score the same tokens by default:

* `llama-perplexity -f FILE -c N` reads FILE (dropping one trailing newline; escape sequences
  like `\\n` are processed unless `--no-escape`), tokenizes it with BOS when the vocabulary asks
  for one, cuts the ids into floor(len/N) chunks of N tokens (the tail is dropped), puts BOS in
  place of the first token of every chunk when the vocabulary adds BOS, runs each chunk from an
  empty KV cache, and scores only the second half: the N-1-N/2 tokens at positions
  N/2+1 .. N-1 (tools/perplexity/perplexity.cpp, `perplexity()`, `first = n_ctx/2`).
* `linly-lora eval --text FILE` prepends BOS and scores every token, long inputs in
  half-overlapping windows; `eval --ids` scores positions 1..T-1 of each sequence.

This script reproduces llama.cpp's protocol on the linly-lora side, on the very ids llama.cpp
scores: it tokenizes with `llama-tokenize` (the same `common_tokenize` call, special tokens not
parsed, no escapes), builds the chunks exactly as above, scores each full chunk and each chunk's
first N/2+1 tokens with `linly-lora eval --ids`, and takes the difference: by causality that is
the NLL of positions N/2+1 .. N-1, the tokens llama.cpp scores. llama.cpp's mean NLL comes from
`--ppl-output-type 1` (six decimals); its total is that mean times the scored-token count.

llama.cpp runs in up to four configurations (--configs); the two default ones:

* `q4_1-default`: the GGUF as given, default options (what a user gets). ggml's CPU matmul
  with quantized weights quantizes the activations too (Q8_1 / Q8_0 blocks), and the KV cache
  is f16, so this differs from an f32 forward by more than rounding.
* `f32-exact`: the same GGUF re-exported as F32 with `llama-quantize --allow-requantize ... F32`
  (exact dequantization, which is what `linly-lora import gguf --dtype f32` does), run with an
  f32 KV cache and flash attention off. The remaining differences are float summation order.

`q4_1-f32kv` and `f32-default` separate the two effects (activation quantization, f16 KV cache).

Per character: both sides score the same tokens, so bits/char uses the characters those tokens
cover (a character counts for the token holding its first UTF-8 byte; pieces come from the
imported tokenizer.json). For reference the script also reports `linly-lora eval --text` (its own
protocol: every token, BOS first) and checks that linly-lora's tokenizer gives llama.cpp's ids.

Usage (see BENCHMARKS.md for the recorded run):
  python3 benches/llamacpp_perplexity.py --gguf MODEL.gguf --text tests/fixtures/text/english.txt \\
      --zh-tsv tests/fixtures/zh/hsk_zh_en.tsv [--model IMPORTED_DIR] [--ctx 128] [--json OUT]
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (run the F32 re-export?, f32 KV cache and no flash attention?, description)
CONFIGS = {
    "q4_1-default": (False, False, "the GGUF as given, default options"),
    "q4_1-f32kv": (False, True, "the GGUF as given, f32 KV cache, flash attention off"),
    "f32-default": (True, False, "F32 re-export, default options (f16 KV cache)"),
    "f32-exact": (True, True, "F32 re-export, f32 KV cache, flash attention off"),
}


def run(cmd, **kw):
    """Runs cmd, returns (stdout, stderr); raises with both on failure."""
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}\n{p.stdout[-2000:]}")
    return p.stdout, p.stderr, time.time() - t0


# ---------------------------------------------------------------- tokenizer pieces -> bytes


def gpt2_byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def piece_bytes_table(tokenizer_json):
    """id -> the bytes the token stands for (b'' for special tokens)."""
    with open(tokenizer_json, encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    pre = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
    byte_level = "ByteLevel" in pre
    dec = gpt2_byte_decoder()
    table = {}
    for piece, i in vocab.items():
        if i in special:
            table[i] = b""
        elif byte_level:
            table[i] = bytes(dec[c] for c in piece)
        else:  # SentencePiece: ▁ is a space, <0xNN> a raw byte
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            table[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
    for a in tj.get("added_tokens", []):
        table.setdefault(a["id"], b"" if a.get("special") else a["content"].encode())
    return table


def chars_in(ids, table):
    """Characters whose first UTF-8 byte lies in these tokens' bytes."""
    return sum(1 for i in ids for b in table[i] if b & 0xC0 != 0x80)


# ---------------------------------------------------------------- llama.cpp side


def llama_tokenize(bin_dir, gguf, path, no_bos=False):
    cmd = [os.path.join(bin_dir, "llama-tokenize"), "-m", gguf, "-f", path, "--ids",
           "--no-parse-special", "--no-escape", "--log-disable"]
    if no_bos:
        cmd.append("--no-bos")
    out, _, _ = run(cmd)
    m = re.search(r"\[([0-9, ]*)\]", out)
    if not m:
        raise SystemExit(f"llama-tokenize printed no id list:\n{out[-2000:]}")
    return [int(x) for x in m.group(1).split(",") if x.strip()]


def llama_perplexity(bin_dir, gguf, path, ctx, threads, exact):
    cmd = [os.path.join(bin_dir, "llama-perplexity"), "-m", gguf, "-f", path, "-c", str(ctx), "-b", str(ctx),
           "-t", str(threads), "--no-escape", "--ppl-output-type", "1"]
    if exact:
        cmd += ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    out, err, secs = run(cmd)
    log = out + err
    m = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", log)
    if not m:
        raise SystemExit(f"unexpected llama-perplexity output:\n{log[-3000:]}")
    n_chunk, n_ctx = int(m.group(1)), int(m.group(2))
    # With --ppl-output-type 1 each chunk prints: offset, running PPL, running mean NLL, stderr.
    rows = re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.na-]+)\s*$", log, re.M)
    if len(rows) != n_chunk:
        raise SystemExit(f"expected {n_chunk} chunk lines from llama-perplexity, got {len(rows)}:\n{out[-2000:]}")
    fin = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    return {"n_chunk": n_chunk, "n_ctx": n_ctx, "mean_nll": float(rows[-1][2]),
            "ppl": float(fin.group(1)) if fin else None, "seconds": round(secs, 2), "cmd": " ".join(cmd)}


# ---------------------------------------------------------------- linly-lora side


def linly_eval(linly, model, args, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out, _, secs = run([linly, "eval", "--model", model, "--json"] + args, env=env)
    r = json.loads(out.strip().splitlines()[-1])
    r["seconds"] = round(secs, 2)
    return r


def write_jsonl(path, seqs):
    with open(path + ".tmp", "w") as f:
        for s in seqs:
            f.write(json.dumps(s) + "\n")
    os.replace(path + ".tmp", path)


def linly_ids(linly, model, text):
    out, _, _ = run([linly, "vocab", "encode", "--tokenizer", model, "--text", text])
    m = re.search(r"^ids:\s*\[([0-9, ]*)\]", out, re.M)
    if not m:
        raise SystemExit(f"unexpected `vocab encode` output:\n{out[:2000]}")
    return [int(x) for x in m.group(1).split(",") if x.strip()]


# ---------------------------------------------------------------- one text


def compare(name, path, a, model, table):
    raw = open(path, encoding="utf-8").read()
    # llama-perplexity's -f drops one trailing newline; score exactly that string.
    scored = raw[:-1] if raw.endswith("\n") else raw
    scored_path = os.path.join(a.work, f"{name}.scored.txt")
    with open(scored_path, "w", encoding="utf-8") as f:
        f.write(scored)
    ids = llama_tokenize(a.bin_dir, a.gguf, scored_path)
    ids_nobos = llama_tokenize(a.bin_dir, a.gguf, scored_path, no_bos=True)
    add_bos = len(ids) == len(ids_nobos) + 1
    bos = ids[0] if add_bos else None

    ctx = a.ctx
    if not ctx:  # largest power of two <= 512 giving at least 2 chunks
        ctx = 512
        while ctx > 16 and len(ids) < 2 * ctx:
            ctx //= 2
    n_chunk = len(ids) // ctx
    if n_chunk < 2:
        raise SystemExit(f"{path}: {len(ids)} tokens, llama-perplexity needs at least {2 * ctx} for -c {ctx}")
    first = ctx // 2
    chunks = []
    for c in range(n_chunk):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if add_bos:
            chunk[0] = bos
        chunks.append(chunk)
    n_scored = n_chunk * (ctx - 1 - first)
    scored_ids = [t for ch in chunks for t in ch[first + 1:]]
    n_chars = chars_in(scored_ids, table)

    full_p = os.path.join(a.work, f"{name}.c{ctx}.full.jsonl")
    pre_p = os.path.join(a.work, f"{name}.c{ctx}.prefix.jsonl")
    write_jsonl(full_p, chunks)
    write_jsonl(pre_p, [ch[:first + 1] for ch in chunks])
    full = linly_eval(a.linly, model, ["--ids", full_p, "--window", str(ctx)], a.threads)
    pre = linly_eval(a.linly, model, ["--ids", pre_p, "--window", str(ctx)], a.threads)
    if full["tokens"] - pre["tokens"] != n_scored:
        raise SystemExit(f"internal: linly-lora scored {full['tokens']} - {pre['tokens']} tokens, expected {n_scored}")
    ll_total = full["total_nll"] - pre["total_nll"]

    res = {
        "text": path, "chars_in_file": len(raw), "tokens_llama_cpp": len(ids), "add_bos": add_bos, "bos": bos,
        "ctx": ctx, "chunks": n_chunk, "scored_tokens": n_scored, "scored_chars": n_chars,
        "linly_lora": {"total_nll": ll_total, "nll_per_token": ll_total / n_scored,
                       "bits_per_char": ll_total / math.log(2) / n_chars,
                       "seconds": round(full["seconds"] + pre["seconds"], 2)},
        "llama_cpp": {},
    }
    for label, gguf, exact in a.configs:
        lp = llama_perplexity(a.bin_dir, gguf, path, ctx, a.threads, exact)
        if lp["n_chunk"] != n_chunk or lp["n_ctx"] != ctx:
            raise SystemExit(f"{label}: llama-perplexity used {lp['n_chunk']} chunks of {lp['n_ctx']}, expected {n_chunk} of {ctx}")
        total = lp["mean_nll"] * n_scored
        res["llama_cpp"][label] = {
            "nll_per_token": lp["mean_nll"], "ppl": lp["ppl"], "total_nll": total,
            "bits_per_char": total / math.log(2) / n_chars,
            "rel_diff_vs_linly_lora": (ll_total / n_scored - lp["mean_nll"]) / lp["mean_nll"],
            "seconds": lp["seconds"], "cmd": lp["cmd"],
        }

    # Reference: linly-lora's own protocol on the whole file, and its tokenizer against llama.cpp's.
    own = linly_eval(a.linly, model, ["--text", path], a.threads)
    res["linly_lora_eval_text"] = {k: own.get(k) for k in ("tokens", "mean_nll", "bits_per_char", "chars", "seconds")}
    ll_tok = linly_ids(a.linly, model, raw)
    ref_tok = llama_tokenize(a.bin_dir, a.gguf, path, no_bos=True)  # verbatim file, as linly-lora reads it
    ll_tok = ll_tok[1:] if add_bos and ll_tok[:1] == [bos] else ll_tok
    same = ll_tok == ref_tok
    res["tokenizer_matches_llama_cpp"] = same
    if not same:
        k = next((i for i, (x, y) in enumerate(zip(ll_tok, ref_tok)) if x != y), min(len(ll_tok), len(ref_tok)))
        res["tokenizer_first_difference"] = {"index": k, "linly_lora": ll_tok[k:k + 8], "llama_cpp": ref_tok[k:k + 8],
                                             "lengths": [len(ll_tok), len(ref_tok)]}
    return res


def zh_prose(tsv, lines, out_path):
    """The first `lines` Chinese sentences (column 1) of a zh<TAB>en file, joined into one paragraph."""
    zh = []
    with open(tsv, encoding="utf-8") as f:
        for line in f:
            col = line.rstrip("\n").split("\t")[0].strip()
            if col:
                zh.append(col)
            if len(zh) >= lines:
                break
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("".join(zh) + "\n")
    return out_path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, help="GGUF model file scored by llama.cpp")
    p.add_argument("--model", help="linly-lora model folder imported from that GGUF "
                   "(default: import it now with `linly-lora import gguf --dtype f32` into WORK/import)")
    p.add_argument("--text", action="append", default=[], help="UTF-8 text file to score (repeatable)")
    p.add_argument("--zh-tsv", help="zh<TAB>en file: its Chinese column, joined into prose, is scored too")
    p.add_argument("--zh-lines", type=int, default=400, help="sentences taken from --zh-tsv (default: 400)")
    p.add_argument("--ctx", type=int, default=0, help="llama-perplexity -c (default: largest power of two "
                   "<= 512 that gives at least two chunks)")
    p.add_argument("--threads", type=int, default=2, help="threads for both tools (default: 2)")
    p.add_argument("--linly-lora", dest="linly", default=os.path.join(REPO, "target/release/linly-lora"),
                   help="linly-lora binary (default: target/release/linly-lora)")
    p.add_argument("--llama-dir", default=os.environ.get("LLAMA_CPP_DIR", os.path.join(REPO, "target/llama.cpp")),
                   help="prefix of benches/build_llama_cpp.sh (default: $LLAMA_CPP_DIR or target/llama.cpp)")
    p.add_argument("--work", default=os.path.join(REPO, "target/llamacpp-ppl"),
                   help="scratch folder (default: target/llamacpp-ppl)")
    p.add_argument("--configs", default="q4_1-default,f32-exact",
                   help="llama.cpp runs, comma-separated, from: " + ", ".join(f"{k} ({v[2]})" for k, v in CONFIGS.items())
                   + " (default: q4_1-default,f32-exact)")
    p.add_argument("--json", dest="json_out", help="also write the results here")
    a = p.parse_args()
    a.bin_dir = os.path.join(a.llama_dir, "bin")
    wanted = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = set(wanted) - set(CONFIGS)
    if unknown or not wanted:
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    needs_f32 = any(CONFIGS[c][0] for c in wanted)
    for t in ("llama-perplexity", "llama-tokenize") + (("llama-quantize",) if needs_f32 else ()):
        if not os.access(os.path.join(a.bin_dir, t), os.X_OK):
            raise SystemExit(f"{a.bin_dir}/{t} not found: build it with benches/build_llama_cpp.sh "
                             f"(LLAMA_CPP_DIR={a.llama_dir})")
    if not os.access(a.linly, os.X_OK):
        raise SystemExit(f"{a.linly} not found: cargo build --release, or pass --linly-lora")
    os.makedirs(a.work, exist_ok=True)

    model = a.model
    if not model:
        model = os.path.join(a.work, "import")
        if not os.path.exists(os.path.join(model, "model.safetensors")):
            run([a.linly, "import", "gguf", a.gguf, "--out", model, "--dtype", "f32"])
    table = piece_bytes_table(os.path.join(model, "tokenizer.json"))

    f32 = os.path.join(a.work, os.path.splitext(os.path.basename(a.gguf))[0] + ".F32.gguf")
    if any(CONFIGS[c][0] for c in wanted) and not os.path.exists(f32):
        run([os.path.join(a.bin_dir, "llama-quantize"), "--allow-requantize", a.gguf, f32 + ".tmp", "F32"])
        os.replace(f32 + ".tmp", f32)
    a.configs = [(c, f32 if CONFIGS[c][0] else a.gguf, CONFIGS[c][1]) for c in wanted]

    texts = [(os.path.splitext(os.path.basename(t))[0], t) for t in a.text]
    if a.zh_tsv:
        texts.append(("zh_prose", zh_prose(a.zh_tsv, a.zh_lines, os.path.join(a.work, "zh_prose.txt"))))
    if not texts:
        raise SystemExit("nothing to score: pass --text FILE and/or --zh-tsv FILE")

    results = []
    for name, path in texts:
        r = compare(name, path, a, model, table)
        results.append(r)
        print(f"\n== {path}: {r['tokens_llama_cpp']} tokens, -c {r['ctx']}, {r['chunks']} chunks, "
              f"{r['scored_tokens']} scored tokens / {r['scored_chars']} chars (add_bos={r['add_bos']})")
        print(f"  {'':24} {'nats/token':>12} {'bits/char':>10} {'rel. diff':>10} {'seconds':>8}")
        ll = r["linly_lora"]
        print(f"  {'linly-lora (f32)':24} {ll['nll_per_token']:12.6f} {ll['bits_per_char']:10.5f} {'':>10} {ll['seconds']:8.1f}")
        for label, c in r["llama_cpp"].items():
            print(f"  {'llama.cpp ' + label:24} {c['nll_per_token']:12.6f} {c['bits_per_char']:10.5f} "
                  f"{c['rel_diff_vs_linly_lora']:+10.2e} {c['seconds']:8.1f}")
        o = r["linly_lora_eval_text"]
        print(f"  linly-lora eval --text (own protocol, all {o['tokens']} tokens): {o['mean_nll']:.4f} nats/token, "
              f"{o['bits_per_char']:.4f} bits/char; tokenizer == llama.cpp: {r['tokenizer_matches_llama_cpp']}")
        if not r["tokenizer_matches_llama_cpp"]:
            print(f"  first tokenizer difference: {r['tokenizer_first_difference']}")
    if a.json_out:
        with open(a.json_out + ".tmp", "w") as f:
            json.dump({"gguf": a.gguf, "model": model, "threads": a.threads, "results": results}, f, indent=2)
        os.replace(a.json_out + ".tmp", a.json_out)


if __name__ == "__main__":
    main()
