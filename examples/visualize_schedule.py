"""Draw who computes what: the chunk-pair ownership matrix of a few plans, as text and PNG.

    python examples/visualize_schedule.py                          # C = 13, writes three PNGs here
    python examples/visualize_schedule.py --num-chunks 57 --out-dir /tmp/schedules

For each masking (none, causal, sliding window) it prints the ownership matrix
(row: query chunk, column: key chunk, symbol: the subproblem that computes the
pair, '.': skipped), the chunks each subproblem loads and the pairs it
computes, checks that every visible pair is computed exactly once, and writes
``schedule_<masking>.png`` (the same matrix in colour, above a bar chart of
per-subproblem work). The same picture comes from the command line:
``python -m stream_cqsa_jax visualize --q-len ... --num-chunks ...``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import stream_cqsa_jax as sc
from stream_cqsa_jax._src import visualize


def check_exactly_once(plan: sc.Plan) -> None:
    """Raises AssertionError unless each chunk pair with a visible position pair is computed once."""
    counts = np.zeros((plan.num_chunks, plan.num_chunks), int)
    np.add.at(counts, tuple(plan.pairs().T), 1)
    c = np.arange(plan.num_chunks)
    a, b = np.meshgrid(c, c, indexing="ij")
    visible, _ = plan.band.range_visibility(
        a * plan.q_chunk, (a + 1) * plan.q_chunk, b * plan.kv_chunk, (b + 1) * plan.kv_chunk, np
    )
    assert np.array_equal(counts, visible.astype(int)), "a visible chunk pair is computed twice or never"


def main(argv=None) -> list[str]:
    """Prints and draws the plans; returns the PNG paths written."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--num-chunks", type=int, default=13, help="chunks (13 = 3^2 + 3 + 1: a perfect cover of 4)")
    p.add_argument("--window", type=int, default=None, help="window half-width (default: 1.5 chunks)")
    p.add_argument("--out-dir", default=".", help="where to write the PNGs")
    args = p.parse_args(argv)
    window = args.window if args.window is not None else (3 * args.q_len) // (2 * args.num_chunks)
    os.makedirs(args.out_dir, exist_ok=True)

    written = []
    for name, masking in (
        ("dense", dict()),
        ("causal", dict(is_causal=True)),
        ("window", dict(local_window_size=window)),
    ):
        plan = sc.plan(
            q_len=args.q_len, num_q_heads=args.heads, head_dim=args.head_dim, num_chunks=args.num_chunks, **masking
        )
        check_exactly_once(plan)
        cover = ", ".join(map(str, plan.cover.elements))
        print(f"=== {name}: cover {{{cover}}} of Z_{plan.num_chunks}")
        if plan.num_chunks <= 40:
            print(visualize.ownership_text(plan))
        for sub, amount in zip(plan.subproblems, visualize.work(plan)):
            print(
                f"  subproblem {sub.index:2d} (quorum {sub.quorum:2d}): loads query chunks {list(sub.q_chunks)}, "
                f"key chunks {list(sub.kv_chunks)}; computes {int(amount)} pairs"
            )
        path = os.path.join(args.out_dir, f"schedule_{name}.png")
        visualize.write_png(path, visualize.ownership_image(plan))
        print(f"  every visible chunk pair computed exactly once; wrote {path}\n")
        written.append(path)
    return written


if __name__ == "__main__":
    main()
