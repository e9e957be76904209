"""Pytree helpers: path names, grads/params matching, sparse gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from adamx._types import ArrayLike, DType, Leaf
from adamx._types import PyTree as PyTree


def path_str(path: tuple[object, ...]) -> str:
    """A key path as ``a/b/0/c``: the form matched by ``exclude_from_weight_decay``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - future key types
            parts.append(str(k))
    return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
    """The ``path_str`` of every leaf of ``tree``, in flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [path_str(p) for p, _ in leaves]


def _is_sparse(x: object) -> bool:
    return isinstance(x, jsparse.BCOO)


def _describe(x: Leaf) -> str:
    if x is None:
        return "None"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__}{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def _first_mismatch(grads: PyTree, params: PyTree) -> str:
    """Walk both trees side by side and describe the first place they differ."""
    g_leaves = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_sparse)[0]
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    g_map = {path_str(p): v for p, v in g_leaves}
    p_map = {path_str(p): v for p, v in p_leaves}
    for path, _ in p_leaves:
        key = path_str(path)
        if key not in g_map:
            return f"params has a leaf at '{key}' that grads does not have"
    for path, v in g_leaves:
        key = path_str(path)
        if key not in p_map:
            return f"grads has a leaf at '{key}' ({_describe(v)}) that params does not have"
    return (
        "the trees have the same leaf paths but different structure: grads "
        f"{jax.tree_util.tree_structure(grads)} vs params {jax.tree_util.tree_structure(params)}"
    )


def align_grads(grads: PyTree, params: PyTree) -> tuple[list[Leaf], list[Leaf], jax.tree_util.PyTreeDef]:
    """Flatten ``grads`` up to the structure of ``params``.

    Returns ``(grad_leaves, param_leaves, treedef)`` where ``treedef`` is the
    structure of ``params``. A grads leaf may be ``None`` where params has an array
    (Keras: "gradient does not exist", the variable is left alone) or a
    ``jax.experimental.sparse.BCOO`` (summed to dense). Anything else that does not
    line up raises ``ValueError`` naming the first mismatching path.
    """
    treedef: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(params)
    try:
        g_leaves = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as e:
        raise ValueError(f"grads do not match params: {_first_mismatch(grads, params)}") from e
    p_leaves = treedef.flatten_up_to(params)
    paths = None
    out: list[Leaf] = []
    for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
        if g is None:
            out.append(None)
            continue
        if _is_sparse(g):
            g = g.todense()
        elif isinstance(g, (bool, int, float, complex, np.generic)):
            g = jnp.asarray(g)  # a Python/NumPy scalar gradient of a scalar leaf
        elif not hasattr(g, "shape"):
            # a nested subtree where params has a leaf
            paths = paths or leaf_paths(params)
            raise ValueError(
                f"grads do not match params at '{paths[i]}': grads has {_describe(g)}, params has {_describe(p)}"
            )
        if tuple(g.shape) != tuple(jnp.shape(p)):
            paths = paths or leaf_paths(params)
            raise ValueError(
                f"grads do not match params at '{paths[i]}': grads has shape "
                f"{tuple(g.shape)}, params has shape {tuple(jnp.shape(p))}"
            )
        out.append(g)
    return out, p_leaves, treedef


def compute_dtype(dtype: DType) -> jnp.dtype:
    """The dtype adamx does arithmetic in for a parameter of ``dtype``: float32 at least
    (complex64 at least for complex parameters)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def compute_dtype_of(*arrays: ArrayLike) -> jnp.dtype:
    """The widest :func:`compute_dtype` of the arrays (no implicit promotion: strict-safe)."""
    return max((compute_dtype(jnp.result_type(x)) for x in arrays), key=lambda d: d.itemsize)


def real_dtype(dtype: DType) -> jnp.dtype:
    """``dtype``, or the real dtype of its parts for a complex ``dtype`` (complex64 -> float32)."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def rounded_sum(p: jax.Array, u: jax.Array, dtype: DType) -> jax.Array:
    """``optax.apply_updates(p, u)`` as the stored params will hold it, returned in ``dtype``.

    For bfloat16/float16 params XLA may keep ``p + u`` in float32 inside a fusion
    (excess precision); ``reduce_precision`` pins the rounding to the param dtype so an
    average of the params sees exactly the values the params take.
    """
    pdt = jnp.dtype(p.dtype)
    s = p.astype(dtype) + u.astype(pdt).astype(dtype)
    if pdt.itemsize < jnp.dtype(dtype).itemsize and jnp.issubdtype(pdt, jnp.floating):
        fi = jnp.finfo(pdt)
        r = jax.lax.reduce_precision(s, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
        if fi.nexp < jnp.finfo(dtype).nexp:
            # reduce_precision flushes the param dtype's subnormals (float16: |x| < 2**-14) to zero;
            # a float16 param holds them (and the fused kernel keeps them): round to their grid.
            step = jnp.asarray(fi.smallest_subnormal, dtype)
            sub = jnp.round(s / step) * step
            r = jnp.where(jnp.abs(s) < jnp.asarray(fi.smallest_normal, dtype), sub, r)
        s = r
    return s


def state_dtype(param_dtype: DType, requested: DType | None) -> jnp.dtype:
    """Dtype of a per-parameter optimizer buffer: the requested one, else the compute dtype."""
    if requested is not None:
        return jnp.dtype(requested)
    return compute_dtype(param_dtype)


def zeros_like(p: ArrayLike, dtype: DType) -> jax.Array:
    """Fresh zeros with ``p``'s shape (and sharding, when it has one)."""
    return jnp.zeros_like(p, dtype=dtype)


def fresh_copy(p: ArrayLike, dtype: DType) -> jax.Array:
    """A copy of ``p`` in ``dtype`` that never aliases ``p``'s buffer (safe under donation)."""
    return jnp.array(p, dtype=dtype, copy=True)


def is_sharded(x: ArrayLike) -> bool:
    """True when ``x`` may be split over devices: the kernel sees one device's buffers.

    Concrete arrays: on more than one device. While tracing: the abstract mesh of the
    value has a non-manual axis of size > 1 (jit over sharded or replicated inputs);
    inside ``shard_map`` (manual axes) each shard is a plain local array, which is fine.
    """
    if not isinstance(x, jax.core.Tracer):
        sh = getattr(x, "sharding", None)
        if sh is None:
            return False
        try:
            return len(sh.device_set) > 1
        except Exception:  # noqa: BLE001
            return True
    try:
        mesh = jax.typeof(x).sharding.mesh
        sizes = dict(mesh.shape)
        types = tuple(mesh.axis_types)
    except Exception:  # noqa: BLE001 - no sharding information: a plain single-device value
        return False
    return any(size > 1 and "manual" not in str(t).lower() for size, t in zip(sizes.values(), types))
