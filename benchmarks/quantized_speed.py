"""8-bit moments, speed and memory: the fused step with ``quantize_moments=True`` against float32
moments, in the same process, on one large leaf (default 64M parameters).

Both are ``jax.jit(opt.apply_gradients)`` with params and state donated (the in-place fused
kernel). Reported: the median step time of each, their ratio (8-bit / float32; goal <= 0.7),
and the measured state bytes per parameter (``adamx.state_bytes_per_param``).

    PYTHONPATH=. python benchmarks/quantized_speed.py --n 67108864 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax

import adamx


def measure(opt: adamx.Adam, n: int, reps: int) -> tuple[float, float]:
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (n,))}
    grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (n,)) * 0.01}
    state = opt.init(params)
    assert adamx.fused.why_not(opt, grads, state, params) is None
    bpp = adamx.state_bytes_per_param((state.mu, state.nu), params)
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
    params, state = step(params, state, grads)  # compile + warm up
    jax.block_until_ready(params)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), bpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantized_speed.json"))
    args = ap.parse_args()
    rows = {}
    for name, kw in (("float32", {}), ("8-bit", {"quantize_moments": True})):
        t, bpp = measure(adamx.adam(learning_rate=1e-3, **kw), args.n, args.reps)
        rows[name] = {"step_s": t, "state_bytes_per_param": bpp}
        print(f"{name:8s} step {t * 1e3:8.1f} ms   state {bpp:.4f} bytes/param", flush=True)
    ratio = rows["8-bit"]["step_s"] / rows["float32"]["step_s"]
    print(f"8-bit / float32 step time: {ratio:.2f}x")
    out = {
        "n": args.n,
        "reps": args.reps,
        "rows": rows,
        "ratio": ratio,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
