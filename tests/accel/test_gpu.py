"""Issue 24's goals on the GPU compiler, deviceless: the step compiled for an H100 by jax's CUDA plugin.

Collected only under ``make test-accel`` (``ADAMX_REQUIRE_ACCEL=1``, the ``accel`` extra installed):
without the plugin there, every test fails naming the package. Four leaves of 1M params
(1024 x 1024). Bytes are our count of each kernel's operand and output bytes in the optimized HLO,
checked here against XLA's HLO cost analysis of the same module. Goals missed today are strict
xfails with the measured number.
"""

from __future__ import annotations

import pytest

from tests.accel.conftest import (
    accelerator,
    assert_8bit_goal,
    assert_bytes_goal,
    assert_temporaries_goal,
    measured,
    xfail_cases,
)

TARGET = "h100"
OPTIONS = list(accelerator.OPTION_SETS)

BYTES_FAIL = {
    "8-bit moments, bf16": "14.3 B/param (ideal 10.06, optax 14): the two passes read the bf16 grads and the "
    "codes twice (26.2 before the two-pass schedule)",
}
TEMP_FAIL = {
    "4bit moments": "1.06 B/param of temporaries (4.0 before the two-pass schedule): the second pass packs "
    "the codes by a sum over each pair, a reduction that XLA does not write in place over the donated "
    "codes it reads, so it writes them aside and copies them in"
}
EIGHT_BIT_FAIL = {
    "8-bit moments": "22.3 B/param against float32 Adam's 28 (0.80x; 32.2 before): the block absmax pass reads "
    "the grads and codes once more (6 B/param) and the update pass cannot own the params (apply_updates)",
    "fp8 moments": "22.3 B/param against float32 Adam's 28 (0.80x), as 8-bit: XLA:GPU fuses it into 2 kernels",
    "4bit moments": "21.5 B/param against float32 Adam's 28 (0.77x; 42.3 before the two-pass schedule): "
    "the block absmax pass reads the grads and codes once more, and the packed codes are copied in (2 B/param)",
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


@pytest.mark.parametrize("option", OPTIONS)
def test_own_kernel_count_agrees_with_xla_cost_analysis(option):
    m = measured(TARGET, option)
    assert m.error is None, m.error
    assert m.xla_bytes_per_param is not None, "XLA's HLO cost analysis did not run on the optimized module"
    if accelerator.OPTION_SETS[option].fused:
        # the Triton kernel is a custom call, which XLA's cost analysis does not see into (it counts
        # ~0); the kernel's operands and outputs are the step's arguments and results, once each
        assert m.xla_bytes_per_param < 0.1
        assert m.bytes_per_param == pytest.approx(m.ideal_per_param, abs=0.01)
        return
    assert m.bytes_per_param == pytest.approx(m.xla_bytes_per_param, rel=0.02)


def test_gpt2_small_8bit_state_and_temporaries_at_most_035x_optax_float32():
    mine = measured(TARGET, "8-bit moments", shape="GPT-2 small")
    base = measured(TARGET, "float32", peer=True, shape="GPT-2 small")
    assert mine.error is None, mine.error
    ratio = mine.state_plus_temp / base.state_plus_temp
    assert ratio <= 0.35, f"8-bit state + temporaries {ratio:.2f}x optax float32 Adam's"


@pytest.mark.parametrize("option", ["8-bit, apply_gradients", "4bit, apply_gradients"])
def test_gpt2_small_apply_gradients_at_the_ideal(option):
    """The GPT-2-small-shaped tree through the Triton kernel: one kernel per leaf, bytes within
    1.15x the ideal, no full-size temporaries."""
    m = measured(TARGET, option, shape="GPT-2 small")
    assert m.error is None, m.error
    assert m.bytes_per_param <= 1.15 * m.ideal_per_param, (m.bytes_per_param, m.ideal_per_param)
    assert m.temp_per_param <= 0.5
