"""Visible text of Debian's zh-CN HTML documentation, and the guard that keeps reported text out.

Shared by quickstart_data.py (the CPU quickstart's technical Chinese) and gpu_data.py (the GPU
recipe's). Python 3 standard library only.

Filters (why): a line that shares a run of 16 Chinese (40 English) characters with any held-out or
validation file is dropped, so that no reported or choosing text is trained on; so is any line
naming Lu Xun (鲁迅), the held-out author. Repeated lines (page furniture) are kept once; Chinese
lines need some Chinese (pages left untranslated are English).
"""
import glob
import html
import os
import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# Runs shared with a protected text, in characters without whitespace: a Chinese clause; about
# seven English words (shorter English runs are common phrases, not copied text).
SHINGLE_ZH = 16
SHINGLE_EN = 40
MIN_CJK_SHARE = 0.2


def read(path, errors="replace"):
    """A UTF-8 text with its line ends made `\n`; documentation is read with `errors="replace"`
    (a stray byte in a manual costs one character), the quickstart's own sources strictly."""
    with open(path, encoding="utf-8", errors=errors) as f:
        return f.read().replace("\r\n", "\n").replace("\r", "\n")


def write(path, text):
    """Atomic: a temporary file beside `path`, then a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def html_lines(path):
    """Visible text of one HTML page, a line per block element."""
    s = read(path)
    s = re.sub(r"(?is)<(script|style|head|pre)\b.*?</\1>", "\n", s)
    s = re.sub(r"(?i)<br\s*/?>|</(p|div|h[1-6]|li|tr|td|th|dt|dd|table|caption)>", "\n", s)
    s = re.sub(r"(?s)<[^>]+>", " ", s)
    s = html.unescape(s)
    out = []
    for line in s.split("\n"):
        line = re.sub(r"[ \t\u3000\xa0]+", " ", line).strip()
        if line:
            out.append(line)
    return out


def squash(text):
    return re.sub(r"\s+", "", text)


def shingles(text, n):
    t = squash(text)
    return {t[i:i + n] for i in range(max(0, len(t) - n + 1))}


class Guard:
    """Drops lines that overlap a protected text."""

    def __init__(self, texts, names, n):
        self.n = n
        self.grams = set()
        for t in texts:
            self.grams |= shingles(t, n)
        self.names = names
        self.dropped_overlap = 0
        self.dropped_name = 0

    def keep(self, line):
        if any(n in line for n in self.names):
            self.dropped_name += 1
            return False
        t = squash(line)
        n = self.n
        if any(t[i:i + n] in self.grams for i in range(max(0, len(t) - n + 1))):
            self.dropped_overlap += 1
            return False
        return True


# A training source's documents are shuffled whole (`[[data]]` text: one per blank-line block),
# so a source written as one block is read front to back: gpu_data.py's first version wrote the
# English handbook as one 1 MB block and each zh-CN manual as one. Blocks longer than LONG_DOC
# characters are cut at line ends into pieces of at least DOC_PIECE (a manual's section, a
# play's speeches stay whole).
LONG_DOC = 2000
DOC_PIECE = 800


def cut_long_documents(text):
    """`text` as blank-line-separated documents (each stripped, empty ones dropped, `\n`-ended),
    with every document longer than LONG_DOC characters cut at line ends into pieces of at least
    DOC_PIECE characters (the last piece of a document may be shorter)."""
    out = []
    for doc in re.split(r"\n\s*\n", text):
        doc = doc.strip()
        if not doc:
            continue
        if len(doc) <= LONG_DOC:
            out.append(doc)
            continue
        piece, n = [], 0
        for line in doc.split("\n"):
            piece.append(line)
            n += len(line) + 1
            if n >= DOC_PIECE:
                out.append("\n".join(piece))
                piece, n = [], 0
        if piece:
            out.append("\n".join(piece))
    return "\n\n".join(out) + "\n"


def chinese_doc(files, guard, seen):
    lines = []
    for f in files:
        for line in html_lines(f):
            n = len(CJK.findall(line))
            if n < 4 or n < MIN_CJK_SHARE * len(squash(line)):
                continue
            if line in seen:
                continue
            seen.add(line)
            if guard.keep(line):
                lines.append(line)
    return lines


DEBIAN_REFERENCE = "debian-reference-zh-cn/usr/share/debian-reference/*.zh-cn.html"
HANDBOOK_ZH = "debian-handbook/usr/share/doc/debian-handbook/html/zh-CN/*.html"
VALID2_CHARS = 6200
DOC_LINES = 20


def debian_files(src, pattern):
    return sorted(glob.glob(os.path.join(src, pattern)))


def valid2_slice(src):
    """The technical validation text: ~6,200 characters of whole lines from the middle of the
    Debian reference (its lines as chinese_doc keeps them, before any guard)."""
    text = "\n".join(chinese_doc(debian_files(src, DEBIAN_REFERENCE), Guard([], [], SHINGLE_ZH), set()))
    start = text.find("\n", len(text) // 2) + 1
    end = text.find("\n", start + VALID2_CHARS)
    return text[start:end if end >= 0 else len(text)] + "\n"


def tech_documents(src, protected):
    """The Debian reference and the Debian handbook (zh-CN) as training documents of DOC_LINES
    lines each, without any line that overlaps a `protected` text."""
    guard = Guard(protected, ["鲁迅", "魯迅"], SHINGLE_ZH)
    seen = set()
    lines = chinese_doc(debian_files(src, DEBIAN_REFERENCE), guard, seen) + chinese_doc(debian_files(src, HANDBOOK_ZH), guard, seen)
    return ["\n".join(lines[i:i + DOC_LINES]) for i in range(0, len(lines), DOC_LINES)]
