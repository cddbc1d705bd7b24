"""float64 attention and its gradients for every row of one head, computed on the device in blocks.

`check_accuracy.py`'s host reference checks sampled rows with a cotangent that is zero elsewhere,
so dk and dv there sum over those rows only. This one covers every row, so dk and dv sum over the
whole sequence, as in training. It is meant for a GPU with float64 tensor cores: on the host, every
row of 1M tokens would take hours per head.

Three passes over [block, block] tiles of one head, each a plain float64 formula:
rows first, the output by a running softmax, and its log-sum-exp; rows first again, dq from
``p = exp(s - lse)``, ``ds = p (dO v^T - delta)``; keys first, dk and dv. About 9 N^2 H
multiply-adds per head, half under a causal mask, whose tiles above the diagonal are skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def float64():
    """A context in which JAX computes in float64: `jax.enable_x64` as a context manager, or the older
    `jax.experimental.enable_x64`."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover

    return enable_x64()  # pragma: no cover


def _scores(q_blk, k_blk, rows, cols, n: int, causal: bool, scale: float):
    """s [rows, cols] of a tile, -inf where the key is padding or (causal) after the row."""
    s = jnp.dot(q_blk, k_blk.T) * scale
    r = rows[:, None]
    c = cols[None, :]
    visible = c < n
    if causal:
        visible &= c <= r
    return jnp.where(visible, s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("n", "causal", "block", "grads"))
def _head(q, k, v, do, *, n: int, causal: bool, block: int, grads: bool):
    """(out, dq, dk, dv) float64 [P, H] of one head from q, k, v, do float64 [P, H] (P: n padded
    to a multiple of `block`; padded rows of `do` are zero); without `grads`, (out,) alone."""
    scale = 1.0 / jnp.sqrt(jnp.float64(q.shape[-1]))
    blocks = q.shape[0] // block
    tile = lambda x, i: lax.dynamic_slice_in_dim(x, i * block, block)
    index = lambda i: i * block + jnp.arange(block)

    def forward(r):
        q_r = tile(q, r)

        def step(c, carry):
            m, l, acc = carry
            s = _scores(q_r, tile(k, c), index(r), index(c), n, causal, scale)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp(s - m_new[:, None])
            fix = jnp.exp(m - m_new)
            return m_new, l * fix + p.sum(axis=1), acc * fix[:, None] + jnp.dot(p, tile(v, c))

        start = (jnp.full((block,), -jnp.inf), jnp.zeros((block,)), jnp.zeros((block, q.shape[1])))
        m, l, acc = lax.fori_loop(0, r + 1 if causal else blocks, step, start)
        return acc / l[:, None], m + jnp.log(l)

    out, lse = lax.map(forward, jnp.arange(blocks))
    out, lse = out.reshape(q.shape), lse.reshape(-1)
    if not grads:
        return (out,)
    delta = (do * out).sum(axis=1)

    def probabilities(r, c):
        """p and ds of the tile (row block r, key block c)."""
        s = _scores(tile(q, r), tile(k, c), index(r), index(c), n, causal, scale)
        p = jnp.exp(s - tile(lse, r)[:, None])
        dp = jnp.dot(tile(do, r), tile(v, c).T)
        return p, p * (dp - tile(delta, r)[:, None])

    def row_gradient(r):
        def step(c, dq):
            return dq + jnp.dot(probabilities(r, c)[1], tile(k, c))

        return lax.fori_loop(0, r + 1 if causal else blocks, step, jnp.zeros((block, q.shape[1]))) * scale

    def key_gradients(c):
        def step(r, carry):
            dk, dv = carry
            p, ds = probabilities(r, c)
            return dk + jnp.dot(ds.T, tile(q, r)), dv + jnp.dot(p.T, tile(do, r))

        zeros = jnp.zeros((block, q.shape[1]))
        dk, dv = lax.fori_loop(c if causal else 0, blocks, step, (zeros, zeros))
        return dk * scale, dv

    dq = lax.map(row_gradient, jnp.arange(blocks)).reshape(q.shape)
    dk, dv = lax.map(key_gradients, jnp.arange(blocks))
    return out, dq, dk.reshape(q.shape), dv.reshape(q.shape)


def head_reference(q, k, v, do, causal: bool, block: int = 4096, grads: bool = True):
    """float64 (out, dq, dk, dv) [N, H] of one head of self-attention from q, k, v, do [N, H]
    (any float dtype; converted exactly), with the default scale 1/sqrt(H); without `grads`, (out,)
    alone. The results are float64 arrays: use them inside `float64()` (outside it, JAX computes in
    float32)."""
    n = q.shape[0]
    if not k.shape[0] == v.shape[0] == do.shape[0] == n:
        raise ValueError(
            f"q, k, v, do: expected one length (self-attention), got {q.shape}, {k.shape}, {v.shape}, {do.shape}"
        )
    block = min(block, -(-n // 8) * 8)
    padded = -(-n // block) * block
    with float64():
        pad = lambda x: jnp.pad(jnp.asarray(x).astype(jnp.float64), ((0, padded - n), (0, 0)))
        ref = _head(pad(q), pad(k), pad(v), pad(do), n=n, causal=causal, block=block, grads=grads)
        return tuple(x[:n] for x in ref)


def relative_errors(q, k, v, do, causal: bool, results: dict, block: int = 4096) -> dict[str, dict[str, float]]:
    """``||x - ref|| / ||ref||`` over every row and head of the output and of each gradient, per entry
    of `results` (name -> (out, dq, dk, dv) or (out,) [1, N, heads, H], any float dtype), against the float64
    reference of q, k, v and cotangent do [1, N, heads, H], computed one head at a time (its gradients
    only when some entry has them)."""
    names = ("out", "dq", "dk", "dv")
    grads = any(len(arrays) > 1 for arrays in results.values())
    ref_squares = dict.fromkeys(names, 0.0)
    error_squares = {name: dict.fromkeys(names[: len(arrays)], 0.0) for name, arrays in results.items()}
    with float64():
        for hi in range(q.shape[2]):
            ref = head_reference(q[0, :, hi], k[0, :, hi], v[0, :, hi], do[0, :, hi], causal, block, grads)
            for g, r in zip(names, ref):
                ref_squares[g] += float(jnp.vdot(r, r))
            for name, arrays in results.items():
                for g, x, r in zip(names, arrays, ref):
                    diff = jnp.asarray(x)[0, :, hi].astype(jnp.float64) - r
                    error_squares[name][g] += float(jnp.vdot(diff, diff))
    return {name: {g: (e / ref_squares[g]) ** 0.5 for g, e in per.items()} for name, per in error_squares.items()}
