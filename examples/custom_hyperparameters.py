"""Tour of ``adamx.adam``'s hyperparameters, schedules, EMA weights and Keras configs.

On one small noisy least-squares problem trained with mini-batches it shows

1. custom ``learning_rate`` / ``beta_1`` / ``beta_2`` / ``epsilon`` (epsilon is Keras's
   "epsilon hat", added to ``sqrt(v)``, not optax's ``eps``);
2. ``amsgrad=True``: the state keeps the running maximum ``nu_max`` of the second moment;
3. a Keras learning-rate schedule, ``adamx.schedules.ExponentialDecay``, called with the
   number of steps taken before the current one (the first step uses ``schedule(0)``);
4. ``use_ema=True`` with ``ema_overwrite_frequency``: the moving average of the weights
   is read with ``adamx.finalize_variable_values(params, state)``, and every
   ``ema_overwrite_frequency`` steps the weights are replaced by it;
5. Keras configs: ``adamx.from_keras_config`` builds the optimizer a Keras
   ``Adam.get_config()`` dict (or an older tf.keras one) describes, ``opt.get_config()``
   writes it back; the round trip is printed and, unless ``--no-keras``, checked
   against ``keras.optimizers.Adam.from_config`` itself.

Exits with status 1 when a check fails. ``--smoke`` trains a few steps only (tests).

Run: ``python examples/custom_hyperparameters.py``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx

N_FEATURES = 8


def make_problem(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, N_FEATURES)).astype(np.float32) * np.linspace(0.2, 3.0, N_FEATURES, dtype=np.float32)
    w = rng.normal(size=N_FEATURES).astype(np.float32)
    y = x @ w + 0.5 * rng.normal(size=512).astype(np.float32)
    return x, y


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def train(opt: optax.GradientTransformation, data, steps: int, seed: int, on_step=None):
    """Mini-batch training (batch 16, fixed seed); returns ``(params, state, full-data loss)``."""
    x, y = data
    params = {"w": jnp.zeros(N_FEATURES), "b": jnp.zeros(())}
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(x), 16)
        params, state = step(params, state, x[idx], y[idx])
        if on_step is not None:
            on_step(i, params, state)
    return params, state, float(loss_fn(params, x, y))


def section(title: str) -> None:
    print(f"\n== {title}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-keras", action="store_true", help="skip the check against keras.optimizers.Adam")
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)
    steps = 70 if args.smoke else args.steps
    data = make_problem(args.seed)
    x, y = data
    x1 = np.c_[x, np.ones(len(x), np.float32)]
    best = float(np.mean((x1 @ np.linalg.lstsq(x1, y, rcond=None)[0] - y) ** 2))
    print(
        f"least squares on 512 samples, {N_FEATURES} features, batch 16, {steps} steps; best possible loss {best:.4f}"
    )
    checks: dict[str, bool] = {}

    section("1. custom learning rate, betas and epsilon")
    default = adamx.adam()
    custom = adamx.adam(learning_rate=0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-6)
    for name, opt in (("adamx.adam()", default), ("adamx.adam(0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-6)", custom)):
        hp = opt.hyperparams
        _, _, loss = train(opt, data, steps, args.seed)
        betas = f"({hp['beta_1']}, {hp['beta_2']})"
        print(f"{name:58s} lr={hp['learning_rate']}, betas={betas}, eps={hp['epsilon']}: loss {loss:.4f}")
    print("(Keras's default lr=0.001 is slow on this problem; the larger lr converges within the steps given)")

    section("2. amsgrad=True")
    ams = adamx.adam(learning_rate=0.05, amsgrad=True)
    _, state, loss = train(ams, data, steps, args.seed)
    nu_ge = all(
        bool(jnp.all(m >= v)) for m, v in zip(jax.tree.leaves(state.nu_max), jax.tree.leaves(state.nu), strict=True)
    )
    print(
        f"adamx.adam(0.05, amsgrad=True): loss {loss:.4f}; state has nu_max (running max of nu): nu_max >= nu {nu_ge}"
    )
    checks["amsgrad"] = nu_ge

    section("3. a Keras schedule: ExponentialDecay(0.1, decay_steps=100, decay_rate=0.5)")
    sched = adamx.schedules.ExponentialDecay(initial_learning_rate=0.1, decay_steps=100, decay_rate=0.5)
    print("lr at step " + ", ".join(f"{s}: {float(sched(s)):.5f}" for s in (0, 50, 100, 200, 400)))
    opt = adamx.adam(learning_rate=sched)
    _, state, loss = train(opt, data, steps, args.seed)
    lr_last = float(sched(int(state.count) - 1))
    n_done = int(state.count)
    print(f"adamx.adam(learning_rate=sched): loss {loss:.4f}; {n_done} steps, the last one used lr {lr_last:.5f}")
    print(f"get_config()['learning_rate'] = {opt.get_config()['learning_rate']}")
    checks["schedule"] = abs(float(sched(100)) - 0.05) < 1e-8

    section("4. EMA of the weights: use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=60")
    ema_opt = adamx.adam(learning_rate=0.05, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=60)
    gaps: dict[int, float] = {}

    def watch(i: int, params, state) -> None:
        if i in (59, 60, 61):
            avg = adamx.finalize_variable_values(params, state)
            gaps[i] = max(
                float(jnp.max(jnp.abs(a - p)))
                for a, p in zip(jax.tree.leaves(avg), jax.tree.leaves(params), strict=True)
            )

    params, state, loss = train(ema_opt, data, steps, args.seed, on_step=watch)
    avg = adamx.finalize_variable_values(params, state)
    loss_avg = float(loss_fn(avg, x, y))
    for i, g in gaps.items():
        print(f"after step {i}: max |EMA - weights| = {g:.2e}" + ("   <- overwritten with the EMA" if i == 60 else ""))
    print(f"final weights: loss {loss:.4f}; their EMA (finalize_variable_values): loss {loss_avg:.4f}")
    checks["ema overwrite"] = gaps.get(60) == 0.0 and gaps.get(59, 0.0) > 0.0 and gaps.get(61, 0.0) > 0.0

    section("5. Keras configs: from_keras_config / get_config")
    keras3 = {  # what keras.optimizers.Adam(learning_rate=0.002, amsgrad=True, global_clipnorm=1.0).get_config() prints
        "name": "adam",
        "learning_rate": 0.0020000000949949026,
        "weight_decay": None,
        "clipnorm": None,
        "global_clipnorm": 1.0,
        "clipvalue": None,
        "use_ema": False,
        "ema_momentum": 0.99,
        "ema_overwrite_frequency": None,
        "loss_scale_factor": None,
        "gradient_accumulation_steps": None,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": True,
    }
    opt = adamx.from_keras_config(keras3)
    back = opt.get_config()
    print("Keras 3 config in :", keras3)
    print("get_config() out  :", back)
    print(f"round trip identical: {back == keras3}")
    print(f"adamx.to_keras_config(opt) == opt.get_config(): {adamx.to_keras_config(opt) == back}")
    checks["keras3 round trip"] = back == keras3

    sched_cfg = adamx.adam(learning_rate=sched, amsgrad=True).get_config()
    again = adamx.from_keras_config(sched_cfg)
    print(f"with a schedule, rebuilt learning_rate: {again.hyperparams['learning_rate']!r}")
    checks["schedule round trip"] = again.get_config() == sched_cfg

    legacy = {
        "name": "Adam",
        "learning_rate": 0.001,
        "decay": 0.01,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": False,
    }
    old = adamx.from_keras_config(legacy)
    print(f"tf.keras (TF 2.x) config {legacy}\n  -> learning_rate {old.hyperparams['learning_rate']!r}")

    if not args.no_keras:
        os.environ["KERAS_BACKEND"] = "jax"
        import keras

        # deepcopy: Keras's from_config replaces the schedule dict inside the config it is given by the object.
        same = keras.optimizers.Adam.from_config(copy.deepcopy(back)).get_config() == back
        k_sched = keras.optimizers.Adam.from_config(copy.deepcopy(sched_cfg)).get_config() == sched_cfg
        print(f"keras.optimizers.Adam.from_config(opt.get_config()).get_config() == opt.get_config(): {same}")
        print(f"... with the ExponentialDecay schedule: {k_sched}")
        checks["keras accepts the configs"] = same and k_sched

    print()
    for name, good in checks.items():
        print(f"{name}: {'OK' if good else 'FAILED'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
