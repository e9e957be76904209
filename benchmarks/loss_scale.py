"""float16 training with dynamic loss scaling (adamx.loss_scale_optimizer) vs float32: the digits MLP.

    PYTHONPATH=. python benchmarks/loss_scale.py [--steps 3000] [--out benchmarks/results]

sklearn's bundled ``load_digits`` (1797 8x8 images, no download), pixels / 16, a fixed
1500/297 train/test split; an MLP 64-256-256-10 (tanh), softmax cross-entropy, batch 64,
``adamx.adam(1e-3)``. Every run starts from the same float32 init (cast to the run's
dtype) and sees the same batches. Runs:

* ``float32``: float32 params and compute (the target);
* ``float16, no scaling``: float16 params and compute, gradients as they come;
* ``float16 + loss_scale_optimizer``: the same, the loss multiplied by
  ``adamx.loss_scale(state)`` (Keras defaults: initial scale 2**15, growth every 2000 steps),
  and with ``dynamic_growth_steps=100`` (more growth, more overflows and skips);
* ``float32 params, float16 compute``, without and with ``loss_scale_optimizer``: Keras's
  ``mixed_float16`` recipe (float32 variables, float16 forward/backward).

The loss is computed in float32 from float16 logits (as Keras's mixed precision does).
"Final loss" is the full-train-set loss of the final params, evaluated in float32 (params
cast up), so every run is measured the same way. Also reported: skipped steps, the final
scale, and how many gradient entries a float16 backward pass loses to underflow (zero in
float16, non-zero in float32) at the final params without and with the scale.
Writes ``loss_scale.md`` and ``loss_scale.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # harness.machine_info reads keras's version

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import adamx  # noqa: E402

F16, F32 = jnp.float16, jnp.float32
SIZES = (64, 256, 256, 10)
BATCH, LR, SEED = 64, 1e-3, 0


def data():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(SEED).permutation(len(x))
    tr, te = perm[:1500], perm[1500:]
    return x[tr], y[tr], x[te], y[te]


def init_params(seed: int = SEED) -> list[dict[str, jax.Array]]:
    r = np.random.default_rng(seed)
    return [
        {"w": jnp.asarray(r.standard_normal((i, o)) / np.sqrt(i), F32), "b": jnp.zeros(o, F32)}
        for i, o in zip(SIZES[:-1], SIZES[1:])
    ]


def forward(params, x, compute):
    h = x.astype(compute)
    for i, layer in enumerate(params):
        h = h @ layer["w"].astype(compute) + layer["b"].astype(compute)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h.astype(F32)  # float32 softmax cross-entropy, as Keras mixed precision


def loss_fn(params, x, y, compute):
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x, compute), y).mean()


def make_step(tx, compute, scaled):
    def step(params, state, x, y):
        s = adamx.loss_scale(state) if scaled else jnp.float32(1.0)
        grads = jax.grad(lambda p: loss_fn(p, x, y, compute) * s)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


RUNS = {
    "float32": dict(param=F32, compute=F32, lso=None),
    "float16, no scaling": dict(param=F16, compute=F16, lso=None),
    "float16 + loss_scale_optimizer (Keras defaults)": dict(param=F16, compute=F16, lso={}),
    "float16 + loss_scale_optimizer (dynamic_growth_steps=100)": dict(
        param=F16, compute=F16, lso={"dynamic_growth_steps": 100}
    ),
    "float16 + loss_scale_optimizer + param_rounding='kahan'": dict(param=F16, compute=F16, lso={}, rounding="kahan"),
    "float16 + loss_scale_optimizer + param_rounding='stochastic'": dict(
        param=F16, compute=F16, lso={}, rounding="stochastic"
    ),
    "float32 params, float16 compute, no scaling": dict(param=F32, compute=F16, lso=None),
    "float32 params, float16 compute + loss_scale_optimizer (Keras mixed_float16)": dict(
        param=F32, compute=F16, lso={}
    ),
}


def underflow(params, x, y, scale: float) -> tuple[int, int]:
    """(# grad entries zero in a float16 backward but non-zero in float32, # non-zero in float32)."""
    p32 = jax.tree.map(lambda a: a.astype(F32), params)
    g32 = jax.grad(lambda p: loss_fn(p, x, y, F32))(p32)
    g16 = jax.grad(lambda p: loss_fn(p, x, y, F16) * scale)(jax.tree.map(lambda a: a.astype(F16), params))
    lost = sum(int(jnp.sum((a == 0) & (b != 0))) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)))
    nonzero = sum(int(jnp.sum(b != 0)) for b in jax.tree.leaves(g32))
    return lost, nonzero


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    xtr, ytr, xte, yte = data()
    order = np.random.default_rng(SEED + 1).integers(0, len(xtr), size=(args.steps, BATCH))
    eval_loss = jax.jit(lambda p: loss_fn(jax.tree.map(lambda a: a.astype(F32), p), xtr, ytr, F32))
    accuracy = jax.jit(
        lambda p: jnp.mean(jnp.argmax(forward(jax.tree.map(lambda a: a.astype(F32), p), xte, F32), -1) == yte)
    )
    results = {}
    for name, cfg in RUNS.items():
        params = jax.tree.map(lambda a: a.astype(cfg["param"]), init_params())
        tx = adamx.adam(LR, param_rounding=cfg.get("rounding", "nearest"))
        if cfg["lso"] is not None:
            tx = adamx.loss_scale_optimizer(tx, **cfg["lso"])
        state = tx.init(params)
        step = make_step(tx, cfg["compute"], cfg["lso"] is not None)
        curve, scales = [], []
        t0 = time.perf_counter()
        for t in range(args.steps):
            idx = order[t]
            params, state = step(params, state, xtr[idx], ytr[idx])
            if (t + 1) % 100 == 0:
                curve.append(float(eval_loss(params)))
                if cfg["lso"] is not None:
                    scales.append(float(state.scale))
        secs = time.perf_counter() - t0
        r = {
            "final_loss": curve[-1],
            "test_accuracy": float(accuracy(params)),
            "params_finite": all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in jax.tree.leaves(params)),
            "curve_every_100": curve,
            "seconds": secs,
        }
        if cfg["lso"] is not None:
            r.update(
                skipped_steps=int(state.skipped_steps),
                final_scale=float(state.scale),
                inner_count=int(state.inner_state.count),
                scale_every_100=scales,
            )
        if cfg["compute"] == F16:
            b = order[-1]
            lost0, nz = underflow(params, xtr[b], ytr[b], 1.0)
            lost_s, _ = underflow(params, xtr[b], ytr[b], 2.0**15)
            r.update(underflow_unscaled=lost0, underflow_scaled_2e15=lost_s, grad_nonzero_f32=nz)
        results[name] = r
        print(f"{name}: final loss {r['final_loss']:.4f}, test acc {r['test_accuracy']:.4f}, {secs:.1f}s", flush=True)
    write(args, results)


