"""Accuracy on the device against a float64 reference, next to cuDNN on the same inputs.

    PYTHONPATH=. python bench/check_accuracy.py --out bench/results/accuracy.json
    PYTHONPATH=. python bench/check_accuracy.py --grads --implementations mosaic_gpu cudnn xla ...

For each sequence length the query rows checked are all rows (short
sequences) or `--rows` evenly spaced ones; the reference is computed in NumPy
float64 from the same bfloat16 inputs, one thread per head. Errors are
relative Frobenius norms over the checked rows of the output. With `--grads`,
also of the gradients (`grad_errors`) for a random bfloat16 cotangent that is
zero outside the checked rows: dq on those rows, and every row of dk and dv
(which then sum over the checked rows only, so the reference stays exact).
An implementation named ``mosaic_gpu:nondeterministic`` (any kernel name
works) runs with ``deterministic_backward=False``. ``--backward-launch``
sets the Hopper backward's launch (written as in `mosaic_kernel.py`). `--seeds` repeats
each case on other random inputs. ``--reference device`` checks every row, with a
full cotangent, against a float64 reference computed on the device
(`device_reference.py`; for long sequences a GPU with float64 tensor cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import device_reference
from launches import backward_launch_as
from mosaic_kernel import backward_launch
from stream_cqsa_jax.benchmark import Case, attention_for, error_text, write_results


def _head_blocks(q, k, rows, causal, bi, hi):
    """Yields (slice of `rows`' positions, those rows, their float64 softmax probabilities
    [rows, S]) for example `bi` and head `hi`, 64 rows at a time."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    for start in range(0, len(rows), 64):
        sel = rows[start : start + 64]
        s = (q[bi, sel, hi] @ k[bi, :, hi].T) * scale
        if causal:
            s = np.where(np.arange(k.shape[1])[None, :] <= sel[:, None], s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        yield slice(start, start + len(sel)), sel, p / p.sum(axis=1, keepdims=True)


def _per_head(q, work):
    """Runs ``work(bi, hi)`` for every example and head, one thread per head (NumPy releases
    the interpreter lock in its array loops)."""
    pairs = [(bi, hi) for bi in range(q.shape[0]) for hi in range(q.shape[2])]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        list(pool.map(lambda pair: work(*pair), pairs))


def reference_rows(q, k, v, rows, causal):
    """float64 attention output for query `rows`: [B, len(rows), N, H]."""
    out = np.zeros((q.shape[0], len(rows)) + q.shape[2:])

    def work(bi, hi):
        for at, _, p in _head_blocks(q, k, rows, causal, bi, hi):
            out[bi, at, hi] = p @ v[bi, :, hi]

    _per_head(q, work)
    return out


def reference_grads(q, k, v, do, rows, causal):
    """float64 (dq for query `rows`, dk, dv) of sum(out * do), for a cotangent `do` that is
    zero outside `rows` (so dk and dv sum over `rows` only)."""
    dq = np.zeros((q.shape[0], len(rows)) + q.shape[2:])
    dk, dv = np.zeros(k.shape), np.zeros(v.shape)
    scale = 1.0 / np.sqrt(q.shape[-1])

    def work(bi, hi):
        for at, sel, p in _head_blocks(q, k, rows, causal, bi, hi):
            dp = do[bi, sel, hi] @ v[bi, :, hi].T
            ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))
            dq[bi, at, hi] = ds @ k[bi, :, hi] * scale
            dk[bi, :, hi] += ds.T @ q[bi, sel, hi] * scale
            dv[bi, :, hi] += p.T @ do[bi, sel, hi]

    _per_head(q, work)
    return dq, dk, dv


def rel(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _inputs(n, heads, head_dim, seed):
    """q, k, v, do: standard normal bfloat16 [1, n, heads, head_dim] from `seed`."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(kk, (1, n, heads, head_dim), jnp.bfloat16) for kk in keys)


def _run(impl, q, k, v, do, causal, grads):
    """`impl`'s output and, with `grads`, its (dq, dk, dv) for cotangent `do`."""
    n, heads, head_dim = q.shape[1:]
    f = attention_for(impl, Case(n, head_dim, causal, "fwd", heads=heads), num_chunks=1)
    out = jax.jit(f)(q, k, v)
    return (out, *jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))(q, k, v, do)) if grads else (out,)


