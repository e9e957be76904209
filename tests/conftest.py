"""Shared test setup: 8 simulated CPU devices (set by `make test`), strict dtype promotion in every test."""

import fnmatch
import os

import jax
import pytest

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "references", "data")

# Tests marked ``slow``: ``make test-fast`` (``pytest -m "not slow"``) leaves them out, ``make test``
# runs them. Node-id patterns (fnmatch, from the repository root): whole modules whose every test
# is slow (other processes, many simulated devices, whole training runs), and single tests that
# take seconds each. Chosen from ``pytest --durations=0`` on 2 cores; ``tests/test_markers.py``
# checks that every pattern still names a test. A test may also say ``@pytest.mark.slow`` itself.
SLOW = [
    # modules: subprocesses, multi-device meshes, other libraries' training stacks, the examples
    "tests/integration/*",
    "tests/test_examples.py::*",
    # exhaustive matrices (every option x path x dtype); the fast run keeps the per-op references
    "tests/test_performance_paths.py::test_flat_state_reference_path_equals_tree_state[*",
    "tests/test_performance_paths.py::test_fused_equals_reference[*",
    "tests/test_performance_paths.py::test_fused_flat_equals_reference[*",
    "tests/test_quantized_adam.py::test_fused_equals_reference_bit_for_bit[*",
    "tests/test_lowbit_fused.py::test_fused_equals_reference_bit_for_bit[*",
    "tests/test_pallas_step.py::test_kernel_equals_xla_step[*",
    "tests/test_pallas_step.py::test_step_equals_update[*",
    "tests/test_param_rounding.py::test_fused_equals_reference_bit_for_bit[*",
    "tests/test_schedules_and_config.py::test_schedule_values_equal_keras[*",
    "tests/test_sweep.py::test_sweep_case[*",
    "tests/test_sweep_features.py::test_sweep_case[*",
    # deviceless TPU compiles (libtpu) and the exhaustive codec check (2**31 floats)
    "tests/accel/*",
    "tests/test_quantize.py::test_arithmetic_codec_exhaustive[*",
    "tests/test_moment_formats.py::test_combinations_run_and_apply_gradients_equals_update[*",
    "tests/test_moment_formats.py::test_orbax_resume_is_bit_exact[*",
    "tests/test_moment_formats.py::test_sharded_jit_step[*",
    "tests/test_checkpoint_format.py::test_first_8bit_layout_restores_and_continues[*",
    # tests (all their parameters together) of 5 s and more on the loaded 2-core machine; the fast
    # run keeps the per-op references and the Keras replays, which are the semantics
    "tests/test_adam_properties.py::test_accumulation_equals_one_big_batch[*",
    "tests/test_adam_properties.py::test_bfloat16_trains_where_keras_freezes",
    "tests/test_adam_properties.py::test_jit_and_eager_agree",
    "tests/test_adam_properties.py::test_schedules_see_the_raw_call_count",
    "tests/test_adam_properties.py::test_state_dtypes_and_shapes_stable_through_update[*",
    "tests/test_building_blocks.py::test_chain_of_blocks_equals_adam",
    "tests/test_building_blocks.py::test_paper_form_matches_pytorch[*",
    "tests/test_checkpoint_format.py::test_old_checkpoint_restores_and_continues[*",
    "tests/test_fused_build.py::test_broken_source_fails_with_the_compilers_error",
    "tests/test_lazy.py::test_duplicates_are_summed_before_squaring",
    "tests/test_lazy.py::test_hat_mode_matches_tfa_lazy_adam_per_op[*",
    "tests/test_loss_scale.py::test_flax_linen_train_state[*",
    "tests/test_loss_scale.py::test_non_finite_step_is_skipped[*",
    "tests/test_loss_scale.py::test_replays_keras_loss_scale_optimizer[*",
    "tests/test_param_rounding.py::test_rounding_with_8bit_moments_falls_back_naming_it",
    "tests/test_param_rounding.py::test_vmap_gives_each_member_its_own_bits[*",
    "tests/test_performance_paths.py::test_fallback_for_other_transformations",
    "tests/test_performance_paths.py::test_flat_reference_path_is_one_loop_per_leaf",
    "tests/test_quantize.py::test_cpp_header_equals_jax_bit_for_bit[*",
    "tests/test_quantize.py::test_cpp_table_decoder_every_code_and_every_tail[*",
    "tests/test_quantize.py::test_jax_equals_numpy_reference_bit_for_bit[*",
    "tests/test_quantize.py::test_quantized_zeros_and_bytes_per_param",
    "tests/test_quantize.py::test_round_trip_error_bound[*",
    "tests/test_quantized_adam.py::test_flat_state_equals_tree_state_bit_for_bit[*",
    "tests/test_quantized_adam.py::test_flat_state_fused_equals_reference[*",
    "tests/test_quantized_adam.py::test_orbax_resume_is_bit_exact",
    "tests/test_quantized_adam.py::test_step_equals_numpy_reference[*",
    "tests/test_reliability.py::test_complex_params_follow_optax[*",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that :data:`SLOW` names ``slow``."""
    for item in items:
        if any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def strict_promotion(request):
    """adamx must not rely on implicit dtype promotion (bf16/f16 params would silently widen): every test runs strict.

    A test marked ``standard_promotion`` compares with another library (optax, Keras) whose own code
    needs standard promotion (optax's Adam computes ``b ** count`` with an int32 count); the marker
    names the reason, and adamx's calls in such a test still run where strict tests cover them.
    """
    if request.node.get_closest_marker("standard_promotion") is not None:
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield
