"""Convergence with 8-bit Adam state, before the optimizer wiring: digits MLP, three kinds of moments.

Trains a pure-JAX MLP (64-256-256-10, ReLU) on scikit-learn's ``load_digits`` with
Keras-Adam (SEMANTICS.md 1.2) and its moments stored as

* ``float32``  - the reference,
* ``bfloat16`` - moments rounded to bfloat16 after every step (computed in float32),
* ``8-bit``    - ``adamx._quantize.adam_step_8bit`` per leaf: block-wise dynamic 8-bit
  codes (block 256) for leaves with >= 4096 elements, float32 for the smaller ones
  (``quantize_min_size=4096``: here the two 256x256/64x256 kernels are 8-bit, the
  biases and the 256x10 head stay float32),

with the same data, initialization and minibatch order (seeds 0, 1, 2). Writes
``benchmarks/results/quantized.md`` and ``quantized.png``. Also times one leaf step
(float32 moments vs 8-bit) as a ratio; informative only (this is the pure-JAX path, not
the fused kernel).

    PYTHONPATH=. python benchmarks/quantized_convergence.py [--steps 1500] [--seeds 3] [--out benchmarks/results]

``float32-textbook`` is a control: float32 moments updated as ``b1*m + (1-b1)*g`` (the
same math, rounded differently). Its distance from ``float32`` is how far float32 rounding
alone moves the final loss of this chaotic, over-fitting run; a storage format cannot be
judged more finely than that.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _quantize as Q

F32 = jnp.float32
MIN_SIZE = 4096
BLOCK = 256
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-7


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def init_params(key, sizes=(64, 256, 256, 10)):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        params.append({"w": jax.random.normal(k, (a, b), F32) * jnp.sqrt(F32(2.0 / a)), "b": jnp.zeros((b,), F32)})
    return params


def forward(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = forward(params, x)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])


def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(forward(params, x), axis=-1) == y)


# ---------------------------------------------------------------------------------- Adam variants


def keras_scalars(count):
    t = (count + 1).astype(F32)
    b1p, b2p = jnp.power(F32(B1), t), jnp.power(F32(B2), t)
    return (F32(LR) * jnp.sqrt(F32(1) - b2p)) / (F32(1) - b1p)


def float_step(g, p, m, v, count, store_dtype, textbook: bool = False):
    """Keras Adam with moments kept in ``store_dtype`` (computed in float32).

    ``textbook``: ``b1*m + (1-b1)*g`` instead of Keras' ``m + (g-m)*(1-b1)``: the same math
    rounded differently, a control for how far rounding alone moves the final loss.
    """
    alpha = keras_scalars(count)
    m32, v32 = m.astype(F32), v.astype(F32)
    if textbook:
        m32 = m32 * F32(B1) + g * np.float32(1 - B1)
        v32 = v32 * F32(B2) + (g * g) * np.float32(1 - B2)
    else:
        m32 = m32 + (g - m32) * np.float32(1 - B1)
        v32 = v32 + (g * g - v32) * np.float32(1 - B2)
    u = -((m32 * alpha) / (jnp.sqrt(v32) + F32(EPS)))
    return u, m32.astype(store_dtype), v32.astype(store_dtype)


def is_quantized(p) -> bool:
    return p.size >= MIN_SIZE


def init_state(params, kind: str):
    def one(p):
        if kind == "8bit" and is_quantized(p):
            return (
                Q.quantized_zeros(p, Q.SIGNED_DYNAMIC_MAP, BLOCK),
                Q.quantized_zeros(p, Q.UNSIGNED_DYNAMIC_MAP, BLOCK),
            )
        dt = jnp.bfloat16 if kind == "bfloat16" else F32
        return (jnp.zeros(p.shape, dt), jnp.zeros(p.shape, dt))

    return jax.tree.map(one, params)


def apply_step(params, grads, state, count, kind: str):
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    s_leaves = treedef.flatten_up_to(state)
    new_p, new_s = [], []
    for p, g, (m, v) in zip(p_leaves, g_leaves, s_leaves):
        if isinstance(m, Q.QuantizedArray):
            u, m, v = Q.adam_step_8bit(g, p, m, v, count=count, learning_rate=LR, epsilon=EPS, block_size=BLOCK)
        else:
            u, m, v = float_step(g, p, m, v, count, m.dtype, textbook=kind == "float32-textbook")
        new_p.append(p + u)
        new_s.append((m, v))
    return treedef.unflatten(new_p), treedef.unflatten(new_s)


def train(kind: str, seed: int, steps: int, batch: int, eval_every: int, data):
    (xtr, ytr), (xte, yte) = data
    params = init_params(jax.random.key(seed))
    state = init_state(params, kind)
    idx = np.random.default_rng(seed).integers(0, len(xtr), size=(steps, batch))
    xtr_j, ytr_j = jnp.asarray(xtr), jnp.asarray(ytr)

    def body(carry, i):
        params, state, count = carry
        xb, yb = xtr_j[i], ytr_j[i]
        grads = jax.grad(loss_fn)(params, xb, yb)
        params, state = apply_step(params, grads, state, count, kind)
        return (params, state, count + 1), None

    @jax.jit
    def chunk(params, state, count, ids):
        (params, state, count), _ = jax.lax.scan(body, (params, state, count), ids)
        return params, state, count, loss_fn(params, xtr_j, ytr_j)

    curve = []
    count = jnp.int32(0)
    for start in range(0, steps, eval_every):
        params, state, count, loss = chunk(params, state, count, jnp.asarray(idx[start : start + eval_every]))
        curve.append((start + eval_every, float(loss)))
    final = {
        "train_loss": float(loss_fn(params, xtr_j, ytr_j)),
        "test_loss": float(loss_fn(params, jnp.asarray(xte), jnp.asarray(yte))),
        "test_acc": float(accuracy(params, jnp.asarray(xte), jnp.asarray(yte))),
        "state_bytes_per_param": Q.bytes_per_param(state, params),
    }
    return curve, final


# ------------------------------------------------------------------------------------ one-leaf timing


def time_leaf(n: int = 4 * 1024 * 1024, repeats: int = 20) -> dict[str, Any]:
    key = jax.random.key(0)
    p = jax.random.normal(key, (n,), F32)
    g = jax.random.normal(jax.random.fold_in(key, 1), (n,), F32) * 1e-2
    m32, v32 = jnp.zeros_like(p), jnp.zeros_like(p)
    mq, vq = Q.quantized_zeros(p, Q.SIGNED_DYNAMIC_MAP, BLOCK), Q.quantized_zeros(p, Q.UNSIGNED_DYNAMIC_MAP, BLOCK)
    f32_step = jax.jit(lambda g, p, m, v, c: float_step(g, p, m, v, c, F32), donate_argnums=(2, 3))
    q_step = jax.jit(lambda g, p, m, v, c: Q.adam_step_8bit(g, p, m, v, count=c, learning_rate=LR, block_size=BLOCK))
    c = jnp.int32(3)

    def run(fn, m, v):
        out = fn(g, p, m, v, c)
        jax.block_until_ready(out)  # compile + warm
        times = []
        m, v = out[1], out[2]
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn(g, p, m, v, c)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            m, v = out[1], out[2]
        return float(np.median(times))

    # interleave to share the machine's noise
    t32a = run(f32_step, m32, v32)
    tqa = run(q_step, mq, vq)
    t32b = run(f32_step, jnp.zeros_like(p), jnp.zeros_like(p))
    tqb = run(q_step, mq, vq)
    t32, tq = min(t32a, t32b), min(tqa, tqb)
    return {"n": n, "f32_ms": t32 * 1e3, "q8_ms": tq * 1e3, "ratio": tq / t32}


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    data = load_data()
    kinds = ["float32", "float32-textbook", "bfloat16", "8bit"]
    curves: dict[str, list] = {k: [] for k in kinds}
    finals: dict[str, list] = {k: [] for k in kinds}
    for seed in range(args.seeds):
        for kind in kinds:
            curve, final = train(kind, seed, args.steps, args.batch, args.eval_every, data)
            curves[kind].append(curve)
            finals[kind].append(final)
            print(kind, seed, final, flush=True)
    timing = time_leaf()
    print("timing", timing)
    elapsed = time.perf_counter() - t_start
    write_results(args, curves, finals, timing, elapsed)


def write_results(args, curves, finals, timing, elapsed) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, style in zip(curves, ["-", "-.", "--", ":"]):
        steps = [s for s, _ in curves[kind][0]]
        mean = np.mean([[loss for _, loss in c] for c in curves[kind]], axis=0)
        ax.plot(steps, mean, style, label=f"{kind} moments", linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train cross-entropy (full train set, mean of seeds)")
    ax.set_title("digits MLP, Keras Adam, lr 1e-3: moment storage")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quantized.png"), dpi=120)

    ref = np.mean([f["train_loss"] for f in finals["float32"]])
    ref_test = np.mean([f["test_loss"] for f in finals["float32"]])
    lines = [
        "# 8-bit optimizer state: convergence (digits MLP) and one-leaf step time",
        "",
        "Produced by `PYTHONPATH=. python benchmarks/quantized_convergence.py"
        + (f" --steps {args.steps}" if args.steps != 1500 else "")
        + "` (pure-JAX per-leaf step `adamx._quantize.adam_step_8bit`, before the optimizer wiring).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.system()}; "
        f"Python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}. "
        f"Total run time {elapsed:.0f} s.",
        "",
        f"MLP 64-256-256-10 (ReLU), scikit-learn `load_digits` (1437 train / 360 test, pixels / 16), "
        f"Keras Adam lr {LR}, eps-hat {EPS}, minibatch {args.batch}, {args.steps} steps, seeds 0..{args.seeds - 1} "
        "(same init and batches for every kind). 8-bit: block 256, dynamic signed map for m, unsigned for v, "
        f"leaves with < {MIN_SIZE} elements in float32 (`quantize_min_size`); 8-bit leaves hold "
        "16384 + 65536 of the 85 002 parameters.",
        "",
        "| moments | train loss at step {early} | vs float32 | final train loss (mean ± sd) | vs float32 | final test loss | test accuracy | state bytes/param |",
        "|---|---|---|---|---|---|---|---|",
    ]
    early_i = max(0, len(curves["float32"][0]) // 5 - 1)
    early_step = curves["float32"][0][early_i][0]
    lines[-2] = lines[-2].replace("{early}", str(early_step))
    ref_early = np.mean([c[early_i][1] for c in curves["float32"]])
    for kind in finals:
        tr = np.array([f["train_loss"] for f in finals[kind]])
        te = np.array([f["test_loss"] for f in finals[kind]])
        acc = np.array([f["test_acc"] for f in finals[kind]])
        bpp = finals[kind][0]["state_bytes_per_param"]
        early = np.mean([c[early_i][1] for c in curves[kind]])
        lines.append(
            f"| {kind} | {early:.4f} | {100 * (early / ref_early - 1):+.2f}% | {tr.mean():.5f} ± {tr.std():.5f} | {100 * (tr.mean() / ref - 1):+.2f}% | "
            f"{te.mean():.4f} ({100 * (te.mean() / ref_test - 1):+.2f}%) | {100 * acc.mean():.2f}% | {bpp:.3f} |"
        )
    lines += [
        "",
        "Per seed (final train loss): "
        + "; ".join(f"{kind}: " + ", ".join(f"{f['train_loss']:.5f}" for f in finals[kind]) for kind in finals),
        "",
        "The final train loss is deep in the over-fitting regime (~4e-4); a relative difference there is a "
        "difference in how fast the net memorizes the last examples. The early column is the same runs "
        "while the loss is still falling steeply.",
        "",
        "`float32-textbook` is the noise floor: float32 moments updated as `b1*m + (1-b1)*g` instead of "
        "`m + (g-m)*(1-b1)`, the same math rounded differently. Differences from float32 smaller than its own "
        "cannot be attributed to the storage format.",
        "",
        "State bytes/param counts m and v of every leaf as stored (the small float32 leaves included); "
        "for a model where every leaf is 8-bit it is 2 + 8/256 = 2.03.",
        "",
        "![loss curves](quantized.png)",
        "",
        "## One leaf, one step (informative)",
        "",
        f"{timing['n']:,} float32 parameters, jitted, median of 20 after warm-up, better of two interleaved rounds: "
        f"float32 moments {timing['f32_ms']:.2f} ms, 8-bit moments {timing['q8_ms']:.2f} ms, "
        f"ratio 8-bit / float32 = **{timing['ratio']:.2f}x**. This is the pure-JAX reference path "
        "(a binary search per element, then a per-block max); the fused CPU kernel (phase 2) is where 8-bit "
        "should be faster than float32.",
        "",
    ]
    with open(os.path.join(args.out, "quantized.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
