"""How a low-precision param receives its update: nearest, Kahan-compensated, stochastic.

``update`` returns optax updates that the caller adds with ``optax.apply_updates``, which
rounds ``p + u`` to nearest in the param dtype. For ``"kahan"`` and ``"stochastic"`` the
step first picks the param it wants, ``p_want``, and returns ``u = round(p_want - p)``:

- when ``p_want`` and ``p`` are within a factor 2 of each other (every step whose update
  is smaller than half the param, the case these modes are for) ``p_want - p`` is exact in
  the param dtype (Sterbenz's lemma), so ``p + u == p_want`` exactly;
- otherwise the step takes ``p_new = round(p + u)`` instead, the value ``apply_updates``
  gives: the returned update is always the one the params really take. Kahan's
  compensation is computed from that ``p_new``, so it absorbs the difference too.

Every rounding to the param dtype here is ``lax.reduce_precision`` on float32 values:
XLA:CPU may drop a ``convert`` pair (float32 -> bfloat16 -> float32) inside a fusion, a
``reduce_precision`` it keeps. The fused kernel (``adamx/fused/kernel.cc``) computes the
same values with real conversions, and the same hash.

Random bits (``"stochastic"``): a counter-based hash, no key to thread. The leaf key is
``mix(mix(mix(seed) ^ count) + leaf * 0x9E3779B9)`` and element ``j`` of the leaf (its
row-major index) gets ``mix(mix(j ^ key) + key)``, ``mix`` being MurmurHash3's 32-bit
finalizer; the top 24 bits are a uniform ``r`` in ``[0, 1)``. So the bits depend only on
``(seed, count, leaf index, element index)``: the same under jit, vmap, sharding and
after a restore.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adamx._types import ArrayLike, DType

GOLDEN = 0x9E3779B9
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35


def narrow(dtype: DType) -> bool:
    """Whether params of ``dtype`` are rounded by ``param_rounding`` (floats narrower than float32)."""
    dt = jnp.dtype(dtype)
    return bool(jnp.issubdtype(dt, jnp.floating)) and dt.itemsize < 4


def _u32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x).astype(jnp.uint32)


def mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer (uint32 in, uint32 out; wraps modulo 2**32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_M1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_M2)
    return h ^ (h >> 16)


def leaf_key(seed: int, count: jax.Array, leaf: int) -> jax.Array:
    """The uint32 key of one leaf at one step."""
    s = mix(jnp.uint32(int(seed) & 0xFFFFFFFF))
    return mix(mix(s ^ _u32(count)) + jnp.uint32((leaf * GOLDEN) & 0xFFFFFFFF))


def leaf_keys(seed: int, count: jax.Array, n_leaves: int) -> jax.Array:
    """``leaf_key(seed, count, i)`` for ``i < n_leaves``, as one uint32 array (the fused kernel's operand)."""
    s = mix(jnp.uint32(int(seed) & 0xFFFFFFFF))
    i = jax.lax.iota(jnp.uint32, n_leaves)
    return mix(mix(s ^ _u32(count)) + i * jnp.uint32(GOLDEN))


def uniforms(key: jax.Array, shape: tuple[int, ...], like: jax.Array | None = None) -> jax.Array:
    """float32 uniforms in ``[0, 1)`` (multiples of 2**-24), one per element of ``shape``.

    The counter is each element's C-order index, built from one iota per axis so that it takes
    ``like``'s sharding on an Explicit mesh: each device hashes its own elements only.
    """
    sharding = None if like is None else _explicit_sharding(like)
    j = jnp.zeros(shape, jnp.uint32) if not shape else None
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        term = jax.lax.broadcasted_iota(jnp.uint32, shape, d, out_sharding=sharding) * jnp.uint32(stride)
        j = term if j is None else j + term
        stride *= int(shape[d])
    assert j is not None
    h = mix(mix(j ^ key) + key)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """``x``'s sharding where it lives on an Explicit mesh (a ``NamedSharding``: it names its mesh,
    so no ``jax.set_mesh`` is needed), else ``None``."""
    sh = jax.typeof(x).sharding
    mesh = getattr(sh, "mesh", None)
    if mesh is None or not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return jax.sharding.NamedSharding(mesh, sh.spec)


def to_dtype(x: jax.Array, dtype: DType) -> jax.Array:
    """``x`` (float32) rounded to nearest in ``dtype``, kept in float32.

    ``reduce_precision`` flushes values under ``dtype``'s smallest normal to zero; float16's
    subnormals (normal float32 values) are rounded to a multiple of their spacing ``2**-24``
    instead (scaling by a power of 2 is exact).
    """
    fi = jnp.finfo(dtype)
    rp = jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    if jnp.dtype(dtype) != jnp.dtype(jnp.float16):
        return rp  # bfloat16's subnormals are float32's: flushed on CPU in both paths
    sub = jax.lax.round(x * jnp.float32(2.0**24), jax.lax.RoundingMethod.TO_NEAREST_EVEN) * jnp.float32(2.0**-24)
    return jnp.where(jnp.abs(x) < jnp.float32(fi.smallest_normal), sub, rp)


def stochastic(x: jax.Array, dtype: DType, r: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to one of its two neighbours in ``dtype`` (kept in float32):
    up with probability ``(x - lo) / (hi - lo)`` (``r < that``), so the mean is ``x``.

    Exact values, non-finite values and overflow round to nearest.
    """
    q = to_dtype(x, dtype)
    bits = jax.lax.bitcast_convert_type(q.astype(dtype), jnp.uint16)
    away = (x > q) == (q > 0)  # x is farther from zero than q: the other neighbour is one step out
    step = jnp.where(away, bits + jnp.uint16(1), bits - jnp.uint16(1))
    tiny = jnp.where(x < 0, jnp.uint16(0x8001), jnp.uint16(0x0001))
    other_bits = jnp.where((bits & jnp.uint16(0x7FFF)) == 0, tiny, step)
    o = jax.lax.bitcast_convert_type(other_bits, dtype).astype(jnp.float32)
    lo, hi = jnp.minimum(q, o), jnp.maximum(q, o)
    up = r * (hi - lo) < (x - lo)  # both sides exact: hi - lo is a power of 2, x - lo by Sterbenz
    return jnp.where(jnp.isfinite(q) & (q != x), jnp.where(up, hi, lo), q)


def receive(
    mode: str, p: jax.Array, u: jax.Array, comp: jax.Array | None, r: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """A narrow param ``p`` receives the float32 update ``u``: ``(update, new comp)``.

    The update is in ``p``'s dtype and ``optax.apply_updates(p, update)`` is the new param.

    .. code-block:: text

        kahan:       y = u + comp ; p_want = round(p + y)
        stochastic:  p_want = stochastic_round(p + u)
        update = round(p_want - p) ; p_new = round(p + update)    # == p_want (Sterbenz)
        kahan:       comp = y - (p_new - p)                       # what p still owes
    """
    dt = p.dtype
    pf = p.astype(jnp.float32)
    if mode == "kahan":
        assert comp is not None
        y = u + comp.astype(jnp.float32)
        want = to_dtype(pf + y, dt)
    else:
        assert r is not None
        want = stochastic(pf + u, dt, r)
    upd = to_dtype(want - pf, dt).astype(dt)
    new_comp = None
    if mode == "kahan":
        # the sum ``optax.apply_updates`` makes, written as it writes it (``p + update`` in p's
        # dtype, = round(pf + upd)): XLA then computes the new param once for both consumers,
        # in the same pass as the moments (one pass on TPU: 26 B/param for bf16, not 66)
        # (rounded explicitly again: under XLA's excess precision the dtype sum may stay float32)
        p_new = to_dtype((p + upd).astype(jnp.float32), dt)
        new_comp = (y - (p_new - pf)).astype(dt)
    return upd, new_comp
