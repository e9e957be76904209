#!/usr/bin/env python
"""adamx performance benchmarks, side by side in one process (see docs/performance.md).

    python benchmarks/run.py --quick   # a few minutes
    python benchmarks/run.py           # full run

Writes ``benchmarks/results/results.md`` (tables), ``results.json`` and ``chart.png``.
Competitors step their own buffers in place (params and state donated), one step each
per round in alternating order; ratios are paired per round. The roofline is measured
in the same run (``harness.stream_runner``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness as H  # noqa: E402

import adamx  # noqa: E402
from adamx import fused as _fused  # noqa: E402

LR = 1e-3
OPTAX_EPS = 1e-7  # Keras' epsilon-hat mapped to optax's eps (equal once 1 - beta_2^t ~ 1)


# ------------------------------------------------------------------ optimizers under test
def full_keras(**kw: Any) -> Any:
    """adamx with the whole Keras feature set on."""
    return adamx.adamw(
        LR,
        weight_decay=0.01,
        global_clipnorm=1.0,
        amsgrad=True,
        use_ema=True,
        ema_overwrite_frequency=100,
        gradient_accumulation_steps=2,
        loss_scale_factor=2.0,
        **kw,
    )


def optax_clip_adamw() -> Any:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, eps=OPTAX_EPS, weight_decay=0.01))


# name -> (factory, "optax" | "ref" | "fused", bytes/param of the minimum traffic)
JAX_COMPETITORS: dict[str, tuple[Callable[[], Any], str, float]] = {
    "optax.adam": (lambda: optax.adam(LR, eps=OPTAX_EPS), "optax", 28),
    "optax.adamw": (lambda: optax.adamw(LR, eps=OPTAX_EPS, weight_decay=0.01), "optax", 28),
    "optax clip_by_global_norm + adamw": (optax_clip_adamw, "optax", 32),
    "optax.amsgrad": (lambda: optax.amsgrad(LR, eps=OPTAX_EPS), "optax", 36),
    "optax.adam mu_dtype=bf16": (lambda: optax.adam(LR, eps=OPTAX_EPS, mu_dtype=jnp.bfloat16), "optax", 26),
    "adamx.adam reference (update + apply_updates)": (lambda: adamx.adam(LR), "ref", 28),
    "adamx.adamw global_clipnorm reference": (lambda: adamx.adamw(LR, 0.01, global_clipnorm=1.0), "ref", 32),
    "adamx.adam amsgrad reference": (lambda: adamx.adam(LR, amsgrad=True), "ref", 36),
    "adamx.adam reference, flat state": (lambda: adamx.adam(LR, flat_state=True), "ref", 28),
    "adamx.adam fused": (lambda: adamx.adam(LR), "fused", 28),
    "adamx.adamw fused": (lambda: adamx.adamw(LR, 0.01), "fused", 28),
    "adamx.adamw global_clipnorm fused": (lambda: adamx.adamw(LR, 0.01, global_clipnorm=1.0), "fused", 32),
    "adamx.adam amsgrad fused": (lambda: adamx.adam(LR, amsgrad=True), "fused", 36),
    "adamx.adam use_ema fused": (lambda: adamx.adam(LR, use_ema=True), "fused", 36),
    "adamx.adam bf16 moments fused": (
        lambda: adamx.adam(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "fused",
        20,
    ),
    # sumsq pass reads g and acc (8, real steps only), update reads 7 and writes 6 buffers (52)
    "adamx full Keras set fused": (full_keras, "fused", 56),
    "adamx.adam fused, flat state": (lambda: adamx.adam(LR, flat_state=True), "fused", 28),
    "adamx.adamw global_clipnorm fused, flat state": (
        lambda: adamx.adamw(LR, 0.01, global_clipnorm=1.0, flat_state=True),
        "fused",
        32,
    ),
    "adamx full Keras set fused, flat state": (lambda: full_keras(flat_state=True), "fused", 56),
}
# Pairs (competitor, baseline) whose paired ratio is reported.
PAIRS = [
    ("adamx.adam fused", "optax.adam"),
    ("adamx.adam fused", "torch Adam fused"),
    ("adamx.adam fused", "adamx.adam reference (update + apply_updates)"),
    ("adamx.adamw fused", "optax.adamw"),
    ("adamx.adamw global_clipnorm fused", "optax clip_by_global_norm + adamw"),
    ("adamx.adam amsgrad fused", "optax.amsgrad"),
    ("adamx.adam bf16 moments fused", "optax.adam mu_dtype=bf16"),
    ("adamx.adam bf16 moments fused", "adamx.adam fused"),
    ("adamx.adam use_ema fused", "adamx.adam fused"),
    ("adamx.adam fused (not donated)", "adamx.adam fused"),
    ("optax.adam (not donated)", "optax.adam"),
    ("adamx.adam fused", "keras Adam (JAX, stateless_apply)"),
    ("adamx.adam fused", "dispatch floor (identity step, same buffers)"),
    ("adamx.adam fused, flat state", "optax.adam"),
    ("adamx.adam reference, flat state", "adamx.adam reference (update + apply_updates)"),
    ("adamx.adamw global_clipnorm fused, flat state", "optax clip_by_global_norm + adamw"),
    ("adamx full Keras set fused, flat state", "optax.adam"),
    ("adamx.adam fused, flat state", "dispatch floor, flat state (identity step, same buffers)"),
    ("dispatch floor, flat state (identity step, same buffers)", "optax.adam"),
    ("optax.adam", "dispatch floor (identity step, same buffers)"),
]


def build_runners(
    names: list[str], shapes: Any, grads: Any, extra: tuple[str, ...] = (), inner: int = 1
) -> list[H.Runner]:
    runners = []
    for name in names:
        factory, kind, traffic = JAX_COMPETITORS[name]
        tx = factory()
        params = H.make_tree(shapes, seed=0)
        state = tx.init(params)
        step = H.fused_step(tx) if kind == "fused" else H.optax_step(tx)
        runners.append(H.jax_runner(name, step, params, state, grads, traffic=traffic, group=kind, inner=inner))
    leaves = H.shape_leaves(shapes)
    if "not donated" in extra:
        for name, factory, kind in (
            ("adamx.adam fused (not donated)", lambda: adamx.adam(LR), "fused"),
            ("optax.adam (not donated)", lambda: optax.adam(LR, eps=OPTAX_EPS), "optax"),
        ):
            tx = factory()
            params = H.make_tree(shapes, seed=0)
            step = H.fused_step(tx) if kind == "fused" else H.optax_step(tx)
            runners.append(H.jax_runner(name, step, params, tx.init(params), grads, traffic=28, donate=False))
    if "floor" in extra:
        # What any jitted step over these buffers costs with no work: JAX dispatch of the
        # donated params + state (and grads) in, params + state out.
        params = H.make_tree(shapes, seed=0)
        tx = adamx.adam(LR)

        def identity(p, s, g):
            return p, s._replace(count=s.count + 1)

        runners.append(
            H.jax_runner("dispatch floor (identity step, same buffers)", identity, params, tx.init(params), grads)
        )
        params = H.make_tree(shapes, seed=0)
        tx = adamx.adam(LR, flat_state=True)
        runners.append(
            H.jax_runner(
                "dispatch floor, flat state (identity step, same buffers)", identity, params, tx.init(params), grads
            )
        )
    if "torch" in extra:
        for fused in (False, True):
            r = H.torch_runner(f"torch Adam {'fused' if fused else 'foreach'}", leaves, fused=fused, inner=inner)
            if r is not None:
                runners.append(r)
    if "keras" in extra:
        r = H.keras_runner("keras Adam (JAX, stateless_apply)", leaves)
        if r is not None:
            runners.append(r)
    return runners


def time_case(label: str, shapes: Any, names: list[str], rounds: int, extra: tuple[str, ...], inner: int = 1) -> dict:
    """Time the competitors on one tree; ``inner`` steps per call (see harness.jax_runner).

    The roofline stream moves as many bytes as an Adam step on this tree (28 B/param,
    i.e. a buffer of 3.5 floats per param read and written), at least 64 MB and at most
    256 MB, so it never fits in the caches.
    """
    n = H.n_params(shapes)
    stream_n = int(min(max(3.5 * n, 16 * 2**20), 64 * 2**20))
    grads = H.make_tree(shapes, seed=1, scale=0.01)
    t0 = time.perf_counter()
    runners = [H.stream_runner(stream_n, inner=inner)] + build_runners(names, shapes, grads, extra, inner)
    times = H.interleave(runners, rounds)
    times = {k: [t / inner for t in v] for k, v in times.items()}
    bw = [8 * stream_n / t for t in times[runners[0].name]]  # bytes/s, per round
    rows = {}
    for r in runners:
        ts = times[r.name]
        row: dict[str, Any] = {"ms": H.summary([t * 1e3 for t in ts]), "traffic": r.traffic, "group": r.group}
        if r.traffic:
            row["roofline_pct"] = H.summary([100 * r.traffic * n / b / t for b, t in zip(bw, ts)])
        rows[r.name] = row
    pairs = {}
    for a, b in PAIRS:
        if a in times and b in times:
            pairs[f"{a} / {b}"] = H.paired(times[a], times[b])
    H.close_all(runners)
    del grads
    out = {
        "label": label,
        "params": n,
        "leaves": len(H.shape_leaves(shapes)),
        "rounds": rounds,
        "inner": inner,
        "bandwidth_GBps": H.summary([b / 1e9 for b in bw]),
        "rows": rows,
        "pairs": pairs,
        "seconds": time.perf_counter() - t0,
    }
    print(f"[{label}] done in {out['seconds']:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------ compile time (subprocess per measurement)
COMPILE_KINDS: dict[str, Callable[[], tuple[Any, str]]] = {
    "floor: identity step over the adam state": lambda: (adamx.adam(LR), "identity"),
    "floor: identity step over the full Keras state": lambda: (full_keras(), "identity"),
    "optax.adam": lambda: (optax.adam(LR, eps=OPTAX_EPS), "optax"),
    "optax clip_by_global_norm + adamw": lambda: (optax_clip_adamw(), "optax"),
    "adamx reference, adam": lambda: (adamx.adam(LR), "ref"),
    "adamx reference, full Keras set": lambda: (full_keras(), "ref"),
    "adamx reference flat state, adam": lambda: (adamx.adam(LR, flat_state=True), "ref"),
    "adamx reference flat state, full Keras set": lambda: (full_keras(flat_state=True), "ref"),
    "adamx fused, adam": lambda: (adamx.adam(LR), "fused"),
    "adamx fused, full Keras set": lambda: (full_keras(), "fused"),
    "floor: identity step over the flat full Keras state": lambda: (full_keras(flat_state=True), "identity"),
    "adamx fused flat state, adam": lambda: (adamx.adam(LR, flat_state=True), "fused"),
    "adamx fused flat state, full Keras set": lambda: (full_keras(flat_state=True), "fused"),
}


# Kinds also compiled with 1000 leaves of distinct sizes: XLA:CPU compiles a loop once for all
# leaves of one shape, so equal leaves flatter per-leaf (tree-state) steps.
DISTINCT_KINDS = [
    "optax.adam",
    "adamx reference, adam",
    "adamx reference flat state, adam",
    "adamx reference, full Keras set",
    "adamx reference flat state, full Keras set",
    "adamx fused, full Keras set",
    "adamx fused flat state, full Keras set",
]


def compile_one(kind: str, leaves: int, distinct: bool = False) -> None:
    """Compile one step in this process; ``distinct``: leaf i has 4096 + i params."""
    tx, mode = COMPILE_KINDS[kind]()
    if distinct:  # numpy: jax.random would compile once per distinct shape
        rng = np.random.default_rng(0)
        params = {f"w{i:05d}": jnp.asarray(rng.standard_normal(4096 + i, np.float32)) for i in range(leaves)}
        grads = {k: jnp.asarray(0.01 * rng.standard_normal(v.shape, np.float32)) for k, v in params.items()}
    else:
        shapes = {f"w{i:05d}": (4096,) for i in range(leaves)}
        params = H.make_tree(shapes, 0)
        grads = H.make_tree(shapes, 1, 0.01)
    state = tx.init(params)
    step = H.fused_step(tx) if mode == "fused" else H.optax_step(tx)
    if mode == "identity":  # what passing these buffers through a jitted, donated step costs

        def step(p, s, g):
            return p, s._replace(count=s.count + 1)

    if mode == "fused":
        _fused.available()  # the kernel build is cached on disk; not part of the compile time
    t0 = time.perf_counter()
    jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def compile_times(sizes: list[int], kinds: dict[int, list[str]], timeout: float, distinct: bool = False) -> dict:
    res: dict[str, dict[int, Any]] = {}
    for leaves in sizes:
        for kind in kinds[leaves]:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--compile-one",
                kind,
                f"{leaves}{'d' if distinct else ''}",
            ]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                val: Any = json.loads(r.stdout.strip().splitlines()[-1])["seconds"] if r.returncode == 0 else "error"
                if val == "error":
                    print(r.stderr[-2000:], file=sys.stderr)
            except subprocess.TimeoutExpired:
                val = f"timed out (>{timeout:.0f} s)"
            res.setdefault(kind, {})[leaves] = val
            print(
                f"[compile] {kind} @ {leaves}{' distinct' if distinct else ''} leaves: {val if isinstance(val, str) else f'{val:.2f} s'}",
                flush=True,
            )
    return res


# ------------------------------------------------------------------ memory
def memory_table(n: int) -> dict:
    shapes = {"w": (n,)}
    params, grads = H.make_tree(shapes, 0), H.make_tree(shapes, 1, 0.01)
    out = {}
    for name in (
        "optax.adam",
        "optax clip_by_global_norm + adamw",
        "adamx.adam reference (update + apply_updates)",
        "adamx.adamw global_clipnorm reference",
        "adamx.adam fused",
        "adamx.adamw global_clipnorm fused",
        "adamx.adam amsgrad fused",
        "adamx.adam bf16 moments fused",
        "adamx full Keras set fused",
    ):
        factory, kind, _ = JAX_COMPETITORS[name]
        tx = factory()
        step = H.fused_step(tx) if kind == "fused" else H.optax_step(tx)
        out[name] = H.memory_per_param(step, params, tx.init(params), grads, n)
    return out


# ------------------------------------------------------------------ report
def fmt_ms(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def fmt_ratio(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def case_md(c: dict) -> str:
    bw = c["bandwidth_GBps"]
    lines = [
        f"### {c['label']}",
        "",
        f"{c['params']:,} params in {c['leaves']} leaves, float32, {c['rounds']} interleaved rounds. "
        f"Roofline bandwidth (same run): {bw['median']:.1f} GB/s (range {bw['min']:.1f}-{bw['max']:.1f}).",
        "",
        "| competitor | ms/step median (min-max) | min traffic B/param | % of roofline median (min-max) |",
        "|---|---|---|---|",
    ]
    for name, r in c["rows"].items():
        pct = fmt_ratio(r["roofline_pct"]) if "roofline_pct" in r else "-"
        lines.append(f"| {name} | {fmt_ms(r['ms'])} | {r['traffic'] or '-'} | {pct} |")
    if c["pairs"]:
        lines += ["", "| paired ratio (time a / time b) | median (min-max) |", "|---|---|"]
        for k, v in c["pairs"].items():
            lines.append(f"| {k} | {fmt_ratio(v)} |")
    return "\n".join(lines) + "\n"


def targets_md(res: dict) -> str:
    """The targets of the performance work, checked against this run's numbers."""
    cases = {c["label"]: c for c in res["cases"]}

    def row(case: str, name: str, key: str = "roofline_pct") -> Any:
        r = cases.get(case, {}).get("rows", {}).get(name)
        return None if r is None or key not in r else r[key]["median"]

    def pair(case: str, a: str, b: str) -> Any:
        p = cases.get(case, {}).get("pairs", {}).get(f"{a} / {b}")
        return None if p is None else p["median"]

    def ok(v: Any, good: bool) -> str:
        return "n/a" if v is None else ("met" if good else "NOT met")

    out = ["| target | this run | status |", "|---|---|---|"]

    def add(target: str, v: Any, shown: Callable[[float], str], good: Callable[[float], bool]) -> None:
        if v is not None:
            out.append(f"| {target} | {shown(v)} | {ok(v, good(v))} |")

    pct = lambda v: f"{v:.0f}%"  # noqa: E731
    ratio = lambda v: f"{v:.2f}"  # noqa: E731
    times = lambda v: f"{v:.2f}x"  # noqa: E731
    big = [c for c in ("one 16M-param leaf", "one 64M-param leaf") if c in cases]
    for c in big:
        for name in ("adamx.adam fused", "adamx.adamw fused"):
            add(f"{name}, {c}: >= 85% of roofline", row(c, name), pct, lambda v: v >= 85)
        fused, clip = "adamx.adam fused", "adamx.adamw global_clipnorm fused"
        add(f"{c}: adamx/optax.adam <= 0.75 (paired)", pair(c, fused, "optax.adam"), ratio, lambda v: v <= 0.75)
        add(
            f"{c}: no slower than torch fused (paired ratio <= ~1)",
            pair(c, fused, "torch Adam fused"),
            ratio,
            lambda v: v <= 1.05,
        )
        add(f"{c}: global_clipnorm + wd >= 75% of its 32 B/param", row(c, clip), pct, lambda v: v >= 75)
        add(
            f"{c}: clip + wd >= 2x faster than optax's chain",
            pair(c, clip, "optax clip_by_global_norm + adamw"),
            lambda v: f"{1 / v:.1f}x",
            lambda v: v <= 0.5,
        )
        add(f"{c}: AMSGrad >= 75% of its 36 B/param", row(c, "adamx.adam amsgrad fused"), pct, lambda v: v >= 75)
        add(
            f"{c}: EMA costs only its read+write (36/28 = 1.29x)",
            pair(c, "adamx.adam use_ema fused", fused),
            times,
            lambda v: v <= 1.36,
        )
        add(
            f"{c}: bf16 moments save time (20/28 = 0.71x)",
            pair(c, "adamx.adam bf16 moments fused", fused),
            times,
            lambda v: v < 0.9,
        )
    for c in [c for c in cases if c.startswith("1000 leaves")]:
        for name in ("adamx.adam fused", "adamx.adam fused, flat state", "adamx full Keras set fused, flat state"):
            add(f"{c}: {name} / optax.adam <= 0.35", pair(c, name, "optax.adam"), ratio, lambda v: v <= 0.35)
        v = pair(c, "dispatch floor, flat state (identity step, same buffers)", "optax.adam")
        if v is not None:
            out.append(f"| {c}: (for scale) a step that does nothing, flat state / optax.adam | {v:.2f} | - |")
    comp = res.get("compile", {})
    for kind in (
        "adamx fused, adam",
        "adamx fused, full Keras set",
        "adamx fused flat state, adam",
        "adamx fused flat state, full Keras set",
    ):
        d = comp.get(kind, {})
        for leaves, limit in ((1000, 1.5), (4000, 10.0)):
            v = d.get(leaves)
            if isinstance(v, (int, float)):
                out.append(f"| compile, {kind}, {leaves} leaves: <= {limit} s | {v:.1f} s | {ok(v, v <= limit)} |")
            elif v is not None:
                out.append(f"| compile, {kind}, {leaves} leaves: <= {limit} s | {v} | NOT met |")
    mem = res.get("memory", {}).get("adamx.adam fused")
    if mem:
        v = mem["peak_above_pg_B"]
        out.append(f"| fp32 Adam peak above params+grads <= 8.7 B/param | {v:.2f} | {ok(v, v <= 8.7)} |")
    mem16 = res.get("memory", {}).get("adamx.adam bf16 moments fused")
    if mem and mem16:
        out.append(
            f"| bf16 moments save memory | state {mem16['state_B']:.0f} vs {mem['state_B']:.0f} B/param |"
            f" {ok(1, mem16['state_B'] < mem['state_B'])} |"
        )
    clipmem = res.get("memory", {}).get("adamx.adamw global_clipnorm fused")
    if clipmem:
        v = clipmem["temp_B"] + clipmem["unaliased_out_B"]
        out.append(f"| clip + wd: no full-size temporaries | {v:.2f} B/param of temporaries | {ok(v, v < 0.01)} |")
    return "\n".join(out) + "\n"


