"""Issue 21's goals on the TPU v5e compiler, deviceless (``libtpu``): every option set of the step.

Single chip: one 16M-param leaf (4096 x 4096). Mesh: the 2x2 v5e topology, an Explicit mesh, the
leaf split along axis 0 or axis 1 over all four chips. Goals that today's code misses are strict
xfails whose reason is the measured number (``benchmarks/results/accelerator.md``): the fix that
meets a goal turns its xfail into a failure, to be removed with the fix.
"""

from __future__ import annotations

import pytest

from tests.accel.conftest import (
    SCALAR_SLACK,
    accelerator,
    assert_8bit_goal,
    assert_bytes_goal,
    assert_temporaries_goal,
    measured,
    xfail_cases,
)

TARGET = "tpu-v5e"
OPTIONS = list(accelerator.OPTION_SETS)
MESH_OPTIONS = [
    "float32",
    "8-bit moments",
    "8-bit, apply_gradients",
    "kahan, bf16",
    "stochastic, bf16",
    "global_clipnorm",
]

# 8-bit moments on the TPU schedule of `update` ("lanes": blocks by static slices and selects of the
# last axis, no reshape): XLA:TPU still writes the float32 moments out between the block reduction
# and the encode (a second pass to recompute them made it worse: 112). The Pallas kernel behind
# `apply_gradients` (the "8-bit, apply_gradients" rows) keeps a block in VMEM: 16.06 B/param.
_Q8_TPU = "63.5 B/param (bf16: 75.4; ideal 16.06; 128 with the block reshape, 16824 with gathers): XLA:TPU materializes the moments"
# fp8 and 4-bit (issue 20) take the plain schedule: no lanes formulation yet
_FP8_TPU = "211 B/param (ideal 16.06), 20 B/param of temporaries: XLA:TPU relayouts the block reshape"
# (a repeat/strided-slice form of pack4/unpack4 was tried: 2238 B/param and a 15-minute compile)
_Q4_TPU = (
    "2331 B/param (ideal 14.13), 273 B/param of temporaries: the (n/2, 2) pairs of pack4/unpack4 are "
    "padded to 128 lanes in the TPU's tiles; the kernel behind apply_gradients moves 15.6"
)
BYTES_FAIL = {
    "8-bit moments": _Q8_TPU,
    "8-bit moments, bf16": _Q8_TPU,
    "fp8 moments": _FP8_TPU,
    "4bit moments": _Q4_TPU,
}
TEMP_FAIL = {
    "8-bit moments": "8.0 B/param of temporaries (the materialized float32 moments; 12 before)",
    "8-bit moments, bf16": "8.1 B/param of temporaries (the materialized float32 moments; 12 before)",
    "fp8 moments": _FP8_TPU,
    "4bit moments": _Q4_TPU,
}
EIGHT_BIT_FAIL = {
    "8-bit moments": _Q8_TPU + ", against float32 Adam's 28",
    "8-bit moments, bf16": _Q8_TPU + ", against float32 Adam's 28",
    "fp8 moments": _FP8_TPU + ", against float32 Adam's 28",
    "4bit moments": _Q4_TPU + ", against float32 Adam's 28",
}
MESH_FAIL: dict[str, str] = {}  # 8-bit compiles on an Explicit mesh, state split like params, no collectives
MESH_BYTES_FAIL = {
    "8-bit moments": "103 B/param per device split along axis 0 (173 before), 179 along axis 1 (the last "
    "axis split: the blocked path, as before) (ideal 16.06)",
}


@pytest.mark.parametrize("option", xfail_cases(OPTIONS, BYTES_FAIL))
def test_bytes_per_param_near_ideal_or_optax(option):
    assert_bytes_goal(TARGET, option)


@pytest.mark.parametrize("option", xfail_cases(OPTIONS, TEMP_FAIL))
def test_temporaries_at_most_half_a_byte_per_param(option):
    assert_temporaries_goal(TARGET, option)


@pytest.mark.parametrize("option", xfail_cases(list(accelerator.CODED), EIGHT_BIT_FAIL))
def test_8bit_moves_at_most_three_quarters_of_float32(option):
    assert_8bit_goal(TARGET, option)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("option", xfail_cases(MESH_OPTIONS, MESH_FAIL))
