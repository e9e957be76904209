"""Sharding helpers: ZeRO-1 placement of optimizer state over a data-parallel mesh axis.

Data parallelism keeps a full copy of the parameters *and* of the optimizer state on
every device. Adam's state is two to five parameter-sized buffers (``mu``, ``nu``,
``nu_max`` with AMSGrad, ``acc`` with gradient accumulation, ``ema`` with
``use_ema``), so it usually dominates memory. ZeRO stage 1 shards those buffers over
the data axis while the parameters stay replicated: each device updates only its
slice of the state, and the new parameters are gathered back.

Nothing here is specific to :func:`adamx.adam`: the placement rule looks only at leaf
shapes, so it applies to any optax state (``optax.chain``, ``inject_hyperparams``,
``MultiSteps`` ...).

* :func:`zero1_state_sharding` -- a pytree of ``NamedSharding`` for a state (or any
  tree, concrete or abstract): every array leaf is split over ``axis`` along its first
  dimension divisible by the axis size (and not already sharded); leaves with no such
  dimension (scalars such as ``count``, small biases) stay replicated.
* :func:`replicated_sharding` -- ``P()`` for every leaf (the parameters under ZeRO-1).
* :func:`zero1` -- wraps an optimizer so ``init`` and ``update`` keep the state in the
  :func:`zero1_state_sharding` layout, running the update in that layout. Use it with an
  ``Explicit`` mesh axis (``jax.make_mesh``'s default), where shardings are part of the
  array types and cannot be left to the compiler. With an ``Auto`` axis,
  ``jit(..., out_shardings=...)`` alone is enough (XLA propagates); the wrapper does no harm.
* :func:`bytes_per_device` -- memory a tree occupies on each device, from ``addressable_shards``.

Example (8 devices, e.g. ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on CPU)::

    import jax, jax.numpy as jnp, optax, adamx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from adamx.sharding import bytes_per_device, replicated_sharding, zero1

    mesh = jax.make_mesh((8,), ("data",))                 # Explicit axes
    tx = zero1(adamx.adam(1e-3, amsgrad=True, use_ema=True), mesh, axis="data")
    loss = lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)

    with jax.set_mesh(mesh):
        params = {"w": jnp.ones((1024, 64)), "b": jnp.zeros(64)}
        params = jax.device_put(params, replicated_sharding(params, mesh))
        state = jax.jit(tx.init)(params)                  # mu/nu/nu_max/ema["w"]: P("data", None)

        @jax.jit
        def step(params, state, x):
            updates, state = tx.update(jax.grad(loss)(params, x), state, params)
            return optax.apply_updates(params, updates), state

        x = jax.device_put(jnp.ones((32, 1024)), NamedSharding(mesh, P("data")))
        params, state = step(params, state, x)

    print(bytes_per_device(state))  # 1/8 of the replicated state's bytes on each device
    # the params stay replicated and equal those of the unsharded run (to float32 rounding)
"""

from __future__ import annotations

from typing import TypeAlias

import jax
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from adamx._quantize import QuantizedArray
from adamx._types import Leaf, PyTree

# One entry of a PartitionSpec: unsharded, one mesh axis, or several.
SpecEntry: TypeAlias = str | tuple[str, ...] | None

__all__ = [
    "bytes_per_device",
    "replicated_sharding",
    "zero1",
    "zero1_partition_spec",
    "zero1_state_sharding",
]


def _is_array_like(x: object) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.axis_names)}.")
    return int(mesh.shape[axis])


def _same_mesh(a: Mesh | AbstractMesh, mesh: Mesh) -> bool:
    """``a`` (a concrete or abstract mesh) has the axes and sizes of ``mesh``."""
    try:
        return tuple(a.axis_names) == tuple(mesh.axis_names) and dict(a.shape) == dict(mesh.shape)
    except (AttributeError, TypeError):
        return False


