#!/usr/bin/env python3
"""Checks that HF PEFT loads adapters written by linly-lora and computes what we compute.

Needs torch, transformers and peft (the H100 host has them). Usage, from the repo root:
    INTEROP_DIR=runs/interop cargo test --release --test lora -- --ignored export_interop   # here
    python3 benches/peft_interop.py runs/interop                                             # there
"""
import sys, json
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from peft import PeftModel

d = sys.argv[1]
fx = "tests/fixtures/tiny_llama"
exp = load_file(f"{fx}/expected.safetensors")
ids = exp["resized_input_ids"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def peft_logits(adapter):
    base = LlamaForCausalLM.from_pretrained(f"{fx}/base", torch_dtype=torch.float32)
    base.resize_token_embeddings(384)
    m = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits.float()


res = {}
res["all_vs_reference"] = rel(peft_logits(f"{d}/ours_all"), exp["adapter_logits"])
ours = load_file(f"{d}/ours_new_rows_logits.safetensors")["logits"]
res["new_rows_vs_linly"] = rel(peft_logits(f"{d}/ours_new_rows"), ours)
ok = all(v < 1e-4 for v in res.values())
print("RESULT " + json.dumps({**res, "ok": ok}))
sys.exit(0 if ok else 1)
