"""Softmax states and their exact, stable merge.

A partial result over some set of keys is kept as a *softmax state*
``(acc, m, l)``: ``m`` is the row's largest logit seen, ``l = sum exp(s - m)``
and ``acc = sum exp(s - m) v`` (not yet divided by ``l``). Two states over
disjoint key sets merge as

    m = max(m1, m2),  acc = e1 acc1 + e2 acc2,  l = e1 l1 + e2 l2,  ei = exp(mi - m),

which is the online-softmax step itself: nothing overflows (every ``ei <= 1``)
and, unlike merging through ``lse = m + log l``, no precision is lost when
logits are large, since ``mi - m`` is exact or its weight negligible. Rows that
have seen no key hold ``m = -inf, l = 0, acc = 0``; the final output is
``acc / l`` (0 for such rows) and ``lse = m + log l``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class SoftmaxState(NamedTuple):
    """acc: [B, L, N, H]; m, l: [B, N, L] (accumulator dtype)."""

    acc: jax.Array
    m: jax.Array
    l: jax.Array


def empty_state(batch: int, length: int, heads: int, head_dim: int, dtype) -> SoftmaxState:
    return SoftmaxState(
        jnp.zeros((batch, length, heads, head_dim), dtype),
        jnp.full((batch, heads, length), -jnp.inf, dtype),
        jnp.zeros((batch, heads, length), dtype),
    )


def _rows(x: jax.Array) -> jax.Array:
    """[B, N, L] -> [B, L, N, 1], to scale [B, L, N, H] rows."""
    return jnp.transpose(x, (0, 2, 1))[..., None]


def rows_of(state: SoftmaxState, start, size: int) -> SoftmaxState:
    """Rows ``start .. start + size`` of a state ([B, L, N, H] / [B, N, L]); `start` may be traced."""
    return SoftmaxState(
        lax.dynamic_slice_in_dim(state.acc, start, size, 1),
        lax.dynamic_slice_in_dim(state.m, start, size, 2),
        lax.dynamic_slice_in_dim(state.l, start, size, 2),
    )


def merge_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state over the union of the two (disjoint) key sets."""
    m = jnp.maximum(a.m, b.m)
    m_ref = jnp.where(m == -jnp.inf, 0.0, m)
    e_a = jnp.exp(a.m - m_ref)
    e_b = jnp.exp(b.m - m_ref)
    return SoftmaxState(_rows(e_a) * a.acc + _rows(e_b) * b.acc, m, e_a * a.l + e_b * b.l)


def finalize(state: SoftmaxState, length: int) -> tuple[jax.Array, jax.Array]:
    """(o [B, length, N, H], lse [B, N, length]) from the first `length` rows of `state`.

    Rows that saw no key give 0 and -inf.
    """
    acc, m, l = state.acc[:, :length], state.m[:, :, :length], state.l[:, :, :length]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    return acc / _rows(l_safe), lse
