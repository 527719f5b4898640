#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (standard library only).

Seeds are small valid inputs of the tiny shape the targets use (hidden 8, one layer, two heads
of 4 with one KV head, FFN 16, vocabulary 16), so that the fuzzer starts past the first checks.
Run from anywhere: `python3 fuzz/seeds.py`.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
H, FFN, V, Q, KV = 8, 16, 16, 8, 4
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}


def values(n, dtype, seed=1):
    x = seed
    out = bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) % (1 << 31)
        v = (x / (1 << 31) - 0.5) * 0.1
        if dtype == "F32":
            out += struct.pack("<f", v)
        elif dtype == "F16":
            out += struct.pack("<e", v)
        elif dtype == "BF16":
            out += struct.pack("<f", v)[2:]
        elif dtype == "I64":
            out += struct.pack("<q", x % V)
        elif dtype == "I32":
            out += struct.pack("<i", x % V)
    return bytes(out)


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape)] with deterministic contents."""
    header, data = {}, bytearray()
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in sorted(tensors):
        n = 1
        for d in shape:
            n *= d
        b = values(n, dtype, seed=len(data) + 1)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(len(h) + 8) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(data)


def model(dtype="F32", tied=False):
    t = [("model.embed_tokens.weight", dtype, [V, H]), ("model.norm.weight", dtype, [H])]
    if not tied:
        t.append(("lm_head.weight", dtype, [V, H]))
    p = "model.layers.0."
    for n, s in [("self_attn.q_proj", [Q, H]), ("self_attn.k_proj", [KV, H]), ("self_attn.v_proj", [KV, H]),
                 ("self_attn.o_proj", [H, Q]), ("mlp.gate_proj", [FFN, H]), ("mlp.up_proj", [FFN, H]),
                 ("mlp.down_proj", [H, FFN]), ("input_layernorm", [H]), ("post_attention_layernorm", [H])]:
        t.append((p + n + ".weight", dtype, s))
    return t


SHAPES = {"q_proj": ("self_attn", Q, H), "k_proj": ("self_attn", KV, H), "v_proj": ("self_attn", KV, H),
          "o_proj": ("self_attn", H, Q), "gate_proj": ("mlp", FFN, H), "up_proj": ("mlp", FFN, H),
          "down_proj": ("mlp", H, FFN)}


def lora(targets, r, dtype="F32", ranks=None):
    t = []
    for m in targets:
        part, out, inp = SHAPES[m]
        k = (ranks or {}).get(m, r)
        key = f"base_model.model.model.layers.0.{part}.{m}"
        t += [(key + ".lora_A.weight", dtype, [k, inp]), (key + ".lora_B.weight", dtype, [out, k])]
    return t


def adapter_config(**kw):
    c = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "lora_dropout": 0.0, "target_modules": list(SHAPES),
         "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {},
         "alpha_pattern": {}, "modules_to_save": None, "trainable_token_indices": None,
         "layers_to_transform": None, "task_type": "CAUSAL_LM"}
    c.update(kw)
    return json.dumps(c).encode()


def adapter(config, tensors):
    return struct.pack("<H", len(config)) + config + tensors


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def main():
    st = "safetensors_reader"
    for dt in ["F32", "F16", "BF16"]:
        write(st, f"model-{dt.lower()}", safetensors(model(dt)))
    write(st, "model-tied", safetensors(model("F32", tied=True)))
    write(st, "ids-i64", safetensors([("input_ids", "I64", [2, 5])]))
    write(st, "ids-i32", safetensors([("input_ids", "I32", [7])]))
    write(st, "ids-empty", safetensors([("input_ids", "I64", [2, 0])]))
    write(st, "imatrix", safetensors([("model.layers.0.self_attn.q_proj.weight", "F32", [H]), ("model.layers.0.mlp.down_proj.weight", "F32", [FFN])],
                                     {"format": "linly-imatrix", "version": "1", "tokens": "64"}))

    ad = "adapter_loader"
    all7 = list(SHAPES)
    write(ad, "lora-r1", adapter(adapter_config(), safetensors(lora(all7, 1))))
    write(ad, "regex", adapter(adapter_config(r=2, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q|v|down)_proj",
                                              rank_pattern={"v_proj": 1}, alpha_pattern={"down_proj": 4.0}, use_rslora=True,
                                              layers_to_transform=[0]),
                               safetensors(lora(["q_proj", "v_proj", "down_proj"], 2, "F16", {"v_proj": 1}))))
    write(ad, "all-linear", adapter(adapter_config(target_modules="all-linear"), safetensors(lora(["k_proj", "up_proj"], 1, "BF16"))))
    write(ad, "tables", adapter(adapter_config(modules_to_save=["embed_tokens", "lm_head"], target_modules=["q_proj"]),
                                safetensors(lora(["q_proj"], 1) + [("base_model.model.model.embed_tokens.weight", "F32", [V + 2, H]),
                                                                  ("base_model.model.lm_head.weight", "F32", [V + 2, H])])))
    tok = [("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", "F32", [2, H]),
           ("base_model.model.lm_head.token_adapter.trainable_tokens_delta", "F32", [2, H])]
    write(ad, "trainable-tokens", adapter(adapter_config(trainable_token_indices=[V, V + 1], target_modules=["o_proj"]),
                                          safetensors(lora(["o_proj"], 1) + tok)))
    write(ad, "trainable-tokens-per-module", adapter(adapter_config(trainable_token_indices={"embed_tokens": [3, V], "lm_head": [V, 5]},
                                                                    target_modules=["gate_proj"]),
                                                     safetensors(lora(["gate_proj"], 1) + tok)))
    write(ad, "tied-rows", adapter(adapter_config(trainable_token_indices=[2, 3], target_modules=["up_proj"]),
                                   safetensors(lora(["up_proj"], 1) + tok[:1])))

    rp = "recipe_parser"
    minimal = '[model]\npath = "model"\n[[data]]\nkind = "text"\npath = "zh.txt"\n[output]\ndir = "out"\n'
    write(rp, "minimal", minimal)
    write(rp, "full", '''[model]
path = "model"
tokenizer = "model"
device = "cpu"
[vocab]
extension = "ext/vocab_extension.json"
init = "noisy-mean"
seed = 3
init_std = 0.02
init_text = "zh.txt"
init_tokens = 256
[lora]
r = 4
alpha = 8.0
dropout = 0.05
rslora = true
targets = ["q_proj", "v_proj"]
init_from = "adapter"
init = "gaussian"
enabled = true
[trainable]
embed_tokens = "new_rows"
lm_head = "all"
[[data]]
kind = "text"
path = "zh.txt"
weight = [0.2, 0.8]
lang = "zh"
name = "zh"
limit = 100
self_distill = 0.0
[[data]]
kind = "parallel"
path = "pairs.tsv"
weight = 0.5
template = "chatml"
[[data]]
kind = "alpaca"
path = "alpaca.json"
template = "llama2"
self_distill = 0.5
[[data]]
kind = "tokenized"
path = "ids.jsonl"
[mix]
bucketed = true
bins = 10
packing = false
[train]
seq_len = 64
batch_size = 2
grad_accum = 4
steps = 100
lr = 3e-4
embed_lr = 1e-4
warmup_ratio = 0.1
schedule = "linear"
weight_decay = 0.0
max_grad_norm = 0.0
seed = 1
[precision]
dtype = "fp16"
scaler = "linly"
init_scale = 1024.0
growth_interval = 100
hysteresis = 2
min_scale = 1.0
new_rows_f32 = true
[output]
dir = "out"
save_every = 50
keep_last = 3
eval_every = 10
plots = false
[[eval]]
path = "valid.txt"
name = "valid"
lang = "zh"
''')
    write(rp, "stages", minimal.replace('[model]\npath = "model"\n', '[model]\npath = "model"\n[vocab]\nadd = "words.txt"\ninit = "random"\n') + '''[[stage]]
name = "embed"
steps = 10
lr = 1e-3
lora = false
trainable = { embed_tokens = "new_rows", lm_head = "new_rows" }
[[stage]]
steps = 20
embed_lr = 0.0
lora = true
''')
    write(rp, "naive-bf16", minimal + '[precision]\ndtype = "bf16"\nscaler = "naive"\n[lora]\nenabled = false\n')
    for f in sorted(os.listdir(os.path.join(HERE, "..", "recipes"))):
        if f.endswith(".toml"):
            with open(os.path.join(HERE, "..", "recipes", f), "rb") as src:
                write(rp, f, src.read())
    for t in ["gguf_reader", st, ad, rp]:
        print(t, len(os.listdir(os.path.join(CORPUS, t))) if os.path.isdir(os.path.join(CORPUS, t)) else 0, "seeds")


if __name__ == "__main__":
    main()
