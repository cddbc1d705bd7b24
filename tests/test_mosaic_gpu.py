"""The Mosaic GPU (Hopper) forward and backward kernels vs float64, on compute capability 9.x only.

Every case asserts that the Mosaic kernels themselves ran (the portable forward
or backward is made to fail), then holds the output's error to 1.2x and the
gradients' to 1.5x that of `jax.nn.dot_product_attention(implementation="xla")`
in the same dtype, like the shared kernel suite. On other machines the module
checks that the kernels' programs lower for CUDA (shared-memory sizes
included) and that plans fall back as documented.
"""

import dataclasses
import functools
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_cqsa_jax as sc
from baselines import data_masks, xla_errors
from reference import as64, attention, attention_grads, random_inputs, rel_error, visibility
from stream_cqsa_jax._src.devices import on_hopper
from stream_cqsa_jax._src.kernels import mosaic_gpu, mosaic_gpu_backward, mosaic_gpu_common, pallas_triton
from stream_cqsa_jax._src.kernels.base import KernelConfig, KernelInputs
from stream_cqsa_jax._src.masks import Band


hopper = pytest.mark.skipif(not on_hopper(), reason="needs an NVIDIA GPU of compute capability 9.x")

# name: (b, t, s, n, kh, h, dtype, structured masks, lengths, chunks, logit scale)
CASES = {
    "causal_gqa_odd": (2, 1000, 1000, 4, 2, 64, "bfloat16", dict(is_causal=True), False, 7, 1.0),
    "dense_head128_f16": (1, 700, 700, 2, 2, 128, "float16", dict(), False, 1, 1.0),
    "window": (1, 1500, 1500, 2, 1, 64, "bfloat16", dict(local_window_size=(37, 5)), False, 7, 1.0),
    "cross_lengths": (2, 600, 900, 2, 2, 64, "bfloat16", dict(), True, 5, 1.0),
    "cross_causal_head128": (1, 900, 500, 2, 1, 128, "bfloat16", dict(is_causal=True), False, 3, 1.0),
    "large_logits": (1, 640, 640, 2, 2, 64, "bfloat16", dict(is_causal=True), False, 13, 8.0),
}


def _plan_args(params: tuple) -> dict:
    """`stream_cqsa_jax.plan`'s arguments for one row of `CASES` or `BACKWARD_CASES`."""
    b, t, s, n, kh, h, dtype_name, structured, _, chunks, _ = params
    return dict(q_len=t, kv_len=s, num_q_heads=n, num_kv_heads=kh, head_dim=h, dtype=jnp.dtype(dtype_name), batch=b,
                num_chunks=chunks, implementation="mosaic_gpu", **structured)


def _float64_case(params: tuple, case: str) -> types.SimpleNamespace:
    """Inputs, float64 references, the XLA kernel's errors and a Mosaic plan for one row of `CASES`
    or `BACKWARD_CASES` (params); inputs are drawn from the case's name."""
    b, t, s, n, kh, h, dtype_name, structured, lengths, chunks, logit_scale = params
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    q, k, v = random_inputs(rng.integers(2**31), b, t, s, n, kh, h, dtype, logit_scale=logit_scale)
    do = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    extra, ref_extra = data_masks("lengths" if lengths else None, b, t, s, rng)
    rk = dict(is_causal=structured.get("is_causal", False), window=structured.get("local_window_size"), **ref_extra)
    vis = visibility(t, s, b, **rk)
    ref_out, ref_lse = attention(as64(q), as64(k), as64(v), **rk)
    ref_grads = attention_grads(as64(q), as64(k), as64(v), as64(do), **rk)
    base_out, base_grads = xla_errors(q, k, v, do, vis, structured, extra, ref_out, ref_grads)
    plan_args = _plan_args(params)
    plan = sc.plan(**plan_args)
    assert plan.implementation == "mosaic_gpu" and len(plan.subproblems) >= min(chunks, 2)
    return types.SimpleNamespace(
        dtype=dtype, q=q, k=k, v=v, do=do, structured=structured, extra=extra, vis=vis, ref_out=ref_out,
        ref_lse=ref_lse, ref_grads=ref_grads, base_out=base_out, base_grads=base_grads, plan=plan,
        plan_args=plan_args,
    )


@hopper
@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_forward_and_gradients_match_float64(case, monkeypatch):
    c = _float64_case(CASES[case], case)
    monkeypatch.setattr(pallas_triton, "forward", _portable_forward)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=c.plan, return_residuals=True, **c.structured,
                                                 **c.extra)
    (out, lse), vjp = jax.vjp(f, c.q, c.k, c.v)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(np.isfinite(out))
    assert rel_error(as64(out), c.ref_out) <= 1.2 * c.base_out
    seen = c.vis.any(-1)  # [B, T]
    assert np.all(out[~seen] == 0)
    lse_seen = np.broadcast_to(seen[:, None, :], lse.shape)
    assert np.all(lse[~lse_seen] == -np.inf)
    np.testing.assert_allclose(lse[lse_seen], c.ref_lse[lse_seen], rtol=2e-3, atol=2e-3)
    grads = vjp((jnp.asarray(c.do), jnp.zeros(lse.shape, jnp.float32)))
    for name, g, r, base in zip("qkv", grads, c.ref_grads, c.base_grads):
        assert g.dtype == c.dtype, name
        assert rel_error(as64(g), r) <= 1.5 * base, name


@hopper
def test_mosaic_repeated_runs_are_bitwise_identical():
    q, k, v = random_inputs(8, 1, 1024, 1024, 4, 4, 64, jnp.bfloat16)
    plan = sc.plan(q_len=1024, num_q_heads=4, head_dim=64, dtype=jnp.bfloat16, num_chunks=7,
                   implementation="mosaic_gpu", is_causal=True)
    f = jax.jit(lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan))
    first = np.asarray(f(q, k, v))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(q, k, v)), first)


@hopper
def test_mosaic_query_tile_order_gives_the_same_bits(monkeypatch):
    q, k, v = random_inputs(9, 1, 2048, 2048, 2, 2, 64, jnp.bfloat16)
    plan = sc.plan(q_len=2048, num_q_heads=2, head_dim=64, dtype=jnp.bfloat16, num_chunks=1,
                   implementation="mosaic_gpu", is_causal=True)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan)
    plain = np.asarray(jax.jit(f)(q, k, v))
    launch = mosaic_gpu.default_launch(64)
    forward_order = dataclasses.replace(launch, heavy_first=not launch.heavy_first)
    monkeypatch.setattr(mosaic_gpu, "default_launch", lambda *_: forward_order)
    jax.clear_caches()
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(q, k, v)), plain)


FORWARD_OPTIONS = {
    "stages3": dict(stages=3),
    "scores_first": dict(scores_first=True),
    "scores_first_pairs": dict(scores_first=True, cluster=2),
    "named_turns": dict(named_turns=True),
    "named_turns_pairs": dict(named_turns=True, cluster=2),
    "scores_first_named_turns_pairs": dict(scores_first=True, named_turns=True, cluster=2),
    "three_warpgroups": dict(warpgroups=3),  # head dim 64 only
    "three_warpgroups_scores_first": dict(warpgroups=3, scores_first=True),
}
SAME_BITS_CASES = ["causal_gqa_odd", "dense_head128_f16", "window", "cross_lengths", "large_logits"]


