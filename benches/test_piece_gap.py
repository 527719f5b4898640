"""Unit test of piece_gap.py's alignment (run by tests/data_scripts.rs)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def report(tokens):
    return {"total_nll": sum(t[1] for t in tokens), "per_token": [{"id": i, "nll": n, "span": s} for i, n, s in tokens]}


class PieceGap(unittest.TestCase):
    def test_each_piece_gets_the_base_cost_of_its_bytes(self):
        # Text "国家好龘": the base reads 国 and 家 as three bytes each, 好 as one token, 龘 as
        # three bytes; the extended model reads 国家 as one added word, 好 as the same token, and
        # 龘 still as three bytes (byte pieces of one character share its span).
        base = [(1, 1.0, [0, 3]), (2, 1.0, [0, 3]), (3, 1.0, [0, 3]), (4, 1.0, [3, 6]), (5, 1.0, [3, 6]), (6, 1.0, [3, 6]),
                (7, 2.0, [6, 9]), (8, 3.0, [9, 12]), (9, 3.0, [9, 12]), (10, 3.0, [9, 12])]
        ext = [(101, 4.5, [0, 6]), (7, 2.5, [6, 9]), (8, 2.0, [9, 12]), (9, 2.0, [9, 12]), (10, 2.0, [9, 12])]
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            for name, obj in (("base", report(base)), ("ext", report(ext)), ("extension", {"old_vocab": 100, "pieces": ["国", "国家"]})):
                paths[name] = os.path.join(d, name + ".json")
                json.dump(obj, open(paths[name], "w", encoding="utf-8"), ensure_ascii=False)
            out = subprocess.run([sys.executable, os.path.join(HERE, "piece_gap.py"), "--base", paths["base"], "--ext", paths["ext"], "--extension", paths["extension"], "--json"],
                                 capture_output=True, text=True, check=True)
        rows = {r["targets"]: r for r in json.loads(out.stdout)["rows"]}
        self.assertEqual(set(rows), {"added word", "old token"})
        self.assertEqual(rows["added word"]["tokens"], 1)
        self.assertAlmostEqual(rows["added word"]["base_nats"], 6.0)
        self.assertAlmostEqual(rows["added word"]["excess_nats"], -1.5)
        # 好 (+0.5) and 龘's three byte pieces against the base's (6 against 9).
        self.assertEqual(rows["old token"]["tokens"], 2)
        self.assertAlmostEqual(rows["old token"]["excess_nats"], 0.5 - 3.0)

    def test_repeats_split_first_from_repeated(self):
        # "国家国家": the base reads each 国家 as one old token (cost 5, then 1 when repeated);
        # the extended model reads the added word 国家 at 6, then 4.
        base = [(1, 5.0, [0, 6]), (1, 1.0, [6, 12])]
        ext = [(101, 6.0, [0, 6]), (101, 4.0, [6, 12])]
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            for name, obj in (("base", report(base)), ("ext", report(ext)), ("extension", {"old_vocab": 100, "pieces": ["国", "国家"]})):
                paths[name] = os.path.join(d, name + ".json")
                json.dump(obj, open(paths[name], "w", encoding="utf-8"), ensure_ascii=False)
            out = subprocess.run([sys.executable, os.path.join(HERE, "piece_gap.py"), "--base", paths["base"], "--ext", paths["ext"], "--extension", paths["extension"], "--repeats", "10", "--json"],
                                 capture_output=True, text=True, check=True)
        rows = {r["targets"]: r for r in json.loads(out.stdout)["rows"]}
        self.assertEqual(set(rows), {"added word first", "added word repeated"})
        self.assertAlmostEqual(rows["added word first"]["excess_nats"], 1.0)
        self.assertAlmostEqual(rows["added word repeated"]["excess_nats"], 3.0)


if __name__ == "__main__":
    unittest.main()