def test_explicit_mesh_state_split_like_params_no_collectives(option, axis):
    m = measured(TARGET, option, f"axis {axis}, explicit")
    assert m.error is None, m.error
    assert m.state_split, m.state_split_detail
    expected = [c for c in m.collectives if c.startswith("all-reduce f32[]")] if option == "global_clipnorm" else []
    assert m.collectives == expected, f"{option}, params split along axis {axis}: collectives {m.collectives}"
    if option == "global_clipnorm":
        assert expected, "global_clipnorm needs the scalar all-reduce of the squared norms; none found"


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("option", xfail_cases(MESH_OPTIONS, MESH_BYTES_FAIL))
def test_explicit_mesh_bytes_and_temporaries(option, axis):
    layout = f"axis {axis}, explicit"
    assert_bytes_goal(TARGET, option, layout)
    assert_temporaries_goal(TARGET, option, layout)


@pytest.mark.parametrize("option", ["fp8, apply_gradients", "4bit, apply_gradients"])
def test_explicit_mesh_lowbit_apply_gradients_split_along_axis_0(option):
    """fp8's scales and 4-bit's codes and scales are 1-D: with the params split along axis 0 alone,
    ``init`` splits them along it too, and the kernel runs per chip with no collective, at the
    single-chip bytes. Split along axis 1 they cannot follow (the leaf takes the XLA step)."""
    layout = "axis 0, explicit"
    m = measured(TARGET, option, layout)
    assert m.error is None, m.error
    assert m.state_split, m.state_split_detail
    assert m.collectives == [], m.collectives
    assert_bytes_goal(TARGET, option, layout)
    assert_temporaries_goal(TARGET, option, layout)


def test_ideal_is_every_argument_byte_read_once_and_every_result_byte_written_once():
    # float32 Adam: params, mu, nu read and written, grads read (issue 21's 28 B/param)
    m = measured(TARGET, "float32")
    assert m.ideal_per_param == pytest.approx(2 * 4 + 4 + 2 * (4 + 4), abs=SCALAR_SLACK)
    # and the TPU compiler's count of optax's float32 step is that ideal: the yardstick measures
    peer = measured(TARGET, "float32", peer=True)
    assert peer.bytes_per_param == pytest.approx(m.ideal_per_param, rel=1e-3)


def test_own_kernel_count_agrees_with_the_tpu_cost_model_on_float32():
    m = measured(TARGET, "float32")
    assert m.xla_bytes_per_param == pytest.approx(m.bytes_per_param, rel=0.01)


def test_gpt2_small_8bit_apply_gradients_bytes_state_and_temporaries():
    """The GPT-2-small-shaped tree (148 leaves): every 8-bit leaf in the Pallas kernel, bytes within
    1.15x the ideal (the compiler's prefetches of some operands into VMEM count their reads), state
    + temporaries at most 0.35x optax float32 Adam's."""
    mine = measured(TARGET, "8-bit, apply_gradients", shape="GPT-2 small")
    base = measured(TARGET, "float32", peer=True, shape="GPT-2 small")
    assert mine.error is None, mine.error
    assert mine.bytes_per_param <= 1.15 * mine.ideal_per_param, (mine.bytes_per_param, mine.ideal_per_param)
    assert mine.temp_per_param <= 0.5
    ratio = mine.state_plus_temp / base.state_plus_temp
    assert ratio <= 0.35, f"8-bit state + temporaries {ratio:.2f}x optax float32 Adam's"


def test_gpt2_small_4bit_apply_gradients_bytes_state_and_temporaries():
    """The GPT-2-small-shaped tree with 4-bit moments through the Mosaic kernel: bytes no more than
    optax's float32 step (17.7 against an ideal of 14.14: the 1-D packed codes are relaid out to the
    kernel's 2-D tiles through VMEM, and some operands prefetched), temporaries at most 0.5 B/param,
    state + temporaries at most 0.35x optax float32 Adam's."""
    mine = measured(TARGET, "4bit, apply_gradients", shape="GPT-2 small")
    base = measured(TARGET, "float32", peer=True, shape="GPT-2 small")
    assert mine.error is None, mine.error
    assert mine.bytes_per_param <= base.bytes_per_param, (mine.bytes_per_param, base.bytes_per_param)
    assert mine.bytes_per_param <= 1.3 * mine.ideal_per_param, (mine.bytes_per_param, mine.ideal_per_param)
    assert mine.temp_per_param <= 0.5
    ratio = mine.state_plus_temp / base.state_plus_temp
    assert ratio <= 0.35, f"4-bit state + temporaries {ratio:.2f}x optax float32 Adam's"
