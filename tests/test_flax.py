"""Flax integration: `attention_fn`, the NNX and Linen modules, and training through them."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import stream_cqsa_jax as sc

B, T, F, N = 2, 40, 32, 4
TOL = dict(rtol=2e-5, atol=2e-5)  # float32 rounding of outputs of size ~1


def inputs(shape=(B, T, F), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def segment_mask(ids):
    """Dense [B, 1, T, T] mask of a [B, T] segment-id array (for Flax's default attention)."""
    return (ids[:, None, :, None] == ids[:, None, None, :])


def nnx_pair(num_kv_heads, **fn_options):
    """Two nnx.MultiHeadAttention with the same weights: Flax's attention and ours."""
    make = lambda **kw: nnx.MultiHeadAttention(  # noqa: E731
        N, F, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0), **kw
    )
    return make(), make(attention_fn=sc.attention_fn(**fn_options))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("num_kv_heads", [N, 2])
def test_nnx_multi_head_attention_matches_flax(is_causal, num_kv_heads):
    theirs, ours = nnx_pair(num_kv_heads, num_chunks=3)  # forced into 3 chunks: a real decomposition
    x = inputs()
    want = theirs(x, is_causal=is_causal)
    got = ours(x, is_causal=is_causal)
    np.testing.assert_allclose(got, want, **TOL)
    assert float(jnp.abs(want).max()) > 0.5  # a real signal, not zeros
    if is_causal:  # the mask really differs from no mask
        assert float(jnp.abs(got - theirs(x)).max()) > 1e-2


def test_nnx_factory_is_causal_and_extra_batch_dims():
    theirs, ours = nnx_pair(2, is_causal=True)
    x = inputs((2, 3, 24, F))  # two leading batch dims
    np.testing.assert_allclose(ours(x), theirs(x, is_causal=True), **TOL)


@pytest.mark.parametrize("is_causal", [False, True])
def test_linen_multi_head_attention_matches_flax(is_causal):
    x = inputs()
    theirs = nn.MultiHeadDotProductAttention(num_heads=N)
    params = theirs.init(jax.random.key(1), x)
    mask = nn.make_causal_mask(x[..., 0]) if is_causal else None
    want = theirs.apply(params, x, mask=mask)
    ours = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=sc.attention_fn(is_causal=is_causal))
    got = ours.apply(params, x)
    np.testing.assert_allclose(got, want, **TOL)
    if is_causal:  # Linen never passes is_causal: the factory's flag must have taken effect
        assert float(jnp.abs(got - theirs.apply(params, x)).max()) > 1e-2


def test_signature_names_every_keyword_flax_passes():
    params = inspect.signature(sc.attention_fn()).parameters
    linen_keywords = {
        "mask", "dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic", "dtype", "precision",
        "force_fp32_for_softmax", "qk_attn_weights_einsum", "attn_weights_value_einsum", "module",
    }  # fmt: skip
    nnx_keywords = linen_keywords - {"force_fp32_for_softmax", "qk_attn_weights_einsum", "attn_weights_value_einsum"}
    assert linen_keywords | nnx_keywords | {"is_causal", "bias"} <= set(params)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("num_kv_heads", [N, 2])
