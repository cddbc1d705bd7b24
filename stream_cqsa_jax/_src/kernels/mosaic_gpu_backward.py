"""The Hopper backward: block-map flash attention gradients in Pallas Mosaic GPU.

Two kernels, by default no atomics (deterministic), each with two compute warpgroups and
one warpgroup that issues bulk tensor copies into a ring of shared-memory
stages, like the forward (`mosaic_gpu`). Both read ``p`` from one per-row
term, ``bias = m log2(e) + log2(l)`` (``+inf`` for rows that see no key), so
``p = exp2(s scale log2(e) - bias)`` is one multiply-add and one exp2.

dq: one thread block per (128 query rows, query head, example); each compute
warpgroup owns 64 rows, holding q, dO [64, H] in shared memory and bias,
delta in registers (thread blocks take the query tiles last first, the
busiest under a causal mask). All three warpgroups walk the forward's
sequence of key tiles (`Launch.dq_block_kv` keys); per tile a compute warpgroup computes
``s = q k^T`` and ``dp = dO v^T`` on the tensor cores (both from shared
memory), ``ds = p (dp - delta)`` in registers, then ``dq += ds k`` (``ds``
from registers), which the tensor cores add up; every `Launch.dq_segment` steps
that running sum moves into a float32 total (additions that round to nearest),
in registers or, with `Launch.dq_flush` (the default at head dim 128), in device memory.
Tiles its own rows do not see it skips, keeping only the barriers in step. With
`Launch.dq_cluster` 2 (the default at head dim 64) two blocks of neighbouring query tiles
share their key and value copies, as the forward's pairs. With `Launch.dq_pass_keys`
it runs once per window of the key array, each launch adding onto the dq of the last.
Output: ``dq scale`` [B, Lq, N, H].

dk/dv: one thread block per (128 keys, key/value head, example); each compute
warpgroup owns 64 keys, holding k, v [64, H] in shared memory. For every
query slot that visits the block's chunk (the transposed pair lists), the
three walk the query tiles (`Launch.dkv_block_q` rows) that see some key of the block
and, per tile, the ``groups`` query heads of the key/value head; the copy
warpgroup streams q, dO [block_q, H] and the rows' bias and delta. With
`Launch.dkv_cluster` 2 two blocks of neighbouring key tiles walk the query tiles
that some key of either sees and share their q and dO copies, as the forward's pairs
share keys and values. Per step:
``s^T = k q^T``, ``dv += p^T dO``, ``dp^T = v dO^T``,
``ds^T = p^T (dp^T - delta)``, ``dk += ds^T q``, all on the tensor cores
(`Launch.dkv_paired`, the default at head dim 64, issues ``s^T`` with ``dp^T``
and then ``dv`` with ``dk``, one wait per pair).
Padding keys and rows see nothing, so they get and give no gradient.
Output: ``dk scale``, ``dv`` [B, Lk, K, H]. With `Launch.fused_dq` (what
``deterministic_backward=False`` picks at head dim 64) it also adds each step's
``ds k`` into a zeroed float32 dq in device memory, and the dq kernel does not run.

Float32 outputs pass through shared memory that the operands no longer need
(`plgpu.RefUnion`). bfloat16 and float16 inputs, head dims 64 and 128, no
segment ids, chunks divisible by the tiles; anything else runs the portable
backward (`pallas_triton`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..devices import on_hopper
from ..tiling import MOSAIC_GPU_DTYPES, MOSAIC_GPU_HEAD_DIMS
from . import block_map, pallas_triton
from .base import KernelConfig, KernelInputs, row_bias
from .mosaic_gpu_common import (
    LOG2E,
    QueryBlock,
    Turns,
    batched_as,
    cluster_fits,
    cluster_member,
    cluster_tile,
    drain,
    free_barrier,
    run_kernel,
    split_refs,
    stream_kv,
    visible,
    walk,
)

try:  # Mosaic GPU ships with jaxlib; guard anyway so that the package imports everywhere.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

ROWS = 64  # query rows (dq) or keys (dk/dv) per compute warpgroup
BLOCK = 2 * ROWS  # query rows (dq) or keys (dk/dv) per thread block


@dataclasses.dataclass(frozen=True)
class Launch:
    """Tiles and ring stages of the two kernels.

    dq_block_kv: keys per tile of the dq kernel; dq_stages: its key/value ring.
    dkv_block_q: query rows per tile of the dk/dv kernel; dkv_stages: its q/dO ring.
    dkv_paired: the dk/dv kernel issues its four products in two pairs, ``s^T`` with
    ``dp^T`` and then ``dv`` with ``dk``, waiting for the tensor cores twice per tile
    instead of three times (same products, same bits).
    fused_dq: the dk/dv kernel (paired) also computes each tile's share of dq,
    ``ds^T^T k``, and adds it into a zeroed float32 dq in device memory with a
    reducing bulk copy; the dq kernel does not run. Five products per tile instead
    of seven, but the order of the additions into dq varies from run to run, and so
    may dq's last bits.
    dq_segment: every this many steps of its walk, the dq kernel adds the tensor cores'
    running sum into a float32 total in registers and restarts it from zero (0: never).
    Summed over a whole long row in the tensor cores' accumulator, dq lost precision:
    at 1M keys, head dim 128, its error was 3% above cuDNN's; the total's additions round to nearest.
    dq_flush: dq's segments go to device memory instead of a register total, through a float32
    staging tile in [64, 64] column blocks (which at head dim 128 fit beside 128-key tiles in shared
    memory): copied by the first flush, added onto what is there by later ones, each finished before
    the next starts, so the additions keep their order and the bits repeat. Frees the total's registers.
    dq_cluster: thread blocks per cluster of the dq kernel; with 2, two neighbouring query tiles
    share their key and value copies, as the forward's `Launch.cluster` (query slots whose chunks
    are not a multiple of 256 rows run with 1).
    dkv_cluster: thread blocks per cluster of the dk/dv kernel; with 2, two neighbouring key tiles
    share their query and dO copies (key slots whose chunks are not a multiple of 256 keys run with 1).
    No default picks it: it was no faster (docs/hopper_kernel.md).
    dq_turns: the dq kernel's two compute warpgroups take turns on the tensor cores, as the
    forward's do: one issues its products while the other computes ``p`` and ``ds`` from its last ones
    (same products, same order, same bits).
    dq_named_turns: with `dq_turns`, the turns are taken at a hardware barrier, as the forward's
    with `mosaic_gpu.Launch.named_turns` (same bits).
    dkv_kv_in_registers: the dk/dv kernel loads each warpgroup's k and v tiles into registers once
    (16 registers each per thread at head dim 64) as the first operands of ``s^T`` and ``dp^T``,
    which then read only q and dO from shared memory. With both operands there, a product of
    N = 64 query rows asks shared memory for 128 bytes per cycle, all it gives, while the copies
    also write to it (by arithmetic, not measured). Head dim 64 only. Same products: same bits.
    dq_pass_keys: the dq kernel runs in passes over windows of this many rows of the key array
    (0: one pass over all), each a launch that adds onto the dq of the passes before it. The
    thread blocks running at once then read keys and values from one window, which L2 holds
    however far apart their walks drift if it is small enough (64K keys at head dim 128: 32 MiB of
    keys and values). Off by default: at 256K it gained 0.5% at head dim 128 and lost 0.6% at 64
    (docs/hopper_kernel.md). A multiple of `dq_block_kv`; with `dq_flush`, of ``dq_segment
    dq_block_kv`` too, so that a pass ends where a segment does. Under `jax.vmap` the dq kernel
    runs in one pass (a kernel that adds in place batches only for a batch of one).
    """

    dq_block_kv: int = 128
    dq_stages: int = 2
    dkv_block_q: int = 64
    dkv_stages: int = 2
    dkv_paired: bool = False
    fused_dq: bool = False
    dq_segment: int = 0
    dq_flush: bool = False
    dq_cluster: int = 1
    dkv_cluster: int = 1
    dq_turns: bool = False
    dq_named_turns: bool = False
    dq_pass_keys: int = 0
    dkv_kv_in_registers: bool = False

    def __post_init__(self):
        for name in ("dq_cluster", "dkv_cluster"):
            if getattr(self, name) not in (1, 2):
                raise ValueError(f"Launch.{name} must be 1 or 2, got {getattr(self, name)}")
        step = self.dq_block_kv * (self.dq_segment if self.dq_in_memory else 1)
        if self.dq_pass_keys < 0 or self.dq_pass_keys % step:
            raise ValueError(f"Launch.dq_pass_keys must be 0 or a positive multiple of {step}, got {self.dq_pass_keys}")

    @property
    def dq_in_memory(self) -> bool:
        """Whether dq's segments go to device memory (`dq_flush` with a `dq_segment`)."""
        return bool(self.dq_segment and self.dq_flush)


