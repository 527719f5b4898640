#!/usr/bin/env python3
"""Cross-check `linly-lora import gguf` against gguf-py, the reference Python reader.

For every tensor of a GGUF file, the importer's f32 safetensors output must equal, bit for bit,
`gguf.quants.dequantize` of the same tensor (reshaped to HF's row-major shape and, for
attn_q/attn_k, un-permuted with transformers' `reverse_permute_weights` formula).

It also checks the rebuilt tokenizer.json against an independent re-implementation of
llama.cpp's byte-level BPE (regex pre-split per `tokenizer.ggml.pre`, byte→unicode map, merges by
rank) on a set of strings, when the GGUF has a `gpt2` tokenizer and the `tokenizers` and `regex`
packages are installed.

Requirements: numpy, gguf (pip install gguf numpy); optional: tokenizers, regex.

Usage:
  python benches/gguf_crosscheck.py --gguf MODEL.gguf
  python benches/gguf_crosscheck.py --synthetic          # one tensor type per weight, random blocks
  python benches/gguf_crosscheck.py --gguf MODEL.gguf --generate "The capital of France is"
  --import-cmd "cargo run --release --quiet -- import gguf {gguf} --out {out} --dtype f32"
      (the default; {gguf} and {out} are substituted)

Exit status 0 when everything matches.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

DEFAULT_CMD = "cargo run --release --quiet -- import gguf {gguf} --out {out} --dtype f32"

LAYER_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in GLOBAL_MAP:
        return GLOBAL_MAP[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in LAYER_MAP:
        return f"model.layers.{parts[1]}.{LAYER_MAP[parts[2]]}.weight", parts[2]
    return None, None


def reverse_permute(w, n_head):
    # transformers.modeling_gguf_pytorch_utils: undo convert_hf_to_gguf.py's permute.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": np.float32, "F16": np.float16}[v["dtype"]]
        out[k] = np.frombuffer(data[base + a:base + b], dtype=dt).reshape(v["shape"])
    return out


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def run_import(cmd, path, out):
    full = cmd.format(gguf=shlex.quote(path), out=shlex.quote(out))
    print(f"$ {full}", flush=True)
    subprocess.run(full, shell=True, check=True)


def compare_weights(path, out_dir):
    reader = gguf.GGUFReader(path)
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv") or n_head)
    got = read_safetensors(os.path.join(out_dir, "model.safetensors"))
    per_type = {}
    ok = True
    seen = set()
    for t in reader.tensors:
        name, kind = hf_name(t.name)
        if name is None:
            continue
        seen.add(name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ref = ref.reshape([int(d) for d in reversed(t.shape.tolist())])
        if kind == "attn_q":
            ref = reverse_permute(ref, n_head)
        elif kind == "attn_k":
            ref = reverse_permute(ref, n_kv)
        mine = got.get(name)
        tname = t.tensor_type.name
        stat = per_type.setdefault(tname, {"tensors": 0, "elements": 0, "mismatched": 0, "max_abs_diff": 0.0})
        stat["tensors"] += 1
        if mine is None or mine.shape != ref.shape or mine.dtype != np.float32:
            print(f"FAIL {t.name} -> {name}: missing or wrong shape/dtype "
                  f"({None if mine is None else (mine.shape, mine.dtype)} vs {ref.shape})")
            ok = False
            continue
        same = (mine.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(mine) & np.isnan(ref))
        bad = int((~same).sum())
        stat["elements"] += ref.size
        stat["mismatched"] += bad
        if bad:
            ok = False
            diff = float(np.nanmax(np.abs(mine.astype(np.float64) - ref.astype(np.float64))))
            stat["max_abs_diff"] = max(stat["max_abs_diff"], diff)
            print(f"FAIL {t.name} ({tname}): {bad}/{ref.size} elements differ, max |diff| {diff:g}")
    extra = set(got) - seen
    if extra:
        print(f"FAIL: output has tensors with no GGUF source: {sorted(extra)[:5]}")
        ok = False
    for k, v in sorted(per_type.items()):
        print(f"  {k:6s} tensors={v['tensors']:4d} elements={v['elements']:>11d} "
              f"bit-mismatches={v['mismatched']} max|diff|={v['max_abs_diff']:g}")
    return ok, reader


BYTES_TO_UNICODE = None


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE = {"smollm": [r"\p{N}", GPT2], "starcoder": [r"\p{N}", GPT2], "gpt-2": [GPT2]}


def llama_cpp_bpe(reader, texts):
    """llama.cpp's llm_tokenizer_bpe_session, minus special-token partitioning."""
    import regex
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    pre = field(reader, "tokenizer.ggml.pre") or "default"
    if pre not in PRE:
        print(f"  (no reference regexes for pre-tokenizer {pre!r}; skipping)")
        return None
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    ranks = {}
    for i, m in enumerate(merges):
        p = m.find(" ", 1)
        ranks.setdefault((m[:p], m[p + 1:]), i)
    b2u = bytes_to_unicode()

    def split(text):
        pieces = [text]
        for rx in PRE[pre]:
            nxt = []
            for p in pieces:
                last = 0
                for mt in regex.finditer(rx, p):
                    if mt.start() > last:
                        nxt.append(p[last:mt.start()])
                    nxt.append(mt.group())
                    last = mt.end()
                if last < len(p):
                    nxt.append(p[last:])
            pieces = nxt
        return pieces

    out = {}
    for text in texts:
        ids = []
        for word in split(text):
            syms = list("".join(b2u[b] for b in word.encode("utf-8")))
            while len(syms) > 1:
                best = min(((ranks.get((syms[i], syms[i + 1]), 1 << 60), i) for i in range(len(syms) - 1)))
                if best[0] == 1 << 60:
                    break
                i = best[1]
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            for s in syms:
                if s in vocab:
                    ids.append(vocab[s])
                else:
                    ids.extend(vocab[c] for c in s if c in vocab)
        out[text] = ids
    return out


