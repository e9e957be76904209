"""The accelerator check (issues 21, 24): the step compiled deviceless for a TPU v5e and an H100.

``benchmarks/accelerator.py`` does the compiles and the measuring; these tests assert the goals.
The TPU tests run in ``make test`` (``libtpu`` is in the ``test`` extra, ``JAX_PLATFORMS=cpu``).
The GPU tests need the CUDA plugin (the ``accel`` extra) and are collected only under
``make test-accel``, which sets ``ADAMX_REQUIRE_ACCEL=1``: there a missing plugin fails them, it
never skips them. Compiles are cached in memory for the session, never on disk.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import pytest

REQUIRE_ACCEL = os.environ.get("ADAMX_REQUIRE_ACCEL") == "1"
# the GPU compiles need the `accel` extra: collected under `make test-accel` only (it says so)
collect_ignore = [] if REQUIRE_ACCEL else ["test_gpu.py"]


def _load_accelerator() -> Any:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "accelerator.py")
    if "adamx_benchmarks_accelerator" in sys.modules:
        return sys.modules["adamx_benchmarks_accelerator"]
    spec = importlib.util.spec_from_file_location("adamx_benchmarks_accelerator", os.path.abspath(path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


accelerator = _load_accelerator()


def measured(target: str, option: str, layout: str = "single", peer: bool = False, shape: str | None = None) -> Any:
    """One compile's :class:`Measure`, once per session; a missing compiler fails the test naming the package."""
    try:
        return accelerator.measure_cached(target, option, layout=layout, peer=peer, shape=shape)
    except accelerator.AcceleratorUnavailable as e:
        pytest.fail(str(e), pytrace=False)


def xfail_cases(options: list[str], failing: dict[str, str]) -> list[Any]:
    """``options`` as pytest params, those in ``failing`` marked strict xfail with the measured number as reason."""
    return [
        pytest.param(o, marks=pytest.mark.xfail(strict=True, reason=failing[o])) if o in failing else o for o in options
    ]


SCALAR_SLACK = 0.01  # B/param: a few bytes of scalars per step (step count, norms) differ between two programs


def assert_bytes_goal(target: str, option: str, layout: str = "single") -> None:
    """Bytes accessed per param within 1.15x the ideal, or no more than optax's same step (compiled only then)."""
    m = measured(target, option, layout)
    assert m.error is None, m.error
    if m.bytes_per_param <= 1.15 * m.ideal_per_param:
        return
    peer = measured(target, option, layout, peer=True)
    assert peer.error is None, peer.error
    assert m.bytes_per_param <= peer.bytes_per_param + SCALAR_SLACK, (
        f"{option} ({layout}): {m.bytes_per_param:.1f} B/param, over 1.15x the ideal {m.ideal_per_param:.2f} "
        f"and over {peer.tx_name}'s {peer.bytes_per_param:.1f}"
    )


def assert_temporaries_goal(target: str, option: str, layout: str = "single") -> None:
    """At most 0.5 B/param of temporaries."""
    m = measured(target, option, layout)
    assert m.error is None, m.error
    assert m.temp_per_param <= 0.5, f"{option} ({layout}): {m.temp_per_param:.2f} B/param of temporaries"


def assert_8bit_goal(target: str, option: str) -> None:
    """8-bit moments move at most 0.75x float32 Adam's bytes per param."""
    m, f32 = measured(target, option), measured(target, "float32")
    assert m.error is None, m.error
    assert m.bytes_per_param <= 0.75 * f32.bytes_per_param, (
        f"{option}: {m.bytes_per_param:.1f} B/param, float32 Adam {f32.bytes_per_param:.1f}"
    )