def _entry_axes(entry: SpecEntry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _leaf_spec(x: Leaf, mesh: Mesh) -> tuple[SpecEntry, ...] | None:
    """The partition spec ``x`` already has on ``mesh`` (padded to its rank), or ``None``."""
    sharding = getattr(x, "sharding", None)
    if sharding is None and isinstance(x, jax.core.Tracer):
        try:
            sharding = jax.typeof(x).sharding
        except Exception:  # pragma: no cover - tracers without a sharding in their type
            sharding = None
    if not isinstance(sharding, NamedSharding) or not _same_mesh(sharding.mesh, mesh):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (len(x.shape) - len(spec))


def zero1_partition_spec(
    shape: tuple[int, ...], axis_size: int, axis: str = "data", base: tuple[SpecEntry, ...] | None = None
) -> PartitionSpec:
    """The ZeRO-1 ``PartitionSpec`` of one buffer of ``shape``.

    ``axis`` goes on the first dimension that ``base`` (the buffer's existing spec,
    default all ``None``) leaves unsharded and whose size is divisible by
    ``axis_size``; the other entries of ``base`` are kept. Without such a dimension,
    or when ``base`` already uses ``axis``, ``base`` is returned unchanged.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> from adamx.sharding import zero1_partition_spec
      >>> zero1_partition_spec((6, 16), 8) == P(None, "data")
      True
      >>> zero1_partition_spec((3,), 8) == P(None)
      True
      >>> zero1_partition_spec((16, 4), 8, base=("model", None)) == P("model", None)
      True
    """
    spec: list[SpecEntry] = list(base) if base is not None else [None] * len(shape)
    spec += [None] * (len(shape) - len(spec))
    if any(axis in _entry_axes(e) for e in spec):
        return PartitionSpec(*spec)
    for d, n in enumerate(shape):
        if spec[d] is None and n > 0 and n % axis_size == 0:
            spec[d] = axis
            break
    return PartitionSpec(*spec)


def zero1_state_sharding(tree: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """``NamedSharding`` s that place ``tree`` ZeRO-1 style over ``mesh``'s ``axis``.

    ``tree`` is an optimizer state (or params, grads: the rule depends only on
    shapes), concrete or abstract (``jax.eval_shape(tx.init, params)``). Each array
    leaf gets :func:`zero1_partition_spec`: split over ``axis`` along its first
    dimension divisible by the axis size, else replicated. A leaf already sharded on
    other axes of the same mesh (tensor parallelism) keeps that sharding and gains
    ``axis`` on a free dimension. Scalars (``count``, injected hyperparameters) are
    replicated. ``None`` fields (options that are off) stay ``None``, so the result
    can be passed as ``jit``'s ``out_shardings`` / ``in_shardings`` or to ``jax.device_put``.

    For an :class:`adamx.AdamState` this shards ``mu``, ``nu``, ``nu_max``, ``acc``
    and ``ema``; ``count`` is replicated.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> from adamx.sharding import zero1_state_sharding
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
      >>> params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
      >>> abstract = jax.eval_shape(adamx.adam(amsgrad=True).init, params)
      >>> sh = zero1_state_sharding(abstract, mesh)
      >>> sh.mu["w"].spec == jax.sharding.PartitionSpec("data", None), sh.count.is_fully_replicated, sh.acc
      (True, True, None)
    """
    size = _axis_size(mesh, axis)

    def one(x: Leaf) -> Leaf:
        if isinstance(x, QuantizedArray):
            codes = one(x.codes)
            assert isinstance(codes, NamedSharding)
            return _quantized_sharding(x, codes, mesh)
        if not _is_array_like(x):
            return x
        shape = tuple(x.shape)
        if not shape:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, zero1_partition_spec(shape, size, axis, _leaf_spec(x, mesh)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, QuantizedArray))


def _quantized_sharding(q: QuantizedArray, codes: NamedSharding, mesh: Mesh) -> QuantizedArray:
    """An 8-bit leaf's shardings: the codes', and for the scales the codes' spec on the leading axes
    they share (``adamx._quantize.scale_shape``), the blocked axis only where each shard holds whole
    blocks; an axis the codes do not split is never split in the scales (the step decodes codes and
    scales together)."""
    cs, ss = tuple(q.codes.shape), tuple(q.scales.shape)
    spec = list(codes.spec) + [None] * (len(cs) - len(codes.spec))
    lead = len(ss) - 1
    if len(ss) > len(cs) or cs[:lead] != ss[:lead]:  # 1-D scales of a leaf whose size is no multiple of a block
        return QuantizedArray._make((codes, NamedSharding(mesh, PartitionSpec(*([None] * len(ss))))))
    last = spec[lead]
    parts = 1
    for name in _entry_axes(last):
        parts *= _axis_size(mesh, name)
    whole = last is not None and all(e is None for e in spec[lead + 1 :]) and ss[lead] % parts == 0
    return QuantizedArray._make((codes, NamedSharding(mesh, PartitionSpec(*spec[:lead], last if whole else None))))


def replicated_sharding(tree: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding(mesh, P())`` for every array leaf of ``tree`` (the params under ZeRO-1).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adamx.sharding import replicated_sharding
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
      >>> replicated_sharding({"w": jnp.zeros(3)}, mesh)["w"].is_fully_replicated
      True
    """
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: rep if _is_array_like(x) else x, tree)


def _explicit(mesh: Mesh, axis: str) -> bool:
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return types.get(axis) == AxisType.Explicit


def _place(x: Leaf, sharding: object, explicit: bool) -> Leaf:
    """Move ``x`` to ``sharding``: ``reshard`` on Explicit axes, else a constraint (traced) or ``device_put``."""
    if not isinstance(sharding, NamedSharding) or not _is_array_like(x):
        return x
    if explicit:
        return jax.sharding.reshard(x, sharding)
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(x, sharding)
    return jax.device_put(x, sharding)


def _place_tree(tree: PyTree, shardings: PyTree, explicit: bool) -> PyTree:
    return jax.tree.map(lambda s, x: _place(x, s, explicit), shardings, tree, is_leaf=lambda s: s is None)


def _known_sharding(x: Leaf, mesh: Mesh, explicit: bool) -> NamedSharding | None:
    """``x``'s sharding on ``mesh`` when it is known: concrete arrays, or tracers on Explicit axes."""
    if not _is_array_like(x) or (isinstance(x, jax.core.Tracer) and not explicit):
        return None
    spec = _leaf_spec(x, mesh)
    return None if spec is None else NamedSharding(mesh, PartitionSpec(*spec))


def zero1(inner: optax.GradientTransformation, mesh: Mesh, axis: str = "data") -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` with its state sharded ZeRO-1 style over ``mesh``'s ``axis``.

    ``init`` places the state with :func:`zero1_state_sharding`. ``update`` moves the
    gradients and parameters to the same layout as the state (slicing a replicated
    array is free), runs ``inner.update`` there, keeps the new state in that layout and
    returns the updates in the parameters' own sharding (an all-gather), so
    ``optax.apply_updates`` and wrappers such as Flax's ``TrainState`` work unchanged.

    Every reduction ``inner`` does (``global_clipnorm``'s norm) is over the global
    arrays, so the result equals the unsharded one up to float32 summation order.

    Works eagerly and under ``jit``, on ``Explicit`` meshes (the update then runs
    inside ``jax.set_mesh(mesh)`` or ``jit``) and ``Auto`` meshes.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamx
      >>> from adamx.sharding import zero1
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
      >>> tx = zero1(adamx.adam(0.1), mesh)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([2.0, -4.0])}, state, params)
      >>> [round(float(v), 4) for v in optax.apply_updates(params, updates)["w"]]
      [0.9, -1.9]
    """
    _axis_size(mesh, axis)
    explicit = _explicit(mesh, axis)

    def init_fn(params: optax.Params) -> optax.OptState:
        state = inner.init(params)
        return _place_tree(state, zero1_state_sharding(state, mesh, axis), explicit)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None, **extra: object
    ) -> tuple[optax.Updates, optax.OptState]:
        target = zero1_state_sharding(updates, mesh, axis)
        # where each update goes back to: the params' sharding (else the grads') when it is known
        back = jax.tree.map(lambda r: _known_sharding(r, mesh, explicit), params if params is not None else updates)
        g = _place_tree(updates, target, explicit)
        p = None if params is None else _place_tree(params, zero1_state_sharding(params, mesh, axis), explicit)
        new_u, new_state = optax.with_extra_args_support(inner).update(g, state, p, **extra)
        new_state = _place_tree(new_state, zero1_state_sharding(new_state, mesh, axis), explicit)
        new_u = _place_tree(new_u, back, explicit)
        return new_u, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
    """Bytes each device holds for the arrays of ``tree`` (summed over ``addressable_shards``).

    Only this process's devices are counted (in a multi-process run each process
    reports its own). Use it to see what ZeRO-1 saves.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adamx.sharding import bytes_per_device
      >>> list(bytes_per_device({"w": jnp.zeros((4, 2)), "s": None}).values())
      [32]
    """
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
    return out
