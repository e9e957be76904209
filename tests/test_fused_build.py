"""``python -m adamx.fused build``: the kernel built on its own, with the loader's command."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from adamx.fused import _build
from adamx.fused.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(capsys, *args: str) -> list[str]:
    assert main(["build", "--print-command", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return out[0].split()


def test_print_command_is_the_loaders_command(capsys, monkeypatch):
    monkeypatch.setenv("ADAMX_KERNEL_WERROR", "0")
    cmd = _command(capsys)
    fl = _build.flags()
    assert cmd == _build.command(_build.compiler(), fl, _build.cached_path(fl))
    assert {"-O3", "-march=native", "-Wall", "-Wextra"} <= set(cmd) and "-Werror" not in cmd
    assert cmd[-3:-2] == [_build.SOURCE]


def test_flags_reach_the_command(capsys, monkeypatch):
    monkeypatch.setenv("ADAMX_KERNEL_WERROR", "0")
    cmd = _command(capsys, "--debug", "--sanitize", "address,undefined", "--werror")
    assert {"-O0", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-Werror"} <= set(cmd)
    assert "-O3" not in cmd
    # a debug build is cached under its own key: the loader never loads it
    assert cmd[-1] != _build.cached_path(_build.flags())


def test_bad_sanitizer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--sanitize", "adress"])
    assert e.value.code == 2
    assert "--sanitize" in capsys.readouterr().err


def test_build_with_werror_succeeds(capsys):
    """The kernel compiles without warnings (cached when the loader built it with ADAMX_KERNEL_WERROR=1)."""
    assert main(["build", "--werror"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(("built: ", "cached ")), out
    path = out[-1].split(": ", 1)[1]
    assert path == _build.cached_path(_build.flags(werror=True))
    assert "-Werror" in out[0].split()
    assert ctypes.CDLL(path).adamx_fused_abi_version() == _build.ABI


def test_broken_source_fails_with_the_compilers_error(tmp_path):
    """A copy of kernel.cc with a syntax error: exit status 1, the command and the compiler's error shown."""
    broken = tmp_path / "kernel_broken.cc"
    with open(_build.SOURCE) as f:
        broken.write_text(f.read() + "\nint adamx_broken_function( {\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "adamx.fused", "build", "--force", "--source", str(broken)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert str(broken) in r.stdout  # the command
    assert "kernel_broken.cc" in r.stderr and "error" in r.stderr  # the compiler's message, with the file
    assert "adamx_broken_function" in r.stderr
