#!/usr/bin/env python3
"""Writes QDIR/report.json from the quickstart's eval/vocab-stats/train outputs and prints the table.

usage: quickstart_report.py QDIR WALL_SECONDS [TRAIN_DIR]
  QDIR holds eval_{base,resized,merged}_{zh,zh2,en}.json (zh2: the second held-out Chinese text,
  when the quickstart could fetch it) and vocab_stats.json (examples/quickstart.sh,
  examples/quickstart_gpu.sh); TRAIN_DIR (default QDIR/train) holds the run's report.json.
"""
import json, os, sys
q, wall = sys.argv[1], int(sys.argv[2])
train_dir = sys.argv[3] if len(sys.argv) > 3 else os.path.join(q, "train")
MODELS = ("base", "resized", "merged")
langs = [l for l in ("zh", "zh2", "en") if os.path.exists(os.path.join(q, f"eval_base_{l}.json"))]
ev = {(m, l): json.load(open(os.path.join(q, f"eval_{m}_{l}.json"))) for m in MODELS for l in langs}
stats = json.load(open(os.path.join(q, "vocab_stats.json")))["results"]
FILES = {"heldout_zh": "zh", "heldout2_zh": "zh2", "heldout_en": "en"}
tpc = {}
for r in stats:
    lang = next((l for f, l in FILES.items() if os.path.basename(r["file"]).startswith(f + ".")), None)
    if lang:
        tpc[("base" if r["tokenizer"].rstrip("/").endswith("base") else "extended", lang)] = r["tokens_per_char"]
train = json.load(open(os.path.join(train_dir, "report.json")))
rows = {}
for m in MODELS:
    tok = "base" if m == "base" else "extended"
    rows[m] = {}
    for l in langs:
        rows[m][f"{l}_bits_per_char"] = ev[(m, l)]["bits_per_char"]
        rows[m][f"{l}_tokens_per_char"] = tpc.get((tok, l))
        # Where the loss sits: targets that are added pieces vs base-vocabulary ones.
        split = ev[(m, l)].get("by_vocab")
        if split and l != "en":
            rows[m][f"{l}_added_targets_nats_per_token"] = split["added"]["mean_nll"]
            rows[m][f"{l}_base_targets_nats_per_token"] = split["base"]["mean_nll"]
b, a, r0 = rows["base"], rows["merged"], rows["resized"]
change = {l: a[f"{l}_bits_per_char"] / b[f"{l}_bits_per_char"] - 1 for l in langs}
step0 = {l: r0[f"{l}_bits_per_char"] - b[f"{l}_bits_per_char"] for l in langs if l != "en"}
targets = {"en_bits_per_char_change <= +0.01": change["en"] <= 0.01,
           "zh_tokens_per_char <= 0.8": (a.get("zh_tokens_per_char") or 9) <= 0.8}
for l in langs:
    if l != "en":
        targets[f"{l}_bits_per_char <= base"] = change[l] <= 0
        targets[f"{l}_step0_cost <= +1.0 bit/char"] = step0[l] <= 1.0
report = {
    "rows": rows,
    "bits_per_char_change": change,
    "step0_cost_bits_per_char": step0,
    "targets": targets,
    "train": {k: train.get(k) for k in ("total_steps", "planned_steps", "first_loss", "last_loss", "tokens_per_s", "wall_s", "packing_efficiency") if k in train},
    "wall_seconds": wall,
    "heldout": {"zh": "Lu Xun, Call to Arms (wordcloud sdist)", "zh2": "zh_CN manual pages (Debian manpages-zh)",
                "en": "Alice in Wonderland, ch. I (wordcloud sdist)"},
}
tmp = os.path.join(q, "report.json.tmp")
json.dump(report, open(tmp, "w"), indent=2, ensure_ascii=False)
os.replace(tmp, os.path.join(q, "report.json"))
NAMES = {"zh": "zh Lu Xun", "zh2": "zh manpages", "en": "en Alice"}
print()
print(f"{'model':<10}" + "".join(f"{NAMES[l] + ' b/c':>18}" for l in langs) + f"{'zh tokens/char':>16}")
for m in MODELS:
    r = rows[m]
    print(f"{m:<10}" + "".join(f"{r[f'{l}_bits_per_char']:>18.4f}" for l in langs) + f"{r.get('zh_tokens_per_char') or 0:>16.3f}")
print(f"{'change':<10}" + "".join(f"{change[l]:>+18.2%}" for l in langs))
print(f"{'step 0':<10}" + "".join(f"{step0[l]:>+18.3f}" if l in step0 else f"{'':>18}" for l in langs) + "   (resized − base, bits/char)")
for m in ("resized", "merged"):
    r = rows[m]
    if "zh_added_targets_nats_per_token" in r:
        print(f"  {m}: Lu Xun targets that are added pieces cost {r['zh_added_targets_nats_per_token']:.2f} nats each, "
              f"base-vocabulary targets {r['zh_base_targets_nats_per_token']:.2f}")
print(f"wall time  {wall // 60} min {wall % 60} s")
for k, ok in targets.items():
    print(f"  target {k}: {'met' if ok else 'NOT met'}")
