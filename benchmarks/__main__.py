"""All benchmarks behind one command: ``python -m benchmarks <name> [args]``.

    python -m benchmarks --list                      # the benchmarks and what each measures
    python -m benchmarks quantized_compile --leaves 20
    python -m benchmarks run --quick --dry-run       # what would run, without running it

``<name>`` is a script ``benchmarks/<name>.py``; the arguments after it are the script's own
(``python -m benchmarks <name> --help``). Run from the repository root. New results are written
in one format (``benchmarks/record.py``).
"""

from __future__ import annotations

import argparse
import ast
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_BENCHMARKS = {"__main__", "harness", "record"}  # helpers, not runnable benchmarks


def benchmarks() -> dict[str, str]:
    """``{name: first line of the script's docstring}`` for every ``benchmarks/<name>.py``."""
    out = {}
    for fn in sorted(os.listdir(HERE)):
        name, ext = os.path.splitext(fn)
        if ext != ".py" or name in NOT_BENCHMARKS:
            continue
        with open(os.path.join(HERE, fn)) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        out[name] = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, on one line
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list the benchmarks")
    ap.add_argument("--dry-run", action="store_true", help="print the script and arguments, run nothing")
    ap.add_argument("name", nargs="?", help="the benchmark (see --list)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    # our flags only before the name: everything after it belongs to the benchmark
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = ap.parse_args(argv[:split] + argv[split : split + 1])
    args.args = argv[split + 1 :]
    names = benchmarks()
    if args.list:
        width = max(map(len, names))
        for name, doc in names.items():
            print(f"{name:{width}s}  {doc}")
        return 0
    if args.name is None:
        ap.error("name a benchmark (see --list)")
    if args.name not in names:
        ap.error(f"unknown benchmark {args.name!r}; one of: {', '.join(names)}")
    script = os.path.join(HERE, f"{args.name}.py")
    if args.dry_run:
        print(" ".join([os.path.basename(sys.executable), os.path.relpath(script), *args.args]))
        return 0
    root = os.path.dirname(HERE)
    if root not in sys.path:
        sys.path.insert(0, root)  # the scripts import adamx and benchmarks.* from the checkout
    sys.argv = [os.path.relpath(script), *args.args]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
