"""Building and loading the fused kernel (``kernel.cc``, shipped with the package).

The kernel is compiled with the machine's C++ compiler on first use, with warnings on
(``-Wall -Wextra``; ``ADAMX_KERNEL_WERROR=1``, set by ``make test``, makes them errors),
and cached (``$ADAMX_CACHE_DIR``, else ``~/.cache/adamx``) under a key of the source, the
flags, the compiler, jaxlib and the CPU. Loading checks the ABI version and that the
kernel's scalar layout is :class:`adamx._step.Scalars`' field list.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from adamx._step import Scalars

log = logging.getLogger("adamx")

ABI = 5
STEP_TARGET = "adamx_fused_step_v2"
SUMSQ_TARGET = "adamx_fused_sumsq_v2"
Q8_TARGET = "adamx_fused_step_q8_v2"  # quantize_moments: 8-bit mu/nu/nu_max
LOWBIT_TARGET = "adamx_fused_step_lowbit_v1"  # moment_format="fp8" / "4bit"
MOMENTS_Q8_TARGET = "adamx_fused_moments_q8_v1"  # quantize_moments on the update path: one 8-bit leaf
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.cc")
# kernel.cc includes "_quant8.h" and "_lowbit.h" from the package directory (adamx/)
INCLUDE_DIR = os.path.dirname(os.path.dirname(SOURCE))
HEADERS = [os.path.join(INCLUDE_DIR, "_quant8.h"), os.path.join(INCLUDE_DIR, "_lowbit.h")]
# -mprefer-vector-width=512: where the CPU has AVX-512, GCC's tuning for it still prefers 256-bit
# vectors; 512-bit ones made the fused bf16 step 24 instead of 33 ms and the stochastic one 36
# instead of 62 (16M params). The same values: no loop reduces across lanes by width.
CXXFLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-std=c++17",
    "-shared",
    "-fPIC",
]
WARNINGS = ["-Wall", "-Wextra"]

_lock = threading.Lock()
_status: dict[str, Any] = {"tried": False, "ok": False, "error": None, "path": None}


def _cache_dir() -> str:
    d = os.environ.get("ADAMX_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "adamx")
    return d


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _werror_from_env() -> bool:
    return os.environ.get("ADAMX_KERNEL_WERROR", "0").lower() in ("1", "true", "yes", "on")


def flags(*, werror: bool | None = None, debug: bool = False, sanitize: Sequence[str] = ()) -> list[str]:
    """The compiler flags: optimisation, warnings, and ``-Werror``.

    Args:
      werror: make warnings errors; ``None`` (the loader's choice) reads ``ADAMX_KERNEL_WERROR=1``.
      debug: ``-O0 -g`` instead of ``-O3`` (for a debugger; ``python -m adamx.fused build --debug``).
      sanitize: sanitizers for ``-fsanitize=`` (``"address"``, ``"undefined"``), with frame pointers kept.
    """
    if werror is None:
        werror = _werror_from_env()
    base = [f for f in CXXFLAGS if not (debug and f == "-O3")]
    extra = ["-O0", "-g"] if debug else []
    if sanitize:
        extra += [f"-fsanitize={','.join(sanitize)}", "-fno-omit-frame-pointer"]
    return [*base, *extra, *WARNINGS, *(["-Werror"] if werror else [])]


def command(cxx: str, fl: Sequence[str], output: str, source: str = SOURCE, extra: Sequence[str] = ()) -> list[str]:
    """The compiler command that builds ``source`` (``kernel.cc``, or a program including it) into ``output``.

    The one command line of the loader, ``python -m adamx.fused build`` and the benchmarks.
    ``-isystem``: warnings in XLA's FFI headers are theirs; ours must be clean.
    """
    return [cxx, *fl, "-isystem", jax.ffi.include_dir(), "-I", INCLUDE_DIR, *extra, source, "-o", output]


def _build_key(cxx: str, source: str, fl: list[str]) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    import jaxlib

    h = hashlib.sha256()
    for part in (source, " ".join(fl), version, jaxlib.__version__, platform.machine(), _cpu_id()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


class BuildError(RuntimeError):
    """The compiler failed: ``command`` is what ran, ``stderr`` what it said."""

    def __init__(self, command: list[str], stderr: str) -> None:
        super().__init__(f"compiling the fused kernel failed ({' '.join(command)}):\n{stderr[-4000:]}")
        self.command = command
        self.stderr = stderr


class Build(NamedTuple):
    """One kernel build: the shared library, the command (``None`` from the cache) and the compiler's output."""

    path: str
    command: list[str] | None
    stderr: str


def _out_dir() -> str:
    out_dir = _cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:
        out_dir = os.path.join(tempfile.gettempdir(), f"adamx-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
        os.makedirs(out_dir, exist_ok=True)
    return out_dir


def compiler() -> str:
    """The C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++`` on the path)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cxx


def cached_path(fl: Sequence[str], source: str = SOURCE) -> str:
    """Where the build of ``source`` with flags ``fl`` is cached (its name is the build key)."""
    with open(source) as f:
        text = f.read()
    for header in HEADERS:  # the build key covers the included headers too
        with open(header) as f:
            text += "\0" + f.read()
    return os.path.join(_out_dir(), f"adamx_fused_{_build_key(compiler(), text, list(fl))}.so")


def compile_kernel(fl: Sequence[str], source: str = SOURCE, force: bool = False) -> Build:
    """Compile ``source`` with flags ``fl`` into the cache (unless cached and not ``force``).

    Raises :class:`BuildError` (with the command and the compiler's errors) when the compiler fails.
    """
    so = cached_path(fl, source)
    if os.path.exists(so) and not force:
        return Build(so, None, "")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(so)) as tmp:
        tmp_so = os.path.join(tmp, "adamx_fused.so")
        cmd = command(compiler(), fl, tmp_so, source)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise BuildError(cmd, r.stderr)
        os.replace(tmp_so, so)  # atomic: concurrent builders all end with a complete file
    return Build(so, cmd, r.stderr)


def build() -> str:
    """Compile ``kernel.cc`` (or find it in the cache); returns the shared library's path."""
    b = compile_kernel(flags())
    if b.stderr.strip():
        log.warning("adamx: compiler warnings in the fused kernel:\n%s", b.stderr[-4000:])
    return b.path


def check_layout(names: str) -> None:
    """The kernel's scalar names (``"c1,c2,...,"``) must be :class:`Scalars`' fields, in order."""
    got = [n for n in names.split(",") if n]
    if got != list(Scalars._fields):
        raise RuntimeError(f"the kernel's scalar layout {got} differs from adamx._step.Scalars {list(Scalars._fields)}")


def available() -> bool:
    """Whether the fused CPU kernel is built and registered (builds it on first call)."""
    if _status["tried"]:
        return bool(_status["ok"])
    with _lock:
        if _status["tried"]:
            return bool(_status["ok"])
        try:
            if os.environ.get("ADAMX_FUSED", "1").lower() in ("0", "false", "off", "no"):
                raise RuntimeError("disabled by ADAMX_FUSED=0")
            path = build()
            lib = ctypes.CDLL(path)
            if lib.adamx_fused_abi_version() != ABI:
                raise RuntimeError(f"{path} has another ABI version")
            lib.adamx_fused_scalar_names.restype = ctypes.c_char_p
            check_layout(lib.adamx_fused_scalar_names().decode())
            jax.ffi.register_ffi_target(STEP_TARGET, jax.ffi.pycapsule(lib.AdamxFusedStep), platform="cpu")
            jax.ffi.register_ffi_target(SUMSQ_TARGET, jax.ffi.pycapsule(lib.AdamxFusedSumsq), platform="cpu")
            jax.ffi.register_ffi_target(Q8_TARGET, jax.ffi.pycapsule(lib.AdamxFusedStepQ8), platform="cpu")
            jax.ffi.register_ffi_target(LOWBIT_TARGET, jax.ffi.pycapsule(lib.AdamxFusedStepLowbit), platform="cpu")
            jax.ffi.register_ffi_target(MOMENTS_Q8_TARGET, jax.ffi.pycapsule(lib.AdamxFusedMomentsQ8), platform="cpu")
            _status.update(ok=True, path=path, lib=lib)
        except Exception as e:  # noqa: BLE001 - any failure means: use the reference path
            _status.update(ok=False, error=f"{type(e).__name__}: {e}")
            log.info("adamx: fused kernel unavailable, using the reference path: %s", _status["error"])
        _status["tried"] = True
    return bool(_status["ok"])


def status() -> dict[str, Any]:
    """``{"ok": bool, "error": str | None, "path": str | None}`` of the fused kernel."""
    available()
    return {k: _status.get(k) for k in ("ok", "error", "path")}
