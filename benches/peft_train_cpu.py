# The peer for `linly-lora bench train`: HF transformers + PEFT doing the same training step on
# the CPU. SmolLM2-135M's shape with random weights, LoRA r 8 / alpha 16 on all seven projections,
# the tied embedding/LM head trainable (modules_to_save, ensure_weight_tying), AdamW, fp32,
# batch 4 x seq 256, 2 threads. The model and LoRA setup are those of
# ../shared/bench/lora_cpu_bench.py (tied_ensure); this copy only times the training step, with
# the warm-up and step counts of ours, and splits it into forward / backward / optimizer.
# usage: python benches/peft_train_cpu.py WARMUP STEPS   -> one JSON line on stdout
import json, resource, sys, time, warnings
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

warm, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
model.config.use_cache = False
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True))
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(1)
pm.train()
phases, total = [0.0, 0.0, 0.0], 0.0
for i in range(warm + steps):
    ids = torch.randint(3, cfg.vocab_size, (4, 256), generator=g)
    t0 = time.perf_counter()
    loss = pm(input_ids=ids, labels=ids).loss
    loss.item()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if i >= warm:
        total += t3 - t0
        for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            phases[k] += dt / steps
print(json.dumps(dict(tokens_per_s=4 * 256 * steps / total, s_per_step=total / steps,
                      forward_s=phases[0], backward_s=phases[1], optimizer_s=phases[2],
                      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      torch=torch.__version__)))
