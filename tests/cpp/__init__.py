"""The C++ test programs (``tests/cpp/*.cc``) and the driver that compiles them for pytest.

Each ``.cc`` file includes the package's C++ headers (``adamx/_quant8.h``) and exports a C ABI;
:func:`compile_library` builds it as a shared library with warnings as errors, in one of
:data:`BUILDS`, and the tests load it with ``ctypes`` and compare it with JAX.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
from collections.abc import Sequence

import pytest

import adamx

HERE = pathlib.Path(__file__).parent
INCLUDE_DIR = os.path.dirname(adamx.__file__)  # where _quant8.h lies

# "portable": the header as any C++17 compiler builds it (the plain loops); "native": as the
# fused kernel builds it (-O3 -march=native: the AVX-512 VBMI decoder where the CPU has it).
BUILDS = {"portable": ["-O2"], "native": ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno"]}


def compile_library(name: str, build: str, out_dir: pathlib.Path, include: Sequence[pathlib.Path] = ()) -> ctypes.CDLL:
    """Compile ``tests/cpp/<name>.cc`` in build ``build`` (a key of :data:`BUILDS`) and load it;
    ``include``: more include directories, searched first.

    Fails the test (never skips) without g++ or when the compiler reports an error or a warning.
    """
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.fail("g++ not found: the C++ headers under adamx/ must be compiled and checked (install g++)")
    lib = out_dir / f"lib{name}_{build}.so"
    cmd = [cxx, *BUILDS[build], "-Wall", "-Wextra", "-Werror", "-std=c++17", "-shared", "-fPIC",
           *(f"-I{d}" for d in include), "-I", INCLUDE_DIR, str(HERE / f"{name}.cc"), "-o", str(lib)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr}"
    return ctypes.CDLL(str(lib))