def default_launch(head_dim: int, deterministic: bool = True) -> Launch:
    """dq: 128-key tiles in 1024-key segments (`Launch.dq_segment`), totalled in registers at head
    dim 64 and in device memory at 128 (`Launch.dq_flush`: a [64, 128] float32 register total
    leaves no registers for 128-key scores). dk/dv: 64-row tiles (two [64, H] float32 accumulators
    stay in registers), paired products at head dim 64, where they were 3-4% faster (at 128 they
    were not; docs/hopper_kernel.md). 2 stages each. The dq kernel's thread blocks in pairs that
    share their key and value copies (`Launch.dq_cluster`) at head dim 64, where that was 1-5%
    faster (at 128 it lost up to 4% under a causal mask). The dq kernel's warpgroups taking turns
    on the tensor cores (`Launch.dq_turns`) at head dim 64, where that was 1-4% faster (at 128 it
    was 6-8% slower). Without `deterministic`, fused dq at head dim 64 (at 128 it was slower)."""
    return Launch(
        dkv_paired=head_dim <= 64,
        fused_dq=not deterministic and head_dim <= 64,
        dq_segment=1024 // Launch.dq_block_kv,
        dq_flush=head_dim > 64,
        dq_cluster=2 if head_dim <= 64 else 1,
        dq_turns=head_dim <= 64,
    )


