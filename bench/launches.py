"""The bench scripts' way of running the Hopper kernels under launches other than their defaults.

    with forward_launch_as(mosaic_gpu.Launch(128, 2)), backward_launch_as(None):
        row, run = benchmark.prepare_case("mosaic_gpu", case)   # compiled under those launches

Plans ask `mosaic_gpu.default_launch` and `mosaic_gpu_backward.default_launch` for a subproblem's
launch while a program is traced; within these, they answer with the launch given. Traced
programs are cached per plan, not per launch, so the caches are cleared on entry and on exit. A
program compiled within keeps its launch when it runs after.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Union

import jax

from stream_cqsa_jax._src.kernels import mosaic_gpu, mosaic_gpu_backward

# A launch for every subproblem, a function of `default_launch`'s arguments, or None (the default).
ForwardChoice = Union[mosaic_gpu.Launch, Callable[..., mosaic_gpu.Launch], None]
BackwardChoice = Union[mosaic_gpu_backward.Launch, Callable[..., mosaic_gpu_backward.Launch], None]


@contextlib.contextmanager
def _default_launch_as(module, choice):
    default = module.default_launch
    if choice is not None:
        module.default_launch = (lambda *args, **kwargs: choice) if isinstance(choice, module.Launch) else choice
    jax.clear_caches()
    try:
        yield default
    finally:
        module.default_launch = default
        jax.clear_caches()


def forward_launch_as(choice: ForwardChoice):
    """Within: the Hopper forward takes `choice` (see `ForwardChoice`); yields the default function."""
    return _default_launch_as(mosaic_gpu, choice)


def backward_launch_as(choice: BackwardChoice):
    """Within: the Hopper backward takes `choice` (see `BackwardChoice`); yields the default function."""
    return _default_launch_as(mosaic_gpu_backward, choice)
