"""Shared test set-up: 8 CPU devices, the float64 reference on the path, hypothesis settings."""

import os
import sys

# Eight host devices for the multi-device tests (tests/test_sharded.py). XLA reads
# this once, when the CPU backend starts, so it must be set before anything
# imports and uses jax; single-device tests still run on device 0 only.
_DEVICES_FLAG = "--xla_force_host_platform_device_count="
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICES_FLAG}8").strip()

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, print_blob=True
)
settings.load_profile("default")


def forcing_budget(num_chunks: int, backward: bool = False, **plan_kwargs) -> int:
    """A memory budget under which the planner must cut the call into many chunks.

    It is the predicted peak of the plan with `num_chunks` chunks (of both
    passes when `backward`); callers assert how many subproblems they got.
    """
    import stream_cqsa_jax as sc

    p = sc.plan(num_chunks=num_chunks, **plan_kwargs)
    need = p.estimated_peak_bytes
    if backward:
        need = max(need, p.backward().estimated_peak_bytes)
    return need
