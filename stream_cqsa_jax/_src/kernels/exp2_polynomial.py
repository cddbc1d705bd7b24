"""exp2 as a polynomial on the FMA units, for the Hopper forward's softmax (`mosaic_gpu.Launch.exp2_on_fma`).

A multiprocessor's multi-function unit (MUFU) computes 16 `exp2` per cycle, an eighth of the rate of
its float32 FMA units. At head dim 64 a step of the forward asks it for as many cycles as the tensor
cores (`docs/hopper_kernel.md`), so part of the work can move to the FMA units:

    2^x = 2^n * 2^f,  n = round(x),  f = x - n in [-1/2, 1/2]

`n` comes from adding and subtracting 1.5 * 2^23 (the sum rounds to a whole number and holds `n` in
its low mantissa bits), 2^f from a degree-5 polynomial (Horner's rule, five FMAs), and 2^n is added into
the exponent bits: eleven instructions on the FMA and integer units with the clamp below, against one
on the MUFU. The coefficients are a fit to the least maximum relative error with the constant term 1,
so that whole numbers give exact powers of two (`bench/exp2_polynomial_fit.py` finds them). Against
float64, with float32 rounding, the relative error stays below 1.6e-7 (1.33 float32 units in the last
place) for x in [-126, 126]. x below -126 gives 2^-126 (MUFU's `ex2.approx.ftz` gives 0 there) and NaN
stays NaN.

`exp2` computes it with NumPy, the same steps in the same order (the tests check its error);
`split_exp2` is the kernel's, on a float32 array in the `wgmma` accumulator layout.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

try:  # Mosaic GPU ships with jaxlib; guard anyway so that the package imports everywhere.
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, vector
except ImportError:  # pragma: no cover
    plgpu = None

# 2^f ~ sum(COEFFICIENTS[k] * f**k) for f in [-1/2, 1/2]; float32 values, written exactly.
COEFFICIENTS = tuple(
    float.fromhex(h)
    for h in ("0x1p+0", "0x1.62e42ap-1", "0x1.ebf9cp-3", "0x1.c6b75p-5", "0x1.3cea88p-7", "0x1.5bba14p-10")
)
ROUNDER = 1.5 * 2.0**23  # x + ROUNDER rounds x to a whole number, held in the sum's low mantissa bits
LOWEST = -126.0  # the least input kept: 2^LOWEST is float32's least normal number
MANTISSA_BITS = 23


def exp2(x: np.ndarray) -> np.ndarray:
    """2^x for float32 `x` of any shape, by the polynomial: the kernel's steps in NumPy, each FMA
    rounded to float32 from float64, where a float32 product is exact (so once, but for a rare tie)."""
    x = np.maximum(np.asarray(x, np.float32), np.float32(LOWEST))
    t = x + np.float32(ROUNDER)
    f = (x - (t - np.float32(ROUNDER))).astype(np.float64)
    p = np.full(f.shape, COEFFICIENTS[-1], np.float32)
    for c in COEFFICIENTS[-2::-1]:
        p = (p * f + c).astype(np.float32)
    n = t.view(np.int32) << np.int32(MANTISSA_BITS)  # the low bits of t's mantissa hold n
    return (p.view(np.int32) + n).view(np.float32)


def split_exp2(x, sixteenths: int):
    """2^x inside a Mosaic GPU kernel, for a float32 array `x` in the `wgmma` accumulator layout: of each
    thread's registers, the last `sixteenths` / 16 (rounded down) by the polynomial, the others by MUFU's
    ``ex2.approx.ftz.f32`` (what ``jnp.exp2`` gives in these kernels). Every thread holds the same
    number of registers, so each does the same share on each unit. 0 is ``jnp.exp2(x)``."""
    if not 0 <= sixteenths <= 16:
        raise ValueError(f"sixteenths must be in [0, 16], got {sixteenths}")
    if sixteenths == 0:
        return jnp.exp2(x)
    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32, layout=layout))
    def emit(_, array):
        registers = array.registers
        out = np.empty(registers.shape, dtype=object)
        cut = registers.size - registers.size * sixteenths // 16
        for i, register in enumerate(registers.flat):
            out.flat[i] = _mufu_exp2(register) if i < cut else _polynomial_exp2(register)
        return mgpu.FragmentedArray(_registers=out, _layout=array.layout, _is_signed=None)

    return emit(x)


def _mufu_exp2(register):
    """``ex2.approx.ftz.f32`` of each float32 of a register vector."""
    return _each(lambda element: _asm("ex2.approx.ftz.f32 $0, $1;", element), register)


def _polynomial_exp2(register):
    """The polynomial's 2^x of each float32 of a register vector."""
    return _each(_polynomial_exp2_of, register)


def _polynomial_exp2_of(x):
    """The polynomial's 2^x of one float32: the steps of `exp2`, each an explicit PTX instruction where
    LLVM might choose another (maximum, the rounding sum, the FMAs)."""
    i32 = ir.IntegerType.get_signless(32)
    x = _asm("max.NaN.f32 $0, $1, $2;", x, _scalar(LOWEST))
    # An instruction no rewrite sees into, so that nothing folds (x + r) - r into x.
    t = _asm("add.rn.f32 $0, $1, $2;", x, _scalar(ROUNDER))
    f = arith.subf(x, arith.subf(t, _scalar(ROUNDER)))
    p = _scalar(COEFFICIENTS[-1])
    for c in COEFFICIENTS[-2::-1]:
        p = _asm("fma.rn.f32 $0, $1, $2, $3;", p, f, _scalar(c))
    n = arith.shli(arith.bitcast(i32, t), arith.constant(i32, ir.IntegerAttr.get(i32, MANTISSA_BITS)))
    return arith.bitcast(ir.F32Type.get(), arith.addi(arith.bitcast(i32, p), n))


def _scalar(value: float):
    """A float32 constant."""
    f32 = ir.F32Type.get()
    return arith.constant(f32, ir.FloatAttr.get(f32, value))


def _asm(text: str, *operands):
    """A float32 result of one PTX instruction on float32 operands."""
    return llvm.inline_asm(ir.F32Type.get(), list(operands), text, "=f" + ",f" * len(operands))


def _each(scalar_fn, register):
    """`scalar_fn` applied to each element of a register vector."""
    out = llvm.mlir_undef(register.type)
    for i in range(ir.VectorType(register.type).shape[0]):
        where = ir.DenseI64ArrayAttr.get([i])
        element = vector.extract(register, dynamic_position=[], static_position=where)
        out = vector.insert(scalar_fn(element), out, dynamic_position=[], static_position=where)
    return out
