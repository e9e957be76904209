"""One results format for every benchmark: ``record.write(path, benchmark, rows, ...)``.

A result file is JSON with these keys (``FORMAT`` names the version)::

    format     "adamx-benchmark/1"
    benchmark  the benchmark's name (``python -m benchmarks <name>``)
    timestamp  when it was written (ISO 8601, local time, seconds)
    command    the command line that ran it
    machine    CPU model, cores, caches, memory, platform (``harness.machine_info``)
    versions   python, jax, jaxlib, optax, numpy, keras, torch, adamx
    params     the benchmark's arguments (sizes, steps, repeats)
    rows       the measurements: a list of flat dicts, one per case
    summary    derived numbers (ratios, load averages), may be empty

``read`` loads one and checks the keys. Results written before this format (the JSON files
already under ``benchmarks/results/``) keep their own layout.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from benchmarks import harness

FORMAT = "adamx-benchmark/1"
KEYS = ("format", "benchmark", "timestamp", "command", "machine", "versions", "params", "rows", "summary")


def make(benchmark: str, rows: list[dict[str, Any]], params: dict[str, Any], summary: dict[str, Any] | None = None):
    """The result as a dict (see the module docstring); ``rows`` must be a list of dicts."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"rows must be a list of dicts (one per case), got {type(rows).__name__}")
    machine = harness.machine_info()
    return {
        "format": FORMAT,
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": machine.pop("command"),
        "machine": machine,
        "versions": machine.pop("versions"),
        "params": params,
        "rows": rows,
        "summary": summary or {},
    }


def write(path: str, benchmark: str, rows: list[dict[str, Any]], params: dict[str, Any], summary=None) -> dict:
    """Write the result of ``benchmark`` to ``path`` (folders made as needed); returns it."""
    res = make(benchmark, rows, params, summary)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"wrote {path}")
    return res


def read(path: str) -> dict:
    """Load a result written by :func:`write`; raises ``ValueError`` naming a missing key or another format."""
    with open(path) as f:
        res = json.load(f)
    missing = [k for k in KEYS if k not in res]
    if missing:
        raise ValueError(f"{path} is not an {FORMAT} result: missing {', '.join(missing)}")
    if res["format"] != FORMAT:
        raise ValueError(f"{path} has format {res['format']!r}, expected {FORMAT!r}")
    return res
