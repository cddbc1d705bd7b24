"""Flax Linen: `StreamCQSAAttention`, the Linen counterpart of `stream_cqsa_jax.nnx.StreamCQSAAttention`.

    import stream_cqsa_jax as sc
    layer = sc.linen.StreamCQSAAttention(num_heads=8, num_kv_heads=2, is_causal=True)
    params = layer.init(jax.random.key(0), x)
    y = layer.apply(params, x, segment_ids=ids)

Its parameters have the names of ``flax.linen.MultiHeadDotProductAttention``'s
(``query``, ``key``, ``value``, ``out``); with ``num_kv_heads == num_heads``
they have the same shapes too, so the two load each other's weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .flax_attention import AttentionOptions
from .nnx import apply_rope, default_positions


class StreamCQSAAttention(nn.Module):
    """Multi-head (grouped-query) attention whose core is `stream_cqsa_jax.dot_product_attention`.

    Attributes:
      num_heads: query heads N.
      num_kv_heads: key/value heads K (default N); N % K == 0.
      qkv_features: N * head_dim (default: the inputs' features).
      out_features: output features (default: the inputs' features).
      use_bias: biases in the projections.
      rope_base: apply rotary position embeddings with this base (None: none).
      is_causal, local_window_size, scale, memory_budget, implementation,
      num_chunks, depth, mesh, subproblem_axis, deterministic_backward: as in
      `stream_cqsa_jax.attention_fn`.
      dtype, param_dtype, kernel_init, bias_init: as in `linen.MultiHeadDotProductAttention`.
    """

    num_heads: int
    num_kv_heads: int | None = None
    qkv_features: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    rope_base: float | None = None
    is_causal: bool = False
    local_window_size: int | tuple[int, int] | None = None
    scale: float | None = None
    memory_budget: int | float | str | None = None
    implementation: str | None = None
    num_chunks: int | None = None
    depth: int | None = None
    mesh: Any = None
    subproblem_axis: Any = None
    deterministic_backward: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
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

        Keyword arguments as in `stream_cqsa_jax.nnx.StreamCQSAAttention.__call__`.
        Returns [batch..., T, out_features].
        """
        options = AttentionOptions.create(
            is_causal=self.is_causal,
            local_window_size=self.local_window_size,
            scale=self.scale,
            memory_budget=self.memory_budget,
            implementation=self.implementation,
            num_chunks=self.num_chunks,
            depth=self.depth,
            mesh=self.mesh,
            subproblem_axis=self.subproblem_axis,
            deterministic_backward=self.deterministic_backward,
        )
        num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(f"qkv_features={qkv_features} must be a multiple of num_heads={self.num_heads}")
        if self.num_heads % num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        head_dim = qkv_features // self.num_heads
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v

        def dense(features, name, axis=-1):
            return nn.DenseGeneral(
                features,
                axis=axis,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name=name,
            )

        q = dense((self.num_heads, head_dim), "query")(inputs_q)
        k = dense((num_kv_heads, head_dim), "key")(inputs_k)
        v = dense((num_kv_heads, head_dim), "value")(inputs_v)
        if self.rope_base is not None:
            positions = default_positions(inputs_q) if positions is None else positions
            kv_positions = default_positions(inputs_k) if kv_positions is None else kv_positions
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, kv_positions, self.rope_base)
        common = jnp.result_type(q, k, v) if self.dtype is None else self.dtype
        q, k, v = (x.astype(common) for x in (q, k, v))
        y = options(
            q,
            k,
            v,
            segment_ids=segment_ids,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
        )
        out_features = self.out_features or inputs_q.shape[-1]
        return dense(out_features, "out", axis=(-2, -1))(y)
