"""Structured masks: which (query position, key position) pairs are visible.

A query at position ``i`` sees a key at position ``j`` when ``j`` lies in the
band ``i - left <= j <= i + right`` and both positions are real tokens
(``i < q_len``, ``j < kv_len``). Causal masking is the band ``right = 0`` with
``left`` unbounded; a local window ``(left, right)`` bounds both sides, exactly
as in ``jax.nn.dot_product_attention`` (top-left aligned for ``T != S``).
Segment ids and per-example lengths are data, not structure: kernels apply
them in-tile (see ``kernels/``).

The helpers take an array module ``xp`` (``numpy`` or ``jax.numpy``) so the
planner (NumPy, static) and the kernels (JAX, traced) share one definition.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Band:
    """The static part of a mask.

    Attributes:
      q_len: number of real query positions T.
      kv_len: number of real key positions S.
      left: how far back a query sees (``None``: unbounded).
      right: how far ahead a query sees (``None``: unbounded).
    """

    q_len: int
    kv_len: int
    left: int | None = None
    right: int | None = None

    @classmethod
    def of(cls, q_len: int, kv_len: int, is_causal: bool, window: tuple[int, int] | None) -> "Band":
        left, right = (None, None) if window is None else window
        if is_causal:
            right = 0 if right is None else min(right, 0)
        return cls(q_len, kv_len, left, right)

    @property
    def is_dense(self) -> bool:
        """True when the band hides nothing inside the real positions."""
        return (self.left is None or self.left >= self.q_len - 1) and (
            self.right is None or self.right >= self.kv_len - 1
        )

    @property
    def left_bound(self) -> int:
        """`left` clipped to a finite value that still hides nothing extra."""
        reach = self.q_len + self.kv_len
        return reach if self.left is None else min(self.left, reach)

    @property
    def right_bound(self) -> int:
        """`right` clipped to a finite value that still hides nothing extra."""
        reach = self.q_len + self.kv_len
        return reach if self.right is None else min(self.right, reach)

    def range_visibility(self, q_start, q_stop, kv_start, kv_stop, xp):
        """Visibility of the block ``[q_start, q_stop) x [kv_start, kv_stop)``.

        Works elementwise on integer arrays of any matching shapes.
        Returns ``(any_visible, all_visible)`` boolean arrays: whether at least
        one, and whether every, position pair of the block is visible. Padding
        positions (beyond `q_len` or `kv_len`) count as invisible keys; query
        padding rows are ignored (their output is discarded).
        """
        q_last = xp.minimum(q_stop, self.q_len) - 1
        kv_last = xp.minimum(kv_stop, self.kv_len) - 1
        nonempty = (q_last >= q_start) & (kv_last >= kv_start)
        left, right = self.left_bound, self.right_bound
        any_visible = nonempty & (kv_start <= q_last + right) & (kv_last >= q_start - left)
        all_visible = (
            nonempty
            & (kv_stop <= self.kv_len)
            & (kv_last <= q_start + right)
            & (kv_start >= q_last - left)
        )
        return any_visible, all_visible

    def key_span(self, q_start, q_last, xp):
        """Inclusive key positions ``[lo, hi]`` that queries ``q_start..q_last`` may see.

        Clipped to ``[0, kv_len - 1]``; empty when ``lo > hi``.
        """
        lo = xp.maximum(q_start - self.left_bound, 0)
        hi = xp.minimum(q_last + self.right_bound, self.kv_len - 1)
        return lo, hi

    def visible(self, q_pos, kv_pos):
        """Elementwise visibility of positions (broadcasting arrays)."""
        left, right = self.left_bound, self.right_bound
        return (
            (q_pos < self.q_len)
            & (kv_pos < self.kv_len)
            & (kv_pos >= q_pos - left)
            & (kv_pos <= q_pos + right)
        )
