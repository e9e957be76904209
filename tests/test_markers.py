"""The ``slow`` marker (``make test-fast`` leaves those tests out): tests/conftest.py's SLOW patterns."""

from __future__ import annotations

import pathlib
import re

import pytest

from tests import conftest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("pattern", conftest.SLOW)
def test_every_slow_pattern_names_a_test(pattern):
    """A renamed or deleted test must not leave a pattern behind that marks nothing (or something else)."""
    path_pattern, _, test_pattern = pattern.partition("::")
    files = [p for p in ROOT.glob(path_pattern) if p.name.startswith("test_") and p.suffix == ".py"]
    assert files, f"SLOW pattern {pattern!r}: no test module matches {path_pattern!r}"
    name = re.split(r"[\[*]", test_pattern)[0]
    if name:
        defined = any(re.search(rf"^\s*(async )?def {re.escape(name)}\b", p.read_text(), re.M) for p in files)
        assert defined, f"SLOW pattern {pattern!r}: no test function {name!r} in {path_pattern}"


class _Item:
    def __init__(self, nodeid: str):
        self.nodeid, self.markers = nodeid, []

    def add_marker(self, marker):
        self.markers.append(marker.name)


def test_the_hook_marks_exactly_the_matching_tests():
    slow = _Item("tests/integration/test_orbax.py::test_checkpoint_manager_resume_is_bit_identical")
    fast = _Item("tests/test_markers.py::test_the_hook_marks_exactly_the_matching_tests")
    conftest.pytest_collection_modifyitems(None, [slow, fast])  # type: ignore[arg-type]
    assert slow.markers == ["slow"] and fast.markers == []
