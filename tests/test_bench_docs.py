"""docs/benchmarks.md stays what bench/make_tables.py generates from bench/results/."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import make_tables  # noqa: E402


def test_generated_sections_match_the_results(tmp_path):
    doc = make_tables.DOC.read_text()
    for begin, end, make in make_tables.SECTIONS:
        start = doc.index(begin)
        stop = doc.index(end) + len(end)
        assert doc[start:stop] == make(), "run: python bench/make_tables.py --write"
    for chart, files, path in make_tables.CHARTS:
        made = tmp_path / path.name
        chart(files, made)
        assert made.read_bytes() == path.read_bytes(), path.name
