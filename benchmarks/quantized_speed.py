"""Quantized moments, speed and memory: the fused step with ``quantize_moments=True`` in each
``moment_format`` (8-bit ``dynamic8``, ``fp8``, ``4bit``) against float32 moments, in the same
process, on one large leaf (default 64M parameters).

All are ``jax.jit(opt.apply_gradients)`` with params and state donated (the in-place fused
kernel). The steps are run interleaved (float32, 8-bit, fp8, 4bit, float32, ...) so that all
see the same machine load; reported: the median step time of each, the median of the per-round
ratios (format / float32 of the same round; goal <= 0.7 for 8-bit and fp8), the load average
before and after, and the measured state bytes per parameter (``adamx.state_bytes_per_param``).

    PYTHONPATH=. python benchmarks/quantized_speed.py --n 67108864 --reps 9
    PYTHONPATH=. python benchmarks/quantized_speed.py --formats fp8     # float32 and fp8 only
    PYTHONPATH=. python benchmarks/quantized_speed.py --n 262144 --leaves 64 --layouts \
        --out benchmarks/results/quantized_layouts.json      # tree vs flat_state layouts
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax

import adamx
from benchmarks import record

# how the formats are named in the results (the first version of this file called dynamic8 "8-bit")
FORMAT_NAMES = {"dynamic8": "8-bit"}


def setup(opt: adamx.Adam, n: int, leaves: int = 1) -> tuple[Any, Any, Any, Any, float]:
    params = {f"w{i}": jax.random.normal(jax.random.PRNGKey(i), (n,)) for i in range(leaves)}
    grads = {k: jax.random.normal(jax.random.PRNGKey(1000 + i), (n,)) * 0.01 for i, k in enumerate(params)}
    state = opt.init(params)
    assert adamx.fused.why_not(opt, grads, state, params) is None
    bpp = adamx.state_bytes_per_param((state.mu, state.nu), params)
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
    params, state = step(params, state, grads)  # compile + warm up
    jax.block_until_ready((params, state))
    return step, params, state, grads, bpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--leaves", type=int, default=1, help="leaves of --n params each")
    ap.add_argument("--layouts", action="store_true", help="also 8-bit and float32 with flat_state=True")
    ap.add_argument("--formats", default="dynamic8,fp8,4bit", help="moment formats beside float32 (comma-separated)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantized_speed.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    configs: list[tuple[str, dict[str, Any]]] = [("float32", {})]
    configs += [
        (FORMAT_NAMES.get(f, f), {"quantize_moments": True, "moment_format": f}) for f in args.formats.split(",")
    ]
    if args.layouts:
        configs += [
            ("8-bit flat", {"quantize_moments": True, "flat_state": True}),
            ("float32 flat", {"flat_state": True}),
        ]
    runs = {name: list(setup(adamx.adam(learning_rate=1e-3, **kw), args.n, args.leaves)) for name, kw in configs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, r in runs.items():  # interleaved: both see the same load
            step, params, state, grads, _ = r
            t0 = time.perf_counter()
            params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            times[name].append(time.perf_counter() - t0)
            r[1], r[2] = params, state
    load_after = os.getloadavg()
    rows = {name: {"step_s": statistics.median(times[name]), "state_bytes_per_param": runs[name][4],
                   "times_s": times[name]} for name in runs}  # fmt: skip
    for name, row in rows.items():
        print(f"{name:8s} step {row['step_s'] * 1e3:8.1f} ms   state {row['state_bytes_per_param']:.4f} bytes/param")
    pair_ratios = {name: [q / f for q, f in zip(times[name], times["float32"])] for name in runs if name != "float32"}
    for name, rs in pair_ratios.items():
        rows[name]["ratio_to_float32"] = statistics.median(rs)
        print(f"{name} / float32 step time: {statistics.median(rs):.2f}x (median of {args.reps} interleaved "
              f"rounds; min {min(rs):.2f}, max {max(rs):.2f})")  # fmt: skip
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    params = {"n": args.n, "leaves": args.leaves, "reps": args.reps, "formats": args.formats}
    summary: dict[str, Any] = {"load_before": load_before, "load_after": load_after, "pair_ratios": pair_ratios}
    if "8-bit" in pair_ratios:  # the key of the first version of this file
        summary["ratio"] = statistics.median(pair_ratios["8-bit"])
    record.write(args.out, "quantized_speed", [{"config": k, **v} for k, v in rows.items()], params, summary)


if __name__ == "__main__":
    main()
