"""The package's shape (issue 18): no function over 100 lines, ``Any`` in under 15% of annotations.

Measured on the source with ``ast``: a function's length runs from its ``def`` to its last line,
less its docstring (documentation, not code); an annotation (of a parameter, a return or a
variable) counts as ``Any`` when the name ``Any`` appears in it, once however often.
"""

from __future__ import annotations

import ast
import pathlib

import adamx

PKG = pathlib.Path(adamx.__file__).parent
MAX_FUNCTION_LINES = 100
MAX_ANY_SHARE = 0.15


def _files() -> list[pathlib.Path]:
    return sorted(PKG.rglob("*.py"))


def _docstring_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = fn.body[0] if fn.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def function_lengths() -> list[tuple[int, str]]:
    """``(lines, "path:name")`` of every function and method in adamx/, longest first."""
    out = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1 - _docstring_lines(node)
                out.append((lines, f"{path.relative_to(PKG.parent)}:{node.name}"))
    return sorted(out, reverse=True)


def _mentions_any(annotation: ast.expr) -> bool:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Any":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Any":
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
            try:
                if _mentions_any(ast.parse(node.value, mode="eval").body):
                    return True
            except SyntaxError:
                continue
    return False


def _annotations(tree: ast.AST) -> list[ast.expr]:
    out: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            out.extend(p.annotation for p in params if p is not None and p.annotation is not None)
            if node.returns is not None:
                out.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            out.append(node.annotation)
    return out


def any_counts() -> dict[str, tuple[int, int]]:
    """Per file of adamx/: ``(annotations mentioning Any, annotations)``."""
    counts = {}
    for path in _files():
        anns = _annotations(ast.parse(path.read_text()))
        counts[str(path.relative_to(PKG.parent))] = (sum(map(_mentions_any, anns)), len(anns))
    return counts


def test_the_measures_see_what_they_measure():
    src = "def f(x: Any, y: list[int]) -> 'dict[str, Any]':\n    '''doc\n    more'''\n    z: int = 1\n    return z\n"
    tree = ast.parse(src)
    assert [_mentions_any(a) for a in _annotations(tree)] == [True, False, True, False]
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef) and _docstring_lines(fn) == 2
    assert function_lengths()[0][0] > 0 and sum(t for _, t in any_counts().values()) > 100


def test_shape_of_the_package():
    longest = function_lengths()
    too_long = [f"{name} ({n} lines)" for n, name in longest if n > MAX_FUNCTION_LINES]
    counts = any_counts()
    n_any, n_all = sum(a for a, _ in counts.values()), sum(t for _, t in counts.values())
    per_file = "\n".join(f"  {path}: {a} of {t}" for path, (a, t) in sorted(counts.items(), key=lambda kv: -kv[1][0]))
    assert not too_long and n_any / n_all < MAX_ANY_SHARE, (
        f"functions over {MAX_FUNCTION_LINES} lines: {too_long}; Any in {n_any} of {n_all} annotations "
        f"({n_any / n_all:.1%}, the goal is under {MAX_ANY_SHARE:.0%}):\n{per_file}"
    )
