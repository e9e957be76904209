"""Gradient clipping with Keras's formulas: per-tensor norm, global norm, value."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from adamx import _hyper, _tree
from adamx._types import Leaf, Scalar

CLIP_ARGS = ("clipnorm", "clipvalue", "global_clipnorm")


def check_clip_args(clipnorm: object, clipvalue: object, global_clipnorm: object) -> list[str]:
    """Refuse more than one clip argument (Keras's rule and message); return the names of those set.

    ``adamx.adam``'s spec and ``lazy_adam``'s both call it; each checks the values' ranges itself.
    """
    values = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
    set_clips = [k for k in CLIP_ARGS if values[k] is not None]
    if len(set_clips) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
            f"Received: {', '.join(f'{k}={values[k]}' for k in set_clips)}."
        )
    return set_clips


def _abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2`` elementwise: ``x * x`` for real ``x`` (the same ops as before), real for complex."""
    return (jnp.conj(x) * x).real if jnp.iscomplexobj(x) else x * x


def clip_leaf_by_norm(g: jax.Array, max_norm: jax.Array) -> jax.Array:
    """Keras ``clipnorm`` on one tensor: ``g * c / max(||g||_2, c)`` (norm over all axes).

    Below the threshold this is ``g * c / c``, which Keras also computes (it is not
    always bit-exactly ``g``).
    """
    gf = g.astype(_tree.compute_dtype(g.dtype))
    norm = jnp.sqrt(jnp.sum(_abs_sq(gf)))
    if jnp.iscomplexobj(gf):
        c = max_norm.astype(norm.dtype)
        return (gf * (c / jnp.maximum(norm, c)).astype(gf.dtype)).astype(g.dtype)
    c = max_norm.astype(gf.dtype)  # float64 leaves (x64): the float32 threshold, cast explicitly
    return ((gf * c) / jnp.maximum(norm.astype(gf.dtype), c)).astype(g.dtype)


def global_norm(leaves: list[Leaf]) -> jax.Array:
    """``sqrt(sum_i sum(g_i**2))`` over the non-``None`` leaves, in float32 at least."""
    total = jnp.zeros([], jnp.float32)
    for g in leaves:
        if g is not None:
            gf = g.astype(_tree.compute_dtype(g.dtype))
            total = total + jnp.sum(_abs_sq(gf)).astype(total.dtype)
    return jnp.sqrt(total)


def global_clip_scale(norm: jax.Array, max_norm: jax.Array) -> jax.Array:
    """Keras ``global_clipnorm``'s factor ``c * min(1/n, 1/c)``.

    A non-finite norm (any inf/NaN gradient) gives NaN, so every gradient becomes NaN,
    as in Keras and ``optax.clip_by_global_norm``.
    """
    return max_norm * jnp.minimum(1.0 / norm, 1.0 / max_norm) + (norm - norm)


def clip_mode_of(
    clipnorm: Scalar | None, global_clipnorm: Scalar | None, clipvalue: Scalar | None
) -> tuple[str, Scalar | None]:
    """``(mode, threshold)`` of Keras's three clip arguments (at most one is set):
    ``"norm"`` (per tensor), ``"global_norm"``, ``"value"``, or ``("none", None)``."""
    for mode, c in (("norm", clipnorm), ("global_norm", global_clipnorm), ("value", clipvalue)):
        if c is not None:
            return mode, c
    return "none", None


def clip_units(
    mode: str,
    threshold: Scalar | None,
    g_u: list[Leaf],
    split: Callable[[list[Leaf]], list[Leaf]] | None = None,
    join: Callable[[list[Leaf]], list[Leaf]] | None = None,
) -> list[Leaf]:
    """Keras clipping of a list of arrays (``None`` entries stay ``None``). ``"norm"`` is per
    parameter tensor: when the arrays hold several tensors each (flat buffers), ``split``
    cuts them into tensors and ``join`` puts the clipped tensors back."""
    if mode == "none":
        return g_u
    c = jnp.asarray(threshold, jnp.float32)
    if mode == "norm":
        per_leaf = g_u if split is None else split(g_u)
        out = [None if g is None else clip_leaf_by_norm(g, c) for g in per_leaf]
        return out if join is None else join(out)
    if mode == "global_norm":
        scale = global_clip_scale(global_norm(g_u), c)
        return [None if g is None else g * scale.astype(g.dtype) for g in g_u]
    return [None if g is None else clip_leaf_by_value(g, c) for g in g_u]


def clip_by_norm(max_norm: float) -> optax.GradientTransformation:
    r"""Clip each tensor to L2 norm ``max_norm`` (Keras ``clipnorm``).

    .. code-block:: text

        for each leaf g:  g <- g * max_norm / max(||g||_2, max_norm)

    Unlike ``optax.clip_by_global_norm``, each tensor is clipped on its own.

    Args:
      max_norm: the threshold, > 0.

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> tx = adamx.clip_by_norm(1.0)
      >>> u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
      >>> [round(float(x), 4) for x in u["w"]]
      [0.6, 0.8]
    """
    _hyper.check_scalar("clipnorm", max_norm, lo=0.0, lo_open=True)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        del params
        c = jnp.asarray(max_norm, jnp.float32)
        return jax.tree.map(lambda g: clip_leaf_by_norm(g, c), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    r"""Scale all tensors together so their joint L2 norm is at most ``max_norm``.

    .. code-block:: text

        n = sqrt(sum_i ||g_i||^2);  g_i <- g_i * max_norm * min(1/n, 1/max_norm)

    This is Keras's ``global_clipnorm`` formula. It equals ``optax.clip_by_global_norm``
    up to rounding; any non-finite gradient makes every output NaN in both.

    Args:
      max_norm: the threshold, > 0.
    """
    _hyper.check_scalar("global_clipnorm", max_norm, lo=0.0, lo_open=True)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        del params
        c = jnp.asarray(max_norm, jnp.float32)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        scale = global_clip_scale(global_norm(leaves), c)
        out = [(g.astype(scale.dtype) * scale).astype(g.dtype) for g in leaves]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def clip_leaf_by_value(g: jax.Array, c: jax.Array) -> jax.Array:
    """Keras ``clipvalue``: ``clip(g, -c, c)`` (exact)."""
    return jnp.clip(g, -c.astype(g.dtype), c.astype(g.dtype))
