"""The XLA ``update`` path on the CPU (issue 21, item 5): ratios against float32 Adam, one process.

Three ratios, each measured side by side in one process (runs interleaved, medians of pairs):

* **step**: ``jit(update + optax.apply_updates)`` with 8-bit moments (``quantize_moments=True``)
  over the same step with float32 moments, one leaf of ``--n`` params (goal: at most 3x; 32x
  with the code-map gathers before the arithmetic codec);
* **compile**: XLA compile time of that step per leaf, ``--leaves`` leaves of 8192 params, 8-bit
  over float32 (goal: at most 2x; 14x before);
* **stochastic**: the fused step (``apply_gradients``, the C++ kernel) with
  ``param_rounding="stochastic"`` over ``"nearest"``, bf16 params (goal: at most 1.3x; 10x before).

Writes ``benchmarks/results/update_path.json`` and prints a table with the machine and load::

    PYTHONPATH=. python benchmarks/update_path.py [--n 16777216] [--leaves 200] [--reps 7]
        [--only step|compile|stochastic ...] [--repeat 1]

``--only`` runs the named rows alone (the others print as not run); ``--repeat`` runs each
row that many times in the same process and reports every ratio and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx


def _step(opt: optax.GradientTransformation) -> Callable[..., Any]:
    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1))


def _fused(opt: Any) -> Callable[..., Any]:
    return jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))


def _timed(fn: Callable[..., Any], p: Any, s: Any, g: Any) -> tuple[float, Any, Any]:
    t0 = time.perf_counter()
    p, s = fn(p, s, g)
    jax.block_until_ready((p, s))
    return time.perf_counter() - t0, p, s


def paired(a: tuple[Callable[..., Any], Any, Any], b: tuple[Callable[..., Any], Any, Any], g: Any, reps: int) -> dict:
    """Median time of ``a`` and ``b`` run alternately (each warmed up first) and the median ratio b / a."""
    (fa, pa, sa), (fb, pb, sb) = a, b
    _, pa, sa = _timed(fa, pa, sa, g)
    _, pb, sb = _timed(fb, pb, sb, g)
    ta, tb = [], []
    for _ in range(reps):
        t, pa, sa = _timed(fa, pa, sa, g)
        ta.append(t)
        t, pb, sb = _timed(fb, pb, sb, g)
        tb.append(t)
    return {
        "a_ms": 1e3 * statistics.median(ta),
        "b_ms": 1e3 * statistics.median(tb),
        "ratio": statistics.median([y / x for x, y in zip(ta, tb)]),
    }


def step_ratio(n: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((n // 4096, 4096)), jnp.float32)}
    g = jax.tree.map(lambda x: x * 1e-2, params)
    f32, q8 = adamx.adam(1e-3), adamx.adam(1e-3, quantize_moments=True)
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 - donation: each run its own buffers
    return paired((_step(f32), copy(params), f32.init(params)), (_step(q8), copy(params), q8.init(params)), g, reps)


def compile_ratio(leaves: int) -> dict:
    params = {f"w{i}": jax.ShapeDtypeStruct((8192,), jnp.float32) for i in range(leaves)}
    out = {}
    for name, opt in (("float32", adamx.adam(1e-3)), ("8-bit", adamx.adam(1e-3, quantize_moments=True))):
        state = jax.eval_shape(opt.init, params)
        t0 = time.perf_counter()
        lowered = _step(opt).lower(params, state, params)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        out[name] = {"trace_s": t1 - t0, "compile_s": t2 - t1, "per_leaf_ms": 1e3 * (t2 - t1) / leaves}
    out["ratio"] = out["8-bit"]["compile_s"] / out["float32"]["compile_s"]
    return out


def stochastic_ratio(n: int, reps: int) -> dict:
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((n // 4096, 4096)), jnp.bfloat16)}
    g = jax.tree.map(lambda x: x * jnp.bfloat16(1e-2), params)
    near, sto = adamx.adam(1e-3), adamx.adam(1e-3, param_rounding="stochastic")
    for opt in (near, sto):
        why = adamx.fused.why_not(opt, g, opt.init(params), params)
        assert why is None, f"the fused kernel does not take this step: {why}"
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
    return paired(
        (_fused(near), copy(params), near.init(params)), (_fused(sto), copy(params), sto.init(params)), g, reps
    )


ROWS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "step": lambda a: step_ratio(a.n, a.reps),
    "compile": lambda a: compile_ratio(a.leaves),
    "stochastic": lambda a: stochastic_ratio(a.n, a.reps),
}


def repeated(row: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """``row`` run ``args.repeat`` times: the last run's numbers, every ratio and their median."""
    runs = [row(args) for _ in range(args.repeat)]
    out = dict(runs[-1])
    if args.repeat > 1:
        out["ratios"] = [r["ratio"] for r in runs]
        out["ratio"] = statistics.median(out["ratios"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--leaves", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", nargs="+", choices=sorted(ROWS), default=sorted(ROWS), help="the rows to run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each row in this process (median ratio)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "update_path.json"))
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1; got {args.repeat}")
    load = os.getloadavg()
    only = "" if len(args.only) == len(ROWS) else " --only " + " ".join(args.only)
    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load},
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "command": "PYTHONPATH=. python benchmarks/update_path.py "
        + f"--n {args.n} --leaves {args.leaves} --reps {args.reps} --repeat {args.repeat}{only}",
    }
    for name in ("step", "compile", "stochastic"):
        if name in args.only:
            res[name] = repeated(ROWS[name], args)
    res["machine"]["load_after"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("| ratio | measured | goal |\n|---|---|---|")
    s, c, r = res.get("step"), res.get("compile"), res.get("stochastic")
    print(
        f"| 8-bit / float32 `update` step, {args.n} params | "
        + (f"{s['ratio']:.2f}x ({s['b_ms']:.1f} / {s['a_ms']:.1f} ms)" if s else "not run")
        + " | <= 3x |"
    )
    print(
        f"| 8-bit / float32 compile, {args.leaves} leaves | "
        + (
            f"{c['ratio']:.2f}x ({c['8-bit']['per_leaf_ms']:.1f} / {c['float32']['per_leaf_ms']:.1f} ms per leaf)"
            if c
            else "not run"
        )
        + " | <= 2x |"
    )
    print(
        "| fused stochastic / nearest, bf16 | "
        + (f"{r['ratio']:.2f}x ({r['b_ms']:.1f} / {r['a_ms']:.1f} ms)" if r else "not run")
        + " | <= 1.3x |"
    )
    for name in ("step", "compile", "stochastic"):
        if name in res and "ratios" in res[name]:
            print(f"{name} ratios: " + ", ".join(f"{x:.2f}" for x in res[name]["ratios"]))
    print(f"load before/after: {load} / {res['machine']['load_after']}")


if __name__ == "__main__":
    main()
