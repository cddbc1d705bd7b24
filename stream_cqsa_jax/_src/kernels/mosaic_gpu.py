"""The Hopper kernel: block-map flash attention forward in Pallas Mosaic GPU.

One thread block per (128 query rows, query head, example) runs three
warpgroups. Two compute warpgroups own 64 query rows each; the third issues
bulk tensor copies of key/value tiles into a ring of shared-memory stages.
All three walk one sequence of key tiles: the tiles of the block's chunk
pairs, trimmed to the band of its 128 rows. A compute warpgroup runs each
tile through the tensor cores (``wgmma``: ``q k^T`` from shared memory, then
``p v`` with ``p`` in registers), masking only the tiles that cut its own
band; tiles its 64 rows do not see it skips, keeping only the barriers in
step. The two compute warpgroups take turns on the tensor cores (one
multiplies while the other does its softmax); with `Launch.scores_first`
each issues a tile's scores and then the previous tile's ``p v``, and
computes its softmax while ``p v`` runs. With
`Launch.cluster` 2, two thread blocks of neighbouring query tiles form a
cluster that walks the key tiles of both, each copy warpgroup bringing half
of every tile into both blocks' rings. With `Launch.warpgroups` 3, three
compute warpgroups (192 rows) pass their turn round a ring.

The output is the subproblem's softmax state (`base`): float32 ``acc``, row
max ``m`` and ``l``. bfloat16 and float16 inputs, head dims 64 and 128,
no segment ids; anything else runs the portable kernel (`pallas_triton`).
The backward kernels are in `mosaic_gpu_backward`. Only NVIDIA GPUs of
compute capability 9.x run them; the modules import anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..devices import on_hopper
from ..masks import Band
from ..merge import SoftmaxState
from ..tiling import MOSAIC_GPU_DTYPES, MOSAIC_GPU_HEAD_DIMS
from . import block_map, exp2_polynomial, mosaic_gpu_backward, pallas_triton
from .base import KernelConfig, KernelInputs
from .mosaic_gpu_common import (
    LOG2E,
    QueryBlock,
    Turns,
    cluster_fits,
    drain,
    free_barrier,
    run_kernel,
    split_refs,
    stream_kv,
    tiles_per_chunk,
    visible,
)

try:  # Mosaic GPU ships with jaxlib; guard anyway so that the package imports everywhere.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

ROWS = 64  # query rows per compute warpgroup
BLOCK_ROWS = 2 * ROWS  # query rows per thread block of two compute warpgroups (the default)
# Registers per thread (`set_max_registers`) of a compute and of the copy warpgroup, by the number of
# compute warpgroups: together within the multiprocessor's 64K.
REGISTERS = {2: (232, 40), 3: (160, 24)}
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch parameters: key tile and shared-memory stages of the key/value ring.

    heavy_first: thread blocks take the query tiles in reverse order, so that under
    a causal mask the tiles with the most keys start first and the short ones fill
    the end (5-25% faster causal at 256K-1M tokens, docs/hopper_kernel.md); the
    results are the same bits either way.

    cluster: thread blocks per cluster. With 2, the blocks of two neighbouring query
    tiles walk the key tiles of both together, and each copies half of every key and
    value tile into the shared-memory rings of both (a multicast copy): half the key
    and value reads from L2, the same bits. Query slots whose chunks are not a
    multiple of 256 rows run with 1.

    scores_first: over the key tiles that a compute warpgroup sees whole (no mask cuts them), each
    step issues this tile's scores and then the previous tile's ``p v``, waits for the scores alone
    and computes the probabilities while ``p v`` runs; the output is rescaled and ``p`` rounded to the
    inputs' dtype once ``p v`` is done. The same products and additions in the same order: the same
    bits.

    named_turns: the compute warpgroups take their turns at a hardware barrier (``bar.sync``),
    where a waiting warp sleeps until the other warpgroup arrives, instead of at a barrier in
    shared memory, which a waiting warp polls. Only when products are issued changes: the same
    bits.

    exp2_on_fma: over the key tiles that a compute warpgroup sees whole, this many sixteenths of each
    thread's probabilities take ``exp2`` as a polynomial on the FMA units (`exp2_polynomial`) instead
    of the multi-function unit, which at head dim 64 has as many cycles of work per step as the tensor
    cores (docs/hopper_kernel.md). Relative error below 1.6e-7 either way, but not the same bits.

    warpgroups: compute warpgroups per thread block, 2 or 3 (3 x 64 = 192 query rows, with 160
    registers per thread instead of 232). Three take their turns round a ring of hardware barriers
    (`Turns`), so that while one issues its products the other two compute their softmax: at head
    dim 64 a warpgroup's softmax takes longer than its products (by our reading of the counters,
    docs/hopper_kernel.md). A chunk that is no multiple of 192 rows ends in a tile whose last
    warpgroups see nothing. Head dim 64 only, single thread blocks (`cluster` 1), and `named_turns`
    off (the ring is of hardware barriers already). Each row adds up the same tiles in the same
    order: the same bits as with two.
    """

    block_kv: int = 128
    stages: int = 2
    heavy_first: bool = True
    cluster: int = 1
    scores_first: bool = False
    named_turns: bool = False
    exp2_on_fma: int = 0
    warpgroups: int = 2

    def __post_init__(self):
        if self.cluster not in (1, 2):
            raise ValueError(f"Launch.cluster must be 1 or 2, got {self.cluster}")
        if self.warpgroups not in (2, 3):
            raise ValueError(f"Launch.warpgroups must be 2 or 3, got {self.warpgroups}")
        if self.warpgroups == 3 and (self.cluster != 1 or self.named_turns):
            raise ValueError("Launch.warpgroups=3 runs single thread blocks (cluster 1) with named_turns off")
        if not 0 <= self.exp2_on_fma <= 16:
            raise ValueError(f"Launch.exp2_on_fma must be in [0, 16] (sixteenths), got {self.exp2_on_fma}")