def supports(inp: KernelInputs, cfg: KernelConfig, launch: Launch) -> bool:
    """Whether these kernels run `inp` (else the portable backward does)."""
    return (
        plgpu is not None
        and on_hopper()
        and jnp.dtype(inp.q.dtype).name in MOSAIC_GPU_DTYPES
        and inp.k.dtype == inp.q.dtype
        and inp.v.dtype == inp.q.dtype
        and inp.q.shape[-1] in MOSAIC_GPU_HEAD_DIMS
        and inp.q_segment_ids is None
        and cfg.q_chunk % BLOCK == 0
        and cfg.q_chunk % launch.dkv_block_q == 0
        and cfg.kv_chunk % BLOCK == 0
        and cfg.kv_chunk % launch.dq_block_kv == 0
    )


def _row_terms(m, l, delta) -> jax.Array:
    """float32 [B, N, 2, Lq]: each row's bias (``m log2 e + log2 l``, +inf where it sees no key) and delta."""
    return jnp.stack([row_bias(m, l, base2=True), delta.astype(jnp.float32)], axis=2)


def _load(ref, layout):
    """All of `ref` in registers with `layout`. jax 0.10 needs the (empty) index as an argument of
    `plgpu.load`; jax 0.11 deprecates it (index the ref instead)."""
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _iota(shape, dim: int):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _settle(step, partial, total: tuple, every: int):
    """(partial, total): `total` holds the float32 sum of the finished segments, or is () when
    `every` is 0. After steps ``every - 1``, ``2 every - 1``, ... the tensor cores' running sum
    `partial` is added into it and restarts from zero."""
    if not every:
        return partial, total
    add = lambda: (_zeros(partial.shape), (total[0] + partial,))
    return lax.cond(lax.rem(step + 1, every) == 0, add, lambda: (partial, total))


def _product_pair(shape, first, ready, second, issued=None):
    """Issues the products ``first`` and, once the barrier `ready` has landed, ``second`` (each an
    (a, b) operand pair) into fresh float32 accumulators of `shape`; calls `issued` (if any) while
    they run; waits once for both; returns their values."""

    def issue(x_ref, y_ref):
        plgpu.wgmma(x_ref, *first)
        plgpu.barrier_wait(ready)
        plgpu.wgmma(y_ref, *second)
        if issued is not None:
            issued()
        return x_ref[...], y_ref[...]

    return pl.run_scoped(issue, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _turn_barrier(on: bool) -> tuple:
    """The scratch of `Turns`: one barrier of two arrivals, or nothing."""
    return (plgpu.Barrier(num_arrivals=2),) if on else ()


def _both_done(done):
    """Waits until both compute warpgroups get here: past it, neither reads its operands
    in shared memory again, and the output tiles may reuse that memory."""
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)


def _store(*tiles, onto=False):
    """Writes float32 register tiles to device memory through shared memory; each tile is
    (value, shared-memory ref, device-memory ref). With `onto` True, or an int32 flag that is nonzero
    (device memory already holds part of the sums), the tiles are added onto device memory instead."""
    for value, smem, _ in tiles:
        smem[...] = value
    plgpu.commit_smem()
    for _, smem, gmem in tiles:
        _copy_or_add(smem, gmem, onto)
    plgpu.wait_smem_to_gmem(0)


def _flush(stage, blocks, onto) -> None:
    """Moves register tiles into device memory one after another through one float32 staging tile:
    `blocks` is a sequence of (value, device-memory ref); copied there while `onto` is 0, added onto
    device memory after. Waits first for the previous flush to land, so that the additions into the
    same memory keep their order (and the bits repeat)."""
    plgpu.wait_smem_to_gmem(0)
    for i, (value, gmem) in enumerate(blocks):
        if i:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block has left the staging tile
        stage[...] = value
        plgpu.commit_smem()
        _copy_or_add(stage, gmem, onto)


def _copy_or_add(smem, gmem, onto) -> None:
    """A bulk copy of `smem` to `gmem`, or one that adds onto `gmem` where `onto` (a bool, or an int32
    flag known only when the kernel runs) is nonzero."""
    if isinstance(onto, bool):
        plgpu.copy_smem_to_gmem(smem, gmem, reduction_op="add" if onto else None)
        return
    plgpu.copy_smem_to_gmem(smem, gmem, predicate=onto == 0)
    plgpu.copy_smem_to_gmem(smem, gmem, predicate=onto != 0, reduction_op="add")


# -- dq -------------------------------------------------------------------------------


