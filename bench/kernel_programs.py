"""The Hopper kernels' Mosaic GPU programs of one case, as text to compare two versions of the code.

    PYTHONPATH=. python bench/kernel_programs.py --head-dim 128 --out /tmp/new.mlir
    git stash; PYTHONPATH=. python bench/kernel_programs.py --head-dim 128 --out /tmp/old.mlir; git stash pop
    diff /tmp/old.mlir /tmp/new.mlir

Lowers forward plus backward of one case for CUDA (on any machine, as the lowering tests do) and
writes each Mosaic GPU kernel's MLIR before serialization, without source locations, folded and
deduplicated (``canonicalize``, ``cse``), so that index arithmetic that folds away (adding a
zero, multiplying by one) leaves no trace. Identical text means the same program reaches the
GPU compiler. The launches are the defaults unless ``--cluster`` forces every kernel's thread
blocks per cluster (the forward's, the dq kernel's and the dk/dv kernel's), or ``--forward-fields`` and
``--backward-fields`` change fields of the forward's and the backward's (``scores_first=1``,
``dq_turns=0``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

import stream_cqsa_jax as sc
from launches import backward_launch_as, forward_launch_as
from stream_cqsa_jax._src.kernels import mosaic_gpu, mosaic_gpu_backward


def kernel_programs(
    seq_len: int,
    head_dim: int,
    causal: bool,
    cluster: int | None = None,
    backward_fields: dict | None = None,
    forward_fields: dict | None = None,
) -> list[str]:
    """The canonical MLIR text of each Mosaic GPU kernel in forward plus backward of one case (B=1,
    4 query heads over 2 key/value heads, bfloat16): the forward, the dq kernel, the dk/dv kernel
    (with `fused_dq`, the forward and the dk/dv kernel).
    `forward_fields`, `backward_fields`: `mosaic_gpu.Launch` and `mosaic_gpu_backward.Launch` fields
    that replace those of their defaults."""
    from jax._src.lib.mlir import ir, passmanager
    from jax.experimental.mosaic.gpu import core

    texts, serialize = [], core._run_serde_pass

    def capture(module, **kwargs):
        with module.context:
            copy = ir.Module.parse(module.operation.get_asm(enable_debug_info=False))
            passmanager.PassManager.parse("builtin.module(canonicalize,cse)").run(copy.operation)
            texts.append(copy.operation.get_asm(enable_debug_info=False))
        return serialize(module, **kwargs)

    on_hopper = mosaic_gpu.on_hopper, mosaic_gpu_backward.on_hopper
    forward_default, backward_default = mosaic_gpu.default_launch, mosaic_gpu_backward.default_launch
    changes, forward_changes = dict(backward_fields or {}), dict(forward_fields or {})
    if cluster is not None:
        forward_changes.update(cluster=cluster)
        changes.update(dq_cluster=cluster, dkv_cluster=cluster)
    forward = (lambda *a: dataclasses.replace(forward_default(*a), **forward_changes)) if forward_changes else None
    backward = (lambda *a, **k: dataclasses.replace(backward_default(*a, **k), **changes)) if changes else None
    try:
        core._run_serde_pass = capture
        mosaic_gpu.on_hopper = mosaic_gpu_backward.on_hopper = lambda: True
        with forward_launch_as(forward), backward_launch_as(backward):
            plan = sc.plan(q_len=seq_len, num_q_heads=4, num_kv_heads=2, head_dim=head_dim, dtype=jnp.bfloat16,
                           is_causal=causal, implementation="mosaic_gpu")
            q = jax.ShapeDtypeStruct((1, seq_len, 4, head_dim), jnp.bfloat16)
            kv = jax.ShapeDtypeStruct((1, seq_len, 2, head_dim), jnp.bfloat16)

            def loss(q, k, v):
                return sc.dot_product_attention(q, k, v, plan=plan, is_causal=causal).astype(jnp.float32).sum()

            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",))
    finally:
        core._run_serde_pass = serialize
        mosaic_gpu.on_hopper, mosaic_gpu_backward.on_hopper = on_hopper
    return texts


def _field(launch_type: type, which: str):
    """A parser of ``FIELD=INTEGER`` for a field of `launch_type` (the `which` launch), giving (name,
    value of the field's type)."""

    def parse(text: str) -> tuple[str, int | bool]:
        name, _, value = text.partition("=")
        if name not in {f.name for f in dataclasses.fields(launch_type)} or not value.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=INTEGER with a field of the {which}'s launch")
        return name, type(getattr(launch_type(), name))(int(value))

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--cluster", type=int, choices=(1, 2), default=None, help="force blocks per cluster")
    parser.add_argument("--forward-fields", type=_field(mosaic_gpu.Launch, "forward"), nargs="+", default=[],
                        help="fields of the forward's launch, FIELD=INTEGER (booleans as 0 or 1)")
    parser.add_argument("--backward-fields", type=_field(mosaic_gpu_backward.Launch, "backward"), nargs="+",
                        default=[], help="fields of the backward's launch, FIELD=INTEGER (booleans as 0 or 1)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    texts = kernel_programs(
        args.seq_len, args.head_dim, args.causal, args.cluster, dict(args.backward_fields), dict(args.forward_fields)
    )
    with open(args.out, "w") as f:
        f.write("\n// ---- next kernel ----\n".join(texts))
    print(f"{len(texts)} kernels, {sum(map(len, texts))} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
