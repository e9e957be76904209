"""The README's Python blocks, and those of the pages that took its long sections, run as written;
their numeric claims hold."""

import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")
# the README's long sections moved here (docs/guide.md, docs/features.md): their examples stay tested
PAGES = [README, os.path.join(ROOT, "docs", "guide.md"), os.path.join(ROOT, "docs", "features.md")]


def _blocks():
    out = []
    for page in PAGES:
        with open(page) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
        out += [(f"{os.path.relpath(page, ROOT)} block {i}", b) for i, b in enumerate(blocks)]
    return out


@pytest.mark.parametrize("name, block", _blocks(), ids=[name for name, _ in _blocks()])
def test_readme_python_block_runs(name, block):
    exec(compile(block, name, "exec"), {})


def test_readme_counts_match_the_fixtures():
    from tests.test_keras_reference import _cases

    with open(os.path.join(ROOT, "docs", "guide.md")) as f:
        text = f.read()
    n = int(re.search(r"replays (\d+) real Keras", text).group(1))
    assert n == len(_cases("float32"))