def _dq_kernel(
    *refs, cfg: KernelConfig, lay, launch: Launch, groups: int, has_lengths: bool,
    window: tuple[int, int] | None = None, adds: bool = False,
):
    """refs: table, lengths (if any), q, k, v, dO, row terms; dq; then the scratch of `_dq`. The walk
    keeps the key tiles in `window` (`QueryBlock`); with `adds`, dq comes as an operand after the row
    terms, holding earlier passes' sums, and the kernel adds onto it."""
    inputs, outputs = (6, 0) if adds else (5, 1)
    tab_ref, lens_ref, (q_ref, k_ref, v_ref, do_ref, rows_ref, *dq_in), dq_out, scratch = split_refs(
        refs, has_lengths, inputs, outputs
    )
    (dq_ref,) = dq_in or dq_out
    smem, q_ready, do_ready, rows_ready, k_ready, v_ready, k_free, v_free, done, *turn = scratch
    (qdo_smem, out_smem), rows_smem, k_smem, v_smem, *stage_smem = smem
    flushes = launch.dq_in_memory
    band, bk, stages, cluster = cfg.band, launch.dq_block_kv, launch.dq_stages, launch.dq_cluster
    head, t, bi, wg = (lax.axis_index(a) for a in ("heads", "tiles", "batch", "wg"))
    t = q_ref.shape[1] // (BLOCK * cluster) - 1 - t  # the query tiles with the most keys (causal) first
    block = QueryBlock(tab_ref, lens_ref, lay, cfg, bi, t, BLOCK, bk, cluster, window)
    q_limit, kv_limit = block.q_limit, block.kv_limit

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_tile, do_tile = qdo_smem.at[wg, 0], qdo_smem.at[wg, 1]
        q_start, row0 = block.warpgroup_rows(wg, ROWS)
        own = block_map.query_span(band, q_start, ROWS, q_limit, kv_limit)
        rows = (bi, pl.ds(row0, ROWS), head)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_tile, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_tile, do_ready.at[wg])
        plgpu.copy_gmem_to_smem(rows_ref.at[bi, head, :, pl.ds(row0, ROWS)], rows_smem.at[wg], rows_ready.at[wg])
        plgpu.barrier_wait(rows_ready.at[wg])
        per_row = plgpu.Layout.WGMMA.reduce(1)
        bias = _load(rows_smem.at[wg, 0], per_row)
        delta = _load(rows_smem.at[wg, 1], per_row)
        plgpu.barrier_wait(q_ready.at[wg])
        plgpu.barrier_wait(do_ready.at[wg])
        qk_factor = cfg.scale * LOG2E
        shape = (ROWS, bk)
        turns = Turns(turn[0] if turn else None, wg, named=launch.dq_named_turns)

        def skip(kt, carry):
            ring = lax.rem(carry[0], stages)
            plgpu.barrier_wait(k_ready.at[ring])
            plgpu.barrier_wait(v_ready.at[ring])
            turns.take()
            plgpu.barrier_arrive(v_free.at[ring])
            turns.hand_over()
            plgpu.barrier_arrive(k_free.at[ring])
            return (carry[0] + 1,) + carry[1:]

        def visit(kt, carry, kv_start, masked: bool):
            step, dq, *total = carry
            ring = lax.rem(step, stages)
            k_tile, v_tile = k_smem.at[ring], v_smem.at[ring]
            plgpu.barrier_wait(k_ready.at[ring])

            s, dp = _product_pair(
                shape,
                (q_tile, k_tile.transpose((1, 0))),
                v_ready.at[ring],
                (do_tile, v_tile.transpose((1, 0))),
                issued=turns.take,
            )
            plgpu.barrier_arrive(v_free.at[ring])
            if masked:
                q_pos = q_start + _iota(shape, 0)
                kv_pos = kv_start + kt * bk + _iota(shape, 1)
                s = jnp.where(visible(band, q_pos, kv_pos, q_limit, kv_limit), s, -jnp.inf)
            p = jnp.exp2(s * qk_factor - lax.broadcast_in_dim(bias, shape, [0]))
            ds = (p * (dp - lax.broadcast_in_dim(delta, shape, [0]))).astype(q_ref.dtype)
            (ds,) = turns.hand_over(ds)

            def gradient(ref):
                plgpu.wgmma(ref, ds, k_tile)

            dq = pl.run_state(gradient)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_free.at[ring])
            if flushes:
                at_end = lax.rem(step + 1, launch.dq_segment) == 0
                dq, *total = lax.cond(at_end, lambda: flush(dq, total[0]), lambda: (dq, *total))
            else:
                dq, total = _settle(step, dq, tuple(total), launch.dq_segment)
            return (step + 1, dq, *total)

        def flush(dq, flushed):
            """(zeros, 1): dq's running sum, scaled, into device memory (`_flush`) in [64, 64] column
            blocks through the staging tile."""
            width = stage_smem[0].shape[-1]
            scaled = dq * cfg.scale
            blocks = [
                (scaled if width == hd else scaled[:, col : col + width],
                 dq_ref.at[bi, pl.ds(row0, ROWS), head, pl.ds(col, width)])
                for col in range(0, hd, width)
            ]
            _flush(stage_smem[0].at[wg], blocks, flushed)
            return zeros, jnp.int32(1)

        hd = q_ref.shape[-1]
        zeros = _zeros((ROWS, hd))
        # the sum of the finished segments in registers, or the flag that device memory holds it
        extra = ((jnp.int32(int(adds)),) if flushes else (zeros,)) if launch.dq_segment else ()
        turns.start()
        _, dq, *total = block.walk(own, skip, visit, (jnp.int32(0), zeros, *extra))
        turns.finish()
        if flushes:
            plgpu.wait_smem_to_gmem(0)
        elif total:
            dq = dq + total[0]
        _both_done(done)
        _store((dq * cfg.scale, out_smem.at[wg], dq_ref.at[rows]), onto=total[0] if flushes else adds)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        barriers = (k_ready, v_ready, k_free, v_free)
        kv_head = block_map.div(head, groups)
        steps = stream_kv(block, k_ref, v_ref, k_smem, v_smem, barriers, bi, kv_head, stages, cluster)
        drain(k_free, steps, stages)
        drain(v_free, steps, stages)


