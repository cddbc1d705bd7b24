"""docs/benchmarks.md stays what bench/make_tables.py generates from bench/results/."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import make_tables  # noqa: E402


def test_generated_section_matches_the_results(tmp_path):
    doc = make_tables.DOC.read_text()
    start = doc.index(make_tables.BEGIN)
    end = doc.index(make_tables.END) + len(make_tables.END)
    assert doc[start:end] == make_tables.generated(), "run: python bench/make_tables.py --write"
    chart = tmp_path / "chart.png"
    make_tables.kernel_chart(make_tables.KERNEL_FILES, chart)
    assert chart.read_bytes() == make_tables.CHART.read_bytes()
