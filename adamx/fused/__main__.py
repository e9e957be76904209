"""Build the fused kernel on its own: ``python -m adamx.fused build [options]``.

Prints the compiler command, the compiler's warnings and errors, and the shared library's
path; exits non-zero when the build fails. The command is the loader's own
(:func:`adamx.fused._build.command`), so what builds here builds on first use.

.. code-block:: text

    python -m adamx.fused build                   # as the loader builds it (cached)
    python -m adamx.fused build --werror --force  # as `make test` builds it, ignoring the cache
    python -m adamx.fused build --debug --sanitize address,undefined
    python -m adamx.fused build --print-command   # the command only, nothing is compiled

A ``--debug`` or ``--sanitize`` build is cached under its own key; the loader never picks it
up (its flags differ). A sanitized library needs the sanitizer runtime preloaded to be loaded
into Python (``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adamx.fused import _build

SANITIZERS = ("address", "undefined", "leak", "thread")


def _sanitizers(value: str) -> list[str]:
    names = [v for v in value.split(",") if v]
    bad = [v for v in names if v not in SANITIZERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--sanitize takes a comma list of {', '.join(SANITIZERS)}; got {value!r}")
    return names


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand, ``build``."""
    ap = argparse.ArgumentParser(prog="python -m adamx.fused", description="The fused CPU kernel's tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile kernel.cc, print the command and the compiler's output")
    b.add_argument("--debug", action="store_true", help="-O0 -g instead of -O3")
    b.add_argument("--sanitize", type=_sanitizers, default=[], metavar="LIST", help="e.g. address,undefined")
    b.add_argument("--werror", action="store_true", help="warnings are errors (as ADAMX_KERNEL_WERROR=1)")
    b.add_argument("--force", action="store_true", help="compile even when the cache has this build")
    b.add_argument("--print-command", action="store_true", help="print the compiler command, compile nothing")
    b.add_argument("--source", default=_build.SOURCE, help="the C++ source (default: the package's kernel.cc)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0: built, 1: the compiler failed, 2: usage)."""
    args = parser().parse_args(argv)
    fl = _build.flags(werror=args.werror or None, debug=args.debug, sanitize=args.sanitize)
    try:
        if args.print_command:
            print(" ".join(_build.command(_build.compiler(), fl, _build.cached_path(fl, args.source), args.source)))
            return 0
        result = _build.compile_kernel(fl, args.source, force=args.force)
    except _build.BuildError as e:
        print(" ".join(e.command))
        print(e.stderr, end="", file=sys.stderr)
        print(f"error: the build failed (compiler exit status non-zero): {args.source}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.command is None:
        print(" ".join(_build.command(_build.compiler(), fl, result.path, args.source)))
        print(f"cached (--force rebuilds): {result.path}")
    else:
        print(" ".join(result.command))
        print(result.stderr, end="", file=sys.stderr)
        print(f"built: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
