"""Where the arrays of a sharded call live, and the collective that merges partial results.

The subproblem axis is always manual inside `jax.shard_map`. Other mesh
axes are handled by kind:

* automatic axes (``AxisType.Auto``, the default of ``jax.sharding.Mesh``)
  stay under the compiler: inputs sharded over them (batch, heads) stay
  sharded, and the specs below do not mention them;
* explicit axes (``AxisType.Explicit``, the default of ``jax.make_mesh``)
  carry shardings in the arrays' types, so they are made manual too: the
  batch and head dimensions keep the query's sharding over them, and every
  device runs the executor on its batch and head shard.

Sequence and head-dim dimensions are whole on every device (the subproblems
of a device read any chunk); where an input's type says otherwise it is
resharded first (`Layout.place`).
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P


def explicit_axes(mesh) -> tuple[str, ...]:
    """Names of `mesh`'s axes of type Explicit (none in JAX versions without axis types)."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    types = getattr(mesh, "axis_types", None) or ()
    return tuple(name for name, kind in zip(mesh.axis_names, types) if explicit is not None and kind == explicit)


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(names: tuple[str, ...]):
    return None if not names else names[0] if len(names) == 1 else names


@dataclasses.dataclass(frozen=True)
class Layout:
    """Partition specs of one sharded call.

    Attributes:
      mesh: the mesh. axis: the subproblem axis.
      batch, heads: spec entries for the batch and head dimensions (explicit
        axes only; None when not sharded).
    """

    mesh: jax.sharding.Mesh
    axis: str
    batch: object = None
    heads: object = None

    @property
    def manual(self) -> frozenset:
        return frozenset((self.axis,) + _names(self.batch) + _names(self.heads))

    @property
    def size(self) -> int:
        return int(self.mesh.shape[self.axis])

    def tokens(self, sharded: bool = False) -> P:
        """[B, L, heads, H] arrays: whole along the sequence, or sharded over the subproblem axis."""
        return P(self.batch, self.axis if sharded else None, self.heads, None)

    def rows(self, sharded: bool = False) -> P:
        """[B, heads, L] row statistics."""
        return P(self.batch, self.heads, self.axis if sharded else None)

    def masks(self, masks):
        """Specs for `executor.MaskArrays` (segment ids [B, L], lengths [B])."""
        specs = (P(self.batch, None), P(self.batch, None), P(self.batch), P(self.batch))
        return type(masks)(*(None if x is None else s for x, s in zip(masks, specs)))

    def place(self, x, spec: P):
        """`x` with the sharding `spec` where the mesh has explicit axes; unchanged otherwise.

        Under explicit sharding `shard_map` requires inputs whose type matches
        its specs; automatic axes are resharded by the compiler.
        """
        if x is None or not explicit_axes(self.mesh):
            return x
        spec = P(*spec, *([None] * (x.ndim - len(spec))))
        have = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
        if have is not None and tuple(have) == tuple(spec):
            return x
        return jax.reshard(x, NamedSharding(self.mesh, spec))

    def like(self, x, ref):
        """`x` resharded to the type of `ref` where the mesh has explicit axes (gradients must
        match their inputs' types there); unchanged otherwise."""
        if not explicit_axes(self.mesh):
            return x
        spec = getattr(getattr(jax.typeof(ref), "sharding", None), "spec", None)
        return x if spec is None else self.place(x, spec)

    def trim(self, x, length: int, dim: int):
        """The first `length` entries of `x` along `dim` (sharded over the subproblem axis)."""
        if x.shape[dim] == length:
            return x
        if self.axis in explicit_axes(self.mesh) and length % self.size:
            # Explicit types need even shards: gather along the sequence first.
            spec = list(jax.typeof(x).sharding.spec) + [None] * x.ndim
            spec[dim] = _entry(tuple(a for a in _names(spec[dim]) if a != self.axis))
            x = jax.reshard(x, NamedSharding(self.mesh, P(*spec[: x.ndim])))
        return lax.slice_in_dim(x, 0, length, axis=dim)


def layout_of(mesh, axis: str, q, k) -> Layout:
    """The layout of a call with query `q` [B, T, N, H] and key `k` [B, S, K, H].

    Batch and head dimensions keep the query's sharding over explicit axes
    (other than `axis`); heads stay whole when the key/value heads cannot be
    split the same way.
    """
    explicit = set(explicit_axes(mesh)) - {axis}
    spec = getattr(getattr(jax.typeof(q), "sharding", None), "spec", None)
    if not explicit or spec is None:
        return Layout(mesh, axis)
    spec = tuple(spec) + (None,) * 4
    keep = lambda entry: tuple(a for a in _names(entry) if a in explicit)
    batch, heads = keep(spec[0]), keep(spec[2])
    ways = 1
    for name in heads:
        ways *= int(mesh.shape[name])
    if k.shape[2] % ways:
        heads = ()
    return Layout(mesh, axis, _entry(batch), _entry(heads))


def _shard_map_impl():
    """`jax.shard_map` (or the older experimental one) and its keyword names in this JAX."""
    fn = getattr(jax, "shard_map", None)
    if fn is None:  # pragma: no cover - JAX before jax.shard_map
        from jax.experimental.shard_map import shard_map as fn
    params = inspect.signature(fn).parameters
    check = "check_vma" if "check_vma" in params else "check_rep"
    manual = "axis_names" if "axis_names" in params else "auto"
    return fn, check, manual


def shard_map(f, layout: Layout, in_specs, out_specs):
    """`f` mapped over the mesh, manual over `layout.manual`; other axes stay automatic."""
    fn, check, manual = _shard_map_impl()
    names = layout.manual
    if manual == "auto":  # pragma: no cover - older JAX names the automatic axes instead
        names = frozenset(n for n in layout.mesh.axis_names if n not in names)
    # Replication checks are off: scan carries start replicated and become per-device.
    return fn(f, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, **{manual: names, check: False})


def ring_reduce_scatter(tree, axis: str, size: int, row_axes, combine):
    """Combines `tree` over the devices of `axis`; device ``d`` returns block ``d`` of the result.

    Call inside `shard_map`. Each leaf has a row axis (`row_axes`, a
    matching pytree of ints) whose length is a multiple of `size`; block
    ``d`` is the ``d``-th of `size` equal slices. Ring algorithm: ``size -
    1`` steps, each sending one block to the next device, so each device
    sends ``(size - 1) / size`` of its data. Block ``d`` is combined in the
    fixed device order ``d + 1, d + 2, ..., d``: results are repeatable.
    """
    index = lax.axis_index(axis)

    def block(j):
        return jax.tree.map(
            lambda x, ax: lax.dynamic_slice_in_dim(x, j * (x.shape[ax] // size), x.shape[ax] // size, axis=ax),
            tree,
            row_axes,
        )

    ring = [(d, (d + 1) % size) for d in range(size)]
    carry = block(lax.rem(index + size - 1, size))
    for step in range(size - 1):
        received = jax.tree.map(lambda x: lax.ppermute(x, axis, ring), carry)
        carry = combine(received, block(lax.rem(index + 2 * size - 2 - step, size)))
    return carry


def own_block(x, axis: str, size: int, dim: int):
    """This device's block (of `size` equal ones) of `x` along `dim`; call inside `shard_map`."""
    rows = x.shape[dim] // size
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * rows, rows, axis=dim)
