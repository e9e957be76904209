"""A custom jitted train step with gradient clipping and weight decay that spares the biases.

Three parts:

1. What the clip options do to one gradient: ``clipnorm`` clips each tensor to the
   given L2 norm on its own (``adamx.clip_by_norm``), ``global_clipnorm`` scales all
   tensors together so that their joint norm is at most the threshold
   (``adamx.clip_by_global_norm``, same as ``optax.clip_by_global_norm``).
2. Weight decay with ``exclude_from_weight_decay=["bias"]``: with zero gradients one
   step multiplies every kernel by ``1 - lr * weight_decay`` and leaves every leaf
   whose key path (``dense1/bias``) matches the regex ``bias`` untouched.
3. A small MLP on noisy two-moons data with 5% outlier points (gradient spikes),
   trained with a hand-written ``jax.jit`` step, once with
   ``adamx.adam(global_clipnorm=1.0, weight_decay=1e-3, exclude_from_weight_decay=["bias"])``
   and once with per-tensor ``clipnorm=0.5`` instead; each prints how often clipping
   was active and the accuracy reached.

Exits with status 1 when a check fails. ``--smoke`` trains a few steps only (tests).

Run: ``python examples/custom_train_step_clipping.py``
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx

LR = 1e-2
WEIGHT_DECAY = 1e-3


def make_moons(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles with noise; 5% of the points are pushed far out (outliers)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    t = rng.uniform(0, np.pi, n)
    x = np.where(y[:, None] == 0, np.c_[np.cos(t), np.sin(t)], np.c_[1 - np.cos(t), 0.5 - np.sin(t)])
    x = x + 0.15 * rng.normal(size=x.shape)
    out = rng.random(n) < 0.05
    x[out] *= rng.uniform(5, 15, size=(out.sum(), 1))
    return x.astype(np.float32), y.astype(np.int32)


def init_params(key: jax.Array, hidden: int = 64) -> dict:
    k1, k2 = jax.random.split(key)
    glorot = jax.nn.initializers.glorot_uniform()
    return {
        "dense1": {"kernel": glorot(k1, (2, hidden)), "bias": jnp.zeros(hidden)},
        "dense2": {"kernel": glorot(k2, (hidden, 2)), "bias": jnp.zeros(2)},
    }


def forward(params: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def tensor_norms(tree: dict) -> dict[str, float]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): float(np.linalg.norm(v)) for p, v in flat}


def global_norm(tree: dict) -> float:
    return float(np.sqrt(sum(v**2 for v in tensor_norms(tree).values())))


def fmt(norms: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in norms.items())


def part1_clipping(params: dict, x: np.ndarray, y: np.ndarray) -> bool:
    print("== 1. clipping one gradient (threshold 0.5)")
    grads = jax.jit(jax.grad(loss_fn))(params, x, y)  # jitted: one compilation instead of one per op
    print(f"raw gradient norms:           {fmt(tensor_norms(grads))}; global {global_norm(grads):.3f}")
    per, _ = jax.jit(adamx.clip_by_norm(0.5).update)(grads, optax.EmptyState())
    print(f"clipnorm=0.5 (each tensor):   {fmt(tensor_norms(per))}")
    glob, _ = jax.jit(adamx.clip_by_global_norm(0.5).update)(grads, optax.EmptyState())
    print(f"global_clipnorm=0.5 (jointly): {fmt(tensor_norms(glob))}; global {global_norm(glob):.3f}")
    ref, _ = jax.jit(optax.clip_by_global_norm(0.5).update)(grads, optax.EmptyState())
    d = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(glob), jax.tree.leaves(ref), strict=True))
    print(f"max |adamx.clip_by_global_norm - optax.clip_by_global_norm| = {d:.1e}")
    ok = all(v <= 0.5 * (1 + 1e-6) for v in tensor_norms(per).values())
    ok &= global_norm(glob) <= 0.5 * (1 + 1e-6) and d <= 1e-6
    return ok


def part2_weight_decay(params: dict) -> bool:
    print("\n== 2. weight decay with exclude_from_weight_decay=['bias']")
    opt = adamx.adam(learning_rate=LR, weight_decay=WEIGHT_DECAY, exclude_from_weight_decay=["bias"])
    params = jax.tree.map(lambda p: p + 0.5 if p.ndim == 1 else p, params)  # non-zero biases, to see them spared
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradients: Adam's own step is exactly 0
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    ok = True
    for (path, p), u, n in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(updates), jax.tree.leaves(new), strict=True
    ):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        p, u, n = np.asarray(p), np.asarray(u), np.asarray(n)
        decayed = bool(np.any(u != 0))
        if "bias" in name:
            ok &= not decayed
        else:  # kernel: p * (1 - lr * wd), up to float32 rounding
            ok &= bool(np.allclose(n, p * (1 - LR * WEIGHT_DECAY), rtol=1e-6, atol=1e-9))
        ratio = float(np.linalg.norm(n) / np.linalg.norm(p))
        print(f"  {name:15s} {'decayed ' if decayed else 'excluded'}  |new| / |old| = {ratio:.6f}")
    print(f"  expected kernel factor 1 - lr * weight_decay = {1 - LR * WEIGHT_DECAY:.6f}")
    return ok


def make_train_step(opt: optax.GradientTransformation, clip: float, per_tensor: bool):
    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        norms = jnp.stack([jnp.linalg.norm(g) for g in jax.tree.leaves(grads)])
        clipped = jnp.any(norms > clip) if per_tensor else optax.global_norm(grads) > clip
        updates, opt_state = opt.update(grads, opt_state, params)  # clipping happens inside adamx.adam
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, clipped

    return train_step


def part3_training(x, y, x_te, y_te, steps: int, batch: int, seed: int, smoke: bool) -> bool:
    print(f"\n== 3. custom jitted train step, {steps} steps of batch {batch}")
    configs = {
        "global_clipnorm=1.0": (dict(global_clipnorm=1.0), 1.0, False),
        "clipnorm=0.5 (per tensor)": (dict(clipnorm=0.5), 0.5, True),
    }
    ok = True
    for label, (clip_kw, clip, per_tensor) in configs.items():
        opt = adamx.adam(learning_rate=LR, weight_decay=WEIGHT_DECAY, exclude_from_weight_decay=["bias"], **clip_kw)
        params = init_params(jax.random.key(seed))
        opt_state = opt.init(params)
        train_step = make_train_step(opt, clip, per_tensor)
        rng = np.random.default_rng(seed)
        n_clipped, losses = 0, []
        for _ in range(steps):
            idx = rng.integers(0, len(x), batch)
            params, opt_state, loss, clipped = train_step(params, opt_state, x[idx], y[idx])
            n_clipped += int(clipped)
            losses.append(float(loss))
        acc = float(np.mean(np.argmax(jax.jit(forward)(params, x_te), -1) == y_te))
        first, last = np.mean(losses[: max(1, steps // 10)]), np.mean(losses[-max(1, steps // 10) :])
        print(
            f"  adamx.adam({label}, weight_decay={WEIGHT_DECAY}, exclude_from_weight_decay=['bias']):\n"
            f"    loss {first:.4f} -> {last:.4f}, clipping active in {n_clipped}/{steps} steps, test accuracy {acc:.4f}"
        )
        ok &= bool(np.isfinite(last)) and last < first
        if not smoke:
            ok &= acc >= 0.9
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)

    x, y = make_moons(1000, args.seed)
    x_te, y_te = make_moons(500, args.seed + 1)
    params = init_params(jax.random.key(args.seed))
    checks = {
        "clipping": part1_clipping(params, x[:256], y[:256]),
        "weight decay mask": part2_weight_decay(params),
        "training": part3_training(
            x, y, x_te, y_te, 30 if args.smoke else args.steps, args.batch_size, args.seed, args.smoke
        ),
    }
    print()
    for name, good in checks.items():
        print(f"{name}: {'OK' if good else 'FAILED'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
