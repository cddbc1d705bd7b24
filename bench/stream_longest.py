"""The longest exact `stream_attention` run that fits a time limit, checked against float64.

    PYTHONPATH=. python bench/stream_longest.py --tokens 32M 28M 24M 16M --limit 540 \
        --out bench/results/stream_longest.json

Plans each candidate length (causal, 1 head, head dim 64, bfloat16, 2 GiB
device budget by default), predicts its time with rates measured on this
machine (`cost_model.calibrate`), and runs the longest one predicted to fit
`--limit` seconds with room to spare. Inputs are random, made on the device
in blocks and kept in host memory as NumPy arrays. Reports wall time, the
device peak (``memory_stats``), the host's peak resident memory, and the
relative error of sampled query rows against float64 attention.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import stream_cqsa_jax as sc  # noqa: E402
from stream_cqsa_jax._src import cost_model  # noqa: E402

# Seconds the run may take beyond its prediction: input generation, compilation and the check.
_OVERHEAD = 60.0
# Margin on the predicted run time.
_MARGIN = 1.10


def _tokens(text: str) -> int:
    scale = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def _random_tokens(length: int, heads: int, head_dim: int, seed: int, block: int = 1 << 21) -> np.ndarray:
    """[1, length, heads, head_dim] bfloat16 standard normal values, drawn on the device in blocks."""
    out = np.empty((1, length, heads, head_dim), ml_dtypes.bfloat16)
    block = min(block, length)
    draw = jax.jit(
        lambda key: jax.random.normal(key, (1, block, heads, head_dim), jnp.float32).astype(jnp.bfloat16)
    )
    key = jax.random.key(seed)
    for lo in range(0, length, block):
        key, sub = jax.random.split(key)
        hi = min(length, lo + block)
        out[:, lo:hi] = np.asarray(draw(sub))[:, : hi - lo]
    return out


def _row_sums(q, k, v, rows: np.ndarray, scale: float, do=None, block: int = 1 << 18) -> dict:
    """Running-max sums of causal attention for query rows `rows` (ascending), streamed over the keys.

    With s the scaled logits of a row, m its running max and e = exp(s - m):
    ``l = sum e`` and ``ev = sum e v`` (arrays [K, R*G] and [K, R*G, H], rows of
    each key/value head's query group side by side); with a cotangent `do`
    also ``edp = sum e dp``, ``ek = sum e k`` and ``edpk = sum e dp k`` for
    dp = do . v. Each key block is converted once; groups of rows use it on
    threads (NumPy's matmul and exp release the GIL).
    """
    import concurrent.futures

    heads, kv_heads, h = q.shape[2], k.shape[2], q.shape[3]
    group = heads // kv_heads
    r = len(rows)
    by_kv_head = lambda x: x.reshape(r, kv_heads, group, h).transpose(1, 0, 2, 3).reshape(kv_heads, r * group, h)
    qr = by_kv_head(np.asarray(q[0, rows], np.float64) * scale)
    dor = None if do is None else by_kv_head(np.asarray(do[0, rows], np.float64))
    row_of = np.repeat(rows, group)
    m = np.full((kv_heads, r * group), -np.inf)
    sums = {"l": np.zeros((kv_heads, r * group)), "ev": np.zeros((kv_heads, r * group, h))}
    if do is not None:
        sums.update(edp=np.zeros((kv_heads, r * group)), ek=np.zeros((kv_heads, r * group, h)),
                    edpk=np.zeros((kv_heads, r * group, h)))
    parts = [p for p in np.array_split(np.arange(r * group), min(r * group, os.cpu_count() or 1)) if len(p)]

    def update(part: np.ndarray, j: int, lo: int, kk: np.ndarray, vv: np.ndarray) -> None:
        part = part[row_of[part] >= lo]
        if not len(part):
            return
        s = qr[j, part] @ kk.T  # [rows, keys]
        s[np.arange(lo, lo + len(kk))[None, :] > row_of[part][:, None]] = -np.inf
        m_new = np.maximum(m[j, part], s.max(axis=1))
        e = np.exp(s - m_new[:, None])
        terms = {"l": e.sum(axis=1), "ev": e @ vv}
        if dor is not None:
            e_dp = e * (dor[j, part] @ vv.T)
            terms.update(edp=e_dp.sum(axis=1), ek=e @ kk, edpk=e_dp @ kk)
        correction = np.exp(m[j, part] - m_new)
        for name, term in terms.items():
            scaled = correction if term.ndim == 1 else correction[:, None]
            sums[name][j, part] = sums[name][j, part] * scaled + term
        m[j, part] = m_new

    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
        for lo in range(0, int(rows[-1]) + 1, block):
            hi = min(int(rows[-1]) + 1, lo + block)
            for j in range(kv_heads):
                kk = np.asarray(k[0, lo:hi, j], np.float64)
                vv = np.asarray(v[0, lo:hi, j], np.float64)
                for future in [pool.submit(update, part, j, lo, kk, vv) for part in parts]:
                    future.result()
    return sums


def _by_query_head(x: np.ndarray, rows: int) -> np.ndarray:
    """[K, R*G, H] -> [R, K*G, H]."""
    kv_heads, _, h = x.shape
    return x.reshape(kv_heads, rows, -1, h).transpose(1, 0, 2, 3).reshape(rows, -1, h)


def _reference_rows(q, k, v, rows: np.ndarray, scale: float, block: int = 1 << 18) -> np.ndarray:
    """float64 causal attention of query rows `rows` (ascending): [R, N, H]."""
    sums = _row_sums(q, k, v, rows, scale, block=block)
    return _by_query_head(sums["ev"] / sums["l"][..., None], len(rows))


def _reference_dq_rows(q, k, v, do, rows: np.ndarray, scale: float, block: int = 1 << 18) -> np.ndarray:
    """float64 dq of causal attention for query rows `rows` (ascending) under cotangent `do`: [R, N, H].

    With delta_i = sum e dp / l_i: dq_i = scale * (sum e dp k - delta_i sum e k) / l_i.
    """
    sums = _row_sums(q, k, v, rows, scale, do=do, block=block)
    l = sums["l"]
    delta = sums["edp"] / l
    dq = scale * (sums["edpk"] - delta[..., None] * sums["ek"]) / l[..., None]
    return _by_query_head(dq, len(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", default=["32M", "28M", "24M", "16M", "8M"],
                        help="candidate lengths, longest first (e.g. 32M)")
    parser.add_argument("--limit", type=float, default=540.0, help="seconds the whole script may take")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--budget", default="2GiB")
    parser.add_argument("--rows", type=int, default=256, help="query rows checked against float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shape = dict(num_q_heads=args.heads, head_dim=args.head_dim, dtype="bfloat16", is_causal=True,
                 memory_budget=args.budget, executor="stream")

    candidates = []
    rates = None
    for text in args.tokens:
        t = _tokens(text)
        p = sc.plan(q_len=t, **shape)
        if rates is None:
            rates = cost_model.calibrate(p, seed=args.seed)
        predicted = cost_model.run_seconds(p, rates)
        candidates.append((t, p, predicted))
        print(f"{t:>11} tokens: C = {p.num_chunks}, {p.cover.size}-chunk quorums, predicted {predicted:7.1f} s")
    spent = time.perf_counter() - start
    fitting = [c for c in candidates if spent + _MARGIN * c[2] + _OVERHEAD <= args.limit]
    if not fitting:
        raise SystemExit(f"no candidate is predicted to fit {args.limit} s")
    t, p, predicted = max(fitting, key=lambda c: c[0])
    print(p.summary())
    chosen = time.perf_counter()

    q, k, v = (_random_tokens(t, args.heads, args.head_dim, args.seed + i) for i in range(3))
    out = np.empty_like(q)
    generated = time.perf_counter()
    print(f"inputs made in {generated - chosen:.1f} s", flush=True)
    sc.stream_attention(q, k, v, out=out, is_causal=True, memory_budget=args.budget, progress=False)
    wall = time.perf_counter() - generated
    print(f"stream_attention: {wall:.1f} s", flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "tokens": t,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": "bfloat16",
        "causal": True,
        "memory_budget": args.budget,
        "num_chunks": p.num_chunks,
        "cover_size": p.cover.size,
        "chunk_tokens": p.q_chunk,
        "predicted_s": predicted,
        "wall_s": wall,
        "flops_visible": 2.0 * t * t * args.heads * args.head_dim,
        "estimated_peak_bytes": p.estimated_peak_bytes,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_bytes": rss,
        "rates": {key: val for key, val in vars(rates).items()},
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    _write(result, args.out)  # the timing is kept even if the check below does not finish

    checked = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(t, size=min(args.rows, t), replace=False))
    want = _reference_rows(q, k, v, rows, args.head_dim**-0.5)
    got = np.asarray(out[0, rows], np.float64)
    row_errors = np.linalg.norm((got - want).reshape(len(rows), -1), axis=1) / np.linalg.norm(
        want.reshape(len(rows), -1), axis=1
    )
    # What rounding the float64 result to bfloat16 alone costs, for scale.
    rounding = np.linalg.norm(want.astype(ml_dtypes.bfloat16).astype(np.float64) - want) / np.linalg.norm(want)
    result.update(
        rows_checked=int(len(rows)),
        rel_error=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        max_row_rel_error=float(row_errors.max()),
        bf16_rounding_rel_error=float(rounding),
        check_s=time.perf_counter() - checked,
        script_s=time.perf_counter() - start,
    )
    _write(result, args.out)


def _write(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
