"""``python -m benchmarks``: one command for every benchmark, one results format (benchmarks/record.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import record

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_list_names_every_benchmark_script():
    r = _cli("--list")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in r.stdout.splitlines()}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__main__", "harness", "record"}
    assert set(listed) == scripts
    assert all(listed.values()), "every benchmark script starts with a docstring saying what it measures"


def test_dry_run_prints_the_script_and_its_arguments():
    r = _cli("--dry-run", "run", "--quick", "--out", "x")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == [os.path.join("benchmarks", "run.py"), "--quick", "--out", "x"]


def test_unknown_benchmark_is_a_usage_error():
    r = _cli("no_such_bench")
    assert r.returncode == 2 and "no_such_bench" in r.stderr and "quantized_compile" in r.stderr


def test_a_quick_benchmark_writes_the_common_format(tmp_path):
    out = tmp_path / "compile.json"
    r = _cli("quantized_compile", "--leaves", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = record.read(str(out))
    assert res["benchmark"] == "quantized_compile" and res["params"]["leaves"] == 2
    assert "quantized_compile.py --leaves 2" in res["command"]
    assert {"jax", "adamx"} <= set(res["versions"]) and res["machine"]["cores"] == os.cpu_count()
    configs = {(row["config"], row["path"]) for row in res["rows"]}
    assert len(configs) == len(res["rows"]) == 6
    assert all(row["compile_s"] > 0 for row in res["rows"])


def test_read_refuses_other_layouts(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"leaves": 3, "rows": []}))
    with pytest.raises(ValueError, match="missing format, benchmark, timestamp"):
        record.read(str(old))
    with pytest.raises(TypeError, match="rows must be a list of dicts"):
        record.make("x", {"a": 1}, {})  # type: ignore[arg-type]
