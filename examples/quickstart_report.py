#!/usr/bin/env python3
"""Writes QDIR/report.json from the quickstart's eval/vocab-stats/train outputs and prints the table.

usage: quickstart_report.py QDIR WALL_SECONDS [TRAIN_DIR]
  QDIR holds eval_{base,resized,merged}_{zh,en}.json and vocab_stats.json (examples/quickstart.sh,
  examples/quickstart_gpu.sh); TRAIN_DIR (default QDIR/train) holds the run's report.json.
"""
import json, os, sys
q, wall = sys.argv[1], int(sys.argv[2])
train_dir = sys.argv[3] if len(sys.argv) > 3 else os.path.join(q, "train")
ev = {(m, l): json.load(open(os.path.join(q, f"eval_{m}_{l}.json"))) for m in ("base", "resized", "merged") for l in ("zh", "en")}
stats = json.load(open(os.path.join(q, "vocab_stats.json")))["results"]
tpc = {("base" if "base" in r["tokenizer"] else "extended", "zh" if "heldout_zh" in r["file"] else "en"): r["tokens_per_char"] for r in stats}
train = json.load(open(os.path.join(train_dir, "report.json")))
rows = {}
for m in ("base", "resized", "merged"):
    tok = "base" if m == "base" else "extended"
    rows[m] = {"zh_bits_per_char": ev[(m, "zh")]["bits_per_char"], "en_bits_per_char": ev[(m, "en")]["bits_per_char"],
               "zh_tokens_per_char": tpc[(tok, "zh")], "en_tokens_per_char": tpc[(tok, "en")]}
    # Where the zh loss sits: targets that are added pieces vs base-vocabulary ones.
    split = ev[(m, "zh")].get("by_vocab")
    if split:
        rows[m]["zh_added_targets_nats_per_token"] = split["added"]["mean_nll"]
        rows[m]["zh_added_targets_bits_per_char"] = split["added"]["bits_per_char"]
b, a = rows["base"], rows["merged"]
report = {
    "rows": rows,
    "zh_bits_per_char_change": a["zh_bits_per_char"] / b["zh_bits_per_char"] - 1,
    "en_bits_per_char_change": a["en_bits_per_char"] / b["en_bits_per_char"] - 1,
    "targets": {"zh_bits_per_char_change <= -0.25": a["zh_bits_per_char"] / b["zh_bits_per_char"] - 1 <= -0.25,
                "en_bits_per_char_change <= +0.03": a["en_bits_per_char"] / b["en_bits_per_char"] - 1 <= 0.03,
                "zh_tokens_per_char <= 0.8": a["zh_tokens_per_char"] <= 0.8},
    "train": {k: train.get(k) for k in ("steps", "first_loss", "last_loss", "tokens_per_s", "seconds", "packing_efficiency") if k in train},
    "wall_seconds": wall,
    "heldout": {"zh": "Lu Xun, Call to Arms (wordcloud sdist)", "en": "Alice in Wonderland, ch. I (wordcloud sdist)"},
}
tmp = os.path.join(q, "report.json.tmp")
json.dump(report, open(tmp, "w"), indent=2, ensure_ascii=False)
os.replace(tmp, os.path.join(q, "report.json"))
print()
print(f"{'model':<10} {'zh bits/char':>13} {'en bits/char':>13} {'zh tokens/char':>15}")
for m in ("base", "resized", "merged"):
    r = rows[m]
    print(f"{m:<10} {r['zh_bits_per_char']:>13.3f} {r['en_bits_per_char']:>13.4f} {r['zh_tokens_per_char']:>15.3f}")
print(f"change     {report['zh_bits_per_char_change']:>+13.1%} {report['en_bits_per_char_change']:>+13.2%}")
for m in ("resized", "merged"):
    r = rows[m]
    if "zh_added_targets_nats_per_token" in r:
        print(f"  {m}: added-piece targets carry {r['zh_added_targets_bits_per_char']:.3f} of the zh bits/char "
              f"({r['zh_added_targets_nats_per_token']:.2f} nats each)")
print(f"wall time  {wall // 60} min {wall % 60} s")
for k, ok in report["targets"].items():
    print(f"  target {k}: {'met' if ok else 'NOT met'}")