# Rows of a subproblem's key array (examples x keys x key/value heads) from which head dim 64 pairs its
# thread blocks without a mask (`default_launch`): 1M keys of 8 heads, or 512K of 8 heads in 2 examples.
LARGE_KEYS = 1 << 23


def default_launch(head_dim: int, key_rows: int = 0, band: Band | None = None) -> Launch:
    """128-key tiles, 2 stages, heaviest query tiles first, for head dims 64 and 128; thread blocks in
    pairs (`Launch.cluster`) at head dim 128, and at 64 for subproblems whose key array has `LARGE_KEYS`
    rows or more (`key_rows`: examples x keys x key/value heads) without a mask (`band` dense), where
    the key and value reads of single blocks missed L2 the most. At head dim 128, scores first
    (`Launch.scores_first`) and turns at a hardware barrier (`Launch.named_turns`), 1-7% faster causal
    or not (at head dim 64 scores first lost 5% without a mask, and the barrier 6-8%). Measurements in
    docs/hopper_kernel.md."""
    dense = band is not None and band.is_dense
    wide = head_dim > 64
    pairs = wide or (dense and key_rows >= LARGE_KEYS)
    return Launch(
        block_kv=128, stages=2, heavy_first=True, cluster=2 if pairs else 1, scores_first=wide, named_turns=wide
    )


def query_tiles(q_rows: int, cfg: KernelConfig, launch: Launch) -> int:
    """The grid's tiles of a subproblem of `q_rows` query rows: per chunk, the clusters of thread blocks
    of `launch.warpgroups` x `ROWS` rows that cover it."""
    return q_rows // cfg.q_chunk * tiles_per_chunk(cfg.q_chunk, launch.warpgroups * ROWS, launch.cluster)


def supports(inp: KernelInputs, cfg: KernelConfig, launch: Launch) -> bool:
    """Whether this kernel runs `inp` (else the portable kernel does)."""
    return (
        plgpu is not None
        and on_hopper()
        and jnp.dtype(inp.q.dtype).name in MOSAIC_GPU_DTYPES
        and inp.q.shape[-1] in MOSAIC_GPU_HEAD_DIMS
        and inp.q_segment_ids is None
        and cfg.q_chunk % BLOCK_ROWS == 0  # whole tiles of two warpgroups; three end chunks in part tiles
        and cfg.kv_chunk % launch.block_kv == 0
    )