TEXTS = [
    "The capital of France is", "Hello world! 123", "Hello, we can use", "  multiple   spaces",
    "Café déjà vu.", "naïve résumé — 3.14159 × 2", "def f(x):\n    return x**2\n", "你好，世界", "emoji 🙂👍!",
    "It's we'll they're I've", "tabs\tand\nnewlines\r\n", "1234567890", "",
]


def compare_tokenizer(reader, out_dir):
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        print("  tokenizer: not gpt2; reference check skipped")
        return True
    try:
        import tokenizers  # noqa: F401
        from tokenizers import Tokenizer
    except ImportError:
        print("  tokenizer: `tokenizers` not installed; skipped")
        return True
    ref = llama_cpp_bpe(reader, TEXTS)
    if ref is None:
        return True
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    ok = True
    for text in TEXTS:
        mine = tok.encode(text, add_special_tokens=False).ids
        if mine != ref[text]:
            ok = False
            print(f"FAIL tokenize {text!r}: tokenizer.json {mine} vs llama.cpp-style {ref[text]}")
    print(f"  tokenizer: {len(TEXTS)} strings, {'all equal' if ok else 'MISMATCH'}")
    return ok


def generate(out_dir, prompt, n_new):
    """Greedy decoding with a plain numpy LLaMA in HF conventions (rotate_half RoPE), from the
    imported folder alone. A wrong Q/K un-permutation or name mapping shows up as gibberish."""
    from tokenizers import Tokenizer
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    W = {k: v.astype(np.float32) for k, v in read_safetensors(os.path.join(out_dir, "model.safetensors")).items()}
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    ids = tok.encode(prompt).ids
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    lm_head = W.get("lm_head.weight", W["model.embed_tokens.weight"])

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    for _ in range(n_new):
        T = len(ids)
        x = W["model.embed_tokens.weight"][ids]
        inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        ang = np.outer(np.arange(T), inv)
        cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
        sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)

        def rope(q):
            rot = np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1)
            return q * cos + rot * sin

        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = rms(x, W[p + "input_layernorm.weight"])
            q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
            k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
            v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
            q, k = rope(q), rope(k)
            k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
            a = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ v).transpose(1, 0, 2).reshape(T, nh * hd)
            x = x + o @ W[p + "self_attn.o_proj.weight"].T
            h = rms(x, W[p + "post_attention_layernorm.weight"])
            g = h @ W[p + "mlp.gate_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
        logits = rms(x[-1], W["model.norm.weight"]) @ lm_head.T
        ids.append(int(logits.argmax()))
    return tok.decode(ids)


# (gguf tensor name suffix -> type) for the synthetic model: every dequantizable type once.
SYNTH_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32,
    "blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q6_K, "blk.0.attn_v.weight": Q.Q5_0,
    "blk.0.attn_output.weight": Q.Q5_1, "blk.0.ffn_gate.weight": Q.Q4_0, "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q2_K,
    "blk.1.attn_q.weight": Q.Q3_K, "blk.1.attn_k.weight": Q.Q5_K, "blk.1.attn_v.weight": Q.BF16,
    "blk.1.attn_output.weight": Q.F16, "blk.1.ffn_gate.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.F32,
    "blk.1.ffn_down.weight": Q.Q4_K,
}
# Byte offsets of the f16 scale fields in each block, so random blocks get finite scales.
SCALE_OFFSETS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
                 Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def synthetic(path):
    rng = np.random.default_rng(1234)
    embd, ff, heads, kv, layers, vocab = 256, 512, 4, 2, 2, 384
    hd = embd // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    b2u = bytes_to_unicode()
    toks = [b2u[b] for b in range(256)] + ["<|endoftext|>", "\u0120t", "to"]
    toks += [f"tok{i}" for i in range(vocab - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(toks)
    w.add_token_types([1] * 256 + [3] + [1] * (vocab - 257))
    w.add_token_merges(["\u0120 t", "t o"])
    w.add_eos_token_id(256)
    shapes = {"token_embd": (vocab, embd), "output": (vocab, embd), "attn_q": (heads * hd, embd),
              "attn_k": (kv * hd, embd), "attn_v": (kv * hd, embd), "attn_output": (embd, heads * hd),
              "ffn_gate": (ff, embd), "ffn_up": (ff, embd), "ffn_down": (embd, ff)}
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for l in range(layers):
        names += [f"blk.{l}.{k}.weight" for k in ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                   "attn_output", "ffn_gate", "ffn_up", "ffn_down"]]
    for name in names:
        kind = name.split(".")[-2]
        qt = SYNTH_TYPES.get(name, Q.F32)
        shape = shapes.get(kind, (embd,))
        if qt in (Q.F32, Q.F16):
            arr = rng.standard_normal(shape).astype(np.float32 if qt == Q.F32 else np.float16)
            w.add_tensor(name, arr)
            continue
        if qt == Q.BF16:
            raw = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(name, raw.view(np.uint8).reshape(shape[0], -1), raw_dtype=qt)
            continue
        block, bsize = gguf.GGML_QUANT_SIZES[qt]
        n_blocks = shape[0] * shape[1] // block
        raw = rng.integers(0, 256, size=(n_blocks, bsize), dtype=np.uint8)
        for off in SCALE_OFFSETS[qt]:
            scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
            raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
        w.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", action="append", default=[], help="a LLaMA GGUF to import and check (repeatable)")
    ap.add_argument("--synthetic", action="store_true", help="also check a generated GGUF using every supported type")
    ap.add_argument("--import-cmd", default=DEFAULT_CMD)
    ap.add_argument("--keep", action="store_true", help="keep the temporary output folders")
    ap.add_argument("--generate", metavar="PROMPT", help="greedy-decode from each --gguf import with a numpy LLaMA")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    if not args.gguf and not args.synthetic:
        ap.error("give --gguf FILE and/or --synthetic")
    work = tempfile.mkdtemp(prefix="gguf-crosscheck-")
    files = list(args.gguf)
    if args.synthetic:
        p = os.path.join(work, "synthetic.gguf")
        synthetic(p)
        files.append(p)
    ok = True
    for i, path in enumerate(files):
        out = os.path.join(work, f"out{i}")
        print(f"== {path}")
        run_import(args.import_cmd, path, out)
        w_ok, reader = compare_weights(path, out)
        t_ok = compare_tokenizer(reader, out)
        ok = ok and w_ok and t_ok
        if args.generate and path in args.gguf:
            print(f"  generate: {generate(out, args.generate, args.new_tokens)!r}")
    if not args.keep:
        subprocess.run(["rm", "-rf", work])
    else:
        print(f"outputs kept in {work}")
    print("OK: all tensors bit-identical to gguf-py" if ok else "MISMATCHES FOUND")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
