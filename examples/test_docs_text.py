"""Tests of docs_text.py: the technical validation slice never reaches the training documents,
nor does any line that overlaps a protected text. Run: python3 -m unittest discover examples"""
import os
import random
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import docs_text  # noqa: E402


def page(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = "".join(f"<p>{l}</p>\n" for l in lines)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<html><head><title>x</title></head><body>{body}<pre>代码块不算正文内容的一部分</pre></body></html>")


class DocsText(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        src = self.src = self.tmp.name
        # Each line distinct, with enough Chinese to be kept.
        # Random characters, so that no two lines share the guard's 16-character runs.
        rng = random.Random(1)
        ref = ["".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(24)) + " apt" for _ in range(800)]
        page(os.path.join(src, "debian-reference-zh-cn/usr/share/debian-reference/ch01.zh-cn.html"), ref[:400])
        page(os.path.join(src, "debian-reference-zh-cn/usr/share/debian-reference/ch02.zh-cn.html"), ref[400:])
        hb = [f"手册第{i}段：" + "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(20)) for i in range(50)]
        hb.append("这一行提到鲁迅，所以不能用于训练。")
        hb.append("English only line is dropped")
        page(os.path.join(src, "debian-handbook/usr/share/doc/debian-handbook/html/zh-CN/a.html"), hb)
        self.handbook = hb

    def tearDown(self):
        self.tmp.cleanup()

    def test_validation_slice_is_kept_out_of_training(self):
        valid = docs_text.valid2_slice(self.src)
        self.assertGreater(len(valid), docs_text.VALID2_CHARS)
        held_out = "前言" + self.handbook[7][5:] + "后记"
        docs = docs_text.tech_documents(self.src, [valid, held_out])
        train = "\n".join(docs)
        for line in valid.strip().split("\n"):
            self.assertNotIn(line, train)
        self.assertNotIn(self.handbook[7], train)
        self.assertNotIn("鲁迅", train)
        self.assertNotIn("English only", train)
        self.assertNotIn("代码块", train)
        self.assertIn("手册第8段", train)
        self.assertTrue(all(len(d.split("\n")) <= docs_text.DOC_LINES for d in docs))
        # Both sources, and everything not protected, are there.
        kept = sum(len(d.split("\n")) for d in docs)
        self.assertEqual(kept, 800 + 50 - len(valid.strip().split("\n")) - 1)


class CutLongDocuments(unittest.TestCase):
    def test_long_blocks_become_documents_and_nothing_is_lost(self):
        rng = random.Random(2)
        long_lines = [f"line {i} " + "x" * rng.randrange(10, 90) for i in range(300)]
        short = "a short paragraph\nof two lines"
        text = "\n".join(long_lines) + "\n\n  \n" + short + "\n\n\n"
        out = docs_text.cut_long_documents(text)
        self.assertTrue(out.endswith("\n") and not out.endswith("\n\n"))
        docs = out[:-1].split("\n\n")
        self.assertEqual(docs[-1], short)
        pieces = docs[:-1]
        self.assertGreater(len(pieces), 10)
        # Every piece but the last of a cut block reaches DOC_PIECE; none is longer than it
        # needs to be (its last line is what crossed the mark).
        for p in pieces[:-1]:
            n = len(p) + 1
            self.assertGreaterEqual(n, docs_text.DOC_PIECE)
            self.assertLess(n - len(p.split("\n")[-1]) - 1, docs_text.DOC_PIECE)
        # The lines, in order, are the block's.
        self.assertEqual("\n".join(pieces).split("\n"), long_lines)
        # A text without long blocks keeps its documents.
        self.assertEqual(docs_text.cut_long_documents("one\n\ntwo\nthree\n"), "one\n\ntwo\nthree\n")


if __name__ == "__main__":
    unittest.main()
