"""The docs site's API reference (docs/api.rst) documents every public name of adamx."""

import pathlib
import re

import adamx

API_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.rst"


def test_api_reference_lists_every_public_name():
    text = API_PAGE.read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class|module|data):: (?:adamx\.)?(\w+)", text, flags=re.M))
    assert documented, "no autodoc directives found in docs/api.rst"
    missing = sorted(set(adamx.__all__) - documented)
    assert not missing, f"add these names of adamx.__all__ to docs/api.rst: {missing}"
    unknown = sorted(documented - set(adamx.__all__))
    assert not unknown, f"docs/api.rst documents names that adamx does not export: {unknown}"