def write(args, results) -> None:
    info = harness.machine_info()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loss_scale.json"), "w") as f:
        json.dump({"machine": info, "steps": args.steps, "results": results}, f, indent=1)
        f.write("\n")
    ref = results["float32"]["final_loss"]
    lines = [
        "# float16 training with dynamic loss scaling: digits MLP",
        "",
        f"- command: `PYTHONPATH=. {info['command']}`",
        f"- machine: {info['cpu']}, {info['cores']} cores; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- model: MLP {'-'.join(map(str, SIZES))} (tanh), softmax cross-entropy in float32; sklearn load_digits, "
        f"1500 train / 297 test; batch {BATCH}, adamx.adam({LR}), {args.steps} steps, same init and batches for every run",
        "- final loss: full train set, float32 evaluation of the final params; underflow: gradient entries that are 0 in a "
        "float16 backward pass but not in float32, at the final params (one batch), without / with a 2**15 scale",
        "",
        "| run | final train loss | vs float32 | test accuracy | skipped steps | final scale | underflowed grads (no scale / 2**15) | seconds (incl. compile) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        skipped = f"{r['skipped_steps']} of {args.steps}" if "skipped_steps" in r else "—"
        scale = f"{r['final_scale']:g}" if "final_scale" in r else "—"
        uf = (
            f"{r['underflow_unscaled']} / {r['underflow_scaled_2e15']} of {r['grad_nonzero_f32']}"
            if "underflow_unscaled" in r
            else "—"
        )
        lines.append(
            f"| {name} | {r['final_loss']:.3e} | {r['final_loss'] / ref - 1:+.1%} | {r['test_accuracy']:.4f} | {skipped} | "
            f"{scale} | {uf} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        "Train loss every 500 steps:",
        "",
        "| step | " + " | ".join(results) + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    for i in range(4, len(results["float32"]["curve_every_100"]), 5):
        lines.append(
            f"| {(i + 1) * 100} | " + " | ".join(f"{r['curve_every_100'][i]:.3e}" for r in results.values()) + " |"
        )
    with open(os.path.join(args.out, "loss_scale.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