def _dq(inp: KernelInputs, do, rows, tab, lay, lens, cfg: KernelConfig, launch: Launch) -> jax.Array:
    b, lq, n, h = inp.q.shape
    dtype, bk, stages = inp.q.dtype, launch.dq_block_kv, launch.dq_stages
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        # q and dO tiles of each warpgroup, then its float32 output tile.
        plgpu.RefUnion(
            plgpu.SMEM((2, 2, ROWS, h), dtype, transforms=swizzled), plgpu.SMEM((2, ROWS, h), jnp.float32)
        ),
        plgpu.SMEM((2, 2, ROWS), jnp.float32),  # bias and delta of each warpgroup's rows
        plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled),
        plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled),
    )
    if launch.dq_in_memory:
        smem += (plgpu.SMEM((2, ROWS, min(h, 64)), jnp.float32),)  # each warpgroup's flushes of dq
    cluster = cluster_fits(cfg.q_chunk, BLOCK, launch.dq_cluster)
    launch = dataclasses.replace(launch, dq_cluster=cluster)
    free = functools.partial(free_barrier, cluster)
    scratch = (
        smem,
        plgpu.Barrier(num_barriers=2),  # query tile landed
        plgpu.Barrier(num_barriers=2),  # dO tile landed
        plgpu.Barrier(num_barriers=2),  # row terms landed
        plgpu.Barrier(num_barriers=stages),  # key tile landed
        plgpu.Barrier(num_barriers=stages),  # value tile landed
        free(num_arrivals=2, num_barriers=stages),  # key stage free
        free(num_arrivals=2, num_barriers=stages),  # value stage free
        plgpu.Barrier(num_arrivals=2),  # both compute warpgroups done with q and dO
        *_turn_barrier(launch.dq_turns),  # tensor-core turns
    )
    body = functools.partial(
        _dq_kernel, cfg=cfg, lay=lay, launch=launch, groups=n // inp.k.shape[2], has_lengths=lens is not None
    )
    out_type = jax.ShapeDtypeStruct((b, lq, n, h), jnp.float32)
    grid = (n, lq // (BLOCK * cluster), b)
    windows = key_windows(inp.k.shape[1], launch.dq_pass_keys)
    if len(windows) == 1:
        return run_kernel(body, out_type, scratch, grid, tab, lens, inp.q, inp.k, inp.v, do, rows, cluster=cluster)
    one_pass = dataclasses.replace(launch, dq_pass_keys=0)

    @batched_as(lambda inp, do, rows, tab, lens: _dq(inp, do, rows, tab, lay, lens, cfg, one_pass))
    def passes(inp, do, rows, tab, lens):
        operands = (inp.q, inp.k, inp.v, do, rows)
        first = functools.partial(body, window=windows[0])
        dq = run_kernel(first, out_type, scratch, grid, tab, lens, *operands, cluster=cluster)

        def later(dq_ref):  # the kernel adds onto dq in place: `pl.run_state` keeps this a pure function
            for window in windows[1:]:
                adding = functools.partial(body, window=window, adds=True)
                run_kernel(adding, (), scratch, grid, tab, lens, *operands, dq_ref, cluster=cluster)

        return pl.run_state(later)(dq)

    return passes(inp, do, rows, tab, lens)


def key_windows(key_rows: int, pass_keys: int) -> list[tuple[int, int] | None]:
    """The dq kernel's passes over a key array of `key_rows` rows: [lo, hi) row windows of
    `pass_keys` rows, or one pass over all of them ([None]) when `pass_keys` is 0 or covers them."""
    if not pass_keys or pass_keys >= key_rows:
        return [None]
    return [(lo, min(lo + pass_keys, key_rows)) for lo in range(0, key_rows, pass_keys)]


# -- dk, dv ---------------------------------------------------------------------------


def _dkv_kernel(*refs, cfg: KernelConfig, lay, launch: Launch, groups: int, has_lengths: bool):
    """refs: table, lengths (if any), q, k, v, dO, row terms; dk, dv; then the scratch of `_dkv`.
    With `launch.fused_dq`, dk and dv come as operands (buffers the kernel writes) after a float32
    dq to add into, and there are no outputs."""
    fused = launch.fused_dq
    tab_ref, lens_ref, inputs, outputs, scratch = split_refs(refs, has_lengths, 8 if fused else 5, 0 if fused else 2)
    q_ref, k_ref, v_ref, do_ref, rows_ref, *dq_refs = inputs[:6] if fused else inputs
    dk_ref, dv_ref = inputs[6:] if fused else outputs
    (((k_smem, v_smem, q_smem, do_smem), out_smem), rows_smem, *dq_smem), *barriers = scratch
    k_ready, v_ready, q_ready, do_ready, rows_ready, free, done = barriers
    band, cq, ck, bq, stages = cfg.band, cfg.q_chunk, cfg.kv_chunk, launch.dkv_block_q, launch.dkv_stages
    cluster = launch.dkv_cluster
    tiles = cq // bq
    kv_head, t, bi, wg = (lax.axis_index(a) for a in ("heads", "tiles", "batch", "wg"))
    member = cluster_member(cluster)  # this block's key tile in its cluster
    kv_slot, cluster_start = cluster_tile(tab_ref, lay.kv_chunks, ck, t, BLOCK, cluster)
    block_start = cluster_start + member * BLOCK
    q_limit, kv_limit = block_map.limits(band, lens_ref, bi)
    # the query tiles that some key of the cluster sees, which all its thread blocks walk
    shared = block_map.key_span(band, cluster_start, BLOCK * cluster, q_limit, kv_limit)
    visitors = tab_ref[lay.kv_pair_count + kv_slot]

    def visitor_chunk(i):
        q_slot = tab_ref[lay.kv_pair_q + kv_slot * lay.kv_pairs + i]
        return q_slot, tab_ref[lay.q_chunks + q_slot] * cq

    def step_rows(j, q_slot):
        """(query head, first row) of step `j` (query tile, group head) over the chunk in `q_slot`."""
        qt = block_map.div(j, groups)
        return kv_head * groups + (j - qt * groups), q_slot * cq + qt * bq

    def steps(span, chunk_start, all_masked: bool) -> tuple:
        """Steps (query tile, group head) of the tiles of a query chunk that `span` lists."""
        return tuple(x * groups for x in block_map.tile_ranges(span, chunk_start, bq, tiles, all_masked))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        # Indexed by the traced `wg` only: a constant index (``.at[wg, 1]``) closed over by
        # `pl.run_state` below comes back out of it as a literal, which the Warpgroup lowering
        # (the default from jax 0.11) rejects ("Shaped arrays must be represented by ir.Values").
        k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
        kv_start = block_start + wg * ROWS
        keys = (bi, pl.ds((t * cluster + member) * BLOCK + wg * ROWS, ROWS), kv_head)
        own = block_map.key_span(band, kv_start, ROWS, q_limit, kv_limit)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_tile, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_tile, v_ready.at[wg])
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        if launch.dkv_kv_in_registers:  # the first operands of s^T and dp^T, read from shared memory once
            k_first, v_first = _load(k_tile, plgpu.Layout.WGMMA), _load(v_tile, plgpu.Layout.WGMMA)
        else:
            k_first, v_first = k_tile, v_tile
        qk_factor = cfg.scale * LOG2E
        shape = (ROWS, bq)
        per_column = plgpu.Layout.WGMMA.reduce(0)

        def skip(j, carry):
            ring = lax.rem(carry[0], stages)
            plgpu.barrier_wait(q_ready.at[ring])
            plgpu.barrier_wait(rows_ready.at[ring])
            plgpu.barrier_wait(do_ready.at[ring])
            plgpu.barrier_arrive(free.at[ring])
            return (carry[0] + 1,) + carry[1:]

        def probabilities(s, bias):
            """p^T from s^T and the rows' bias [bq]."""
            return jnp.exp2(s * qk_factor - lax.broadcast_in_dim(bias, shape, [1]))

        def score_gradient(p, dp, delta):
            """ds^T = p^T (dp^T - delta), in the inputs' dtype, from the rows' delta [bq]."""
            return (p * (dp - lax.broadcast_in_dim(delta, shape, [1]))).astype(q_ref.dtype)

        def mask(s, j, q_start):
            q_pos = q_start + block_map.div(j, groups) * bq + _iota(shape, 1)
            kv_pos = kv_start + _iota(shape, 0)
            return jnp.where(visible(band, q_pos, kv_pos, q_limit, kv_limit), s, -jnp.inf)

        def add_dq(j, ds, q_slot):
            """Adds ``ds^T^T k`` of this warpgroup's keys into dq's rows of step `j` (`fused_dq`)."""
            (dq_ref,), (ds_smem, dq_out) = dq_refs, dq_smem
            ds_tile, dq_tile = ds_smem.at[wg], dq_out.at[wg]
            ds_tile[...] = ds
            plgpu.commit_smem()

            def product(ref):
                plgpu.wgmma(ref, ds_tile.transpose((1, 0)), k_tile)
                return ref[...]

            dq = pl.run_scoped(product, plgpu.ACC((bq, k_ref.shape[-1]), jnp.float32))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous addition has read dq_tile
            dq_tile[...] = dq
            plgpu.commit_smem()
            head, row0 = step_rows(j, q_slot)
            rows = (bi, pl.ds(row0, bq), head)
            plgpu.copy_smem_to_gmem(dq_tile, dq_ref.at[rows], reduction_op="add")

        def visit_paired(j, carry, q_start, masked: bool, q_slot):
            step, dk, dv = carry
            ring = lax.rem(step, stages)
            q_tile, do_tile, terms = q_smem.at[ring], do_smem.at[ring], rows_smem.at[ring]
            plgpu.barrier_wait(q_ready.at[ring])

            s, dp = _product_pair(  # s^T (keys x query rows) and dp^T
                shape,
                (k_first, q_tile.transpose((1, 0))),
                do_ready.at[ring],
                (v_first, do_tile.transpose((1, 0))),
            )
            if masked:
                s = mask(s, j, q_start)
            plgpu.barrier_wait(rows_ready.at[ring])
            bias = _load(terms.at[0], per_column)
            delta = _load(terms.at[1], per_column)
            p = probabilities(s, bias)
            ds = score_gradient(p, dp, delta)
            p16 = p.astype(q_ref.dtype)

            def gradients(refs):
                dv_ref, dk_ref = refs
                plgpu.wgmma(dv_ref, p16, do_tile)
                plgpu.wgmma(dk_ref, ds, q_tile)

            dv, dk = pl.run_state(gradients)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            if fused:
                add_dq(j, ds, q_slot)
            plgpu.barrier_arrive(free.at[ring])
            return step + 1, dk, dv

        def visit_in_turn(j, carry, q_start, masked: bool, q_slot):
            step, dk, dv = carry
            ring = lax.rem(step, stages)
            q_tile, do_tile, terms = q_smem.at[ring], do_smem.at[ring], rows_smem.at[ring]
            plgpu.barrier_wait(q_ready.at[ring])

            def scores(ref):
                plgpu.wgmma(ref, k_first, q_tile.transpose((1, 0)))
                return ref[...]

            s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))  # s^T: keys x query rows
            if masked:
                s = mask(s, j, q_start)
            plgpu.barrier_wait(rows_ready.at[ring])
            p = probabilities(s, _load(terms.at[0], per_column))
            p16 = p.astype(q_ref.dtype)
            plgpu.barrier_wait(do_ready.at[ring])

            def values(refs):
                dv_ref, dp_ref = refs
                plgpu.wgmma(dv_ref, p16, do_tile)
                plgpu.wgmma(dp_ref, v_first, do_tile.transpose((1, 0)))

            zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
            dv, dp = pl.run_state(values)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
            ds = score_gradient(p, dp, _load(terms.at[1], per_column))

            def gradient(ref):
                plgpu.wgmma(ref, ds, q_tile)

            dk = pl.run_state(gradient)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(free.at[ring])
            return step + 1, dk, dv

        visit = visit_paired if launch.dkv_paired or fused else visit_in_turn

        def visitor(i, carry):
            q_slot, chunk_start = visitor_chunk(i)
            first, _, _, last = steps(shared, chunk_start, all_masked=True)
            mine = steps(own, chunk_start, all_masked=False)
            masked = functools.partial(visit, q_start=chunk_start, masked=True, q_slot=q_slot)
            plain = functools.partial(visit, q_start=chunk_start, masked=False, q_slot=q_slot)
            return walk(first, last, mine, skip, masked, plain, carry)

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, k_ref.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
        _, dk, dv = lax.fori_loop(0, visitors, visitor, (jnp.int32(0), zeros, zeros))
        if fused:
            plgpu.wait_smem_to_gmem(0)
        _both_done(done)
        _store((dk * cfg.scale, out_smem.at[wg, 0], dk_ref.at[keys]), (dv, out_smem.at[wg, 1], dv_ref.at[keys]))

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        multicast = "cluster" if cluster > 1 else None  # each block copies a share into all of them

        def visitor(i, step):
            q_slot, chunk_start = visitor_chunk(i)
            first, _, _, last = steps(shared, chunk_start, all_masked=True)

            def tile(j, step):
                ring = lax.rem(step, stages)
                head, row0 = step_rows(j, q_slot)
                rows = (bi, pl.ds(row0, bq), head)

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(free.at[ring])

                terms = rows_ref.at[bi, head, :, pl.ds(row0, bq)]
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[ring], q_ready.at[ring], collective_axes=multicast)
                plgpu.copy_gmem_to_smem(terms, rows_smem.at[ring], rows_ready.at[ring])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[ring], do_ready.at[ring], collective_axes=multicast)
                return step + 1

            return lax.fori_loop(first, last, tile, step)

        drain(free, lax.fori_loop(0, visitors, visitor, jnp.int32(0)), stages)