@hopper
@pytest.mark.parametrize("case,option", [
    pytest.param(case, option, id=f"{case}-{name}")
    for name, option in FORWARD_OPTIONS.items() for case in SAME_BITS_CASES
    if option.get("warpgroups", 2) == 2 or CASES[case][5] == 64
])
def test_mosaic_forward_options_give_the_same_bits(case, option, monkeypatch):
    """A third stage (whose output tiles all live in the ring's memory) changes only how far ahead
    tiles are copied, `Launch.scores_first` and `Launch.named_turns` (the default at head dim 128 has
    both) only when the products are issued and waited for, and three compute warpgroups (192-row tiles,
    the chunks ending in part tiles) which rows share a thread block: the output and the log-sum-exp are
    the same bits as those of the launch with no options (masked, plain and skipped tiles all occur; with
    pairs of thread blocks where the query chunks allow)."""
    c = _float64_case(CASES[case], case)
    monkeypatch.setattr(pallas_triton, "forward", _portable_forward)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=c.plan, return_residuals=True, **c.structured,
                                                 **c.extra)
    default = mosaic_gpu.Launch(cluster=option.get("cluster", 1))  # every option off
    results = []
    for launch in (default, dataclasses.replace(default, **option)):
        monkeypatch.setattr(mosaic_gpu, "default_launch", lambda *_, launch=launch: launch)
        jax.clear_caches()
        results.append([np.asarray(x) for x in jax.jit(f)(c.q, c.k, c.v)])
    jax.clear_caches()
    assert rel_error(as64(results[1][0]), c.ref_out) <= 1.2 * c.base_out
    for name, a, b in zip(("out", "lse"), *results):
        np.testing.assert_array_equal(b, a, err_msg=name)


@hopper
@pytest.mark.parametrize("case,sixteenths,warpgroups", [
    pytest.param(case, sixteenths, warpgroups, id=f"{case}-{sixteenths}-{warpgroups}")
    for sixteenths, warpgroups in ((4, 2), (16, 2), (4, 3)) for case in CASES
    if warpgroups == 2 or CASES[case][5] == 64
])
def test_mosaic_forward_exp2_on_fma_matches_float64(case, sixteenths, warpgroups, monkeypatch):
    """With part or all of the unmasked tiles' exp2 by the polynomial (`Launch.exp2_on_fma`; head dim 128
    with scores first, 64 without, and with three warpgroups), the output holds the float64 bar of the
    other tests, rows that see no key still give 0 and -inf, the log-sum-exp stays within float32
    rounding of the launch without it and the output within a small part of a bfloat16 kernel's error
    of it (large logits: inputs below the polynomial's range occur)."""
    c = _float64_case(CASES[case], case)
    monkeypatch.setattr(pallas_triton, "forward", _portable_forward)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=c.plan, return_residuals=True, **c.structured,
                                                 **c.extra)
    chosen = mosaic_gpu.default_launch
    results = []
    for k in (0, sixteenths):
        three = dict(warpgroups=3, cluster=1, named_turns=False) if warpgroups == 3 else {}
        launch_of = lambda *args, k=k, three=three: dataclasses.replace(chosen(*args), exp2_on_fma=k, **three)
        monkeypatch.setattr(mosaic_gpu, "default_launch", launch_of)
        jax.clear_caches()
        results.append([np.asarray(x) for x in jax.jit(f)(c.q, c.k, c.v)])
    jax.clear_caches()
    (default_out, default_lse), (out, lse) = results
    assert rel_error(as64(out), c.ref_out) <= 1.2 * c.base_out
    assert rel_error(as64(out), as64(default_out)) <= 0.25 * c.base_out
    seen = c.vis.any(-1)  # [B, T]
    assert np.all(out[~seen] == 0)
    lse_seen = np.broadcast_to(seen[:, None, :], lse.shape)
    assert np.all(lse[~lse_seen] == -np.inf)
    np.testing.assert_allclose(lse[lse_seen], default_lse[lse_seen], rtol=1e-6, atol=1e-5)


def test_mosaic_plans_fall_back_where_the_kernel_does_not_apply():
    """Plans name the Mosaic kernel anywhere; its `supports` rule sends other inputs to the
    portable kernel, and float32 plans use the portable kernel's narrow tiles."""
    p = sc.plan(q_len=1000, num_q_heads=2, head_dim=64, dtype="bfloat16", num_chunks=3, implementation="mosaic_gpu")
    assert p.implementation == "mosaic_gpu" and p.block_q == 128 and p.block_kv == 128
    wide = sc.plan(q_len=1000, num_q_heads=2, head_dim=64, dtype="float32", num_chunks=3, implementation="mosaic_gpu")
    assert wide.block_q == 16
    assert mosaic_gpu.default_launch(64).block_kv == 128 and mosaic_gpu.default_launch(128).block_kv == 128


LOWERING_CASES = {
    "causal_head64": (1, 1024, 1024, 4, 4, 64, dict(is_causal=True), False, None),
    "gqa_lengths_head128": (2, 900, 1100, 4, 2, 128, dict(), True, None),
    "window_decomposed": (1, 3000, 3000, 2, 1, 64, dict(local_window_size=(100, 0)), False, 7),
}