def _kernel(*refs, cfg: KernelConfig, lay, launch: Launch, groups: int, has_lengths: bool):
    """refs: the packed table, lengths (if any), q, k, v; acc, m, l; then the scratch of `forward`."""
    tab_ref, lens_ref, (q_ref, k_ref, v_ref), (acc_ref, m_ref, l_ref), scratch = split_refs(refs, has_lengths, 3, 3)
    (q_smem, ring, *apart), q_ready, k_ready, v_ready, k_free, v_free, turn = scratch
    (k_smem, v_smem), in_ring = ring
    o_smem, m_smem, l_smem = (*in_ring, *apart)
    band, bk, stages, cluster, wgs = cfg.band, launch.block_kv, launch.stages, launch.cluster, launch.warpgroups
    block_rows = wgs * ROWS
    bi, head, t, wg = (lax.axis_index(a) for a in ("batch", "heads", "tiles", "wg"))
    if launch.heavy_first:
        t = query_tiles(q_ref.shape[1], cfg, launch) - 1 - t
    block = QueryBlock(tab_ref, lens_ref, lay, cfg, bi, t, block_rows, bk, cluster)
    q_limit, kv_limit = block.q_limit, block.kv_limit
    compute_registers, copy_registers = REGISTERS[wgs]

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(compute_registers, action="increase")
        q_tile, o_tile, m_tile, l_tile = q_smem.at[wg], o_smem.at[wg], m_smem.at[wg], l_smem.at[wg]
        q_start, row0 = block.warpgroup_rows(wg, ROWS)
        inside = block.warpgroup_inside(wg, ROWS)  # None: always
        when_inside = (lambda f: f()) if inside is None else pl.when(inside)
        own_limit = q_limit if inside is None else jnp.where(inside, q_limit, 0)  # rows outside see nothing
        own = block_map.query_span(band, q_start, ROWS, own_limit, kv_limit)

        @when_inside
        def _():
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS), head], q_tile, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

        qk_factor = cfg.scale * LOG2E
        turns = Turns(turn, wg, named=launch.named_turns, warpgroups=wgs)

        def issue_scores(ref, ring):
            """Issues q k^T of the key tile in stage `ring` into the accumulator `ref`."""
            plgpu.wgmma(ref, q_tile, k_smem.at[ring].transpose((1, 0)))

        def issue_values(ref, ring, p):
            """Issues p v of the value tile in stage `ring` into the accumulator `ref` (`p` in registers)."""
            plgpu.wgmma(ref, p, v_smem.at[ring])

        def scores(ring):
            """q k^T of the key tile in stage `ring`, a turn passed while the product runs."""

            def issue(ref):
                issue_scores(ref, ring)
                turns.take()
                return ref[...]

            return pl.run_scoped(issue, plgpu.ACC((ROWS, bk), jnp.float32))

        def probabilities(s, m_i, whole: bool):
            """(m, alpha, p in float32) after the scores `s` (of a tile no mask cuts if `whole`).
            Base-2: m is kept in units of log2, so p = exp2(s * factor - m) is one FMA."""
            m_new = jnp.maximum(m_i, s.max(axis=1) * qk_factor)
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m_i - m_use)
            x = s * qk_factor - lax.broadcast_in_dim(m_use, s.shape, [0])
            # Masked scores are -inf, whose exp2 must be 0: the polynomial gives 2^-126 (its least input).
            p = exp2_polynomial.split_exp2(x, launch.exp2_on_fma) if whole else jnp.exp2(x)
            return m_new, alpha, p

        def softmax(s, m_i, l_i, acc, whole: bool):
            """(acc times alpha, l, m, p in the inputs' dtype) after the scores `s`, held before the
            next pass."""
            m_new, alpha, p = probabilities(s, m_i, whole)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(q_ref.dtype)
            return lax.optimization_barrier((acc, l_i, m_new, p16))

        def add_values(ring, acc, p16):
            """acc + p v with the value tile in stage `ring`, which is then free."""

            acc = pl.run_state(lambda ref: issue_values(ref, ring, p16))(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[ring])
            return acc

        def skip(kt, carry):
            step = carry[0]
            ring = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[ring])
            turns.take()
            plgpu.barrier_arrive(k_free.at[ring])
            turns.arrive()
            plgpu.barrier_wait(v_ready.at[ring])
            turns.wait()
            plgpu.barrier_arrive(v_free.at[ring])
            return (step + 1,) + carry[1:]

        def scored(kt, step, acc, m_i, l_i, kv_start=None):
            """A step's first half, on key tile `kt` in stage ``step % stages``: its scores (masked when
            `kv_start`, the pair's first key position, is given), then `softmax`."""
            ring = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[ring])
            s = scores(ring)
            plgpu.barrier_arrive(k_free.at[ring])
            if kv_start is not None:
                q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
                kv_pos = kv_start + kt * bk + plgpu.broadcasted_iota(
                    jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA
                )
                s = jnp.where(visible(band, q_pos, kv_pos, q_limit, kv_limit), s, -jnp.inf)
            return softmax(s, m_i, l_i, acc, whole=kv_start is None)

        def visit(kt, carry, kv_start, masked: bool):
            step, acc, m_i, l_i = carry
            ring = lax.rem(step, stages)
            acc, l_i, m_new, p16 = scored(kt, step, acc, m_i, l_i, kv_start if masked else None)
            turns.arrive()
            plgpu.barrier_wait(v_ready.at[ring])
            turns.wait()
            acc = add_values(ring, acc, p16)
            return step + 1, acc, m_new, l_i

        def scores_first(lo, hi, carry):
            """The steps of key tiles [lo, hi), which no mask cuts, with `Launch.scores_first`: a step
            issues its scores, then the previous tile's ``p v``, and computes its probabilities while
            ``p v`` runs. The first tile's scores come alone and the last tile's ``p v`` after the others."""

            def first(carry):
                step, acc, m_i, l_i = carry
                acc, l_i, m_new, p16 = scored(lo, step, acc, m_i, l_i)
                turns.arrive()
                turns.wait()
                return step + 1, acc, m_new, l_i, p16

            def next_tile(kt, carry):
                step, acc, m_i, l_i, p16 = carry  # p16: the previous tile's, its values in stage `prev`
                ring, prev = lax.rem(step, stages), lax.rem(step - 1, stages)
                plgpu.barrier_wait(k_ready.at[ring])
                plgpu.barrier_wait(v_ready.at[prev])

                def products(s_ref, o_ref):
                    o_ref[...] = acc  # fenced before either product is issued
                    issue_scores(s_ref, ring)
                    issue_values(o_ref, prev, p16)
                    turns.take()
                    s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # p v may still run
                    plgpu.barrier_arrive(k_free.at[ring])
                    m_new, alpha, p = probabilities(s, m_i, whole=True)
                    l_new = l_i * alpha + p.sum(axis=1)
                    return plgpu.wgmma_accumulator_load(o_ref, wait_n=0), m_new, alpha, l_new, p

                acc, m_new, alpha, l_i, p = pl.run_scoped(
                    products, plgpu.ACC((ROWS, bk), jnp.float32), plgpu.ACC(acc.shape, jnp.float32)
                )
                plgpu.barrier_arrive(v_free.at[prev])
                # p's copy in the inputs' dtype takes the registers that p v read: made once p v is done.
                acc, p = lax.optimization_barrier((acc, p))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p.astype(q_ref.dtype)))
                turns.arrive()
                turns.wait()
                return step + 1, acc, m_new, l_i, p16

            def last(carry):
                step, acc, m_i, l_i, p16 = carry
                prev = lax.rem(step - 1, stages)
                plgpu.barrier_wait(v_ready.at[prev])
                return step, add_values(prev, acc, p16), m_i, l_i

            def steps(carry):
                return last(lax.fori_loop(lo + 1, hi, next_tile, first(carry)))

            return lax.cond(hi > lo, steps, lambda carry: carry, carry)

        hd = q_ref.shape[-1]
        init = (
            jnp.int32(0),
            plgpu.layout_cast(jnp.zeros((ROWS, hd), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        )
        turns.start()
        plain_steps = scores_first if launch.scores_first else None
        _, acc, m_i, l_i = block.walk(own, skip, visit, init, plain_steps)
        turns.finish()
        # Once every compute warpgroup passes this, none reads the key/value ring again,
        # and the output tiles may reuse its memory.
        turns.meet()

        @when_inside
        def _():
            o_tile[...] = acc
            m_tile[...] = m_i * _LN2
            l_tile[...] = l_i
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_tile, acc_ref.at[bi, pl.ds(row0, ROWS), head])
            plgpu.copy_smem_to_gmem(m_tile, m_ref.at[bi, head, pl.ds(row0, ROWS)])
            plgpu.copy_smem_to_gmem(l_tile, l_ref.at[bi, head, pl.ds(row0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
        plgpu.set_max_registers(copy_registers, action="decrease")
        barriers = (k_ready, v_ready, k_free, v_free)
        kv_head = block_map.div(head, groups)
        steps = stream_kv(block, k_ref, v_ref, k_smem, v_smem, barriers, bi, kv_head, stages, cluster)
        if cluster > 1:  # the other blocks' releases arrive here too; none may come after this block exits
            drain(k_free, steps, stages)
            drain(v_free, steps, stages)


def forward(inp: KernelInputs, cfg: KernelConfig, launch: Launch | None = None) -> SoftmaxState:
    """The softmax state of one subproblem; see `base`. Falls back to `pallas_triton` where
    `supports` says no."""
    b, lq, n, h = inp.q.shape
    kh = inp.k.shape[2]
    launch = launch or default_launch(h, b * inp.k.shape[1] * kh, cfg.band)
    launch = dataclasses.replace(launch, block_kv=min(launch.block_kv, cfg.block_kv))
    launch = dataclasses.replace(launch, cluster=cluster_fits(cfg.q_chunk, BLOCK_ROWS, launch.cluster))
    if not supports(inp, cfg, launch):
        return pallas_triton.forward(inp, cfg)
    if launch.warpgroups == 3 and h != 64:
        raise ValueError(
            f"Launch.warpgroups=3 takes head dim 64, got {h}: at 160 registers a thread could not hold the "
            "output, the scores and p"
        )
    tab, lay = block_map.pack(inp)
    lens = block_map.lengths(inp)
    dtype = inp.q.dtype
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    ring = (
        plgpu.SMEM((launch.stages, launch.block_kv, h), dtype, transforms=swizzled),
        plgpu.SMEM((launch.stages, launch.block_kv, h), dtype, transforms=swizzled),
    )
    wgs = launch.warpgroups
    out = (plgpu.SMEM((wgs, ROWS, h), jnp.float32), *[plgpu.SMEM((wgs, ROWS), jnp.float32)] * 2)  # acc, m, l
    # The output's acc tile reuses the ring; with more than two stages m's and l's do too, which three
    # stages of 128-key tiles at head dim 128 need to fit.
    in_ring = 3 if launch.stages > 2 else 1
    smem = (
        plgpu.SMEM((wgs, ROWS, h), dtype, transforms=swizzled),  # q
        plgpu.RefUnion(ring, out[:in_ring]),
        *out[in_ring:],
    )
    free = functools.partial(free_barrier, launch.cluster)
    scratch = (
        smem,
        plgpu.Barrier(num_barriers=wgs),  # query tiles landed
        plgpu.Barrier(num_barriers=launch.stages),  # key tile landed
        plgpu.Barrier(num_barriers=launch.stages),  # value tile landed
        free(num_arrivals=wgs, num_barriers=launch.stages),  # key stage free
        free(num_arrivals=wgs, num_barriers=launch.stages),  # value stage free
        plgpu.Barrier(num_arrivals=2),  # tensor-core turn (two warpgroups; three take a ring of hardware barriers)
    )
    rows = jax.ShapeDtypeStruct((b, n, lq), jnp.float32)
    body = functools.partial(
        _kernel, cfg=cfg, lay=lay, launch=launch, groups=n // kh, has_lengths=lens is not None
    )
    out_type = (jax.ShapeDtypeStruct((b, lq, n, h), jnp.float32), rows, rows)
    grid = (n, query_tiles(lq, cfg, launch), b)
    acc, m, l = run_kernel(
        body, out_type, scratch, grid, tab, lens, inp.q, inp.k, inp.v, cluster=launch.cluster, warpgroups=wgs
    )
    return SoftmaxState(acc, m, l)


def backward(inp: KernelInputs, do, m, l, delta, cfg: KernelConfig):
    """The Hopper backward (`mosaic_gpu_backward`, same contract); it falls back to `pallas_triton`."""
    return mosaic_gpu_backward.backward(inp, do, m, l, delta, cfg)
