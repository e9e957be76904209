"""What stays by design (issue 19, part 4), with its size measured.

Four behaviours docs/reliability.md documents instead of changing:

* **NaN in an 8-bit block**: one NaN gradient element poisons its whole block of the 8-bit moments
  (``quantize_block_size``, default 256): how many params turn NaN, 8-bit vs float32 moments;
* **wide ranges inside a block**: a block holding one element 1 and the rest ``r``: the relative
  error of the small elements' update after 3 steps against float32 moments, per ``moment_format``;
* **an unbounded loss scale**: ``loss_scale_optimizer`` without ``min_scale``/``max_scale``: how many
  non-finite steps halve ``2**15`` to 0, how many growth periods double it to inf, and what a finite
  step does then;
* **a transform after ``param_rounding``**: ``optax.chain(adamx.adam(param_rounding="kahan"),
  optax.scale(0.5))`` on bfloat16 params against the intended float32 trajectory (``adam(lr / 2)``).

Writes ``benchmarks/results/by_design.md``::

    PYTHONPATH=. python benchmarks/by_design.py
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx

OUT = os.path.join(os.path.dirname(__file__), "results", "by_design.md")


def _run(opt: optax.GradientTransformation, p: dict, grads: list[dict]) -> dict:
    s = opt.init(p)
    step = jax.jit(opt.update)
    for g in grads:
        u, s = step(g, s, p)
        p = optax.apply_updates(p, u)
    return p


def nan_block() -> list[str]:
    n = 4096
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.standard_normal(n).astype(np.float32))}
    clean = [{"w": jnp.asarray(rng.standard_normal(n).astype(np.float32))} for _ in range(3)]
    bad = {"w": clean[0]["w"].at[1000].set(jnp.nan)}
    rows = ["| moments | NaN params after 1 clean + 1 NaN + 1 clean step (of 4096) |", "|---|---:|"]
    options: tuple[tuple[str, dict[str, Any]], ...] = (
        ("float32", {}),
        ("8-bit, block 256", {"quantize_moments": True, "quantize_min_size": 1}),
        ("8-bit, block 64", {"quantize_moments": True, "quantize_min_size": 1, "quantize_block_size": 64}),
    )
    for name, kw in options:
        out = _run(adamx.adam(1e-3, **kw), p, [clean[1], bad, clean[2]])
        rows.append(f"| {name} | {int(jnp.sum(jnp.isnan(out['w'])))} |")
    return rows


def wide_range() -> list[str]:
    rng = np.random.default_rng(1)
    n = 256
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    mag = (0.5 + 0.5 * rng.random(n)).astype(np.float32)
    rows = [
        "| small/large ratio r | dynamic8 | fp8 | 4bit |",
        "|---:|---:|---:|---:|",
    ]
    for r in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        g = sign * mag * np.float32(r)
        g[0] = 1.0
        grads = [{"w": jnp.asarray(g * np.float32(1 + 0.1 * i))} for i in range(3)]
        p = {"w": jnp.zeros(n, jnp.float32)}
        want = np.asarray(_run(adamx.adam(1e-3), p, grads)["w"])[1:]
        cells = []
        for fmt in ("dynamic8", "fp8", "4bit"):
            kw: dict[str, Any] = {"quantize_moments": True, "quantize_min_size": 1, "moment_format": fmt}
            got = np.asarray(_run(adamx.adam(1e-3, **kw), p, grads)["w"])[1:]
            rel = np.abs(got - want) / np.abs(want)
            cells.append(f"{np.median(rel):.2g} (max {np.max(rel):.2g})")
        rows.append(f"| {r:g} | " + " | ".join(cells) + " |")
    return rows


def loss_scale() -> list[str]:
    p = {"w": jnp.ones(4)}
    nan_g = {"w": jnp.full(4, jnp.nan)}
    ok_g = {"w": jnp.ones(4)}
    opt = adamx.loss_scale_optimizer(adamx.adam(1e-3), initial_scale=2.0**15)
    step = jax.jit(opt.update)
    s = opt.init(p)
    n_down = 0
    while float(adamx.loss_scale(s)) > 0 and n_down < 1000:
        _, s = step(nan_g, s, p)
        n_down += 1
    # at scale 0 the scaled loss is 0, its gradients finite zeros: the step is not skipped (the
    # finiteness check is on the scaled gradients, as Keras's) and the inner optimizer gets 0 / 0 = NaN
    skipped0 = int(s.skipped_steps)
    p0 = p
    for _ in range(3):
        u, s = step({"w": jnp.zeros(4)}, s, p0)
        p0 = optax.apply_updates(p0, u)
    stuck_low = int(s.skipped_steps) - skipped0
    nan_low = int(jnp.sum(jnp.isnan(p0["w"])))
    scale_low = float(adamx.loss_scale(s))
    up = adamx.loss_scale_optimizer(adamx.adam(1e-3), initial_scale=2.0**15, dynamic_growth_steps=1)
    ustep = jax.jit(up.update)
    s = up.init(p)
    n_up = 0
    while np.isfinite(float(adamx.loss_scale(s))) and n_up < 1000:
        _, s = ustep(ok_g, s, p)
        n_up += 1
    # at scale inf the scaled loss and gradients are inf or NaN: every step is skipped, inf / 2 = inf
    before = int(s.skipped_steps)
    for _ in range(3):
        _, s = ustep({"w": jnp.full(4, jnp.inf)}, s, p)
    return [
        "| what | measured |",
        "|---|---:|",
        f"| non-finite steps from 2**15 to a scale of exactly 0 | {n_down} |",
        f"| then: of 3 steps with finite (zero) scaled grads, skipped | {stuck_low} |",
        f"| then: NaN params (of 4) after those steps; scale after | {nan_low}; {scale_low} |",
        f"| growth periods (`dynamic_growth_steps` finite steps each) from 2**15 to inf | {n_up} |",
        f"| then: of 3 steps (scaled grads inf), skipped; scale after | {int(s.skipped_steps) - before}; "
        f"{float(adamx.loss_scale(s))} |",
    ]


def rescaled_rounding() -> list[str]:
    n, steps, lr = 1024, 300, 1e-3
    rng = np.random.default_rng(2)
    p32 = {"w": jnp.asarray((1.0 + rng.random(n)).astype(np.float32))}
    g = [{"w": jnp.asarray(rng.standard_normal(n).astype(np.float32))} for _ in range(steps)]
    want = np.asarray(_run(adamx.adam(lr / 2), p32, g)["w"], np.float64)
    pb = {"w": p32["w"].astype(jnp.bfloat16)}
    gb = [{"w": x["w"].astype(jnp.bfloat16)} for x in g]
    spacing = np.abs(want) * 2.0**-7  # one bfloat16 spacing at the param's magnitude (within 2x)
    rows = ["| bfloat16 params, 300 steps, intent: adam(lr/2) in float32 | mean error (bf16 spacings) |", "|---|---:|"]
    for name, opt in (
        ('adam(lr/2, param_rounding="kahan")', adamx.adam(lr / 2, param_rounding="kahan")),
        ("adam(lr/2) (nearest)", adamx.adam(lr / 2)),
        (
            'chain(adam(lr, param_rounding="kahan"), scale(0.5))',
            optax.chain(adamx.adam(lr, param_rounding="kahan"), optax.scale(0.5)),
        ),
    ):
        got = np.asarray(_run(opt, pb, gb)["w"].astype(jnp.float32), np.float64)
        rows.append(f"| `{name}` | {np.mean(np.abs(got - want) / spacing):.3f} |")
    moved = np.mean(np.abs(want - np.asarray(p32["w"])) / spacing)
    rows.append(f"| (the intended total move) | {moved:.3f} |")
    return rows


def main() -> None:
    sections = {
        "One NaN gradient element, 8-bit vs float32 moments": nan_block(),
        "Relative error of the small elements' update in a block with one element 1 (3 steps)": wide_range(),
        "An unbounded loss scale (`min_scale`/`max_scale` unset, Keras's behaviour)": loss_scale(),
        "A transform after `param_rounding` that rescales `u`": rescaled_rounding(),
    }
    text = [
        "# What stays by design, measured",
        "",
        f"`PYTHONPATH=. python benchmarks/by_design.py`, jax {jax.__version__}, {jax.devices()[0].platform}.",
        "",
    ]
    for title, rows in sections.items():
        text += [f"## {title}", "", *rows, ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