def check_every_row(n, heads, head_dim, causal, implementations, grads=False, seed=0):
    """Like `check` for every row, against the float64 reference on the device (`device_reference`):
    dk and dv then sum over every query row, as in training."""
    q, k, v, do = _inputs(n, heads, head_dim, seed)
    result = {"seq_len": n, "heads": heads, "head_dim": head_dim, "causal": causal, "rows_checked": n,
              "seed": seed, "reference": "device", "errors": {}}
    got = {}
    for impl in implementations:
        try:
            got[impl] = [x.block_until_ready() for x in _run(impl, q, k, v, do, causal, grads)]
        except Exception as err:
            result["errors"][impl] = error_text(err)
    start = time.perf_counter()
    errors = device_reference.relative_errors(q, k, v, do, causal, got) if got else {}
    result["reference_seconds"] = time.perf_counter() - start
    for impl, e in errors.items():
        result["errors"][impl] = e.pop("out")
        if grads:
            result.setdefault("grad_errors", {})[impl] = e
    return result


def check(n, heads, head_dim, causal, rows, implementations, grads=False, seed=0):
    q, k, v, do = _inputs(n, heads, head_dim, seed)
    rows = np.arange(n) if rows is None or rows >= n else np.linspace(0, n - 1, rows).astype(int)
    if len(rows) < n:  # the cotangent lives on the checked rows only
        do = jnp.zeros_like(do).at[:, rows].set(do[:, rows])
    q64, k64, v64, do64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, do))
    start = time.perf_counter()
    ref = reference_rows(q64, k64, v64, rows, causal)
    ref_grads = reference_grads(q64, k64, v64, do64, rows, causal) if grads else None
    ref_seconds = time.perf_counter() - start
    result = {"seq_len": n, "heads": heads, "head_dim": head_dim, "causal": causal, "rows_checked": len(rows),
              "seed": seed, "reference_seconds": ref_seconds, "errors": {}}
    if grads:
        result["grad_errors"] = {}
    for impl in implementations:
        try:
            out, *got = (np.asarray(x.astype(jnp.float32), np.float64) for x in _run(impl, q, k, v, do, causal, grads))
            result["errors"][impl] = rel(out[:, rows], ref)
            if grads:
                result["grad_errors"][impl] = {
                    "dq": rel(got[0][:, rows], ref_grads[0]), "dk": rel(got[1], ref_grads[1]),
                    "dv": rel(got[2], ref_grads[2]),
                }
        except Exception as err:
            result["errors"][impl] = error_text(err)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    parser.add_argument("--rows", type=int, default=None, help="query rows to check (default: all)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--implementations", nargs="+", default=["pallas_triton", "xla", "cudnn"])
    parser.add_argument("--grads", action="store_true", help="also check dq, dk and dv")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--reference", choices=("host", "device"), default="host",
                        help="host: float64 in NumPy on --rows rows; device: float64 on the device, every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="random keys of the inputs, one case each (results files without a seed used 0)")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every case")
    parser.add_argument("--backward-launch", default=None,
                        help="the Hopper backward's launch, e.g. 128,2,64,2,seg8,flush (default: its own)")
    args = parser.parse_args(argv)
    if args.reference == "device" and args.rows is not None:
        parser.error("--rows: the device reference checks every row; leave --rows out")
    launch = backward_launch(args.backward_launch) if args.backward_launch else None
    masks = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    results = []
    with backward_launch_as(launch):
        for n in args.seq_lens:
            for d in args.head_dims:
                for causal, seed in itertools.product(masks, args.seeds):
                    if args.reference == "device":
                        result = check_every_row(n, args.heads, d, causal, args.implementations, args.grads, seed)
                    else:
                        result = check(n, args.heads, d, causal, args.rows, args.implementations, args.grads, seed)
                    if args.backward_launch:
                        result["backward_launch"] = args.backward_launch
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    if args.out:
                        write_results(args.out, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
