"""8-bit moments, compile time: one jitted step for a model of many quantized leaves.

``L`` leaves of 8192 float32 params each (every leaf 8-bit under the default
``quantize_min_size=4096``); for float32 moments, 8-bit tree state and 8-bit ``flat_state``,
the trace and XLA compile time of ``opt.apply_gradients`` (the fused kernel) and of
``opt.update`` (the reference path, the one GPU/TPU run). Writes
``benchmarks/results/quantized_compile.json``.

    PYTHONPATH=. python benchmarks/quantized_compile.py [--leaves 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

import adamx
from benchmarks import record

CONFIGS = {
    "float32 tree": {},
    "8-bit tree": {"quantize_moments": True},
    "8-bit flat": {"quantize_moments": True, "flat_state": True},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leaves", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantized_compile.json"))
    args = ap.parse_args()
    params = {f"w{i}": jnp.ones((8192,)) * 0.1 for i in range(args.leaves)}
    grads = jax.tree.map(lambda p: p * 0.01, params)
    rows = []
    load_before = os.getloadavg()
    for name, kw in CONFIGS.items():
        opt = adamx.adam(1e-3, **kw)
        state = opt.init(params)
        paths = {
            "apply_gradients": lambda p, s, g, opt=opt: opt.apply_gradients(g, s, p),
            "update": lambda p, s, g, opt=opt: opt.update(g, s, p),
        }
        for path, fn in paths.items():
            t0 = time.perf_counter()
            lowered = jax.jit(fn).lower(params, state, grads)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            rows.append({"config": name, "path": path, "trace_s": t1 - t0, "compile_s": t2 - t1})
            print(f"{name:13s} {path:16s} trace {t1 - t0:7.2f} s   compile {t2 - t1:7.2f} s", flush=True)
    summary = {"load_before": load_before, "load_after": os.getloadavg()}
    record.write(args.out, "quantized_compile", rows, {"leaves": args.leaves, "leaf_size": 8192}, summary)


if __name__ == "__main__":
    main()
