"""Shared pieces of the integration tests: the optimizers under test, a tiny problem, the eager reference.

Every stack test trains a tiny model for a few steps through a real framework
(Flax linen/NNX, Equinox, optax wrappers, Orbax, sharding) and compares with the
*reference*: the same optimizer run eagerly (no jit) on one device with plain
``optax.apply_updates``.

Tolerances. ``jit`` lets XLA fuse and reorder float32 arithmetic (``m * alpha /
(sqrt(v) + eps)`` fused, the global norm's sum reassociated, a psum/pmean across
devices summed in another order), so a jitted or sharded run differs from the eager
one by a few ulps per step (measured: <= 1.2e-7 absolute on O(1) params after 7
steps). ``RTOL = 1e-5`` / ``ATOL = 1e-7`` allow ~100 ulps. A wrong step would be
off by about one learning-rate step (1e-2 here), five orders of magnitude more.
Where the same compiled function runs on both sides (Orbax resume), results must
be bit-identical instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx

FULL_KWARGS: dict[str, Any] = dict(
    learning_rate=1e-2,
    amsgrad=True,
    weight_decay=0.01,
    global_clipnorm=1.0,
    use_ema=True,
    ema_overwrite_frequency=3,
    gradient_accumulation_steps=2,
)


def full_adam(**overrides: Any) -> adamx.Adam:
    """The optimizer under test: every option on (AMSGrad, decay, clipping, EMA overwrite, accumulation)."""
    return adamx.adam(**{**FULL_KWARGS, **overrides})


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "full": full_adam,
    "plain": adamx.adam,
}
# 7 calls: with accumulation 2 that is 3 real steps (the EMA overwrite fires on the
# 3rd, call 6) and a half-filled window at the end.
N_STEPS = 7

RTOL = 1e-5
ATOL = 1e-7


def require_devices(n: int) -> None:
    """Fail (not skip) when the process has fewer devices than the test needs."""
    have = jax.device_count()
    assert have >= n, (
        f"this test needs {n} devices but jax sees {have}: run pytest with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported (make test does)."
    )


# ---------------------------------------------------------------------------
# a tiny regression problem on plain pytrees
# ---------------------------------------------------------------------------
IN, HIDDEN, OUT, BATCH = 4, 16, 2, 16


def init_mlp(seed: int = 0) -> dict[str, Any]:
    r = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(r.standard_normal((IN, HIDDEN)) * 0.5, jnp.float32),
            "bias": jnp.zeros((HIDDEN,), jnp.float32),
        },
        "out": {
            "kernel": jnp.asarray(r.standard_normal((HIDDEN, OUT)) * 0.5, jnp.float32),
            "bias": jnp.zeros((OUT,), jnp.float32),
        },
    }


def mlp(p: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((pred - y) ** 2)


def mlp_loss(p: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    return mse(mlp(p, x), y)


def batches(n: int = N_STEPS, seed: int = 1, batch: int = BATCH) -> list[tuple[jax.Array, jax.Array]]:
    """``n`` batches ``(x, y)``; targets are large enough that the gradient norm exceeds the clip threshold."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = r.standard_normal((batch, IN)).astype(np.float32)
        y = (3.0 * r.standard_normal((batch, OUT))).astype(np.float32)
        out.append((jnp.asarray(x), jnp.asarray(y)))
    return out


def reference_run(
    tx: optax.GradientTransformation,
    params: Any,
    loss: Callable[..., jax.Array],
    data: list[tuple[Any, ...]],
) -> tuple[Any, Any]:
    """The reference: eager (``jax.disable_jit``: op by op, ``lax.cond`` as Python ``if``), one device,
    plain ``optax.apply_updates``."""
    with jax.disable_jit():
        state = tx.init(params)
        for batch in data:
            grads = jax.grad(loss)(params, *batch)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    return params, state


@functools.cache
def reference(opt: str, n_steps: int = N_STEPS) -> tuple[Any, Any]:
    """``reference_run`` of ``OPTIMIZERS[opt]`` on the standard problem (``init_mlp``, ``mlp_loss``, ``batches``).

    Eager runs are slow (each op is dispatched on its own), so it is computed once per
    session and shared by the stacks that train this same problem.
    """
    return reference_run(OPTIMIZERS[opt](), init_mlp(), mlp_loss, batches(n_steps))


# ---------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------
def _leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


def assert_trees_close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL, what: str = "") -> None:
    """Same number of leaves, shapes, dtypes; values within the jit/sharding tolerance."""
    a_l, e_l = _leaves(actual), _leaves(expected)
    assert len(a_l) == len(e_l), f"{what}: {len(a_l)} leaves vs {len(e_l)}"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    for path, a, e in zip(paths, a_l, e_l, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}{path}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}{path}")


def assert_trees_equal(actual: Any, expected: Any, what: str = "") -> None:
    """Bit-identical leaves (NaN == NaN), same structure."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected), what
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, what
        assert a.tobytes() == e.tobytes(), f"{what}: not bit-identical, max diff {np.max(np.abs(a - e))}"


def buffer_pointers(tree: Any) -> list[int]:
    """Device buffer addresses of every (single-device) array leaf of ``tree``."""
    return [leaf.unsafe_buffer_pointer() for leaf in _leaves(tree)]
