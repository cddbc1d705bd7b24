"""Pieces the Hopper kernels share (`mosaic_gpu` forward, `mosaic_gpu_backward` dq and dk/dv).

All three run on a grid of thread blocks of two compute warpgroups and a copy
warpgroup (`run_kernel`, arguments split by `split_refs`). A thread block of
the forward and dq kernels owns a tile of query rows of one query slot
(`QueryBlock`), walks the key tiles of that slot's chunk pairs that its rows
see, and is fed by a copy warpgroup (`stream_kv`) that puts each key and value
tile into a ring of shared-memory stages. Each compute warpgroup cuts the
shared walk by its own rows (`walk`) and masks where the band or a length
cuts a tile (`visible`). All but `run_kernel` are traced inside a kernel body.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import custom_batching, lax
from jax.experimental import pallas as pl

from ..masks import Band
from . import block_map

try:  # Mosaic GPU ships with jaxlib; guard anyway so that the package imports everywhere.
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
# The hardware barrier at which the compute warpgroups take turns with `Turns(named=True)`; three compute
# warpgroups take `TURN_BARRIER` + their index, and meet all together at `TURN_BARRIER` + 3 (`Turns`). Mosaic GPU
# keeps 0 (the whole block) and 1 to 4 (one per warpgroup) for its own synchronization.
TURN_BARRIER = 8


def split_refs(refs, has_lengths: bool, inputs: int, outputs: int):
    """(table, lengths or None, input refs, output refs, scratch refs) of a kernel's arguments."""
    tab_ref, rest = refs[0], refs[1:]
    lens_ref = None
    if has_lengths:
        lens_ref, rest = rest[0], rest[1:]
    return tab_ref, lens_ref, rest[:inputs], rest[inputs : inputs + outputs], rest[inputs + outputs :]


def batched_as(batched):
    """Decorator: `f(*args)` (arrays or None -> arrays) as it stands, but `jax.vmap(batched)` in its
    place under `jax.vmap`. For kernels that update buffers in place, which JAX batches only for a
    batch of one: `batched` computes the same result with kernels JAX can batch."""

    def decorate(f):
        def wrapped(*args):
            leaves, tree = jax.tree.flatten(args)

            @custom_batching.custom_vmap
            def call(*leaves):
                return f(*jax.tree.unflatten(tree, leaves))

            @call.def_vmap
            def rule(axis_size, in_batched, *leaves):
                axes = [0 if b else None for b in in_batched]
                out = jax.vmap(lambda *xs: batched(*jax.tree.unflatten(tree, xs)), in_axes=axes)(*leaves)
                return out, jax.tree.map(lambda _: True, out)

            return call(*leaves)

        return wrapped

    return decorate


# The order in which the grid's named axes are laid out, the last varying fastest (Mosaic GPU hands the
# grid to CUDA in reverse): the thread blocks running at once are query tiles of one head, which read the
# same key and value tiles. `bench/mosaic_backward_parts.py` swaps the first two to measure the other
# order (blocks of every head at once); the kernels find their axes by name either way.
GRID_ORDER = ("heads", "tiles", "batch")


def run_kernel(
    body, out_type, scratch, grid: tuple[int, int, int], tab, lens, *operands, cluster: int = 1, warpgroups: int = 2
):
    """Runs `body` on a grid (heads, tiles, batch) of thread blocks of `warpgroups` compute warpgroups
    and a copy warpgroup (axis "wg", the copy warpgroup last), laid out in `GRID_ORDER`; its arguments:
    `tab`, `lens` unless None, `operands`, the outputs of `out_type`, the `scratch`. An operand may be a
    `jax.Ref` (inside `pl.run_state`), which the kernel may update in place. With `cluster` > 1 each grid
    point is a cluster of that many thread blocks (axis "cluster"), which may share copies (`stream_kv`)."""
    args = (tab, *(() if lens is None else (lens,)), *operands)
    size = dict(zip(("heads", "tiles", "batch"), grid))
    layout = dict(
        grid=tuple(size[a] for a in GRID_ORDER), grid_names=GRID_ORDER, num_threads=warpgroups + 1, thread_name="wg"
    )
    if cluster > 1:
        layout.update(cluster=(cluster,), cluster_names=("cluster",))
    params = plgpu.CompilerParams(approx_math=True)
    if any(isinstance(x, jax.Ref) for x in operands):
        # plgpu.kernel's batching wrapper does not pass Refs through; build its kernel directly.
        def with_scratch(*refs):
            pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg")

        name = getattr(getattr(body, "func", body), "__name__", "kernel")
        return pl.kernel(with_scratch, out_type=out_type, mesh=plgpu.Mesh(**layout), compiler_params=params, name=name)(
            *args
        )
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, compiler_params=params, **layout)(*args)


