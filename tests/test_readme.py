"""The README's Python blocks run as written, and its numeric claims hold."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_python_block_runs(i):
    exec(compile(_blocks()[i], f"README.md block {i}", "exec"), {})


def test_readme_counts_match_the_fixtures():
    from tests.test_keras_reference import _cases

    with open(README) as f:
        text = f.read()
    n = int(re.search(r"replays (\d+) real Keras", text).group(1))
    assert n == len(_cases("float32"))