def _lowering_call(case: str):
    """(attend(q, k, v) with a Mosaic plan and the case's masks, q and k/v shapes) of a `LOWERING_CASES` row."""
    b, t, s, n, kh, h, structured, lengths, chunks = LOWERING_CASES[case]
    plan = sc.plan(q_len=t, kv_len=s, num_q_heads=n, num_kv_heads=kh, head_dim=h, dtype=jnp.bfloat16, batch=b,
                   num_chunks=chunks, implementation="mosaic_gpu", **structured)
    extra = {}
    if lengths:
        extra = dict(query_seq_lengths=jnp.array([t, t // 2], jnp.int32),
                     key_value_seq_lengths=jnp.array([s // 3, s], jnp.int32))
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, kh, h), jnp.bfloat16)
    return lambda q, k, v: sc.dot_product_attention(q, k, v, plan=plan, **structured, **extra), q, kv


def _lower_forward(case: str, monkeypatch, **launch) -> str:
    """The text of a `LOWERING_CASES` call lowered for CUDA on any machine, with the default forward
    launch of its head dim changed by `launch` (fields of `mosaic_gpu.Launch`)."""
    monkeypatch.setattr(mosaic_gpu, "on_hopper", lambda: True)
    chosen = dataclasses.replace(mosaic_gpu.default_launch(LOWERING_CASES[case][5]), **launch)
    monkeypatch.setattr(mosaic_gpu, "default_launch", lambda *_: chosen)
    attend, q, kv = _lowering_call(case)
    jax.clear_caches()  # traced programs are cached per plan, not per launch: none may outlive the call
    try:
        return jax.jit(attend).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("heavy_first,cluster", [(False, 1), (True, 1), (True, 2)])
@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_mosaic_kernel_lowers_for_cuda_on_any_machine(case, heavy_first, cluster, monkeypatch):
    """The kernel's Pallas program lowers to Mosaic GPU (shared-memory sizes included) without a GPU,
    so API or size errors show up in CI; running it needs compute capability 9.x (tests above). With
    `cluster` 2 the thread blocks run in pairs where the query chunks allow (the causal case's do)."""
    text = _lower_forward(case, monkeypatch, heavy_first=heavy_first, cluster=cluster)
    assert "mosaic_gpu" in text
    # the default's turns at a hardware barrier (head dim 128) reach the program
    assert ("bar.sync 8, 256" in text) == (LOWERING_CASES[case][5] == 128)
    if case == "causal_head64":
        assert ("cluster_block_id" in text) == (cluster == 2)


@pytest.mark.parametrize("option", ["scores_first", "named_turns"])
@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
@pytest.mark.parametrize("case,cluster", [("causal_head64", 1), ("gqa_lengths_head128", 2), ("window_decomposed", 1)])
def test_mosaic_forward_launch_options_lower_for_cuda(case, cluster, semantics, option, monkeypatch):
    """`Launch.scores_first` (the previous tile's p v issued after the scores, the probabilities computed
    while it runs) and `Launch.named_turns` (turns at a hardware barrier) lower for CUDA under the lowering
    semantics of jax 0.10 and 0.11 (shared memory included), and change the forward's program."""
    _use_lowering_semantics(monkeypatch, semantics)
    plain = dict(scores_first=False, named_turns=False)
    texts = [_lower_forward(case, monkeypatch, cluster=cluster, **{**plain, option: on}) for on in (False, True)]
    assert texts[0] != texts[1]
    assert ("bar.sync 8, 256" in texts[1]) == (option == "named_turns")


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
@pytest.mark.parametrize("case,cluster,scores_first", [("causal_head64", 1, False), ("gqa_lengths_head128", 2, True)])
def test_mosaic_forward_exp2_on_fma_lowers_for_cuda(case, cluster, scores_first, semantics, monkeypatch):
    """`Launch.exp2_on_fma` lowers for CUDA under the lowering semantics of jax 0.10 and 0.11, with and
    without scores first; the polynomial (its rounding step, ``add.rn.f32``) reaches the program only
    when the option is on."""
    _use_lowering_semantics(monkeypatch, semantics)
    texts = [
        _lower_forward(case, monkeypatch, cluster=cluster, scores_first=scores_first, exp2_on_fma=k) for k in (0, 4)
    ]
    assert ["add.rn.f32" in text for text in texts] == [False, True]


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
@pytest.mark.parametrize("case", ["causal_head64", "window_decomposed"])
def test_mosaic_forward_three_warpgroups_lower_for_cuda(case, semantics, monkeypatch):
    """`Launch.warpgroups` = 3 lowers for CUDA under the lowering semantics of jax 0.10 and 0.11, with and
    without scores first (both cases' chunks end in a part tile of 192 rows); its ring of hardware
    barriers and the meeting of all three reach the program, which two warpgroups' program has none of."""
    _use_lowering_semantics(monkeypatch, semantics)
    plain = dict(cluster=1, named_turns=False)
    two = _lower_forward(case, monkeypatch, **plain)
    assert "bar.arrive" not in two and "384;" not in two
    for scores_first in (False, True):
        three = _lower_forward(case, monkeypatch, **plain, scores_first=scores_first, warpgroups=3)
        assert "bar.arrive $0, 256;" in three and "bar.sync $0, 256;" in three and "bar.sync 11, 384;" in three


def _ring_sequences(monkeypatch, steps: int) -> list[list[tuple[str, int]]]:
    """Per compute warpgroup of three, the hardware-barrier instructions (``bar.sync`` or ``bar.arrive``,
    barrier) that `Turns` gives a forward of `steps` key tiles: `start`, then per tile `take`, `arrive`,
    `wait` (the order of every kind of step of the forward), then `finish`."""
    sequences = []
    for wg in range(3):
        ops = []
        record = lambda instruction, offset, warpgroups, threads, wg=wg, ops=ops: ops.append(
            (instruction, mosaic_gpu_common.TURN_BARRIER + (wg + offset) % warpgroups)
        )
        monkeypatch.setattr(mosaic_gpu_common, "own_barrier", record)
        turns = mosaic_gpu_common.Turns("turn", wg, warpgroups=3)
        turns.start()
        for _ in range(steps):
            turns.take()
            turns.arrive()
            turns.wait()
        turns.finish()
        sequences.append(ops)
    return sequences


@pytest.mark.parametrize("steps", [0, 1, 2, 7])
def test_three_warpgroups_pass_one_token_round_their_ring(steps, monkeypatch):
    """The ring of `Turns` with three warpgroups, run against a model of hardware barriers (a barrier
    of 256 threads completes when two warpgroups have come, ``bar.sync`` waiting for it) in many random
    orders: every warpgroup finishes, each barrier completes only with the one warpgroup that waits at
    it, the warpgroups issue in turn (0, 1, 2, 0, ...), and no barrier is left half full."""
    sequences = _ring_sequences(monkeypatch, steps)
    assert all(len(ops) == 2 * steps + 2 for ops in sequences)
    rng = np.random.default_rng(steps)
    for _ in range(50):
        position, waiting, count, holders = [0, 0, 0], {}, {}, [0]  # warpgroup 0 holds the token first
        while any(p < len(ops) for p, ops in zip(position, sequences)):
            runnable = [w for w in range(3) if position[w] < len(sequences[w]) and w not in waiting.values()]
            assert runnable, f"deadlock at {position}"
            w = runnable[rng.integers(len(runnable))]
            instruction, barrier = sequences[w][position[w]]
            position[w] += 1
            count[barrier] = count.get(barrier, 0) + 128
            if instruction == "bar.sync":
                assert barrier not in waiting, "two warpgroups wait at one barrier"
                waiting[barrier] = w
            if count[barrier] == 256:
                assert barrier in waiting, "a barrier completed with no warpgroup waiting at it"
                holders.append(waiting.pop(barrier))
                count[barrier] = 0
        assert not waiting and not any(count.values())
        assert holders == [i % 3 for i in range(len(holders))]


def test_three_warpgroups_take_head_dim_64_single_thread_blocks_without_named_turns(monkeypatch):
    assert mosaic_gpu.Launch(warpgroups=3).warpgroups == 3
    with pytest.raises(ValueError, match="warpgroups must be 2 or 3, got 4"):
        mosaic_gpu.Launch(warpgroups=4)
    for bad in (dict(cluster=2), dict(named_turns=True)):
        with pytest.raises(ValueError, match="cluster 1.*named_turns off"):
            mosaic_gpu.Launch(warpgroups=3, **bad)
    with pytest.raises(ValueError, match="warpgroups=3 takes head dim 64, got 128"):
        _lower_forward("gqa_lengths_head128", monkeypatch, cluster=1, named_turns=False, warpgroups=3)


def test_mosaic_forward_three_stages_fit_at_head_dim_128(monkeypatch):
    """With three stages the output's tiles (acc, m, l) all reuse the key/value ring's memory, so three
    stages of 128-key tiles fit at head dim 128; four do not, and the lowering refuses them (it checks
    the size)."""
    _lower_forward("gqa_lengths_head128", monkeypatch, stages=3)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lower_forward("gqa_lengths_head128", monkeypatch, stages=4)


def test_default_launches_pair_thread_blocks_where_that_was_faster():
    """Forward pairs (`Launch.cluster`) at head dim 128, and at 64 only without a mask for key arrays of
    at least `LARGE_KEYS` rows over examples and heads; the dq kernel's pairs at head dim 64 only; the
    dk/dv kernel's nowhere."""
    rows = mosaic_gpu.LARGE_KEYS
    n = 1 << 20
    dense, causal = Band.of(n, n, False, None), Band.of(n, n, True, None)
    assert mosaic_gpu.default_launch(128).cluster == 2
    assert mosaic_gpu.default_launch(128, 1024, Band.of(1024, 1024, True, None)).cluster == 2
    assert mosaic_gpu.default_launch(64).cluster == 1
    assert mosaic_gpu.default_launch(64, rows, dense).cluster == 2
    assert mosaic_gpu.default_launch(64, rows, causal).cluster == 1
    assert mosaic_gpu.default_launch(64, rows // 2, dense).cluster == 1
    for d in (64, 128):
        for deterministic in (True, False):
            assert mosaic_gpu_backward.default_launch(d, deterministic).dkv_cluster == 1
    assert mosaic_gpu_backward.default_launch(64).dq_cluster == 2
    assert mosaic_gpu_backward.default_launch(128).dq_cluster == 1
    assert mosaic_gpu_backward.default_launch(64).dq_turns and not mosaic_gpu_backward.default_launch(128).dq_turns


def test_default_forward_issues_scores_first_with_named_turns_at_head_dim_128():
    """`Launch.scores_first` and `Launch.named_turns` where they were faster: head dim 128, with or without a
    mask (not at head dim 64)."""
    n = 1 << 16
    for band in (Band.of(n, n, False, None), Band.of(n, n, True, None), Band.of(n, n, False, (256, 0)), None):
        launch = mosaic_gpu.default_launch(128, n, band)
        assert launch.scores_first and launch.named_turns
        launch = mosaic_gpu.default_launch(64, n, band)
        assert not launch.scores_first and not launch.named_turns


def test_launches_refuse_clusters_other_than_one_or_two():
    with pytest.raises(ValueError, match="cluster must be 1 or 2"):
        mosaic_gpu.Launch(cluster=4)
    with pytest.raises(ValueError, match="dq_cluster must be 1 or 2"):
        mosaic_gpu_backward.Launch(dq_cluster=0)
    with pytest.raises(ValueError, match="dkv_cluster must be 1 or 2"):
        mosaic_gpu_backward.Launch(dkv_cluster=3)


# name: (b, t, s, n, kh, h, dtype, structured masks, lengths, chunks, logit scale)
BACKWARD_CASES = {
    "causal_gqa_odd": (2, 1000, 1000, 4, 2, 64, "bfloat16", dict(is_causal=True), False, 7, 1.0),
    "dense_head128_f16": (1, 700, 700, 2, 2, 128, "float16", dict(), False, 1, 1.0),
    "window": (1, 1500, 1500, 2, 1, 64, "bfloat16", dict(local_window_size=(37, 5)), False, 7, 1.0),
    "cross_lengths": (2, 600, 900, 2, 2, 64, "bfloat16", dict(), True, 5, 1.0),
    "gqa_lengths_head128": (2, 900, 1100, 4, 2, 128, "bfloat16", dict(), True, 3, 1.0),
    "cross_causal_gqa_head128": (1, 900, 500, 4, 1, 128, "bfloat16", dict(is_causal=True), False, 3, 1.0),
    "large_logits": (1, 640, 640, 2, 2, 64, "bfloat16", dict(is_causal=True), False, 13, 10.0),
}


def _portable_backward(*args, **kwargs):
    raise AssertionError("the portable backward ran instead of the Mosaic kernels")


def _portable_forward(*args, **kwargs):
    raise AssertionError("the portable forward ran instead of the Mosaic kernel")


@hopper
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_mosaic_backward_matches_float64(case, monkeypatch):
    """dq, dk, dv of the Mosaic backward kernels (the portable backward is made to fail); rows past a
    query length and keys past a key length get exactly zero gradient."""
    c = _float64_case(BACKWARD_CASES[case], case)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=c.plan, **c.structured, **c.extra)
    _, vjp = jax.vjp(f, c.q, c.k, c.v)
    grads = [np.asarray(g) for g in vjp(c.do)]
    for name, g, r, base in zip("qkv", grads, c.ref_grads, c.base_grads):
        assert g.dtype == c.dtype, name
        assert rel_error(as64(g), r) <= 1.5 * base, name
    dq, dk, dv = grads
    assert np.all(dq[~c.vis.any(-1)] == 0)  # rows that see no key
    unseen = ~c.vis.any(1)  # [B, S]: keys no row sees
    assert np.all(dk[unseen] == 0) and np.all(dv[unseen] == 0)


@hopper
def test_mosaic_backward_repeated_runs_are_bitwise_identical(monkeypatch):
    q, k, v = random_inputs(10, 1, 1024, 1024, 4, 2, 64, jnp.bfloat16)
    plan = sc.plan(q_len=1024, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16, num_chunks=7,
                   implementation="mosaic_gpu", is_causal=True)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    loss = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan).astype(jnp.float32).sum()
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    first = [np.asarray(x) for x in g(q, k, v)]
    for _ in range(3):
        for a, b in zip(g(q, k, v), first):
            np.testing.assert_array_equal(np.asarray(a), b)


@hopper
def test_mosaic_backward_paired_products_give_the_same_bits(monkeypatch):
    """`Launch.dkv_paired` only regroups the dk/dv kernel's waits: the gradients are the same bits
    (a causal window with grouped heads, 1000 tokens over 5 chunks: masked, plain and skipped tiles all occur)."""
    q, k, v = random_inputs(11, 1, 1000, 1000, 4, 2, 64, jnp.bfloat16)
    structured = dict(is_causal=True, local_window_size=(300, 0))
    plan = sc.plan(q_len=1000, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16, num_chunks=5,
                   implementation="mosaic_gpu", **structured)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    loss = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=plan, **structured).astype(jnp.float32).sum()
    grads = {}
    for paired in (False, True):
        launch = dataclasses.replace(mosaic_gpu_backward.default_launch(64), dkv_paired=paired)
        monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_, launch=launch: launch)
        jax.clear_caches()  # traced programs are cached per plan, not per launch
        grads[paired] = [np.asarray(x) for x in jax.grad(loss, argnums=(0, 1, 2))(q, k, v)]
    jax.clear_caches()
    for a, b in zip(grads[False], grads[True]):
        np.testing.assert_array_equal(a, b)


