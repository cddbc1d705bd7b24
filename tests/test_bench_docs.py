"""docs/benchmarks.md stays what bench/make_tables.py generates from bench/results/."""

import json
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


def test_launch_error_table_puts_each_launch_in_its_column(tmp_path, monkeypatch):
    """One row per case and error; a launch a case did not run shows "-", cuDNN's errors come from whichever
    file has them, and the ratio is the rightmost launch the case has over cuDNN."""

    def result(seed, errors):
        grads = {impl: {"dq": e * 2, "dk": e * 3, "dv": e * 4} for impl, e in errors.items()}
        return {"seq_len": 65536, "heads": 2, "head_dim": 128, "causal": True, "seed": seed,
                "rows_checked": 65536, "errors": errors, "grad_errors": grads}

    (tmp_path / "a.json").write_text(json.dumps({"results": [result(0, {"mosaic_gpu": 1.0, "cudnn": 2.0}),
                                                             result(1, {"mosaic_gpu": 5.0})]}))
    (tmp_path / "b.json").write_text(json.dumps({"results": [result(0, {"mosaic_gpu": 0.5})]}))
    monkeypatch.setattr(make_tables, "RESULTS", tmp_path)
    lines = make_tables.launch_error_table([("a.json", "old"), ("b.json", "new")]).splitlines()
    assert lines[0].split("|")[8:11] == [" old ", " new ", " cuDNN "]
    assert lines[2].split("|")[5:11] == [" 0 ", " 65536 ", " out ", " 1.0000e+00 ", " 5.0000e-01 ", " 2.0000e+00 "]
    assert lines[2].split("|")[11] == " 0.2500 "  # new / cuDNN
    assert lines[4].split("|")[9:12] == [" 1.5000e+00 ", " 6.0000e+00 ", " 0.2500 "]  # dk
    assert lines[6].split("|")[5:12] == [" 1 ", " 65536 ", " out ", " 5.0000e+00 ", " - ", " - ", " - "]
    assert len(lines) == 2 + 8