def cluster_fits(chunk: int, rows: int, cluster: int) -> int:
    """`cluster` if a chunk of `chunk` rows (or keys) holds whole clusters of `cluster` tiles of
    `rows`, else 1 (single thread blocks)."""
    return cluster if chunk % (rows * cluster) == 0 else 1


def free_barrier(cluster: int, **kwargs):
    """A ring's stage-free barrier (`plgpu.Barrier` arguments): with `cluster` > 1, one that the
    compute warpgroups of every thread block in the cluster arrive at, since a copy fills the
    stage in all of them."""
    if cluster > 1:
        return plgpu.ClusterBarrier(collective_axes=("cluster",), **kwargs)
    return plgpu.Barrier(**kwargs)


def tiles_per_chunk(chunk: int, rows: int, cluster: int = 1) -> int:
    """Clusters of `cluster` tiles of `rows` rows that cover a chunk of `chunk` positions (the last one
    runs past the chunk's end where `chunk` is not a multiple of their rows)."""
    return -(-chunk // (rows * cluster))


def cluster_tile(tab_ref, chunks_at: int, chunk: int, t, rows: int, cluster: int):
    """(slot, first position) of cluster `t` of `cluster` tiles of `rows` rows (or keys), slot-major over
    the plan's slots of `chunk` positions, whose chunk indices the table holds from `chunks_at`."""
    per_chunk = tiles_per_chunk(chunk, rows, cluster)
    slot = block_map.div(t, per_chunk)
    return slot, tab_ref[chunks_at + slot] * chunk + (t - slot * per_chunk) * (rows * cluster)


def cluster_member(cluster: int):
    """Which tile of its cluster this thread block holds (0 for single blocks)."""
    return lax.axis_index("cluster") if cluster > 1 else 0


def sync_compute_warpgroups() -> None:
    """Both compute warpgroups (256 threads) meet at the hardware barrier `TURN_BARRIER`."""

    @plgpu.inline_mgpu()
    def sync(_):
        void = ir.Type.parse("!llvm.void")
        llvm.inline_asm(void, [], f"bar.sync {TURN_BARRIER}, 256;", "", has_side_effects=True)

    sync()


def own_barrier(instruction: str, offset: int, warpgroups: int, threads: int) -> None:
    """``instruction`` (``bar.sync`` or ``bar.arrive``) for `threads` threads at the hardware barrier
    `TURN_BARRIER` + ((this warpgroup's index + `offset`) mod `warpgroups`)."""

    @plgpu.inline_mgpu()
    def emit(_):
        i32 = ir.IntegerType.get_signless(32)
        index = arith.addi(mgpu.utils.warpgroup_idx(sync=True), mgpu.utils.c(offset, i32))
        index = arith.remui(index, mgpu.utils.c(warpgroups, i32))
        barrier = arith.addi(index, mgpu.utils.c(TURN_BARRIER, i32))
        void = ir.Type.parse("!llvm.void")
        llvm.inline_asm(void, [barrier], f"{instruction} $0, {threads};", "r", has_side_effects=True)

    emit()


class Turns:
    """The two compute warpgroups taking turns on the tensor cores through the barrier `turn` (two
    arrivals), or doing nothing where `turn` is None. Each pass (`take`, or `arrive` then `wait`) is a sync
    point of both. Warpgroup 1 starts one pass behind (`start`) and warpgroup 0 catches up at the end
    (`finish`), so that while one issues its products the other computes from its last ones.

    With `named`, a pass is the hardware barrier `TURN_BARRIER` instead of the memory barrier `turn`
    (which a waiting warp polls): `arrive` does nothing and `wait` meets the other warpgroup there.

    With three `warpgroups` (`turn` not None) the turn is a token passed round a ring of hardware
    barriers, one per warpgroup: `wait` takes it (``bar.sync`` at this warpgroup's barrier, where the
    previous warpgroup arrived), `take` passes it on (``bar.arrive`` at the next one's) and `arrive`
    does nothing, so a warpgroup holds it from a step's `wait` to the next step's `take`, while it
    issues its products. Warpgroup 0 holds it first. Only one token goes round, so no barrier gets a
    second arrival before its warpgroup came."""

    def __init__(self, turn, wg, named: bool = False, warpgroups: int = 2):
        self._turn, self._wg, self._named, self._warpgroups = turn, wg, named, warpgroups
        self._ring = turn is not None and warpgroups > 2

    def arrive(self) -> None:
        if self._turn is not None and not self._named and not self._ring:
            plgpu.barrier_arrive(self._turn)

    def wait(self) -> None:
        if self._ring:
            own_barrier("bar.sync", 0, self._warpgroups, 256)
        elif self._turn is not None:
            if self._named:
                sync_compute_warpgroups()
            else:
                plgpu.barrier_wait(self._turn)

    def take(self) -> None:
        if self._ring:
            own_barrier("bar.arrive", 1, self._warpgroups, 256)
            return
        self.arrive()
        self.wait()

    def meet(self) -> None:
        """Every compute warpgroup past this point has seen all the others reach it (a pass, with two)."""
        if not self._ring:
            self.take()
            return

        @plgpu.inline_mgpu()
        def sync(_):
            void = ir.Type.parse("!llvm.void")
            barrier, threads = TURN_BARRIER + self._warpgroups, 128 * self._warpgroups  # past the ring's barriers
            llvm.inline_asm(void, [], f"bar.sync {barrier}, {threads};", "", has_side_effects=True)

        sync()

    def hand_over(self, *values):
        """A pass, with `values` computed before it, not moved past it (a barrier of no operands
        is no valid program, so a pass with no values has none)."""
        if self._turn is None:
            return values
        if values:
            values = lax.optimization_barrier(values)
        self.take()
        return values

    def start(self) -> None:
        if self._ring:
            pl.when(self._wg != 0)(self.wait)
        elif self._turn is not None:
            pl.when(self._wg == 1)(self.take)

    def finish(self) -> None:
        if self._ring:  # pass the token on; warpgroup 0 takes it back from the last, so none is left
            self.take()
            pl.when(self._wg == 0)(self.wait)
        elif self._turn is not None:
            pl.when(self._wg == 0)(self.take)


class QueryBlock:
    """The query rows of cluster `t` (slot-major over the plan's query slots): `cluster` tiles of
    `rows` rows from ``start``, their limits, and the key tiles of `block_kv` keys that some of
    them see, which every thread block of the cluster walks. This thread block's own tile is
    number `member` of the cluster (`warpgroup_rows`). With `window` = (lo, hi), multiples of
    `block_kv`, the walk keeps only the tiles in rows [lo, hi) of the key array (`pair_tiles`).
    A chunk that is no whole number of tiles ends in a tile that runs past it: the walk is that of
    its rows inside the chunk, and a warpgroup tells its own by `warpgroup_inside`."""

    def __init__(
        self, tab_ref, lens_ref, lay, cfg, bi, t, rows: int, block_kv: int, cluster: int = 1,
        window: tuple[int, int] | None = None,
    ):
        self._tab, self._lay, self._window = tab_ref, lay, window
        self.block_kv, self.kv_chunk = block_kv, cfg.kv_chunk
        self._t, self._rows, self._cluster, self._q_chunk = t, rows, cluster, cfg.q_chunk
        self.slot, self.start = cluster_tile(tab_ref, lay.q_chunks, cfg.q_chunk, t, rows, cluster)
        self.q_limit, self.kv_limit = block_map.limits(cfg.band, lens_ref, bi)
        # Where the chunk is no whole number of tiles, its last tile runs past its end: rows that see nothing.
        self._ragged = cfg.q_chunk % (rows * cluster) != 0
        span_limit = self.q_limit
        if self._ragged:
            self._in_chunk = (t - self.slot * tiles_per_chunk(cfg.q_chunk, rows, cluster)) * (rows * cluster)
            span_limit = jnp.minimum(self.q_limit, self.start - self._in_chunk + cfg.q_chunk)
        self.span = block_map.query_span(cfg.band, self.start, rows * cluster, span_limit, self.kv_limit)
        self.pair_count = tab_ref[lay.pair_count + self.slot]
        self.member = cluster_member(cluster)

    def warpgroup_rows(self, wg, rows: int):
        """(first query position, first row in the subproblem's query array) of the `rows` rows of
        compute warpgroup `wg` in this thread block's tile."""
        q_start = self.start + self.member * self._rows + wg * rows
        if self._ragged:
            return q_start, self.slot * self._q_chunk + self._in_chunk + self.member * self._rows + wg * rows
        return q_start, (self._t * self._cluster + self.member) * self._rows + wg * rows

    def warpgroup_inside(self, wg, rows: int):
        """Whether the `rows` rows of compute warpgroup `wg` lie inside their chunk (a traced bool), or
        None where every tile's rows do (chunks of whole tiles). Rows outside see no key: their
        warpgroup skips every tile and writes nothing."""
        if not self._ragged:
            return None
        return self._in_chunk + self.member * self._rows + wg * rows < self._q_chunk

    def pair_chunk(self, p):
        """(key slot, first key position) of the block's pair `p`."""
        kv_slot = self._tab[self._lay.pair_kv + self.slot * self._lay.pairs + p]
        return kv_slot, self._tab[self._lay.kv_chunks + kv_slot] * self.kv_chunk

    def pair_tiles(self, p):
        """(key slot, first key position, first tile, last tile) of the block's pair `p`: the tiles
        [first, last) of its key chunk that some row of the block sees, within the `window`."""
        kv_slot, chunk_start = self.pair_chunk(p)
        tiles = self.kv_chunk // self.block_kv
        first, _, _, last = block_map.tile_ranges(self.span, chunk_start, self.block_kv, tiles, all_masked=True)
        if self._window is not None:
            lo, hi = (jnp.clip(bound // self.block_kv - kv_slot * tiles, 0, tiles) for bound in self._window)
            first = jnp.clip(first, lo, hi)
            last = jnp.clip(last, first, hi)
        return kv_slot, chunk_start, first, last

    def walk(self, own: block_map.Span, skip, visit, carry, plain_steps=None):
        """Folds a compute warpgroup's steps over the block's key tiles, pair by pair: for
        the rows of `own`, ``skip(kt, carry)`` on tiles they do not see, ``visit(kt, carry,
        kv_start=, masked=)`` on the others (``kv_start``: the pair's first key position).
        ``plain_steps(first, last, carry)``, if given, runs the steps of the tiles that no mask
        cuts instead of ``visit``."""

        def pair(p, carry):
            _, chunk_start, first, last = self.pair_tiles(p)
            tiles = self.kv_chunk // self.block_kv
            mine = block_map.tile_ranges(own, chunk_start, self.block_kv, tiles, all_masked=False)
            masked = functools.partial(visit, kv_start=chunk_start, masked=True)
            plain = functools.partial(visit, kv_start=chunk_start, masked=False)
            return walk(first, last, mine, skip, masked, plain, carry, plain_steps)

        return lax.fori_loop(0, self.pair_count, pair, carry)


def visible(band: Band, q_pos, kv_pos, q_limit, kv_limit):
    """Whether query positions `q_pos` see key positions `kv_pos` (same shapes)."""
    return (
        (kv_pos < kv_limit)
        & (q_pos < q_limit)
        & (kv_pos >= q_pos - band.left_bound)
        & (kv_pos <= q_pos + band.right_bound)
    )


def walk(first, last, own: tuple, skip, masked, plain, carry, plain_steps=None):
    """Folds one chunk's steps ``[first, last)``: `skip` outside the warpgroup's own range
    `own` = (first, full_first, full_last, last), `masked` at its edges, `plain` inside, or
    ``plain_steps(full_first, full_last, carry)`` for all of the inside at once."""
    own_first, full_first, full_last, own_last = (jnp.clip(x, first, last) for x in own)
    carry = lax.fori_loop(first, own_first, skip, carry)
    carry = lax.fori_loop(own_first, full_first, masked, carry)
    if plain_steps is None:
        carry = lax.fori_loop(full_first, full_last, plain, carry)
    else:
        carry = plain_steps(full_first, full_last, carry)
    carry = lax.fori_loop(full_last, own_last, masked, carry)
    return lax.fori_loop(own_last, last, skip, carry)


def stream_kv(
    block: QueryBlock, k_ref, v_ref, k_smem, v_smem, barriers, bi, kv_head, stages: int, cluster: int = 1
):
    """The copy warpgroup: every key and value tile of the block's walk into the ring, a stage
    reused once both compute warpgroups freed it. `barriers` = (k_ready, v_ready, k_free,
    v_free). Returns the number of tiles sent.

    With `cluster` > 1 the thread blocks of a cluster walk the same tiles, and each copies a
    share of every tile into the rings of all of them (a multicast copy); the `free` barriers
    are then cluster barriers, so that a stage is reused once every block's compute warpgroups
    freed it."""
    k_ready, v_ready, k_free, v_free = barriers
    shared = "cluster" if cluster > 1 else None
    bk, ck = block.block_kv, block.kv_chunk

    def pair(p, step):
        kv_slot, _, first, last = block.pair_tiles(p)

        def tile(kt, step):
            ring = lax.rem(step, stages)
            rows = (bi, pl.ds(kv_slot * ck + kt * bk, bk), kv_head)

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(k_free.at[ring])

            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[ring], k_ready.at[ring], collective_axes=shared)

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[ring])

            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[ring], v_ready.at[ring], collective_axes=shared)
            return step + 1

        return lax.fori_loop(first, last, tile, step)

    return lax.fori_loop(0, block.pair_count, pair, jnp.int32(0))


def drain(free, steps, stages: int):
    """The copy warpgroup waits for the last `stages` releases of the ring too, so that it
    observes every phase of the `free` barriers."""

    def wait(step, _):
        plgpu.barrier_wait(free.at[lax.rem(step, stages)])

    lax.fori_loop(jnp.maximum(steps - stages, 0), steps, wait, None)