@hopper
@pytest.mark.parametrize("case", ["causal_gqa_odd", "window", "gqa_lengths_head128", "cross_causal_gqa_head128"])
def test_mosaic_fused_dq_matches_float64(case, monkeypatch):
    """dq added up by the dk/dv kernel is within 1.5x of the XLA kernel's error and zero for rows that
    see no key; dk, dv are the same bits as without it. At head dim 64 through the public switch
    (`deterministic_backward=False`), at 128 (where that switch keeps the two kernels) through
    `Launch.fused_dq`."""
    c = _float64_case(BACKWARD_CASES[case], case)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)

    def grads(plan):
        f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=plan, **c.structured, **c.extra)
        jax.clear_caches()  # traced programs are cached per plan, not per launch
        _, vjp = jax.vjp(f, c.q, c.k, c.v)
        return [np.asarray(g) for g in vjp(c.do)]

    head_dim = c.q.shape[-1]
    assert mosaic_gpu_backward.default_launch(head_dim, deterministic=False).fused_dq == (head_dim == 64)
    plain = grads(c.plan)
    if head_dim == 64:
        dq, dk, dv = grads(sc.plan(**c.plan_args, deterministic_backward=False))
    else:
        fused = dataclasses.replace(mosaic_gpu_backward.default_launch(head_dim), fused_dq=True)
        monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: fused)
        dq, dk, dv = grads(c.plan)
    jax.clear_caches()
    assert dq.dtype == c.dtype
    assert rel_error(as64(dq), c.ref_grads[0]) <= 1.5 * c.base_grads[0]
    assert np.all(dq[~c.vis.any(-1)] == 0)  # rows that see no key
    np.testing.assert_array_equal(dk, plain[1])
    np.testing.assert_array_equal(dv, plain[2])


