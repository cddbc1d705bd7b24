"""Flax NNX: `StreamCQSAAttention`, multi-head attention computed with Stream-CQSA.

    import stream_cqsa_jax as sc
    layer = sc.nnx.StreamCQSAAttention(num_heads=8, in_features=512, num_kv_heads=2,
                                       is_causal=True, rope_base=10_000.0, rngs=nnx.Rngs(0))
    y = layer(x, segment_ids=ids)            # x [B, T, 512] -> y [B, T, 512]

Its parameters have the names and shapes of ``flax.nnx.MultiHeadAttention``'s
(``query``, ``key``, ``value``, ``out``), so weights move between the two with
``nnx.update(layer, nnx.state(other, nnx.Param))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .flax_attention import AttentionOptions


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32.

    Args:
      x: [..., L, heads, H] with H even.
      positions: int [..., L] (broadcastable against x's leading dims).
      base: the wavelength base.

    Returns:
      x rotated by angle ``positions * base ** (-2i / H)`` in plane ``(i, i + H/2)``; x's dtype.
    """
    h = x.shape[-1]
    if h % 2:
        raise ValueError(f"rope needs an even head_dim, got {h}")
    freq = jnp.asarray(base, jnp.float32) ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle = jnp.asarray(positions, jnp.float32)[..., None, None] * freq  # [..., L, 1, H/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def default_positions(x: jax.Array) -> jax.Array:
    """int32 [batch..., L]: 0..L-1 for inputs x [batch..., L, features]."""
    return jnp.broadcast_to(jnp.arange(x.shape[-2], dtype=jnp.int32), x.shape[:-1])


class StreamCQSAAttention(nnx.Module):
    """Multi-head (grouped-query) attention whose core is `stream_cqsa_jax.dot_product_attention`.

    Args:
      num_heads: query heads N.
      in_features: features of the inputs.
      qkv_features: N * head_dim (default: in_features).
      out_features: output features (default: in_features).
      num_kv_heads: key/value heads K (default N); N % K == 0.
      in_kv_features: features of the key/value inputs (default: in_features).
      use_bias: biases in the projections.
      rope_base: apply rotary position embeddings to queries and keys with
        this base (None: no RoPE).
      is_causal, local_window_size, scale, memory_budget, implementation,
      num_chunks, depth, mesh, subproblem_axis, deterministic_backward: as in
      `stream_cqsa_jax.attention_fn`.
      dtype, param_dtype, kernel_init, bias_init: as in `nnx.MultiHeadAttention`.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        use_bias: bool = True,
        rope_base: float | None = None,
        is_causal: bool = False,
        local_window_size: int | tuple[int, int] | None = None,
        scale: float | None = None,
        memory_budget: int | float | str | None = None,
        implementation: str | None = None,
        num_chunks: int | None = None,
        depth: int | None = None,
        mesh: Any = None,
        subproblem_axis: Any = None,
        deterministic_backward: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = nnx.initializers.lecun_normal(),
        bias_init: nnx.Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        qkv_features = in_features if qkv_features is None else qkv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("qkv_features", qkv_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if qkv_features % num_heads:
            raise ValueError(f"qkv_features={qkv_features} must be a multiple of num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        head_dim = qkv_features // num_heads
        if rope_base is not None and head_dim % 2:
            raise ValueError(f"rope_base needs an even head_dim, got qkv_features / num_heads = {head_dim}")
        self.options = AttentionOptions.create(
            is_causal=is_causal,
            local_window_size=local_window_size,
            scale=scale,
            memory_budget=memory_budget,
            implementation=implementation,
            num_chunks=num_chunks,
            depth=depth,
            mesh=mesh,
            subproblem_axis=subproblem_axis,
            deterministic_backward=deterministic_backward,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base = rope_base
        self.dtype = dtype
        in_kv_features = in_features if in_kv_features is None else in_kv_features
        out_features = in_features if out_features is None else out_features

        def linear(fan_in, features, axis=-1):
            return nnx.LinearGeneral(
                fan_in,
                features,
                axis=axis,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                rngs=rngs,
            )

        self.query = linear(in_features, (num_heads, head_dim))
        self.key = linear(in_kv_features, (num_kv_heads, head_dim))
        self.value = linear(in_kv_features, (num_kv_heads, head_dim))
        self.out = linear((num_heads, head_dim), out_features, axis=(-2, -1))

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        segment_ids=None,
        positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        query_seq_lengths: jax.Array | None = None,
        key_value_seq_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """Attends `inputs_q` [batch..., T, F] to `inputs_k`/`inputs_v` [batch..., S, F_kv] (default: self).

        Args:
          segment_ids: int [batch..., T] (self-attention) or a pair (q_ids, kv_ids): packed documents.
          positions, kv_positions: int [batch..., T] / [batch..., S] for RoPE
            (default 0..T-1 and 0..S-1).
          query_seq_lengths, key_value_seq_lengths: int [batch...]: real tokens per example.

        Returns:
          [batch..., T, out_features].
        """
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        q, k, v = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
        if self.rope_base is not None:
            positions = default_positions(inputs_q) if positions is None else positions
            kv_positions = default_positions(inputs_k) if kv_positions is None else kv_positions
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, kv_positions, self.rope_base)
        common = jnp.result_type(q, k, v) if self.dtype is None else self.dtype
        q, k, v = (x.astype(common) for x in (q, k, v))
        y = self.options(
            q,
            k,
            v,
            segment_ids=segment_ids,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
        )
        return self.out(y)