def _dkv(inp: KernelInputs, do, rows, tab, lay, lens, cfg: KernelConfig, launch: Launch):
    """(dk scale, dv) float32 [B, Lk, K, H], and with `launch.fused_dq` also dq [B, Lq, N, H]
    (unscaled, added up by the kernel into zeros)."""
    b, lk, kh, h = inp.k.shape
    dtype, bq, stages = inp.q.dtype, launch.dkv_block_q, launch.dkv_stages
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    operands = (
        plgpu.SMEM((2, ROWS, h), dtype, transforms=swizzled),  # k of each warpgroup's keys
        plgpu.SMEM((2, ROWS, h), dtype, transforms=swizzled),  # v of each warpgroup's keys
        plgpu.SMEM((stages, bq, h), dtype, transforms=swizzled),  # q ring
        plgpu.SMEM((stages, bq, h), dtype, transforms=swizzled),  # dO ring
    )
    smem = (
        plgpu.RefUnion(operands, plgpu.SMEM((2, 2, ROWS, h), jnp.float32)),  # then dk, dv of each warpgroup
        plgpu.SMEM((stages, 2, bq), jnp.float32),  # bias and delta ring
    )
    if launch.fused_dq:
        smem += (
            plgpu.SMEM((2, ROWS, bq), dtype, transforms=swizzled),  # ds^T of each warpgroup
            plgpu.SMEM((2, bq, h), jnp.float32),  # its share of dq, on its way to device memory
        )
    cluster = cluster_fits(cfg.kv_chunk, BLOCK, launch.dkv_cluster)
    launch = dataclasses.replace(launch, dkv_cluster=cluster)
    scratch = (
        smem,
        plgpu.Barrier(num_barriers=2),  # key tile landed
        plgpu.Barrier(num_barriers=2),  # value tile landed
        plgpu.Barrier(num_barriers=stages),  # query tile landed
        plgpu.Barrier(num_barriers=stages),  # dO tile landed
        plgpu.Barrier(num_barriers=stages),  # row terms landed
        free_barrier(cluster, num_arrivals=2, num_barriers=stages),  # stage free
        plgpu.Barrier(num_arrivals=2),  # both compute warpgroups done with the operands
    )
    body = functools.partial(
        _dkv_kernel, cfg=cfg, lay=lay, launch=launch, groups=inp.q.shape[2] // kh, has_lengths=lens is not None
    )
    grads = jax.ShapeDtypeStruct((b, lk, kh, h), jnp.float32)
    grid, operands = (kh, lk // (BLOCK * cluster), b), (inp.q, inp.k, inp.v, do, rows)
    if not launch.fused_dq:
        return run_kernel(body, (grads, grads), scratch, grid, tab, lens, *operands, cluster=cluster)

    def in_place(refs):
        run_kernel(body, (), scratch, grid, tab, lens, *operands, *refs, cluster=cluster)

    # The kernel updates buffers in place (dq added into zeros; dk, dv written): `pl.run_state` keeps
    # them inside, so that this stays a pure function, which `batched_as` in `backward` needs.
    zeros = lambda shape: jnp.zeros(shape, jnp.float32)
    dq, dk, dv = pl.run_state(in_place)((zeros(inp.q.shape), zeros(grads.shape), zeros(grads.shape)))
    return dk, dv, dq


def backward(
    inp: KernelInputs, do, m, l, delta, cfg: KernelConfig, launch: Launch | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq [B, Lq, N, H], dk, dv [B, Lk, K, H]) float32 of one subproblem; see `base`.
    Falls back to `pallas_triton` where `supports` says no."""
    launch = launch or default_launch(inp.q.shape[-1], cfg.deterministic)
    if not supports(inp, cfg, launch):
        return pallas_triton.backward(inp, do, m, l, delta, cfg)
    if launch.dkv_kv_in_registers and inp.q.shape[-1] != 64:
        raise ValueError(
            f"Launch.dkv_kv_in_registers takes head dim 64, got {inp.q.shape[-1]}: k and v would take 64 registers each"
        )
    tab, lay = block_map.pack(inp)
    lens = block_map.lengths(inp)
    rows = _row_terms(m, l, delta)
    do = do.astype(inp.q.dtype)
    two_kernels = dataclasses.replace(launch, fused_dq=False)

    def separate(inp, do, rows, tab, lens):
        dq = _dq(inp, do, rows, tab, lay, lens, cfg, two_kernels)
        dk, dv = _dkv(inp, do, rows, tab, lay, lens, cfg, two_kernels)
        return dq, dk, dv

    if not launch.fused_dq:
        return separate(inp, do, rows, tab, lens)

    @batched_as(separate)  # the fused kernel adds into dq in place: under vmap, the two kernels run
    def fused(inp, do, rows, tab, lens):
        dk, dv, dq = _dkv(inp, do, rows, tab, lay, lens, cfg, launch)
        return dq * cfg.scale, dk, dv

    return fused(inp, do, rows, tab, lens)