DQ_SEGMENT_RUNS = [
    (case, segment, flush, dq_block_kv)
    for case, dq_block_kv in (("causal_gqa_odd", None), ("window", None), ("gqa_lengths_head128", 64))
    for segment, flush in ((0, False), (1, False), (3, False), (1, True), (3, True))
] + [  # 128-key dq tiles at head dim 128 (the default there), whose segments only fit in memory
    ("gqa_lengths_head128", 1, True, 128), ("gqa_lengths_head128", 3, True, 128), ("cross_causal_gqa_head128", 3, True, 128)
]


@hopper
@pytest.mark.parametrize("case,segment,flush,dq_block_kv", DQ_SEGMENT_RUNS)
def test_mosaic_dq_segments_match_float64(case, segment, flush, dq_block_kv, monkeypatch):
    """dq summed in segments of `segment` key tiles (`Launch.dq_segment`; 0: one sum) of `dq_block_kv`
    keys (None: the default's), totalled in registers or, with `flush` (`Launch.dq_flush`), in device
    memory, is within 1.5x of the XLA kernel's error and zero for rows that see no key; dk, dv are the
    same bits as the default launch's (segments touch only the dq kernel). Short segments make every few
    tiles a segment's end, including ends on tiles a warpgroup skips (the window). Flushed, dq is the
    same bits twice."""
    c = _float64_case(BACKWARD_CASES[case], case)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)

    def grads():
        f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=c.plan, **c.structured, **c.extra)
        jax.clear_caches()  # traced programs are cached per plan, not per launch
        _, vjp = jax.vjp(f, c.q, c.k, c.v)
        return [np.asarray(g) for g in vjp(c.do)]

    plain = grads()
    launch = dataclasses.replace(
        mosaic_gpu_backward.default_launch(c.q.shape[-1]), dq_segment=segment, dq_flush=flush
    )
    if dq_block_kv:
        launch = dataclasses.replace(launch, dq_block_kv=dq_block_kv)
    monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: launch)
    dq, dk, dv = grads()
    if flush:
        np.testing.assert_array_equal(grads()[0], dq)
    jax.clear_caches()
    assert rel_error(as64(dq), c.ref_grads[0]) <= 1.5 * c.base_grads[0]
    assert np.all(dq[~c.vis.any(-1)] == 0)  # rows that see no key
    np.testing.assert_array_equal(dk, plain[1])
    np.testing.assert_array_equal(dv, plain[2])


# name: (b, t, s, n, kh, h, dtype, structured masks, lengths, chunks, logit scale); query chunks of 256k rows
CLUSTER_CASES = {
    "causal_gqa_odd": BACKWARD_CASES["causal_gqa_odd"],
    "window": BACKWARD_CASES["window"],
    "dense_head128_f16": BACKWARD_CASES["dense_head128_f16"],
    "cross_lengths_gqa": (2, 1000, 900, 4, 2, 64, "bfloat16", dict(), True, 2, 1.0),
    "causal_lengths_head128": (2, 900, 900, 4, 1, 128, "bfloat16", dict(is_causal=True), True, 2, 1.0),
}


@hopper
@pytest.mark.parametrize("case", list(CLUSTER_CASES))
def test_mosaic_clusters_give_the_same_bits(case, monkeypatch):
    """Thread blocks paired in clusters that share their key and value copies (`Launch.cluster` of the
    forward, `Launch.dq_cluster` of the dq kernel) walk the union of the pair's key tiles, skipping those
    their rows do not see: each row adds up the same tiles in the same order, so the output and the
    gradients are the same bits as with single blocks (causal, window, lengths and grouped heads make
    tiles the two blocks of a pair take differently). Likewise the dk/dv kernel's pairs of key tiles
    (`Launch.dkv_cluster`), which share their query and dO copies."""
    c = _float64_case(CLUSTER_CASES[case], case)
    assert c.plan.q_chunk % 256 == 0 and c.plan.kv_chunk % 256 == 0  # else the kernels take single blocks
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    monkeypatch.setattr(pallas_triton, "forward", _portable_forward)
    head_dim = c.q.shape[-1]

    def run(cluster: int):
        forward = dataclasses.replace(mosaic_gpu.default_launch(head_dim), cluster=cluster)
        backward = dataclasses.replace(mosaic_gpu_backward.default_launch(head_dim), dq_cluster=cluster,
                                       dkv_cluster=cluster)
        return _output_and_gradients(c, monkeypatch, backward, forward)

    single, paired = run(1), run(2)
    assert rel_error(as64(paired[0]), c.ref_out) <= 1.2 * c.base_out
    for name, a, b in zip(("out", "dq", "dk", "dv"), single, paired):
        np.testing.assert_array_equal(b, a, err_msg=name)


@hopper
def test_mosaic_fused_dq_in_pairs_of_key_tiles(monkeypatch):
    """The order-varying dq (`Launch.fused_dq`) with the dk/dv kernel's blocks in pairs
    (`Launch.dkv_cluster`): dk and dv are the same bits as with single blocks, dq is within 1.5x of the
    XLA kernel's error and zero for rows that see no key."""
    case = "cross_lengths_gqa"
    c = _float64_case(CLUSTER_CASES[case], case)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    launch = lambda cluster: mosaic_gpu_backward.Launch(dkv_paired=True, fused_dq=True, dkv_cluster=cluster)
    single = _output_and_gradients(c, monkeypatch, launch(1))
    _, dq, dk, dv = _output_and_gradients(c, monkeypatch, launch(2))
    assert rel_error(as64(dq), c.ref_grads[0]) <= 1.5 * c.base_grads[0]
    assert np.all(dq[~c.vis.any(-1)] == 0)  # rows that see no key
    np.testing.assert_array_equal(dk, single[2])
    np.testing.assert_array_equal(dv, single[3])


@hopper
@pytest.mark.parametrize("case", ["causal_gqa_odd", "window", "gqa_lengths_head128", "cross_causal_gqa_head128"])
def test_mosaic_backward_turns_give_the_same_bits(case, monkeypatch):
    """The dq kernel's compute warpgroups taking turns on the tensor cores (`Launch.dq_turns`, at a
    memory barrier or at a hardware one) changes only when each issues its products: the gradients
    are the same bits (masked, plain and skipped tiles, windows, lengths and grouped heads all occur)."""
    c = _float64_case(BACKWARD_CASES[case], case)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    plain = dataclasses.replace(mosaic_gpu_backward.default_launch(c.q.shape[-1]), dq_turns=False)
    without = _output_and_gradients(c, monkeypatch, plain)
    for named in (False, True):
        turns = dataclasses.replace(plain, dq_turns=True, dq_named_turns=named)
        with_turns = _output_and_gradients(c, monkeypatch, turns)
        assert rel_error(as64(with_turns[1]), c.ref_grads[0]) <= 1.5 * c.base_grads[0]
        for name, a, b in zip(("out", "dq", "dk", "dv"), without, with_turns):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, turns at a hardware barrier: {named}")


