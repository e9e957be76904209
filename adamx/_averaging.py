"""Exponential moving average of the *parameters* (Keras ``use_ema``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamx import _flat, _hyper, _tree
from adamx._types import DType, Leaf, PyTree, Scalar


class EmaParamsState(NamedTuple):
    """State of :func:`ema_params`. Field names are the checkpoint format."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; update() calls so far, saturating
    ema: optax.Params  # moving average of params; float32 for bf16/f16/f32 params


def ema_buffers(params: PyTree, dtype: DType | None = None) -> PyTree:
    """The averages' initial value: a fresh copy of ``params`` (never the same buffers)."""
    return jax.tree.map(lambda p: _tree.fresh_copy(p, _tree.state_dtype(p.dtype, dtype)), params)


def ema_scalars(
    count: jax.Array, momentum: Scalar, overwrite_frequency: Scalar | None, accumulation_steps: Scalar | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(mom, 1 - mom, overwrite or None)`` for the EMA after ``count`` calls (see :func:`ema_step`)."""
    it = count if accumulation_steps is None else count // accumulation_steps
    mom = jnp.where(it != 0, jnp.asarray(momentum, jnp.float32), 0.0)
    # it % f == f - 1 is (it + 1) % f == 0 without wrapping at the saturated count
    overwrite = None if overwrite_frequency is None else it % overwrite_frequency == overwrite_frequency - 1
    return mom, 1 - mom, overwrite


def average_leaf(mom: jax.Array, one_m: jax.Array, avg: jax.Array, p_new: jax.Array) -> jax.Array:
    """One average: ``mom * avg + (1 - mom) * p_new`` in the average's dtype."""
    return mom.astype(avg.dtype) * avg + one_m.astype(avg.dtype) * p_new


def ema_step(
    p_leaves: list[Leaf],
    u_leaves: list[Leaf],
    avg_leaves: list[Leaf],
    count: jax.Array,
    momentum: Scalar,
    overwrite_frequency: Scalar | None,
    accumulation_steps: Scalar | None,
) -> tuple[list[Leaf], list[Leaf]]:
    """Keras's EMA after an update; returns ``(updates, averages)``.

    .. code-block:: text

        it = count // accumulation_steps                  # Keras `iterations`, pre-increment
        mom = momentum if it != 0 else 0                  # first step: average = new params
        avg = mom * avg + (1 - mom) * (params + updates)  # 1 - mom in float32
        if overwrite_frequency and (it + 1) % overwrite_frequency == 0:
            updates = avg - params                        # params + updates == avg

    Every leaf is averaged, also those whose update is zero (micro-steps, ``None``
    gradients), as Keras averages every variable it was built with.
    """
    mom, one_m, overwrite = ema_scalars(count, momentum, overwrite_frequency, accumulation_steps)
    new_u, new_avg = [], []
    for p, u, a in zip(p_leaves, u_leaves, avg_leaves):
        p_new = p.astype(a.dtype) if u is None else _tree.rounded_sum(p, u, a.dtype)
        a_new = average_leaf(mom, one_m, a, p_new)
        new_avg.append(a_new)
        if overwrite is not None:
            u = overwrite_update(overwrite, a_new, p, u)
        new_u.append(u)
    return new_u, new_avg


def overwrite_update(overwrite: jax.Array, avg: jax.Array, p: jax.Array, u: jax.Array | None) -> jax.Array:
    """Keras's ``ema_overwrite_frequency``: on an overwrite step the update that takes ``p`` to its
    average (``avg - p``, in the param's dtype), else ``u`` (zeros for a ``None`` update)."""
    pdt = jnp.asarray(p).dtype
    to_avg = (avg - p.astype(avg.dtype)).astype(pdt)
    return jnp.where(overwrite, to_avg, jnp.zeros_like(to_avg) if u is None else u.astype(pdt))


def ema_params(
    momentum: float = 0.99,
    overwrite_frequency: int | None = None,
    *,
    accumulation_steps: int | None = None,
    ema_dtype: DType | None = None,
) -> optax.GradientTransformation:
    r"""Keep an exponential moving average of the parameters (Keras ``use_ema``).

    Put it **last** in a chain: it averages ``params + updates``, the values the step
    produces. See :func:`ema_step` for the rule; in short

    .. code-block:: text

        avg_1 = params_1                           # Keras's first-step rule
        avg_t = momentum * avg_{t-1} + (1 - momentum) * params_t
        every `overwrite_frequency` steps: params_t <- avg_t

    Read the averages with :func:`finalize_variable_values`.

    Args:
      momentum: in [0, 1].
      overwrite_frequency: ``None`` or an integer >= 1.
      accumulation_steps: when the chain accumulates gradients over ``k`` micro-steps
        (Keras ``gradient_accumulation_steps``), pass ``k`` so the first-step rule and
        the overwrite count real steps, as Keras does.
      ema_dtype: storage dtype; default float32 for bf16/f16/f32 params.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> tx = optax.chain(optax.sgd(0.1), adamx.ema_params(0.9))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> u, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> adamx.finalize_variable_values(optax.apply_updates(params, u), state)["w"].tolist()
      [0.8999999761581421, 0.8999999761581421]
    """
    _hyper.check_scalar("ema_momentum", momentum, lo=0.0, hi=1.0)
    _hyper.check_int("ema_overwrite_frequency", overwrite_frequency, lo=1)
    _hyper.check_int("accumulation_steps", accumulation_steps, lo=1)

    def init_fn(params: optax.Params) -> EmaParamsState:
        return EmaParamsState(count=jnp.zeros([], jnp.int32), ema=ema_buffers(params, ema_dtype))

    def update_fn(
        updates: optax.Updates, state: EmaParamsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, EmaParamsState]:
        if params is None:
            raise ValueError("ema_params needs `params`: call update(updates, state, params).")
        u_leaves, p_leaves, treedef = _tree.align_grads(updates, params)
        avg_leaves = treedef.flatten_up_to(state.ema)
        new_u, new_avg = ema_step(
            p_leaves, u_leaves, avg_leaves, state.count, momentum, overwrite_frequency, accumulation_steps
        )
        new_u = [jnp.zeros_like(p) if u is None else u for u, p in zip(new_u, p_leaves)]
        return jax.tree_util.tree_unflatten(treedef, new_u), EmaParamsState(
            count=optax.safe_increment(state.count), ema=jax.tree_util.tree_unflatten(treedef, new_avg)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _has_ema(x: object) -> bool:
    return isinstance(x, tuple) and "ema" in getattr(x, "_fields", ())


def finalize_variable_values(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
    """The EMA weights held in ``opt_state``, in ``params``' dtypes (Keras ``finalize_variable_values``).

    Searches ``opt_state`` (also inside ``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps`` ...) for the first adamx state that keeps averages. Without one, or
    when averaging is off, returns ``params`` unchanged. Pure: nothing is modified.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> opt = adamx.adam(use_ema=True)
      >>> params = {"w": jnp.ones(2)}
      >>> adamx.finalize_variable_values(params, opt.init(params))["w"].tolist()
      [1.0, 1.0]
    """
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_has_ema):
        if _has_ema(node) and node.ema is not None:
            # match leaves in order, not structure: params may be wrapped (flax nnx Param vs OptVariable)
            p_leaves, treedef = jax.tree_util.tree_flatten(params)
            if isinstance(node.ema, _flat.FlatBuffers):  # adamx.adam(flat_state=True)
                lay = _flat.layout([jnp.asarray(p) for p in p_leaves], lambda p: _tree.state_dtype(p.dtype, None))
                a_leaves = _flat.unpack(node.ema, lay)
            else:
                a_leaves = jax.tree_util.tree_leaves(node.ema)
            if len(a_leaves) != len(p_leaves):
                raise ValueError(
                    f"params has {len(p_leaves)} leaves but the optimizer's averages have {len(a_leaves)}."
                )
            return jax.tree_util.tree_unflatten(
                treedef, [a.astype(jnp.asarray(p).dtype) for p, a in zip(p_leaves, a_leaves)]
            )
    return params