def write_report(res: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    m = res["machine"]
    md = [
        "# adamx benchmark results",
        "",
        f"- date: {res['date']}",
        f"- command: `{res['command']}` (mode: {res['mode']}, total {res['seconds']:.0f} s)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; {m['caches']}",
        f"- platform: {m['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- fused kernel: {res['fused_status']}",
        "",
        "Roofline: a jitted, donated, in-place `x = x * a + b` over float32 (XLA, all cores), timed",
        "in every round next to the competitors; bandwidth = 8 bytes/element / time. A competitor's",
        "roofline time is its minimum traffic (bytes/param, column 'min traffic') / that bandwidth.",
        "Adam must read params, grads, mu, nu and write params, mu, nu: 28 B/param in float32;",
        "+4 to read the grads again for a global norm (32), +8 for nu_max (36) or an EMA (36).",
        "",
    ]
    md += ["## Targets", "", targets_md(res), "## Timings", ""]
    md += [case_md(c) for c in res["cases"]]
    if res.get("compile"):
        sizes = sorted({s for d in res["compile"].values() for s in d})
        md += ["### Compile time (lower + compile of the jitted, donated step, fresh process)", ""]
        md += ["| step | " + " | ".join(f"{s} leaves" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for kind, d in res["compile"].items():
            cells = ["-" if s not in d else (d[s] if isinstance(d[s], str) else f"{d[s]:.2f} s") for s in sizes]
            md.append(f"| {kind} | " + " | ".join(cells) + " |")
        md.append("")
    if res.get("compile_distinct"):
        md += [
            "### Compile time, 1000 leaves of distinct sizes (leaf i: 4096 + i params)",
            "",
            "XLA:CPU compiles a loop once for all leaves of one shape; here no two leaves share one.",
            "",
            "| step | 1000 distinct leaves |",
            "|---|---|",
        ]
        for kind, d in res["compile_distinct"].items():
            v = d.get(1000, "-")
            md.append(f"| {kind} | {v if isinstance(v, str) else f'{v:.2f} s'} |")
        md.append("")
    if res.get("memory"):
        md += [
            f"### Memory (compiled memory_analysis, one {res['memory_n']:,}-param float32 leaf, donated)",
            "",
            "| step | state B/param | temporaries B/param | outputs not aliased B/param | peak above params+grads B/param |",
            "|---|---|---|---|---|",
        ]
        for k, v in res["memory"].items():
            md.append(
                f"| {k} | {v['state_B']:.2f} | {v['temp_B']:.2f} | {v['unaliased_out_B']:.2f} | {v['peak_above_pg_B']:.2f} |"
            )
        md.append("")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    chart(res, os.path.join(out_dir, "chart.png"))


def chart(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in res["cases"] if any("roofline_pct" in r for r in c["rows"].values())]
    npanel = max(len(cases) + (1 if res.get("compile") else 0), 1)
    ncol = min(npanel, 4)
    nrow = -(-npanel // ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 6.5 * nrow), squeeze=False)
    flat_axes = list(grid.ravel())
    for ax in flat_axes[npanel:]:
        ax.set_visible(False)
    axes = [flat_axes[:npanel]]
    colors = {"fused": "tab:green", "ref": "tab:olive", "optax": "tab:blue", "torch": "tab:red", "keras": "tab:purple"}
    for ax, c in zip(axes[0], cases):
        names = [k for k, r in c["rows"].items() if "roofline_pct" in r]
        vals = [c["rows"][k]["roofline_pct"]["median"] for k in names]
        ax.barh(range(len(names)), vals, color=[colors.get(c["rows"][k]["group"], "gray") for k in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="k", lw=0.8)
        ax.axvline(85, color="k", lw=0.5, ls="--")
        ax.set_xlabel("% of roofline (own minimum traffic)")
        ax.set_title(c["label"], fontsize=9)
    if res.get("compile"):
        ax = axes[0][-1]
        for kind, d in res["compile"].items():
            xs = [s for s in sorted(d) if not isinstance(d[s], str)]
            ax.plot(xs, [d[s] for s in xs], marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("leaves")
        ax.set_ylabel("compile seconds")
        ax.set_title("compile time", fontsize=9)
        ax.legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"adamx benchmarks ({res['mode']}): {m['cpu']}, {m['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds (a few minutes)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results, or results/quick)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument(
        "--replot", metavar="RESULTS_JSON", help="only rewrite results.md and chart.png from a results.json"
    )
    ap.add_argument("--compile-one", nargs=2, metavar=("KIND", "LEAVES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_one:
        kind, leaves = args.compile_one
        compile_one(kind, int(leaves.rstrip("d")), distinct=leaves.endswith("d"))
        return
    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        for key in ("compile", "compile_distinct"):
            res[key] = {k: {int(n): v for n, v in d.items()} for k, d in res.get(key, {}).items()}
        write_report(res, os.path.dirname(os.path.abspath(args.replot)))
        return
    t_start = time.perf_counter()
    quick = args.quick
    if args.out is None:
        args.out = os.path.join(HERE, "results", "quick") if quick else os.path.join(HERE, "results")
    t0 = time.perf_counter()
    ok = _fused.available()
    status = (
        f"built and loaded in {time.perf_counter() - t0:.1f} s" if ok else f"UNAVAILABLE ({_fused.status()['error']})"
    )
    print(f"fused kernel: {status}", flush=True)
    res: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "command": "python " + " ".join(sys.argv),
        "machine": H.machine_info(),
        "fused_status": status,
        "cases": [],
    }
    all_big = list(JAX_COMPETITORS)
    small_set = [
        "optax.adam",
        "optax clip_by_global_norm + adamw",
        "adamx.adam reference (update + apply_updates)",
        "adamx.adam fused",
        "adamx.adamw global_clipnorm fused",
    ]
    # 1. one large leaf
    res["cases"].append(
        time_case(
            "one 16M-param leaf",
            {"w": (16 * 2**20,)},
            all_big,
            9 if quick else 25,
            ("torch", "keras", "not donated"),
        )
    )
    big = 64 * 2**20
    if H.available_gb() > 10:
        names = (
            small_set
            if quick
            else [*small_set, "optax.adamw", "adamx.adamw fused", "adamx.adam amsgrad fused", "optax.amsgrad"]
        )
        res["cases"].append(time_case("one 64M-param leaf", {"w": (big,)}, names, 5 if quick else 12, ("torch",)))
    else:
        print("skipping the 64M leaf: not enough free memory", flush=True)
    # 2. GPT-2-small-shaped tree (148 leaves)
    width = 384 if quick or H.available_gb() < 18 else 768
    shapes = H.gpt2_shapes(width=width)
    label = "GPT-2-small-shaped tree" + (
        "" if width == 768 else f" at half width ({width}; scaled down for time/memory)"
    )
    names = [*small_set, "adamx.adamw fused", "adamx.adam fused, flat state"]
    res["cases"].append(time_case(label, shapes, names, 5 if quick else 12, ("torch",)))
    # 3. many small leaves
    many = {f"w{i:04d}": (4096,) for i in range(1000)}
    names = [
        "optax.adam",
        "optax clip_by_global_norm + adamw",
        "adamx.adam reference (update + apply_updates)",
        "adamx.adam fused",
        "adamx.adamw global_clipnorm fused",
        "adamx full Keras set fused",
        "adamx.adam fused, flat state",
        "adamx.adamw global_clipnorm fused, flat state",
        "adamx full Keras set fused, flat state",
    ]
    case = time_case(
        "1000 leaves x 4096 params",
        many,
        [*names, "adamx.adam reference, flat state"],
        7 if quick else 20,
        ("torch", "keras", "floor"),
    )
    amort = time_case(
        "1000 leaves x 4096 params, 10 steps per call (dispatch amortized)",
        many,
        names,
        5 if quick else 12,
        ("torch",),
        inner=10,
    )
    flat = time_case(
        "the same 4.1M params as one flat leaf, 10 steps per call",
        {"w": (4096 * 1000,)},
        ["optax.adam", "adamx.adam fused"],
        5 if quick else 12,
        ("torch",),
        inner=10,
    )
    case["single_flat_pass_ms"] = flat["rows"]["adamx.adam fused"]["ms"]
    res["cases"].append(case)
    res["cases"].append(amort)
    res["cases"].append(flat)
    # 4. compile time
    if not args.skip_compile:
        every = list(COMPILE_KINDS)
        if quick:
            at4000 = [
                "floor: identity step over the adam state",
                "optax.adam",
                "adamx fused, adam",
                "adamx fused, full Keras set",
                "floor: identity step over the flat full Keras state",
                "adamx fused flat state, adam",
                "adamx fused flat state, full Keras set",
            ]
            res["compile"] = compile_times([10, 1000, 4000], {10: every, 1000: every, 4000: at4000}, timeout=60)
        else:
            res["compile"] = compile_times([10, 1000, 4000], {10: every, 1000: every, 4000: every}, timeout=400)
        distinct = [k for k in DISTINCT_KINDS if not (quick and k == "adamx reference, full Keras set")]
        res["compile_distinct"] = compile_times([1000], {1000: distinct}, timeout=400, distinct=True)
    # 5. memory
    res["memory_n"] = 4 * 2**20
    res["memory"] = memory_table(res["memory_n"])
    res["seconds"] = time.perf_counter() - t_start
    write_report(res, args.out)
    print(f"wrote {args.out}/results.md, results.json, chart.png in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