@hopper
@pytest.mark.parametrize("case", ["causal_gqa_odd", "window", "cross_lengths", "large_logits"])
def test_mosaic_dkv_kv_in_registers_give_the_same_bits(case, monkeypatch):
    """k and v in registers as the first operands of the dk/dv kernel's ``s^T`` and ``dp^T``
    (`Launch.dkv_kv_in_registers`), with paired products and in turn: the same products in the same
    order, so the gradients are the same bits as with both operands in shared memory."""
    c = _float64_case(BACKWARD_CASES[case], case)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    for paired in (True, False):
        plain = dataclasses.replace(mosaic_gpu_backward.default_launch(64), dkv_paired=paired)
        without = _output_and_gradients(c, monkeypatch, plain)
        in_registers = _output_and_gradients(c, monkeypatch, dataclasses.replace(plain, dkv_kv_in_registers=True))
        assert rel_error(as64(in_registers[2]), c.ref_grads[1]) <= 1.5 * c.base_grads[1]
        for name, a, b in zip(("out", "dq", "dk", "dv"), without, in_registers):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}, paired products: {paired}")


DQ_PASS_CASES = [("causal_gqa_odd", None), ("window", None), ("gqa_lengths_head128", 1), ("cross_causal_gqa_head128", 2)]


def _key_rows(plan) -> list[int]:
    """Rows of each subproblem's key array (its key chunks, end to end)."""
    return [len(sp.kv_chunks) * plan.kv_chunk for sp in plan.subproblems]


@pytest.mark.parametrize("case", sorted({case for case, _ in DQ_PASS_CASES}))
def test_dq_pass_cases_take_several_passes(case):
    """The plans of `test_mosaic_dq_passes_match_float64` (checked here, where no GPU is needed): some
    subproblem's key array spans two 256-key passes or more, and the key chunks are whole 128-key dq
    tiles, as the Hopper backward needs (`mosaic_gpu_backward.supports`)."""
    plan = sc.plan(**_plan_args(BACKWARD_CASES[case]))
    assert max(_key_rows(plan)) > 256
    assert plan.kv_chunk % 128 == 0


@hopper
@pytest.mark.parametrize("case,segment", DQ_PASS_CASES)
def test_mosaic_dq_passes_match_float64(case, segment, monkeypatch):
    """The dq kernel in passes over 256-key windows of the key array (`Launch.dq_pass_keys`), each
    adding onto the last: dq is within 1.5x of the XLA kernel's error, zero for rows that see no key, the
    same bits twice; dk and dv are the default's bits (passes touch only the dq kernel). Chunks in
    several key slots, masked, plain and skipped tiles, lengths and grouped heads all occur. At head
    dim 128 dq's segments go to device memory, and a pass must hold whole segments: `segment` tiles
    (at 64 the default's segments, in registers)."""
    c = _float64_case(BACKWARD_CASES[case], case)
    assert max(_key_rows(c.plan)) > 256  # some subproblem's dq kernel runs in two passes or more
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    default = mosaic_gpu_backward.default_launch(c.q.shape[-1])
    plain = _output_and_gradients(c, monkeypatch, default)
    passes = dataclasses.replace(default, dq_pass_keys=256, dq_segment=segment or default.dq_segment)
    _, dq, dk, dv = _output_and_gradients(c, monkeypatch, passes)
    np.testing.assert_array_equal(_output_and_gradients(c, monkeypatch, passes)[1], dq)
    assert rel_error(as64(dq), c.ref_grads[0]) <= 1.5 * c.base_grads[0]
    assert np.all(dq[~c.vis.any(-1)] == 0)  # rows that see no key
    np.testing.assert_array_equal(dk, plain[2])
    np.testing.assert_array_equal(dv, plain[3])


@hopper
@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_dq_passes_of_whole_segments_give_the_same_bits(causal, monkeypatch):
    """In one key chunk the dq kernel walks the key tiles in order; passes of whole segments (head dim
    128's default: 1024-key segments in device memory) then add the same segments onto dq in the same
    order as one pass: dq is the same bits (3 passes over 3072 keys)."""
    q, k, v = random_inputs(13, 1, 3072, 3072, 4, 2, 128, jnp.bfloat16)
    plan = sc.plan(q_len=3072, num_q_heads=4, num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16, num_chunks=1,
                   implementation="mosaic_gpu", is_causal=causal)
    assert plan.kv_chunk == 3072
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)
    default = mosaic_gpu_backward.default_launch(128)
    assert default.dq_flush and default.dq_segment * default.dq_block_kv == 1024
    do = jnp.asarray(np.random.default_rng(13).standard_normal(q.shape), jnp.bfloat16)
    c = types.SimpleNamespace(q=q, k=k, v=v, do=do, plan=plan, structured=dict(is_causal=causal), extra={})
    one = _output_and_gradients(c, monkeypatch, default)
    three = _output_and_gradients(c, monkeypatch, dataclasses.replace(default, dq_pass_keys=1024))
    for name, a, b in zip(("out", "dq", "dk", "dv"), one, three):
        np.testing.assert_array_equal(b, a, err_msg=name)


def _output_and_gradients(c, monkeypatch, backward, forward=None) -> list[np.ndarray]:
    """(out, dq, dk, dv) of the case `c` (`_float64_case`) with the backward's default launch replaced by
    `backward`, and the forward's by `forward` if given."""
    with monkeypatch.context() as m:
        m.setattr(mosaic_gpu_backward, "default_launch", lambda *_: backward)
        if forward is not None:
            m.setattr(mosaic_gpu, "default_launch", lambda *_: forward)
        jax.clear_caches()  # traced programs are cached per plan, not per launch
        f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=c.plan, **c.structured, **c.extra)
        out, vjp = jax.vjp(f, c.q, c.k, c.v)
        result = [np.asarray(x) for x in (out, *vjp(c.do))]
    jax.clear_caches()
    return result


@hopper
def test_mosaic_nondeterministic_backward_under_vmap_runs_the_two_kernels(monkeypatch):
    """Under `jax.vmap` the order-varying backward (whose kernel adds into dq in place) gives way to the
    two deterministic kernels, batched: its gradients are the same bits as the vmapped deterministic
    gradients, and each element's are those of the element on its own up to the last bit of bfloat16
    (XLA may reduce delta in another order when batched)."""
    q, k, v = random_inputs(12, 3, 1000, 1000, 4, 2, 64, jnp.bfloat16)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)

    def grad(deterministic):
        plan = sc.plan(q_len=1000, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16, num_chunks=5,
                       is_causal=True, implementation="mosaic_gpu", deterministic_backward=deterministic)
        attend = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan)
        return jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))

    batched = lambda deterministic: [
        np.asarray(g, np.float32) for g in jax.jit(jax.vmap(grad(deterministic)))(q[:, None], k[:, None], v[:, None])
    ]
    order_varying, deterministic = batched(False), batched(True)
    for name, a, b in zip(("dq", "dk", "dv"), order_varying, deterministic):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for i in range(3):
        own = [np.asarray(g, np.float32) for g in grad(True)(q[i : i + 1], k[i : i + 1], v[i : i + 1])]
        for name, b, g in zip(("dq", "dk", "dv"), deterministic, own):
            np.testing.assert_allclose(b[i], g, rtol=2**-7, atol=2**-14, err_msg=f"{name} of element {i}")


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_mosaic_backward_lowers_for_cuda_on_any_machine(case, monkeypatch):
    """The gradient's program holds the Mosaic dq and dk/dv kernels (the portable backward is made to
    fail) and lowers to Mosaic GPU without a GPU, shared-memory sizes included."""
    _pretend_hopper(monkeypatch)
    built = []
    for name in ("_dq", "_dkv"):
        kernel = getattr(mosaic_gpu_backward, name)
        monkeypatch.setattr(mosaic_gpu_backward, name,
                            lambda *args, _kernel=kernel, _name=name, **kw: built.append(_name) or _kernel(*args, **kw))
    attend, q, kv = _lowering_call(case)
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert {"_dq", "_dkv"} <= set(built)
    assert text.count("custom_call @mosaic_gpu") >= 3  # the forward, dq and dk/dv kernels


