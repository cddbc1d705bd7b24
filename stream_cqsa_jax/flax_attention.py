"""`attention_fn`: Stream-CQSA attention behind Flax's ``attention_fn`` interface.

    layer = nnx.MultiHeadAttention(..., attention_fn=sc.attention_fn(memory_budget="2GiB"))
    layer = linen.MultiHeadDotProductAttention(..., attention_fn=sc.attention_fn(is_causal=True))

Flax hands the function projected heads ``[batch..., length, heads, head_dim]``
and a set of keyword arguments (``mask``, dropout settings, ``dtype``,
``precision``, ``module`` and, from NNX, ``is_causal``). Linen inspects the
function's signature and passes only the keywords it names, so every one is
named here. Structure that Flax would express as a dense ``[.., T, S]`` mask is
given to the factory instead (``is_causal``, ``local_window_size``), or through
the ready-made modules (`stream_cqsa_jax.nnx`, `stream_cqsa_jax.linen`), which
also take segment ids and sequence lengths.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ._src.attention import dot_product_attention
from ._src.budget import parse_budget
from ._src.plan import _check_bool, _check_positive_int, normalize_window, plan as make_plan, resolve_implementation

_INSTEAD = (
    "pass the structure instead: is_causal=True (to attention_fn(...), or NNX's `is_causal` call argument), "
    "local_window_size=(left, right) to attention_fn(...), or segment ids / sequence lengths through "
    "stream_cqsa_jax.dot_product_attention or the stream_cqsa_jax.nnx / stream_cqsa_jax.linen modules"
)


def _accepts(name: str) -> bool:
    """Whether `dot_product_attention` takes the keyword `name` in this version."""
    return name in inspect.signature(dot_product_attention).parameters


def _fold(x, lead: tuple[int, ...], name: str):
    """[*lead, ...] -> [prod(lead), ...]; None stays None."""
    if x is None:
        return None
    if tuple(getattr(x, "shape", ())[: len(lead)]) != lead:
        raise ValueError(f"{name} must lead with query's batch dims {lead}, got shape {getattr(x, 'shape', x)!r}")
    return jnp.reshape(x, (math.prod(lead),) + tuple(x.shape[len(lead) :]))


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Call-independent options of Stream-CQSA attention, validated once.

    Attributes mirror `stream_cqsa_jax.dot_product_attention`; `num_chunks`
    and `depth` force the decomposition (see `stream_cqsa_jax.plan`).
    `mesh` and `subproblem_axis` are forwarded only when set.
    """

    is_causal: bool = False
    local_window_size: tuple[int, int] | None = None
    scale: float | None = None
    memory_budget: int | None = None
    implementation: str | None = None
    num_chunks: int | None = None
    depth: int | None = None
    mesh: Any = None
    subproblem_axis: Any = None
    deterministic_backward: bool = True

    @classmethod
    def create(
        cls,
        *,
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
    ) -> "AttentionOptions":
        """Validates every option, naming the offending argument."""
        _check_bool("is_causal", is_causal)
        _check_bool("deterministic_backward", deterministic_backward)
        if scale is not None:
            if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
                raise TypeError(f"scale must be None or a real number, got {scale!r}")
            if not math.isfinite(float(scale)):
                raise ValueError(f"scale must be finite, got {scale}")
            scale = float(scale)
        for name, value in (("num_chunks", num_chunks), ("depth", depth)):
            if value is not None:
                _check_positive_int(name, value)
        if depth is not None and num_chunks is None:
            raise ValueError(f"depth={depth} needs num_chunks (the chunks per level of the product cover)")
        for name, value in (("mesh", mesh), ("subproblem_axis", subproblem_axis)):
            if value is not None and not _accepts(name):
                raise TypeError(f"{name}: this version of stream_cqsa_jax.dot_product_attention does not take {name}")
        resolve_implementation(implementation)
        return cls(
            is_causal=bool(is_causal),
            local_window_size=normalize_window(local_window_size),
            scale=scale,
            memory_budget=parse_budget(memory_budget),
            implementation=implementation,
            num_chunks=num_chunks,
            depth=depth,
            mesh=mesh,
            subproblem_axis=subproblem_axis,
            deterministic_backward=bool(deterministic_backward),
        )

    def __call__(
        self,
        query,
        key,
        value,
        *,
        is_causal: bool = False,
        segment_ids=None,
        query_seq_lengths=None,
        key_value_seq_lengths=None,
    ):
        """Attention over ``[batch..., T, N, H]`` heads (any number of leading batch dims).

        Args:
          query: [batch..., T, N, H]. key, value: [batch..., S, K, H], N % K == 0.
          is_causal: causal masking in addition to the options' own `is_causal`.
          segment_ids: int [batch..., T] or a pair (q_ids [batch..., T], kv_ids [batch..., S]).
          query_seq_lengths, key_value_seq_lengths: int [batch...].

        Returns:
          [batch..., T, N, H] in the inputs' dtype.
        """
        for name, x in (("query", query), ("key", key), ("value", value)):
            if getattr(x, "ndim", 0) < 3:
                raise ValueError(
                    f"{name} must have shape [batch..., length, heads, head_dim], got {getattr(x, 'shape', x)!r}"
                )
        lead = tuple(query.shape[:-3])
        for name, x in (("key", key), ("value", value)):
            if tuple(x.shape[:-3]) != lead:
                raise ValueError(
                    f"{name} batch dims {tuple(x.shape[:-3])} must equal query's batch dims {lead} "
                    f"(query {tuple(query.shape)}, {name} {tuple(x.shape)})"
                )
        if len(lead) > 1:  # fold extra batch dims into one
            query, key, value = (_fold(x, lead, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
            if isinstance(segment_ids, (tuple, list)):
                segment_ids = tuple(_fold(s, lead, f"segment_ids[{i}]") for i, s in enumerate(segment_ids))
            else:
                segment_ids = _fold(segment_ids, lead, "segment_ids")
            query_seq_lengths = _fold(query_seq_lengths, lead, "query_seq_lengths")
            key_value_seq_lengths = _fold(key_value_seq_lengths, lead, "key_value_seq_lengths")
        causal = self.is_causal or bool(is_causal)
        kwargs: dict[str, Any] = dict(
            scale=self.scale,
            is_causal=causal,
            local_window_size=self.local_window_size,
            segment_ids=segment_ids,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
        )
        if not self.deterministic_backward:
            kwargs["deterministic_backward"] = False
        for name in ("mesh", "subproblem_axis"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.num_chunks is not None:
            batched = query.ndim == 4
            t, n, h = query.shape[-3:]
            s, kh = key.shape[-3], key.shape[-2]
            kwargs["plan"] = make_plan(
                q_len=t,
                kv_len=s,
                num_q_heads=n,
                num_kv_heads=kh,
                head_dim=h,
                dtype=query.dtype,
                batch=query.shape[0] if batched else 1,
                is_causal=causal,
                local_window_size=self.local_window_size,
                memory_budget=self.memory_budget,
                num_chunks=self.num_chunks,
                depth=self.depth,
                implementation=self.implementation,
                deterministic_backward=self.deterministic_backward,
            )
        else:
            kwargs["memory_budget"] = self.memory_budget
            kwargs["implementation"] = self.implementation
        out = dot_product_attention(query, key, value, **kwargs)
        return jnp.reshape(out, lead + tuple(out.shape[-3:])) if len(lead) > 1 else out


def attention_fn(
    *,
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
) -> Callable:
    """A Flax ``attention_fn`` that computes exact attention with Stream-CQSA.

    For ``nnx.MultiHeadAttention(attention_fn=...)`` (which passes `is_causal`
    and grouped-query K/V) and ``linen.MultiHeadDotProductAttention(attention_fn=...)``
    (which has no `is_causal`: set it here).

    Args:
      is_causal: causal masking for every call (OR-ed with NNX's call-time `is_causal`).
      local_window_size: int or (left, right): a sliding window for every call.
      scale: logit scale; default ``1 / sqrt(head_dim)``, as in Flax.
      memory_budget: device bytes one call may add (int or e.g. "1.5GiB").
      implementation: kernel name; default "xla".
      num_chunks, depth: force the decomposition instead of letting the
        budget choose it (`stream_cqsa_jax.plan`'s arguments of those names).
      mesh, subproblem_axis: spread subproblems over a mesh axis; forwarded
        to `stream_cqsa_jax.dot_product_attention` only when set.
      deterministic_backward: False allows a faster backward whose gradients'
        last bits vary from run to run (`stream_cqsa_jax.plan`); not to be
        confused with Flax's `deterministic`, which turns dropout off.

    Returns:
      ``f(query, key, value, bias=None, mask=None, ...)`` taking Flax's keywords:
      query [batch..., T, N, H], key/value [batch..., S, K, H] -> [batch..., T, N, H].
      It refuses, with a ValueError that says what to do instead: a dense
      `mask` or `bias` (O(T*S) memory, which is what this library avoids),
      ``dropout_rate > 0`` outside deterministic mode (attention dropout would
      need the [T, S] weights), ``module`` (``sow_weights=True``: the weights
      are never formed) and custom einsums. ``dtype`` casts the inputs as in
      Flax; ``precision`` and ``force_fp32_for_softmax`` are accepted and
      ignored: contractions always run in float32 at the highest precision,
      and the softmax always in float32.

    Raises:
      TypeError / ValueError for malformed options, naming the argument.
    """
    options = AttentionOptions.create(
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

    def stream_cqsa_attention(
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout: bool = True,
        dropout_rng=None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype=None,
        precision=None,
        module=None,
        is_causal: bool = False,
        force_fp32_for_softmax: bool = False,
        qk_attn_weights_einsum=None,
        attn_weights_value_einsum=None,
    ):
        """Flax-style attention: [batch..., T, N, H] x [batch..., S, K, H] -> [batch..., T, N, H]."""
        del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax  # see attention_fn's docstring
        if bias is not None:
            raise ValueError(f"bias: dense attention bias is not supported (it is O(T*S) memory); {_INSTEAD}")
        if mask is not None:
            raise ValueError(
                f"mask: dense attention masks are not supported (a [.., T, S] mask is O(T*S) memory, "
                f"which is what stream_cqsa_jax avoids); {_INSTEAD}. Autoregressive decoding with a "
                "cache (decode=True) builds such a mask: use Flax's default attention_fn for it"
            )
        if not deterministic and float(dropout_rate) > 0.0:
            raise ValueError(
                f"dropout_rate={dropout_rate}: attention dropout is not supported (it needs the [T, S] "
                "attention weights, which are never formed); set dropout_rate=0 or call with deterministic=True"
            )
        if module is not None:
            raise ValueError(
                "module: sow_weights=True asks for the [.., T, S] attention weights, which stream_cqsa_jax "
                "never forms; call without sow_weights"
            )
        if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
            raise ValueError(
                "qk_attn_weights_einsum / attn_weights_value_einsum: custom (e.g. quantized) einsums are not "
                "supported; leave qk_attn_weights_einsum_cls and attn_weights_value_einsum_cls unset"
            )
        if dtype is not None:
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        else:
            common = jnp.result_type(query, key, value)
            query, key, value = (jnp.asarray(x, common) for x in (query, key, value))
        return options(query, key, value, is_causal=is_causal)

    stream_cqsa_attention.options = options  # type: ignore[attr-defined]
    return stream_cqsa_attention