def test_nnx_module_matches_flax_with_segments(num_kv_heads):
    theirs = nnx.MultiHeadAttention(N, F, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0))
    ours = sc.nnx.StreamCQSAAttention(N, F, num_kv_heads=num_kv_heads, is_causal=True, num_chunks=3, rngs=nnx.Rngs(7))
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    x = inputs()
    ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], B, 0).repeat(T // 4, 1).astype(np.int32))
    np.testing.assert_allclose(ours(x, segment_ids=ids), theirs(x, mask=segment_mask(ids), is_causal=True), **TOL)
    np.testing.assert_allclose(ours(x), theirs(x, is_causal=True), **TOL)


def test_nnx_module_folds_extra_batch_dims_with_segments():
    layer = sc.nnx.StreamCQSAAttention(N, F, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
    x = inputs((2, 2, 24, F))
    ids = jnp.asarray(np.arange(24)[None, None] // np.array([4, 6, 8, 12]).reshape(2, 2, 1), jnp.int32)
    got = layer(x, segment_ids=ids)
    want = layer(x.reshape(4, 24, F), segment_ids=ids.reshape(4, 24)).reshape(2, 2, 24, F)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(got - layer(x)).max()) > 1e-2  # the segments matter
    with pytest.raises(ValueError, match="segment_ids must lead with query's batch dims"):
        layer(x, segment_ids=ids[:1])


def test_linen_module_matches_flax():
    x = inputs()
    theirs = nn.MultiHeadDotProductAttention(num_heads=N)
    params = theirs.init(jax.random.key(1), x)
    ours = sc.linen.StreamCQSAAttention(num_heads=N, is_causal=True)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, params)
    want = theirs.apply(params, x, mask=nn.make_causal_mask(x[..., 0]))
    np.testing.assert_allclose(ours.apply(params, x), want, **TOL)


def test_linen_module_grouped_query_matches_nnx_module():
    x = inputs()
    linen_layer = sc.linen.StreamCQSAAttention(num_heads=N, num_kv_heads=2, is_causal=True, rope_base=100.0)
    params = linen_layer.init(jax.random.key(3), x)["params"]
    nnx_layer = sc.nnx.StreamCQSAAttention(N, F, num_kv_heads=2, is_causal=True, rope_base=100.0, rngs=nnx.Rngs(0))
    for name in ("query", "key", "value", "out"):
        getattr(nnx_layer, name).kernel[...] = params[name]["kernel"]
        getattr(nnx_layer, name).bias[...] = params[name]["bias"]
    np.testing.assert_allclose(linen_layer.apply({"params": params}, x), nnx_layer(x), **TOL)


def rope_reference(x, positions, base):
    """Rotary embedding in complex form: pairs (i, i + H/2) rotate by positions * base ** (-2i / H)."""
    x = np.asarray(x, np.float64)
    h = x.shape[-1] // 2
    z = x[..., :h] + 1j * x[..., h:]
    angle = np.asarray(positions, np.float64)[..., None, None] * base ** (-2.0 * np.arange(h) / (2 * h))
    z = z * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation_and_is_relative():
    x = np.asarray(inputs((B, T, N, 8)))
    positions = np.arange(T)[None].repeat(B, 0) * 3 + 5
    np.testing.assert_allclose(sc.nnx.apply_rope(jnp.asarray(x), positions, 50.0), rope_reference(x, positions, 50.0),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    layer = sc.nnx.StreamCQSAAttention(N, F, num_kv_heads=2, is_causal=True, rope_base=50.0, rngs=nnx.Rngs(0))
    y = inputs()
    base = layer(y)
    shifted = layer(y, positions=jnp.arange(T) + 1000, kv_positions=jnp.arange(T) + 1000)
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)  # only relative positions matter
    plain = sc.nnx.StreamCQSAAttention(N, F, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
    assert float(jnp.abs(plain(y) - base).max()) > 1e-2  # and RoPE does change the result


def test_jitted_optax_training_step_lowers_the_loss_and_matches_flax_gradients():
    x = inputs((B, 24, F))
    target = jnp.sin(jnp.cumsum(x, axis=1) / 4)  # depends on the whole prefix: needs causal attention

    def loss_fn(model):
        return jnp.mean((model(x) - target) ** 2)

    ours = sc.nnx.StreamCQSAAttention(N, F, num_kv_heads=2, is_causal=True, num_chunks=3, rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(N, F, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    g_ours = nnx.grad(loss_fn)(ours)
    g_theirs = nnx.grad(lambda m: jnp.mean((m(x, is_causal=True) - target) ** 2))(theirs)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    optimizer = nnx.Optimizer(ours, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(ours, optimizer)) for _ in range(25)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses


def test_dtype_keyword_casts_like_flax():
    q, k, v = inputs((B, T, N, 8), 1), inputs((B, T, 2, 8), 2), inputs((B, T, 2, 8), 3)
    fn = sc.attention_fn()
    out = fn(q, k, v, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), fn(q, k, v), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask=jnp.ones((B, N, T, T), bool)), r"mask: .*O\(T\*S\).*is_causal=True.*segment"),
        (dict(bias=jnp.zeros((B, N, T, T))), r"bias: .*O\(T\*S\)"),
        (dict(dropout_rate=0.1, deterministic=False), "dropout_rate=0.1"),
        (dict(module=object()), "sow_weights"),
        (dict(qk_attn_weights_einsum=jnp.einsum), "einsum"),
    ],
)
def test_attention_fn_refuses_what_it_cannot_do(kwargs, message):
    q = inputs((B, T, N, 8))
    with pytest.raises(ValueError, match=message):
        sc.attention_fn()(q, q, q, **kwargs)


def test_dropout_is_fine_when_deterministic():
    q = inputs((B, T, N, 8))
    fn = sc.attention_fn()
    np.testing.assert_array_equal(fn(q, q, q, dropout_rate=0.5, deterministic=True), fn(q, q, q))


def test_nnx_mask_error_reaches_the_user():
    _, ours = nnx_pair(N)
    with pytest.raises(ValueError, match="mask"):
        ours(inputs(), mask=jnp.ones((B, N, T, T), bool))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(memory_budget="fast"), ValueError, "memory_budget"),
        (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size"),
        (dict(scale="big"), TypeError, "scale"),
        (dict(implementation="flash"), ValueError, "implementation"),
        (dict(num_chunks=0), ValueError, "num_chunks"),
        (dict(depth=2), ValueError, "depth=2 needs num_chunks"),
        (dict(deterministic_backward="no"), TypeError, "deterministic_backward"),
    ],
)
def test_factory_validates_its_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        sc.attention_fn(**kwargs)


def test_shape_errors_name_the_argument():
    fn = sc.attention_fn()
    q = np.zeros((2, 3, 16, N, 8), np.float32)
    with pytest.raises(ValueError, match="key batch dims"):
        fn(q, q[:1], q[:1])
    with pytest.raises(ValueError, match="query must have shape"):
        fn(q[0, 0, 0], q, q)


def test_module_validates_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        sc.nnx.StreamCQSAAttention(4, 32, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even head_dim"):
        sc.nnx.StreamCQSAAttention(4, 12, rope_base=10.0, rngs=nnx.Rngs(0))


@pytest.mark.skipif(
    "mesh" not in inspect.signature(sc.dot_product_attention).parameters, reason="no multi-device support yet"
)
def test_mesh_options_are_forwarded():
    mesh = jax.make_mesh((1,), ("sp",))
    q, kv = inputs((B, T, N, 8)), inputs((B, T, 2, 8), 1)
    want = sc.attention_fn(is_causal=True)(q, kv, kv)
    np.testing.assert_allclose(sc.attention_fn(is_causal=True, mesh=mesh, num_chunks=3)(q, kv, kv), want, **TOL)
    with pytest.raises(ValueError, match="subproblem_axis='nope'"):
        sc.attention_fn(mesh=mesh, subproblem_axis="nope")(q, kv, kv)