@pytest.mark.parametrize("head_dim", [64, 128])
def test_nondeterministic_backward_fuses_dq_at_head_dim_64(head_dim, monkeypatch):
    """`deterministic_backward=False` reaches the kernels: at head dim 64 the gradient lowers for CUDA
    without the dq kernel (forward and dk/dv: two Mosaic calls), at 128 it keeps all three."""
    _pretend_hopper(monkeypatch)
    text = _lower_gradient(head_dim, deterministic_backward=False)
    assert text.count("custom_call @mosaic_gpu") == (2 if head_dim == 64 else 3)


@pytest.mark.parametrize("deterministic", [True, False])
def test_vmap_of_the_gradient_lowers_for_cuda(deterministic, monkeypatch):
    """Under `jax.vmap` the gradient lowers for CUDA with either setting, to the two backward kernels
    batched by Pallas (forward, dq, dk/dv: three Mosaic calls): the order-varying kernel updates dq in
    place, which JAX batches only for a batch of one, so it gives way to them."""
    _pretend_hopper(monkeypatch)
    text = _lower_gradient(64, deterministic_backward=deterministic, vmapped=3)
    assert text.count("custom_call @mosaic_gpu") == 3
    assert "stablehlo.while" not in text  # batched, not one element at a time


@pytest.mark.parametrize("head_dim,pass_keys,segment,kernels", [
    (64, 256, None, 6), (128, 1024, None, 3), (128, 512, 4, 4),
])
def test_dq_passes_lower_for_cuda_as_one_kernel_each(head_dim, pass_keys, segment, kernels, monkeypatch):
    """`Launch.dq_pass_keys` runs the dq kernel once per window of the 1024-row key array (the
    forward, the passes and dk/dv: `kernels` Mosaic calls; one pass where a window holds every key),
    and under `jax.vmap` in one pass, batched. At head dim 128 a pass holds whole segments of
    `segment` tiles (None: the default's)."""
    _pretend_hopper(monkeypatch)
    default = mosaic_gpu_backward.default_launch(head_dim)
    launch = dataclasses.replace(default, dq_pass_keys=pass_keys, dq_segment=segment or default.dq_segment)
    monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: launch)
    assert _lower_gradient(head_dim).count("custom_call @mosaic_gpu") == kernels
    vmapped = _lower_gradient(head_dim, vmapped=3)
    assert vmapped.count("custom_call @mosaic_gpu") == 3 and "stablehlo.while" not in vmapped


def test_dq_pass_keys_must_be_whole_tiles_and_segments():
    """Passes end where a key tile ends, and where a segment ends when dq's segments go to device memory."""
    assert mosaic_gpu_backward.key_windows(1000, 0) == [None]
    assert mosaic_gpu_backward.key_windows(1000, 1024) == [None]
    assert mosaic_gpu_backward.key_windows(1000, 384) == [(0, 384), (384, 768), (768, 1000)]
    mosaic_gpu_backward.Launch(dq_pass_keys=256)
    with pytest.raises(ValueError, match="dq_pass_keys must be 0 or a positive multiple of 128, got 200"):
        mosaic_gpu_backward.Launch(dq_pass_keys=200)
    with pytest.raises(ValueError, match="multiple of 1024, got 512"):
        mosaic_gpu_backward.Launch(dq_segment=8, dq_flush=True, dq_pass_keys=512)
    with pytest.raises(ValueError, match="got -128"):
        mosaic_gpu_backward.Launch(dq_pass_keys=-128)


def _pretend_hopper(monkeypatch) -> None:
    """Both Hopper kernels' checks pass on any machine, and the portable backward fails if it runs."""
    monkeypatch.setattr(mosaic_gpu, "on_hopper", lambda: True)
    monkeypatch.setattr(mosaic_gpu_backward, "on_hopper", lambda: True)
    monkeypatch.setattr(pallas_triton, "backward", _portable_backward)


