"""Shared test setup: 8 simulated CPU devices (set by `make test`), strict dtype promotion in every test."""

import os

import jax
import pytest

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "references", "data")


@pytest.fixture(autouse=True)
def strict_promotion():
    """adamx must not rely on implicit dtype promotion (bf16/f16 params would silently widen): every test runs strict."""
    with jax.numpy_dtype_promotion("strict"):
        yield
