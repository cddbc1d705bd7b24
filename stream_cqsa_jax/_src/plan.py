"""The planner: a pure function from static arguments to a hashable `Plan`.

A plan fixes the chunking (``num_chunks`` chunks of queries and of keys),
the difference cover whose quorums define the subproblems, the kernel's tile
sizes, and the predicted device memory. It never touches arrays; its
schedule tables (``schedule.py``) are NumPy arrays derived from it on demand.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from . import budget as budget_lib
from . import memory_model, quorum, tiling
from .masks import Band

PASSES = ("forward", "backward")
# "scan": a jitted `lax.scan` over device-resident arrays (`executor.py`);
# "stream": a Python loop over host arrays or files, one subproblem at a time,
# accumulators in host memory (`streaming.py`); "offload": query, key and value
# in host memory as JAX arrays, residency chosen from the budget (`offload_plan.py`).
EXECUTORS = ("scan", "stream", "offload")
# How an out-of-core plan walks its pairs: "quorums" runs the quorum subproblems
# one after another; "query_rows" runs the full cover (quorum g owns the pairs of
# query chunk g) with query chunk g and its state kept on the device while the
# key/value chunks it sees stream past it (`query_rows.py`).
ORDERS = ("quorums", "query_rows")

# Cyclic covers of every size up to this are candidates; above it only perfect
# (Singer) sizes are, since they hold the fewest chunks per subproblem.
_DENSE_CANDIDATES = 64
# Small perfect covers whose products (the published recursion) are compared too.
_PRODUCT_BASES = (7, 13, 21, 31, 57)
# Schedules are materialised as tables of about C * C entries: this bounds C.
MAX_CHUNKS = 4096
# Streaming plans build one subproblem's tables at a time (about C entries, and
# the cover's representatives, 2 * C ints): this bounds C for them.
STREAM_MAX_CHUNKS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Subproblem:
    """One quorum subproblem.

    Attributes:
      index: position in the plan's order.
      quorum: the translate ``i`` of the cover (the quorum is ``D + i``).
      q_chunks: query chunks it reads, ascending.
      kv_chunks: key/value chunks it reads, ascending.
      pairs: the (query chunk, key chunk) pairs it owns and computes.
    """

    index: int
    quorum: int
    q_chunks: tuple[int, ...]
    kv_chunks: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]

    @property
    def chunks(self) -> tuple[int, ...]:
        """Every chunk id it touches (queries or keys), ascending."""
        return tuple(sorted(set(self.q_chunks) | set(self.kv_chunks)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A static, hashable schedule of quorum subproblems for one attention call.

    Use it as a `jax.jit` static argument or pass it to
    `dot_product_attention(..., plan=...)`. Build it with `plan(...)`.
    """

    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    is_causal: bool
    window: tuple[int, int] | None
    pass_kind: str
    cover: quorum.Cover
    q_chunk: int
    kv_chunk: int
    block_q: int
    block_kv: int
    implementation: str
    memory_budget: int | None
    budget_bytes: int
    budget_source: str
    estimated_peak_bytes: int
    estimated_resident_bytes: int
    forced_chunking: bool = False
    executor: str = "scan"
    inputs: str = "device"
    accumulators: str = "device"
    order: str = "quorums"
    deterministic_backward: bool = True

    # -- derived views -------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        """Chunks at the finest level (C)."""
        return self.cover.num_chunks

    @property
    def depth(self) -> int:
        return self.cover.depth

    @property
    def problem(self) -> memory_model.Problem:
        return memory_model.Problem(
            self.batch, self.q_len, self.kv_len, self.num_q_heads, self.num_kv_heads, self.head_dim, self.dtype
        )

    @property
    def band(self) -> Band:
        return Band.of(self.q_len, self.kv_len, self.is_causal, self.window)

    @property
    def padded_q_len(self) -> int:
        return self.num_chunks * self.q_chunk

    @property
    def padded_kv_len(self) -> int:
        return self.num_chunks * self.kv_chunk

    @property
    def reads_in_place(self) -> bool:
        """True when the single subproblem reads the inputs without gathering."""
        return self.num_chunks == 1 and self.q_chunk == self.q_len and self.kv_chunk == self.kv_len

    @property
    def schedule(self):
        """NumPy tables that drive the executor (see `schedule.Schedule`)."""
        from .schedule import build_schedule

        if self.executor in ("stream", "offload") and self.num_chunks > MAX_CHUNKS:
            raise ValueError(
                f"this plan has {self.num_chunks} chunks; its full schedule would hold about "
                f"{self.num_chunks}^2 entries (the limit is {MAX_CHUNKS} chunks). Use plan.quorum_tables(i) or "
                "plan.quorum_subproblem(i) for one subproblem at a time, and plan.num_pairs for the total"
            )
        return build_schedule(self)

    def quorum_tables(self, quorum: int):
        """The padded tables of quorum `quorum`'s subproblem (`schedule.QuorumTables`), in O(C)."""
        from .schedule import quorum_tables

        return quorum_tables(self, quorum)

    def quorum_subproblem(self, quorum: int) -> "Subproblem":
        """Quorum `quorum`'s subproblem, built on demand in O(C) (its ``index`` is the quorum;
        it may own no visible pair). The streaming executor runs quorums in this order."""
        return self.quorum_tables(quorum).subproblem()

    @property
    def num_pairs(self) -> int:
        """Visible (query chunk, key chunk) pairs over all subproblems, in O(C)."""
        from .schedule import visible_pair_count

        return visible_pair_count(self)

    @property
    def stream_layout(self) -> memory_model.Layout:
        """The layout of one step of a streaming or out-of-core run: a quorum padded to the cover
        size, or one chunk pair in query-row order."""
        m = 1 if self.order == "query_rows" else self.cover.size
        return memory_model.Layout(self.num_chunks, m, m, self.q_chunk, self.kv_chunk, self.block_q, self.block_kv)

    @property
    def host_footprint(self) -> memory_model.HostFootprint:
        """Host bytes of a streaming run of this plan (accumulators and buffers in flight)."""
        return memory_model.stream_host_footprint(self.problem, self.stream_layout)

    @property
    def subproblems(self) -> tuple[Subproblem, ...]:
        """The live subproblems (those owning at least one visible pair), in order."""
        return self.schedule.subproblems()

    def pairs(self) -> np.ndarray:
        """int64 [P, 2]: every computed (query chunk, key chunk) pair, all subproblems."""
        return self.schedule.all_pairs()

    def backward(self) -> "Plan":
        """The plan for the backward pass of this call, under the same budget."""
        if self.pass_kind == "backward":
            return self
        if self.executor == "stream":
            raise ValueError("streaming plans (executor='stream') run the forward pass only; they have no backward plan")
        if self.executor == "offload":
            from .offload_plan import offload_backward_of

            bwd = offload_backward_of(self)
        else:
            bwd = _backward_of(self)
        return _with_determinism(bwd, self.deterministic_backward)

    def summary(self) -> str:
        """A human-readable description of the plan."""
        from .summary import describe

        return describe(self)


def plan(
    *,
    q_len: int,
    kv_len: int | None = None,
    num_q_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int,
    dtype="float32",
    batch: int = 1,
    is_causal: bool = False,
    local_window_size: int | Sequence[int] | None = None,
    memory_budget: int | float | str | None = None,
    num_chunks: int | None = None,
    depth: int | None = None,
    implementation: str | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    pass_kind: str = "forward",
    executor: str = "scan",
    order: str | None = None,
    deterministic_backward: bool = True,
) -> Plan:
    """Plans one attention call: chunking, quorum cover, tiles and memory.

    Args:
      q_len, kv_len: query length T and key/value length S (default: T).
      num_q_heads, num_kv_heads: N and K (default: N); N must be a multiple of K.
      head_dim: H. dtype: the inputs' dtype. batch: B.
      is_causal, local_window_size: structured masking, as in
        `jax.nn.dot_product_attention` (window: int or (left, right)).
      memory_budget: device bytes the call may add (int, or a string such as
        "1.5GiB"); default: 80% of the device's free memory.
      num_chunks: force the number of chunks per level (cyclic cover of
        ``Z_num_chunks``); default: the planner chooses.
      depth: levels of the product cover (``num_chunks ** depth`` chunks in
        all); default 1 when `num_chunks` is given, else the planner chooses.
      implementation: kernel name: "xla" (any backend), "pallas_triton"
        (GPU; interpret mode elsewhere) or "mosaic_gpu" (forward and backward on
        compute capability 9.x, else "pallas_triton"); default: `default_implementation()`.
      block_q, block_kv: largest kernel tiles; default from the kernel's rules.
      pass_kind: "forward" or "backward" (the backward holds more per token).
      executor: "scan" (default; the arrays and float32 accumulators live on
        the device) or "stream" (forward only, for `stream_attention`: the
        accumulators live in host memory and the device holds a couple of
        subproblems at a time, so plans reach billions of tokens and up to
        `STREAM_MAX_CHUNKS` chunks; tables are built one subproblem at a time)
        or "offload" (query, key and value are JAX arrays in host memory; the
        plan's ``inputs`` and ``accumulators`` say where each lives: see
        docs/out_of_core.md).
      order: for executor="offload" with inputs in host memory, how the pairs
        are walked: "quorums" (quorum subproblems one after another) or
        "query_rows" (one query chunk and its state stay on the device while
        the key/value chunks it sees stream past); default: the one that
        moves fewer bytes between host and device.
      deterministic_backward: True (default): the gradients have the same bits
        on every run. False lets a kernel add gradient contributions in an
        order that varies from run to run where that is faster; today the
        Hopper backward at head dim 64, whose dk/dv kernel then also
        accumulates dq (docs/hopper_kernel.md). The results are as accurate
        either way. Under `jax.vmap` the deterministic kernels run instead
        (JAX batches a kernel that updates dq in place only for a batch of
        one).

    Raises:
      ValueError / TypeError: for malformed arguments, naming the argument;
        ValueError when no plan fits `memory_budget`, stating the smallest
        budget that would.
    """
    window = normalize_window(local_window_size)
    dtype_name = dtype_name_of(dtype)
    kv_len = q_len if kv_len is None else kv_len
    num_kv_heads = num_q_heads if num_kv_heads is None else num_kv_heads
    for name, value in (
        ("q_len", q_len),
        ("kv_len", kv_len),
        ("num_q_heads", num_q_heads),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("batch", batch),
    ):
        _check_positive_int(name, value)
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads} (grouped-query attention)"
        )
    for name, value in (("num_chunks", num_chunks), ("depth", depth), ("block_q", block_q), ("block_kv", block_kv)):
        if value is not None:
            _check_positive_int(name, value)
    _check_bool("is_causal", is_causal)
    if pass_kind not in PASSES:
        raise ValueError(f"pass_kind must be one of {PASSES}, got {pass_kind!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "stream" and pass_kind != "forward":
        raise ValueError("executor='stream' plans the forward pass only; pass pass_kind='forward'")
    if order is not None and order not in ORDERS:
        raise ValueError(f"order must be None or one of {ORDERS}, got {order!r}")
    if order is not None and executor != "offload":
        raise ValueError(f"order applies to executor='offload' plans only, got executor={executor!r}")
    _check_bool("deterministic_backward", deterministic_backward)
    implementation = resolve_implementation(implementation)
    budget = budget_lib.parse_budget(memory_budget)
    problem = memory_model.Problem(batch, q_len, kv_len, num_q_heads, num_kv_heads, head_dim, dtype_name)
    static = (problem, bool(is_causal), window, budget, (num_chunks, depth), implementation, block_q, block_kv)
    determinism = bool(deterministic_backward)
    if executor == "stream":
        from .stream_plan import stream_plan_cached

        return stream_plan_cached(*static)
    if executor == "offload":
        from .offload_plan import offload_plan_cached

        fwd = _with_determinism(offload_plan_cached(*static, order), determinism)
        return fwd if pass_kind == "forward" else fwd.backward()
    return _with_determinism(_plan_cached(*static, pass_kind), determinism)


# -- argument helpers shared with the public API -----------------------------


def _check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")


def normalize_window(local_window_size) -> tuple[int, int] | None:
    """`local_window_size` as a ``(left, right)`` tuple of non-negative ints, or None."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        window = (int(local_window_size), int(local_window_size))
    elif (
        isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in local_window_size)
    ):
        window = (int(local_window_size[0]), int(local_window_size[1]))
    else:
        raise TypeError(
            f"local_window_size must be an int or a pair of ints (left, right), got {local_window_size!r}"
        )
    if min(window) < 0:
        raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
    return window


def dtype_name_of(dtype) -> str:
    """Canonical name of a supported floating dtype ('bfloat16', 'float16', 'float32', 'float64')."""
    try:
        import jax.numpy as jnp

        name = jnp.dtype(dtype).name
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from None
    if name not in ("bfloat16", "float16", "float32", "float64"):
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, float64; got {name}")
    return name


def call_shape(call) -> dict:
    """`plan` keywords describing a call's shapes and structured mask, read from anything with
    those fields (an `arguments.CallSpec`, or a `Plan` to plan the same call again)."""
    return dict(
        q_len=call.q_len,
        kv_len=call.kv_len,
        num_q_heads=call.num_q_heads,
        num_kv_heads=call.num_kv_heads,
        head_dim=call.head_dim,
        dtype=call.dtype,
        batch=call.batch,
        is_causal=call.is_causal,
        local_window_size=call.window,
    )


def default_implementation() -> str:
    """The fastest kernel for JAX's default backend: the Mosaic GPU kernel on NVIDIA GPUs of
    compute capability 9.x (Hopper), Triton-lowered Pallas on other NVIDIA GPUs of compute
    capability 8.0 or newer, else the XLA kernel."""
    from .devices import gpu_capability, on_hopper

    if on_hopper():
        return "mosaic_gpu"
    capability = gpu_capability()
    if capability is not None and capability >= 8.0:
        return "pallas_triton"
    return "xla"


def resolve_implementation(implementation: str | None) -> str:
    if implementation is None:
        return default_implementation()
    if implementation not in tiling.IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {list(tiling.IMPLEMENTATIONS)}, got {implementation!r}"
        )
    return implementation


# -- the search -----------------------------------------------------------------


class BudgetTooSmall(ValueError):
    """No plan fits the budget; ``smallest`` is the least budget in bytes that works."""

    def __init__(self, smallest: int, message: str):
        super().__init__(message)
        self.smallest = smallest


@dataclasses.dataclass(frozen=True)
class _Candidate:
    num_chunks: int
    cover_size: int
    build: tuple  # ("cyclic", C), ("product", base, depth) or ("full", C)

    def cover(self) -> quorum.Cover:
        if self.build[0] == "cyclic":
            return quorum.cyclic_cover(self.build[1])
        if self.build[0] == "full":
            return quorum.full_cover(self.build[1])
        base = quorum.cyclic_cover(self.build[1])
        return quorum.product_cover(*([base] * self.build[2]))


def _candidates(max_chunks: int, num_chunks: int | None, depth: int | None) -> list[_Candidate]:
    """Covers to consider, in the order the planner prefers them (fewest chunks first)."""
    if num_chunks is not None:
        size = len(quorum.difference_cover(num_chunks))
        d = depth or 1
        build = ("cyclic", num_chunks) if d == 1 else ("product", num_chunks, d)
        return [_Candidate(num_chunks**d, size**d, build)]
    found = []
    if depth is None or depth == 1:
        for c in range(1, min(max_chunks, _DENSE_CANDIDATES) + 1):
            found.append(_Candidate(c, len(quorum.difference_cover(c)), ("cyclic", c)))
        for c in quorum.singer_numbers(max_chunks):
            if c > _DENSE_CANDIDATES:
                found.append(_Candidate(c, quorum.singer_q(c) + 1, ("cyclic", c)))
    for d in (2, 3) if depth is None else (depth,) if depth > 1 else ():
        for base in _PRODUCT_BASES:
            if base**d <= max_chunks:
                found.append(_Candidate(base**d, (quorum.singer_q(base) + 1) ** d, ("product", base, d)))
    return sorted(found, key=lambda c: (c.num_chunks, c.cover_size))


def _footprint(problem, pass_kind, num_chunks, cover_size, rule, max_bq, max_bk):
    q_chunk, block_q = tiling.chunk_and_block(problem.q_len, num_chunks, rule, max_bq)
    kv_chunk, block_kv = tiling.chunk_and_block(problem.kv_len, num_chunks, rule, max_bk)
    slots = 1 if num_chunks == 1 else cover_size
    in_place = num_chunks == 1 and q_chunk == problem.q_len and kv_chunk == problem.kv_len
    layout = memory_model.Layout(num_chunks, slots, slots, q_chunk, kv_chunk, block_q, block_kv, not in_place)
    model = memory_model.forward_footprint if pass_kind == "forward" else memory_model.backward_footprint
    return layout, model(problem, layout)


@functools.lru_cache(maxsize=256)
def _plan_cached(problem, is_causal, window, budget, forced, implementation, block_q, block_kv, pass_kind):
    def footprint(cand, rule, bq, bk):
        return _footprint(problem, pass_kind, cand.num_chunks, cand.cover_size, rule, bq, bk)

    return search(
        problem, is_causal, window, budget, forced, implementation, block_q, block_kv, pass_kind,
        executor="scan", max_chunks=MAX_CHUNKS, candidates=_candidates, footprint=footprint,
        what=f"the {pass_kind} pass of attention",
        hint="; executor='offload' (query, key and value as JAX arrays in host memory, for dot_product_attention) "
        "or executor='stream' (NumPy arrays or files, for stream_attention) keeps the accumulators in host memory"
        if pass_kind == "forward" else "",
    )


def search(
    problem, is_causal, window, budget, forced, implementation, block_q, block_kv, pass_kind, *,
    executor: str, max_chunks: int, candidates, footprint, what: str, hint: str,
) -> Plan:
    """The planner's search, shared by both executors: covers from fewest chunks up, each
    with full-size tiles before any cover with smaller ones; the first whose `footprint`
    fits the budget wins. Raises ValueError stating the smallest budget that works.

    candidates(max_chunks, num_chunks, depth) -> [_Candidate]; footprint(candidate, rule,
    block_q, block_kv) -> (memory_model.Layout, memory_model.Footprint).
    """
    rule = tiling.rule_for(implementation, problem.dtype)
    max_bq = block_q or rule.max_block_q
    max_bk = block_kv or rule.max_block_kv
    budget_bytes, source = (budget, "memory_budget") if budget is not None else (
        int(budget_lib.FREE_MEMORY_FRACTION * budget_lib.device_free_bytes()),
        "free device memory",
    )
    max_chunks = min(max_chunks, max(1, -(-max(problem.q_len, problem.kv_len) // rule.align)))
    num_chunks, depth = forced
    tiles = list(zip(tiling.block_options(rule, max_bq), tiling.block_options(rule, max_bk)))
    found = candidates(max_chunks, num_chunks, depth)
    # More chunks cost little and smaller tiles cost much: every cover is
    # tried with full-size tiles before any cover with smaller ones.
    searches = [(cand, tiles[0]) for cand in found] + [(c, t) for c in found for t in tiles[1:]]
    smallest = None
    for cand, (bq, bk) in searches:
        layout, foot = footprint(cand, rule, bq, bk)
        if smallest is None or foot.total < smallest[0]:
            smallest = (foot.total, cand.num_chunks)
        if foot.total <= budget_bytes:
            return Plan(
                batch=problem.batch,
                q_len=problem.q_len,
                kv_len=problem.kv_len,
                num_q_heads=problem.num_q_heads,
                num_kv_heads=problem.num_kv_heads,
                head_dim=problem.head_dim,
                dtype=problem.dtype,
                is_causal=is_causal,
                window=window,
                pass_kind=pass_kind,
                cover=cand.cover(),
                q_chunk=layout.q_chunk,
                kv_chunk=layout.kv_chunk,
                block_q=layout.block_q,
                block_kv=layout.block_kv,
                implementation=implementation,
                memory_budget=budget,
                budget_bytes=budget_bytes,
                budget_source=source,
                estimated_peak_bytes=foot.total,
                estimated_resident_bytes=foot.resident,
                forced_chunking=forced != (None, None),
                executor=executor,
            )
    if smallest is None:
        raise ValueError(
            f"depth={depth} needs more chunks than q_len={problem.q_len} and kv_len={problem.kv_len} can be cut into "
            f"(at least {min(_PRODUCT_BASES) ** depth} chunks of {rule.align} tokens); pass a smaller depth"
        )
    need, chunks = smallest
    source_text = "memory_budget" if budget is not None else "the free device memory"
    raise BudgetTooSmall(
        need,
        f"{source_text} ({budget_lib.format_bytes(budget_bytes)}, {budget_bytes} bytes) is too small for {what} "
        f"with batch={problem.batch}, q_len={problem.q_len}, kv_len={problem.kv_len}, "
        f"heads={problem.num_q_heads}/{problem.num_kv_heads}, head_dim={problem.head_dim}, {problem.dtype}: "
        f"the smallest budget that works is {need} bytes ({budget_lib.format_bytes(need)}, with {chunks} chunks)"
        + ("" if forced == (None, None) else f" for num_chunks={num_chunks}, depth={depth}")
        + hint
    )


def _with_determinism(p: Plan, deterministic_backward: bool) -> Plan:
    """`p` with `deterministic_backward` set (the cached plans carry the default, True)."""
    if p.deterministic_backward == deterministic_backward:
        return p
    return dataclasses.replace(p, deterministic_backward=deterministic_backward)


@functools.lru_cache(maxsize=64)
def _backward_of(fwd: Plan) -> Plan:
    forced = (fwd.cover.moduli[0], fwd.cover.depth) if fwd.forced_chunking else (None, None)
    return _plan_cached(
        fwd.problem, fwd.is_causal, fwd.window, fwd.memory_budget, forced, fwd.implementation, None, None, "backward"
    )