def _lower_gradient(head_dim: int, deterministic_backward: bool = True, vmapped: int = 0) -> str:
    """The text of a causal grouped-heads gradient at `head_dim` lowered for CUDA, whatever the
    machine; with `vmapped`, under `jax.vmap` over that many calls."""
    plan = sc.plan(q_len=1024, num_q_heads=4, num_kv_heads=2, head_dim=head_dim, dtype=jnp.bfloat16,
                   is_causal=True, num_chunks=1, implementation="mosaic_gpu",
                   deterministic_backward=deterministic_backward)
    lead = (vmapped,) if vmapped else ()
    q = jax.ShapeDtypeStruct(lead + (1, 1024, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct(lead + (1, 1024, 2, head_dim), jnp.bfloat16)
    loss = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan).astype(jnp.float32).sum()
    grad = jax.grad(loss, argnums=(0, 1, 2))
    jax.clear_caches()  # traced programs are cached per plan, not per launch: none may outlive the test
    try:
        return jax.jit(jax.vmap(grad) if vmapped else grad).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("head_dim,launch", [
    (64, mosaic_gpu_backward.Launch(dq_block_kv=128, dq_stages=3, dkv_block_q=128, dkv_stages=2)),
    (128, mosaic_gpu_backward.Launch(dq_block_kv=64, dq_stages=3, dkv_block_q=64, dkv_stages=3)),
    (128, mosaic_gpu_backward.Launch(dq_block_kv=128, dq_stages=2, dkv_block_q=128, dkv_stages=2)),
    (64, mosaic_gpu_backward.Launch(dkv_paired=False)),  # the defaults' other choice at each head dim
    (128, mosaic_gpu_backward.Launch(dkv_paired=True)),
    (64, mosaic_gpu_backward.Launch(dkv_paired=True, dq_segment=0)),  # dq in one sum
    (128, mosaic_gpu_backward.Launch(dq_block_kv=64, dq_segment=0)),
    (64, mosaic_gpu_backward.Launch(fused_dq=True)),
    (128, mosaic_gpu_backward.Launch(fused_dq=True)),
    (128, mosaic_gpu_backward.Launch(dq_block_kv=64, dq_segment=16)),  # dq segments in registers
    (64, mosaic_gpu_backward.Launch(dkv_paired=True, dq_segment=1, dq_flush=True)),
    (64, mosaic_gpu_backward.Launch(dkv_paired=True, dq_segment=8, dq_cluster=1)),  # dq's single blocks
    (128, mosaic_gpu_backward.Launch(dq_segment=8, dq_flush=True, dq_cluster=2)),  # dq's pairs, segments in memory
    (64, mosaic_gpu_backward.Launch(dkv_paired=True, dq_segment=8, dq_cluster=2, dkv_cluster=2)),  # dk/dv's pairs
    (128, mosaic_gpu_backward.Launch(dq_segment=8, dq_flush=True, dkv_cluster=2)),
    (64, mosaic_gpu_backward.Launch(fused_dq=True, dkv_cluster=2)),
    (64, mosaic_gpu_backward.Launch(dkv_paired=True, dq_segment=8, dq_cluster=2)),  # dq without turns
    (128, mosaic_gpu_backward.Launch(dq_segment=8, dq_flush=True, dq_turns=True)),  # dq's turns, segments in memory
    (64, mosaic_gpu_backward.Launch(dkv_kv_in_registers=True)),  # dk/dv's k and v in registers, products in turn
    (64, mosaic_gpu_backward.Launch(fused_dq=True, dkv_kv_in_registers=True)),
])
def test_mosaic_backward_other_launches_lower_for_cuda(head_dim, launch, monkeypatch):
    """Launches other than the default (what a tuning sweep tries) build and fit in shared memory."""
    _pretend_hopper(monkeypatch)
    monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: launch)
    _lower_gradient(head_dim)


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
def test_dkv_kv_in_registers_changes_the_gradient_program_at_head_dim_64_only(semantics, monkeypatch):
    """`Launch.dkv_kv_in_registers` lowers for CUDA under the lowering semantics of jax 0.10 and 0.11 and
    changes the program (the default's paired products); at head dim 128 it is refused."""
    _pretend_hopper(monkeypatch)
    _use_lowering_semantics(monkeypatch, semantics)
    texts = []
    for on in (False, True):
        launch = dataclasses.replace(mosaic_gpu_backward.default_launch(64), dkv_kv_in_registers=on)
        monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_, launch=launch: launch)
        texts.append(_lower_gradient(64))
    assert texts[0] != texts[1]
    wide = dataclasses.replace(mosaic_gpu_backward.Launch(), dkv_kv_in_registers=True)
    monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: wide)
    with pytest.raises(ValueError, match="dkv_kv_in_registers takes head dim 64, got 128"):
        _lower_gradient(128)


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
def test_dq_turns_change_the_gradient_program(semantics, monkeypatch):
    """`Launch.dq_turns` reaches the gradient's program, and `Launch.dq_named_turns` turns them into
    hardware barriers (under the lowering semantics of jax 0.10 and 0.11)."""
    _pretend_hopper(monkeypatch)
    _use_lowering_semantics(monkeypatch, semantics)
    base = mosaic_gpu_backward.Launch(dkv_paired=True, dq_segment=8)
    texts = []
    for launch in (base, dataclasses.replace(base, dq_turns=True), dataclasses.replace(base, dq_turns=True,
                                                                                      dq_named_turns=True)):
        monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_, launch=launch: launch)
        texts.append(_lower_gradient(64))
    assert len(set(texts)) == 3
    assert ["bar.sync 8, 256" in text for text in texts] == [False, False, True]


def _use_lowering_semantics(monkeypatch, name: str) -> None:
    """From now on the Hopper kernels lower with Mosaic GPU's `name` semantics ("Lane", the default
    in jax 0.10, or "Warpgroup", the default in jax 0.11)."""
    plgpu = mosaic_gpu.plgpu
    params = getattr(plgpu.CompilerParams, "func", plgpu.CompilerParams)
    chosen = functools.partial(params, lowering_semantics=getattr(plgpu.LoweringSemantics, name))
    monkeypatch.setattr(plgpu, "CompilerParams", chosen)


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
@pytest.mark.parametrize("head_dim,launch", [
    (64, None),  # the defaults
    (128, None),
    (64, mosaic_gpu_backward.Launch(fused_dq=True)),
    (128, mosaic_gpu_backward.Launch(dq_block_kv=64, dq_segment=16)),  # dq segments in registers
    (128, mosaic_gpu_backward.Launch(dq_segment=4, dq_flush=True, dq_pass_keys=512)),  # dq in two passes
    (64, mosaic_gpu_backward.Launch(dq_segment=8, dq_pass_keys=256)),  # in four, totals in registers
])
def test_mosaic_gradient_lowers_with_either_lowering_semantics(head_dim, launch, semantics, monkeypatch):
    """The gradient (the forward and both backward kernels) lowers for CUDA with the lowering semantics
    of jax 0.10 and of jax 0.11, whichever JAX runs the test."""
    _pretend_hopper(monkeypatch)
    if launch is not None:
        monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: launch)
    _use_lowering_semantics(monkeypatch, semantics)
    _lower_gradient(head_dim)


def test_lowering_semantics_choice_reaches_the_kernels(monkeypatch):
    """The test above is not vacuous: the two semantics give different programs."""
    _pretend_hopper(monkeypatch)
    texts = []
    for name in ("Lane", "Warpgroup"):
        _use_lowering_semantics(monkeypatch, name)
        texts.append(_lower_gradient(64))
    assert texts[0] != texts[1]


def test_mosaic_backward_launch_too_big_for_shared_memory_is_refused(monkeypatch):
    """A third dq stage of 128-key tiles at head dim 128 needs 263,320 bytes of shared memory: the
    lowering refuses it on any machine (so the lowering tests above do check the size)."""
    monkeypatch.setattr(mosaic_gpu, "on_hopper", lambda: True)
    monkeypatch.setattr(mosaic_gpu_backward, "on_hopper", lambda: True)
    too_big = mosaic_gpu_backward.Launch(dq_block_kv=128, dq_stages=3)
    monkeypatch.setattr(mosaic_gpu_backward, "default_launch", lambda *_: too_big)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lower_gradient(128)


def test_mosaic_backward_falls_back_where_the_kernels_do_not_apply(monkeypatch):
    """Segment ids and float32 inputs run the portable backward, even on a Hopper GPU."""
    monkeypatch.setattr(mosaic_gpu_backward, "on_hopper", lambda: True)
    calls = []
    monkeypatch.setattr(pallas_triton, "backward", lambda *args, **kw: calls.append(1) or "portable")
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
    ones = jnp.ones((2,), jnp.int32)
    table = jnp.zeros((2, 2), jnp.int32)
    inp = KernelInputs(q, kv, kv, ones, ones, ones, table, table.astype(bool), ones, table)
    cfg = KernelConfig(band=None, q_chunk=128, kv_chunk=128, block_q=128, block_kv=128, scale=1.0)
    launch = mosaic_gpu_backward.default_launch(64)
    assert mosaic_gpu_backward.supports(inp, cfg, launch)
    ids = jnp.zeros((1, 256), jnp.int32)
    for other in (inp._replace(q_segment_ids=ids, kv_segment_ids=ids),
                  inp._replace(q=q.astype(jnp.float32), k=kv.astype(jnp.float32), v=kv.astype(jnp.float32)),
                  inp._replace(q=jnp.zeros((1, 256, 2, 96), jnp.bfloat16))):
        assert not mosaic_gpu_backward.supports(other, cfg, launch)
        assert mosaic_gpu_backward.backward(other, None, None, None, None, cfg) == "portable"
    assert not mosaic_gpu_backward.supports(inp, dataclasses.replace(cfg, kv_chunk=64), launch)
    assert len(calls) == 3
