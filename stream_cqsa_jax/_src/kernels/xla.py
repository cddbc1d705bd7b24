"""The XLA tile kernel: blockwise online-softmax attention in plain `jax.numpy`.

Runs on every backend and is the reference the other kernels are tested
against. Scores never exceed one ``[B, N, block_q, block_kv]`` tile; all
softmax arithmetic is in the accumulator dtype (float32, or float64), and the
products with V use it too, so the only rounding to the inputs' dtype is the
caller's final cast.

Every contraction is blocked: dot products run over at most `_SUM_BLOCK`
terms and the partial sums are added afterwards (over head-dim blocks for the
logits, over key blocks and then tiles for ``p v``). That bounds the
accumulation error independently of how the backend's matrix routine orders
its sums, so this kernel is at least as accurate as one long dot product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..merge import SoftmaxState, empty_state
from .base import KernelConfig, KernelInputs, accumulator_dtype
from .tiles import QueryTile, for_each_key_tile, query_tile, tile_mask

_PRECISION = lax.Precision.HIGHEST
_SUM_BLOCK = 16


def _split(x: jax.Array, axis: int) -> jax.Array:
    """Splits `axis` into (blocks, block): block is the largest divisor of its size up to _SUM_BLOCK."""
    size = x.shape[axis]
    block = max(d for d in range(1, min(size, _SUM_BLOCK) + 1) if size % d == 0)
    return x.reshape(x.shape[:axis] + (size // block, block) + x.shape[axis + 1 :])


def _blocked_einsum(spec: str, a: jax.Array, b: jax.Array, a_axis: int, b_axis: int, acc) -> jax.Array:
    """``einsum(spec, a, b)`` contracting over one axis in blocks; `spec` names the block axis ``j``.

    `a_axis` and `b_axis` are the contracted axes of `a` and `b`; `spec` is
    written for the split operands, with the block index ``j`` leading the output.
    """
    parts = jnp.einsum(
        spec, _split(a, a_axis), _split(b, b_axis), preferred_element_type=acc, precision=_PRECISION
    )
    return jnp.sum(parts, axis=0)


def _grouped(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, L, N, H] -> [B, L, K, G, H]."""
    b, length, n, h = x.shape
    return x.reshape(b, length, num_kv_heads, n // num_kv_heads, h)


def _scores(q_tile, k_tile, mask, scale, acc):
    """Masked logits [B, K, G, bq, bk]; invisible entries are -inf."""
    s = _blocked_einsum("bqkgjh,bskjh->jbkgqs", q_tile, k_tile, 4, 3, acc)
    s = s * jnp.asarray(scale, acc)
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def _slice_rows(x, row0, size):
    return lax.dynamic_slice_in_dim(x, row0, size, axis=1)


def forward(inp: KernelInputs, cfg: KernelConfig) -> SoftmaxState:
    """The softmax state (acc [B, Lq, N, H], m, l [B, N, Lq]) of one subproblem; see `base`."""
    b, lq, n, h = inp.q.shape
    kh = inp.k.shape[2]
    g = n // kh
    acc = accumulator_dtype(inp.q.dtype)
    bq, bk = cfg.block_q, cfg.block_kv

    def q_tile_step(t, out: SoftmaxState):
        qt = query_tile(inp, cfg, t)
        q_t = _grouped(_slice_rows(inp.q, qt.row0, bq), kh)

        def kv_step(state, kv_row0, kv_start):
            m, l, o = state
            k_t = _slice_rows(inp.k, kv_row0, bk)
            v_t = _slice_rows(inp.v, kv_row0, bk).astype(acc)
            s = _scores(q_t, k_t, tile_mask(inp, cfg, qt, kv_row0, kv_start), cfg.scale, acc)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            o = alpha[..., None] * o + _blocked_einsum("bkgqjs,bjskh->jbkgqh", p, v_t, 4, 1, acc)
            return m_new, l, o

        init = (
            jnp.full((b, kh, g, bq), -jnp.inf, acc),
            jnp.zeros((b, kh, g, bq), acc),
            jnp.zeros((b, kh, g, bq, h), acc),
        )
        m, l, o = for_each_key_tile(inp, cfg, qt, kv_step, init)
        o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, bq, n, h)
        return SoftmaxState(
            lax.dynamic_update_slice_in_dim(out.acc, o, qt.row0, axis=1),
            lax.dynamic_update_slice_in_dim(out.m, m.reshape(b, n, bq), qt.row0, axis=2),
            lax.dynamic_update_slice_in_dim(out.l, l.reshape(b, n, bq), qt.row0, axis=2),
        )

    return lax.fori_loop(0, lq // bq, q_tile_step, empty_state(b, lq, n, h, acc))


def backward(
    inp: KernelInputs, do: jax.Array, m: jax.Array, l: jax.Array, delta: jax.Array, cfg: KernelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq [B, Lq, N, H], dk, dv [B, Lk, K, H]) of one subproblem; see `base`.

    `do` [B, Lq, N, H] is the output cotangent; `m`, `l` [B, N, Lq] the global
    softmax statistics of each query row (row max and ``sum exp(s - m)``), and
    `delta` [B, N, Lq] is ``rowsum(dO * O) - dlse``.
    """
    b, lq, n, h = inp.q.shape
    lk, kh = inp.k.shape[1], inp.k.shape[2]
    g = n // kh
    acc = accumulator_dtype(inp.q.dtype)
    bq, bk = cfg.block_q, cfg.block_kv
    scale = jnp.asarray(cfg.scale, acc)

    def q_tile_step(t, grads):
        dq_buf, dk_buf, dv_buf = grads
        qt: QueryTile = query_tile(inp, cfg, t)
        q_t = _grouped(_slice_rows(inp.q, qt.row0, bq), kh)
        do_t = _grouped(_slice_rows(do, qt.row0, bq), kh).astype(acc)
        rows = lambda x: lax.dynamic_slice_in_dim(x, qt.row0, bq, axis=2).reshape(b, kh, g, bq)
        m_t, l_t, delta_t = rows(m), rows(l), rows(delta)
        m_t = jnp.where(m_t == -jnp.inf, 0.0, m_t)
        l_t = jnp.where(l_t > 0, l_t, 1.0)

        def kv_step(state, kv_row0, kv_start):
            dq_t, dk_buf, dv_buf = state
            k_t = _slice_rows(inp.k, kv_row0, bk)
            v_t = _slice_rows(inp.v, kv_row0, bk).astype(acc)
            s = _scores(q_t, k_t, tile_mask(inp, cfg, qt, kv_row0, kv_start), cfg.scale, acc)
            p = jnp.exp(s - m_t[..., None]) / l_t[..., None]
            dp = _blocked_einsum("bqkgjh,bskjh->jbkgqs", do_t, v_t, 4, 3, acc)
            ds = p * (dp - delta_t[..., None])
            dq_t = dq_t + _blocked_einsum("bkgqjs,bjskh->jbkgqh", ds, k_t.astype(acc), 4, 1, acc) * scale
            dk_t = _blocked_einsum("bkgjqs,bjqkgh->jbskh", ds, q_t.astype(acc), 3, 1, acc) * scale
            dv_t = _blocked_einsum("bkgjqs,bjqkgh->jbskh", p, do_t, 3, 1, acc)
            dk_buf = lax.dynamic_update_slice_in_dim(dk_buf, _slice_rows(dk_buf, kv_row0, bk) + dk_t, kv_row0, 1)
            dv_buf = lax.dynamic_update_slice_in_dim(dv_buf, _slice_rows(dv_buf, kv_row0, bk) + dv_t, kv_row0, 1)
            return dq_t, dk_buf, dv_buf

        init = (jnp.zeros((b, kh, g, bq, h), acc), dk_buf, dv_buf)
        dq_t, dk_buf, dv_buf = for_each_key_tile(inp, cfg, qt, kv_step, init)
        dq_t = jnp.transpose(dq_t, (0, 3, 1, 2, 4)).reshape(b, bq, n, h)
        dq_buf = lax.dynamic_update_slice_in_dim(dq_buf, dq_t, qt.row0, axis=1)
        return dq_buf, dk_buf, dv_buf

    grads = (jnp.zeros((b, lq, n, h), acc), jnp.zeros((b, lk, kh, h), acc), jnp.zeros((b, lk, kh, h), acc))
    return lax.fori_loop(0, lq // bq, q_tile_step, grads)
