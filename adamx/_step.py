"""The ``adamx.adam`` step, written once: per-step scalars and the elementwise pieces.

A *unit* is an array the step runs on: one leaf of params (tree state) or one whole
flat buffer (``flat_state=True``). The pieces below take units and do not care which;
:func:`update_tree` and :func:`update_flat` differ only in what they pass as units.
The fused C++ kernel (``adamx/fused/kernel.cc``) is the only other copy of this
arithmetic; ``tests/test_performance_paths.py`` checks it op by op against this one for
every option the kernel supports.

One call (Keras ``optimizer.apply``), with ``n`` earlier calls, ``k`` the window:

.. code-block:: text

    g   = g / loss_scale_factor                    # unscale
    micro-step ((n+1) % k != 0):  acc += g, nothing else moves
    g   = (g + acc) / k ;  acc = 0                 # window_mean
    g   = clip(g)                                  # per unit, per leaf slice, or global
    m, v, v_max, d = moments(g)                    # Keras kernel form, epsilon hat
    u   = -d - lr * wd * p                         # descent (decayed leaves)
    u   = receive(p, u)                            # param_rounding (bf16/f16 params; adamx._rounding)
    ema = mom * ema + (1 - mom) * (p + u)          # average; overwrite: u = ema - p
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import optax
from jax.interpreters import batching, mlir

from adamx import _averaging, _checks, _clipping, _decay, _flat, _hyper, _moments, _quantize, _rounding, _tree
from adamx._codecs import Dynamic8, MomentCodec
from adamx._spec import AdamSpec
from adamx._state import AdamState, AnyAdamState, KahanAdamState, layout, next_state, tree_views
from adamx._types import Leaf

CLIP_CODES = {"none": 0, "norm": 1, "global_norm": 2, "value": 3}


class Scalars(NamedTuple):
    """The per-step scalars (0-d float32). The field order is the fused kernel's scalar
    layout: ``kernel.cc`` exports its own list of names and the loader refuses a kernel
    whose list differs."""

    c1: jax.Array  # 1 - beta_1 (Keras rounding)
    c2: jax.Array  # 1 - beta_2
    alpha: jax.Array  # lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    eps: jax.Array  # epsilon hat
    lr: jax.Array  # learning rate at this call
    wd: jax.Array  # weight decay rate (0 when off)
    lsf: jax.Array  # loss_scale_factor (1 when off)
    has_lsf: jax.Array  # 1 when loss_scale_factor is set
    k: jax.Array  # accumulation window (1 when off)
    is_real: jax.Array  # 1 on a real step, 0 on an accumulation micro-step
    clip_mode: jax.Array  # CLIP_CODES[spec.clip_mode]
    clip_c: jax.Array  # the clip threshold (1 when off)
    clip_scale: jax.Array  # global_clipnorm's factor (set after the norms are known; 1 otherwise)
    mom: jax.Array  # EMA momentum of this call (0 on the first real step)
    one_m: jax.Array  # 1 - mom
    overwrite: jax.Array  # 1 when this call sets params to their averages


def _f32(x: Leaf) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def scalars(spec: AdamSpec, n: jax.Array) -> Scalars:
    """The scalars of the call after ``n`` earlier calls (Keras counting: schedules see ``n``,
    the bias correction ``t = n // k + 1``)."""
    k = spec.window
    lr = _hyper.value_at(spec.learning_rate, n)
    # t in float32: n + 1 would wrap at the saturated count (int32 max)
    t = (n if k is None else n // k).astype(jnp.float32) + 1
    sc = _moments.adam_scalars(
        spec.beta_1, spec.beta_2, spec.epsilon, 0.0, n, alpha_lr=lr, keras_rounding=True, t=t, sched_count=n
    )
    wd = _f32(0.0) if spec.weight_decay is None or not spec.decay_on else _hyper.value_at(spec.weight_decay, n)
    mom, one_m, overwrite = _f32(0.0), _f32(1.0), jnp.asarray(False)
    if spec.use_ema:
        mom, one_m, ow = _averaging.ema_scalars(n, spec.ema_momentum, spec.ema_overwrite_frequency, k)
        overwrite = jnp.asarray(False) if ow is None else ow
    lsf = spec.loss_scale_factor
    c = spec.clip_threshold
    return Scalars(
        c1=sc.c1,
        c2=sc.c2,
        alpha=sc.alpha,
        eps=sc.eps,
        lr=lr,
        wd=wd,
        lsf=_f32(1.0 if lsf is None else lsf),
        has_lsf=_f32(lsf is not None),
        k=_f32(1 if k is None else k),
        is_real=is_real(spec, n),
        clip_mode=_f32(CLIP_CODES[spec.clip_mode]),
        clip_c=_f32(1.0 if c is None else c),
        clip_scale=_f32(1.0),
        mom=mom,
        one_m=one_m,
        overwrite=overwrite,
    )


# ---------------------------------------------------------------------- elementwise pieces
def unscale(spec: AdamSpec, g_u: list[Leaf]) -> list[Leaf]:
    """Gradients in float32 at least, divided by ``loss_scale_factor`` (``None`` stays ``None``)."""
    g_u = [None if g is None else g.astype(_tree.compute_dtype(g.dtype)) for g in g_u]
    if spec.loss_scale_factor is None:
        return g_u
    s = _f32(spec.loss_scale_factor)
    return [None if g is None else g / s.astype(g.dtype) for g in g_u]


def window_mean(spec: AdamSpec, g_u: list[Leaf], acc_u: list[Leaf]) -> tuple[list[Leaf], list[Leaf]]:
    """The last micro-step of a window: the mean gradient, accumulators reset."""
    kf = _f32(spec.window)
    return (
        [None if g is None else (g + a.astype(g.dtype)) / kf.astype(g.dtype) for g, a in zip(g_u, acc_u)],
        [jnp.zeros_like(a) for a in acc_u],
    )


def accumulate(g_u: list[Leaf], acc_u: list[Leaf]) -> list[Leaf]:
    """A micro-step: gradients added to the accumulators (in the wider dtype, rounded once)."""
    return [
        a
        if g is None
        else (a.astype(_tree.compute_dtype_of(a, g)) + g.astype(_tree.compute_dtype_of(a, g))).astype(a.dtype)
        for g, a in zip(g_u, acc_u)
    ]


def clip(
    spec: AdamSpec,
    g_u: list[Leaf],
    split: Callable[[list[Leaf]], list[Leaf]] | None = None,
    join: Callable[[list[Leaf]], list[Leaf]] | None = None,
) -> list[Leaf]:
    """Keras clipping of the units. ``clipnorm`` is per parameter tensor: for flat
    units ``split`` cuts them into leaves and ``join`` puts the clipped leaves back."""
    return _clipping.clip_units(spec.clip_mode, spec.clip_threshold, g_u, split, join)


def moments(sc: Scalars, g: Leaf, m: Leaf, v: Leaf, v_max: Leaf) -> tuple[Leaf, Leaf, Leaf, Leaf]:
    """Adam on one unit (Keras kernel form, epsilon hat): ``(direction, m, v, v_max)``.

    :func:`adamx._moments.adam_leaf` (float32 arithmetic, wider for float64; complex leaves
    by optax's convention); moments stored back in their own dtypes. A ``None`` gradient
    leaves the moments alone and gives a ``None`` direction.
    """
    if g is None:
        return None, m, v, v_max
    z = jnp.zeros([], jnp.float32)  # b1, b2, b1^t, b2^t, eps_root: not read by the kernel form / epsilon hat
    asc = _moments.AdamScalars(b1=z, b2=z, c1=sc.c1, c2=sc.c2, b1p=z, b2p=z, alpha=sc.alpha, eps=sc.eps, eps_root=z)
    return _moments.adam_leaf(g, m, v, v_max, asc, form="kernel", mode="hat")


def moments_coded(
    sc: Scalars,
    g: Leaf,
    m: Leaf,
    v: Leaf,
    v_max: Leaf,
    codecs: Sequence[MomentCodec],
    schedule: str | None = None,
    kernel: bool = True,
) -> tuple[Leaf, Leaf, Leaf, Leaf]:
    """:func:`moments` on a unit whose moments may be coded (:class:`adamx.QuantizedArray`,
    ``quantize_moments=True``; docs/quantized_state.md): decode (to float32), the float32 step,
    encode, with ``codecs`` the :class:`adamx._codecs.MomentCodec` of ``mu``, ``nu``, ``nu_max``
    (``spec.codec(field)``: for ``dynamic8`` the signed map for ``mu``, the unsigned one for the
    others). The direction uses this step's float32 moments; only what is stored is rounded (as
    bitsandbytes and torchao do).

    Schedules of the same arithmetic, picked by the backend the step is compiled for:

    * XLA:CPU: the new moments computed once (an optimization barrier keeps XLA from
      recomputing them per consumer with another FMA contraction), so the stored codes, the
      block absmax and the direction see one rounding, the fused kernel's; the barrier costs
      nothing there.
    * GPU: two passes. The first computes the new moments only to reduce them to block
      absmaxes; the second computes them again (from inputs passed through a barrier, so XLA
      cannot merge the two) and encodes them with those scales, in the same kernel as the
      direction and, under jit, the param update. The float32 moments never reach memory:
      about 22 bytes a float32 param instead of 32 (a barrier on the moments would force them
      out: 48). Both passes are the same operations on the same values; where a compiler
      rounds them differently, a value a hair above its block's scale still encodes to the
      end code (docs/quantized_state.md, "bit identities"). 4-bit codes are unpacked and packed
      there by elementwise forms (``adamx._lowbit.unpack4``/``pack4`` ``fused``) that XLA:GPU
      fuses into the two passes (21.5 bytes a float32 param instead of 42.3).
    * TPU (``"lanes"``): one pass without barrier in the leaf's own shape, the blocks of a row cut
      by static slices and scaled by selects along the last axis (a reshape into blocks is a
      relayout copy on a TPU: 63 instead of 128 bytes a float32 param); where the last axis may
      be split over devices, or holds more than 32 blocks, the blocked formulation
      (:func:`adamx._quantize.lanes_apply`).
    * Elsewhere (``"plain"``): one pass in blocks, no barrier.

    ``schedule`` (``"one_pass"``, ``"two_passes"``, ``"lanes"``, ``"plain"``) forces one on every
    backend (tests).

    A ``dynamic8`` unit of the current layout with a float32 gradient, not split over devices, is
    one :data:`coded_moments_p` (unless ``kernel=False``: :func:`coded_kernel_applies`): the schedules above,
    except on XLA:CPU with the C++ kernel built, where it is one call of the fused step's per-block
    arithmetic (``adamx.fused`` registers that lowering; ``jax.export`` keeps XLA's). The same bits
    for a gradient that is an argument of the step; for one computed in the same program, XLA's
    schedule may contract its last product into ``g - m`` and the kernel, like ``apply_gradients``,
    does not (an ulp apart).
    """
    qs = [isinstance(x, _quantize.QuantizedArray) for x in (m, v, v_max)]
    if g is None or not any(qs):
        return moments(sc, g, m, v, v_max)

    # the codecs that take the accelerator schedules' arguments (lookup, scales, lanes): dynamic8's, 4bit's
    tuned = [q and hasattr(c, "scales_of") for q, c in zip(qs, codecs)]

    def step(g: Leaf, m: Leaf, v: Leaf, v_max: Leaf, lookup: str | None = None) -> tuple[Leaf, Leaf, Leaf, Leaf]:
        def decode(x: Leaf, c: MomentCodec, t: bool) -> Leaf:
            return c.decode(x, g.shape, lookup=lookup) if lookup and t else c.decode(x, g.shape)  # type: ignore[call-arg]

        m32, v32, x32 = (decode(x, c, t) if q else x for x, q, c, t in zip((m, v, v_max), qs, codecs, tuned))
        return moments(sc, g, m32, v32, x32)

    def encode(new: tuple[Leaf, ...], scales: Sequence[Leaf]) -> tuple[Leaf, ...]:
        return tuple(c.encode(x, *s) if q else x for x, q, c, s in zip(new, qs, codecs, scales))

    def one_pass(g: Leaf, m: Leaf, v: Leaf, v_max: Leaf) -> tuple[Leaf, Leaf, Leaf, Leaf]:
        d, m2, v2, x2 = jax.lax.optimization_barrier(step(g, m, v, v_max))
        return (d, *encode((m2, v2, x2), [()] * 3))

    def two_passes(g: Leaf, m: Leaf, v: Leaf, v_max: Leaf) -> tuple[Leaf, Leaf, Leaf, Leaf]:
        # pass 1, the block absmaxes: the codes decoded by a gather (XLA:GPU fuses it into the reduction)
        first = step(g, m, v, v_max, "table")[1:]
        scales = [(c.scales_of(x),) if t else () for x, c, t in zip(first, codecs, tuned)]  # type: ignore[attr-defined]
        # pass 2 from the codes passed through a barrier (no pass-1 value is reused), decoded by
        # arithmetic: the update writes the codes over the old ones in place
        fm, fv, fx = jax.lax.optimization_barrier((m, v, v_max))
        d, m2, v2, x2 = step(g, fm, fv, fx, "arithmetic")
        return (d, *encode((m2, v2, x2), scales))

    def plain(g: Leaf, m: Leaf, v: Leaf, v_max: Leaf) -> tuple[Leaf, Leaf, Leaf, Leaf]:
        d, m2, v2, x2 = step(g, m, v, v_max)
        return (d, *encode((m2, v2, x2), [()] * 3))

    def lanes(g: Leaf, m: Leaf, v: Leaf, v_max: Leaf) -> tuple[Leaf, Leaf, Leaf, Leaf]:
        # the TPU's: one pass in the leaf's own shape, blocks by slices and selects (no reshape)
        d, m2, v2, x2 = step(g, m, v, v_max, "lanes")
        kw = [{"lanes": True} if t else {} for t in tuned]
        return (d, *(c.encode(x, **k) if q else x for x, q, c, k in zip((m2, v2, x2), qs, codecs, kw)))

    if schedule is not None:
        return {"one_pass": one_pass, "two_passes": two_passes, "plain": plain, "lanes": lanes}[schedule](
            g, m, v, v_max
        )
    if kernel and _kernel_takes(g, (m, v, v_max), codecs):
        ams = v_max is not None
        ops = [a for x in ((m, v, v_max) if ams else (m, v)) for a in x]
        r = coded_moments_p.bind(*sc, g, *ops, codecs=tuple(codecs[: 2 + ams]), ams=ams)
        pairs = [_quantize.QuantizedArray(r[1 + 2 * j], r[2 + 2 * j]) for j in range(len(ops) // 2)]
        return r[0], pairs[0], pairs[1], (pairs[2] if ams else None)
    return jax.lax.platform_dependent(
        g,
        m,
        v,
        v_max,
        cpu=one_pass,
        cuda=two_passes,
        rocm=two_passes,
        tpu=lanes,
        default=plain,
    )


# ------------------------------------------------------------------ one 8-bit unit as a primitive
#
# An 8-bit (dynamic8) unit's moments_coded is one primitive, lowered per platform: XLA's schedules
# (above) by default; on CPU adamx.fused registers the C++ kernel's one pass per block (the fused
# step's arithmetic: XLA:CPU compiles the arithmetic codec slowly, ~50 ms a leaf, and runs it at a
# fraction of the memory bandwidth). A lowering is traced only for its own platform, so the CPU
# program does not pay for the accelerator schedules, nor they for the kernel.


def coded_kernel_applies(spec: AdamSpec) -> bool:
    """Whether ``spec``'s steps may take :data:`coded_moments_p`'s kernel: not where the gradient
    reaching the moments is a product XLA would contract into their ``g - m`` (clipping by norm,
    the accumulation window's mean), which a kernel operand cannot: those keep XLA's schedule."""
    return spec.clip_mode not in ("norm", "global_norm") and spec.window is None


def _kernel_takes(g: Leaf, moms: tuple[Leaf, Leaf, Leaf], codecs: Sequence[MomentCodec]) -> bool:
    """Whether the unit goes through :data:`coded_moments_p`: every moment 8-bit in the ``dynamic8``
    format of the current layout (signed ``mu``, unsigned ``nu``/``nu_max``, one block size), a float32
    gradient, nothing split over devices (a custom call would need it gathered)."""
    m, v, v_max = moms
    qs = [x for x in moms if x is not None]
    cs = list(codecs[: len(qs)])
    if g is None or jnp.dtype(g.dtype) != jnp.dtype(jnp.float32) or len(cs) < len(qs) or m is None or v is None:
        return False
    if not all(isinstance(x, _quantize.QuantizedArray) for x in qs) or not all(isinstance(c, Dynamic8) for c in cs):
        return False
    d8: list[Dynamic8] = cs  # type: ignore[assignment]
    if not d8[0].signed or any(c.signed for c in d8[1:]) or len({c.block_size for c in d8}) != 1:
        return False
    if not all(_checks.has_layout(x, d8[0], tuple(jnp.shape(g))) for x in qs):
        return False  # e.g. the first (1-D) layout: XLA's path converts it
    return not any(_tree.is_sharded(a) for a in (g, *(a for x in qs for a in x)))


def coded_moments_xla(*args: jax.Array, codecs: tuple[MomentCodec, ...], ams: bool) -> list[jax.Array]:
    """:data:`coded_moments_p` by XLA: ``args`` = the :class:`Scalars`, ``g``, codes and scales of
    ``mu``, ``nu`` (, ``nu_max``); returns the direction, then the new codes and scales."""
    n_sc = len(Scalars._fields)
    sc, g, ops = Scalars(*args[:n_sc]), args[n_sc], args[n_sc + 1 :]
    moms = [_quantize.QuantizedArray(ops[2 * j], ops[2 * j + 1]) for j in range(len(ops) // 2)]
    full = (*codecs, *codecs[1:2]) if not ams else codecs
    d, m2, v2, x2 = moments_coded(sc, g, moms[0], moms[1], moms[2] if ams else None, full, kernel=False)
    return [d, *m2, *v2, *(x2 if ams else ())]


def _coded_moments_batched(args: Sequence[jax.Array], dims: Sequence[Any], **params: Any) -> tuple[list, list]:
    out = jax.vmap(lambda *a: coded_moments_xla(*a, **params), in_axes=tuple(dims))(*args)
    return out, [0] * len(out)


coded_moments_p = jax.extend.core.Primitive("adamx_coded_moments")
coded_moments_p.multiple_results = True
coded_moments_p.def_impl(lambda *args, **params: jax.jit(lambda *a: coded_moments_xla(*a, **params))(*args))


def _coded_moments_abstract(*args: Any, codecs: tuple[MomentCodec, ...], ams: bool) -> list[Any]:
    """The direction is shaped like ``g`` (float32), the new state like the old; inside ``shard_map``
    every output varies over the manual axes any input varies over (as XLA's schedule's would)."""
    vma = frozenset().union(*(getattr(a, "vma", frozenset()) for a in args))
    return [a.update(vma=vma) if hasattr(a, "vma") else a for a in args[len(Scalars._fields) :]]


coded_moments_p.def_abstract_eval(_coded_moments_abstract)
mlir.register_lowering(coded_moments_p, mlir.lower_fun(coded_moments_xla, multiple_results=True))
batching.primitive_batchers[coded_moments_p] = _coded_moments_batched


def descent(sc: Scalars, d: Leaf, p: Leaf, decay: bool, dtype: Leaf) -> Leaf:
    """The update ``-d``, minus ``lr * wd * p`` where the leaf is decayed, in ``dtype``."""
    u = -d
    if decay:
        u = u - (p.astype(d.dtype) * sc.wd.astype(d.dtype)) * sc.lr.astype(d.dtype)
    return u.astype(dtype)


def receive(spec: AdamSpec, n: jax.Array, leaf: int, u: Leaf, p: Leaf, comp: Leaf) -> tuple[Leaf, Leaf]:
    """``param_rounding`` on leaf number ``leaf``: the float32 update ``u`` of a narrow param
    ``p`` becomes ``(update in p's dtype, new compensation)`` (see :mod:`adamx._rounding`)."""
    r = None
    if spec.param_rounding == "stochastic":
        r = _rounding.uniforms(_rounding.leaf_key(spec.seed, n, leaf), tuple(jnp.shape(p)), like=p)
    upd, new_comp = _rounding.receive(spec.param_rounding, p, u, comp, r)
    return upd, (comp if new_comp is None else new_comp)


def rounds(spec: AdamSpec, p: Leaf) -> bool:
    """Whether ``param_rounding`` changes how ``p`` receives its update (narrow float params)."""
    return spec.param_rounding != "nearest" and p is not None and _rounding.narrow(jnp.result_type(p))


def average(sc: Scalars, ema: Leaf, p_new: Leaf) -> Leaf:
    """Keras's EMA of one unit: ``mom * ema + (1 - mom) * p_new`` (``p_new`` = params after the step)."""
    return _averaging.average_leaf(sc.mom, sc.one_m, ema, p_new)


class Moments(NamedTuple):
    """The per-unit state the gradient part of the step reads and writes."""

    acc: list[Leaf]
    mu: list[Leaf]
    nu: list[Leaf]
    nu_max: list[Leaf]


def is_real(spec: AdamSpec, n: jax.Array) -> jax.Array:
    """Whether the call after ``n`` earlier calls is a real step (not an accumulation micro-step)."""
    k = spec.window
    return jnp.asarray(True) if k is None else n % k == k - 1  # (n + 1) % k == 0 without overflow


def direction(
    spec: AdamSpec,
    n: jax.Array,
    scalars_of: Callable[[], Scalars],
    g_u: list[Leaf],
    st: Moments,
    *,
    split: Callable[[list[Leaf]], list[Leaf]] | None = None,
    join: Callable[[list[Leaf]], list[Leaf]] | None = None,
    finish: Callable[[list[Leaf], Scalars], list[Leaf]] | None = None,
    idle: Callable[[list[Leaf]], list[Leaf]] | None = None,
) -> tuple[list[Leaf], Moments]:
    """Accumulate / window-mean / clip / moments over the units: ``(out, new state)``.

    ``out`` is the direction per unit, or ``finish(directions, scalars)``, computed inside
    the real step's branch (as are the scalars: ``scalars_of()``, so schedules run on real
    steps only). On a micro-step (the other branch of ``lax.cond``) the moments do not move
    and ``out`` is ``idle(gradients)`` (default: the gradients, a placeholder).
    """
    k = spec.window

    def real_step(g_u: list[Leaf], st: Moments) -> tuple[list[Leaf], Moments]:
        sc = scalars_of()
        acc = st.acc
        if k is not None:
            g_u, acc = window_mean(spec, g_u, st.acc)
        g_u = clip(spec, g_u, split, join)
        cs = [spec.codec(f) for f in ("mu", "nu", "nu_max")] if spec.quantize_moments else []
        kernel = coded_kernel_applies(spec)
        d_u, mu, nu, nm = (
            list(x)
            for x in zip(*(moments_coded(sc, *a, codecs=cs, kernel=kernel) for a in zip(g_u, st.mu, st.nu, st.nu_max)))
        )
        return (d_u if finish is None else finish(d_u, sc)), Moments(acc, mu, nu, nm)

    def micro_step(g_u: list[Leaf], st: Moments) -> tuple[list[Leaf], Moments]:
        return (g_u if idle is None else idle(g_u)), st._replace(acc=accumulate(g_u, st.acc))

    if not g_u:
        return [], st
    if k is None:
        return real_step(g_u, st)
    out, new = jax.lax.cond(is_real(spec, n), real_step, micro_step, g_u, st)
    return list(out), Moments(*(list(x) for x in new))


# ---------------------------------------------------------------------- the two iterations
def _none_list(n: int) -> list[Leaf]:
    return [None] * n


def update_tree(spec: AdamSpec, grads: optax.Updates, state: AnyAdamState, params: optax.Params | None) -> Leaf:
    """``update`` with tree state: the units are the leaves."""
    g_l, p_l, treedef = _tree.align_grads(grads, state.mu if params is None else params)
    nl = len(g_l)
    if params is None:
        p_l = _none_list(nl)
    frozen = frozen_leaves(g_l, p_l, treedef)
    g_l = [None if fr else g for g, fr in zip(g_l, frozen)]
    flat = treedef.flatten_up_to
    st = Moments(
        acc=flat(state.acc) if spec.window is not None else _none_list(nl),
        mu=flat(state.mu),
        nu=flat(state.nu),
        nu_max=flat(state.nu_max) if spec.amsgrad else _none_list(nl),
    )
    n = state.count
    g_l = unscale(spec, g_l)
    keep = _decay.decay_mask_leaves(params, spec.exclude, spec.weight_decay_mask) if spec.decay_on else [False] * nl
    kahan = spec.param_rounding == "kahan"
    if kahan != isinstance(state, KahanAdamState):
        raise ValueError(
            f"adamx.adam(param_rounding={spec.param_rounding!r}) got a {type(state).__name__}: "
            "use the state its own init returns (KahanAdamState for 'kahan', AdamState otherwise)."
        )
    comp_l = flat(state.comp) if isinstance(state, KahanAdamState) else []

    def finish(d_l: list[Leaf], sc: Scalars) -> list[Leaf]:
        u_l = [
            None if d is None else descent(sc, d, p, dec, g.dtype if p is None else jnp.result_type(p))
            for g, p, d, dec in zip(g_l, p_l, d_l, keep)
        ]
        c_l = list(comp_l)
        for i, (p, d, dec) in enumerate(zip(p_l, d_l, keep)):
            if d is not None and rounds(spec, p):
                u_l[i], c = receive(spec, n, i, descent(sc, d, p, dec, d.dtype), p, c_l[i] if kahan else None)
                if kahan:
                    c_l[i] = c
        return u_l + c_l  # the compensation rides along (lax.cond under accumulation)

    def idle(g_l: list[Leaf]) -> list[Leaf]:
        return [
            None if g is None else jnp.zeros_like(g, dtype=g.dtype if p is None else jnp.result_type(p))
            for g, p in zip(g_l, p_l)
        ] + list(comp_l)

    u_l, st = direction(spec, n, lambda: scalars(spec, n), g_l, st, finish=finish, idle=idle)
    u_l, comp_l = u_l[:nl], u_l[nl:]
    ema_l = None
    if spec.use_ema:
        u_l, ema_l = _averaging.ema_step(
            p_l, u_l, flat(state.ema), n, spec.ema_momentum, spec.ema_overwrite_frequency, spec.window
        )
    u_l = [zeros_for_none(u, p, fr) for u, p, fr in zip(u_l, p_l, frozen)]
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    fields = {"mu": st.mu, "nu": st.nu, "nu_max": st.nu_max, "acc": st.acc, "ema": ema_l, "comp": comp_l}
    return unflat(u_l), next_state(spec, n, unflat, fields)


def frozen_leaves(g_l: list[Any], p_l: list[Any], treedef: Any) -> list[bool]:
    """Which leaves are left alone with their gradient ignored: integer and bool params (e.g.
    step counters kept in params), or, without params, leaves whose gradient is
    integer/bool/``float0`` (``jax.grad(..., allow_int=True)``). Their update is zeros, their
    moments never move. A float param given an integer, bool or ``float0`` gradient is refused
    naming its path (it would be frozen silently)."""
    out: list[bool] = []
    for g, p in zip(g_l, p_l):
        g_frozen = g is not None and not _checks.is_trainable(g.dtype)
        p_frozen = p is not None and not _checks.is_trainable(jnp.result_type(p))
        if g_frozen and (p is None and g.dtype == jax.dtypes.float0 or p is not None and not p_frozen):
            path = _tree.leaf_paths(jax.tree_util.tree_unflatten(treedef, g_l))[len(out)]
            if p is None:
                raise ValueError(
                    f"grads at '{path}' is float0 (the gradient of an integer parameter): pass the params, "
                    "update(grads, state, params), so its update can be zeros of the parameter's dtype."
                )
            raise ValueError(_checks.grad_dtype_error(path, g.dtype, jnp.result_type(p)))
        out.append(p_frozen or g_frozen)
    return out


def zeros_for_none(u: Leaf, p: Leaf, frozen: bool) -> Leaf:
    """The update of a leaf without a gradient (``None``) or left alone: zeros of the params' dtype,
    so ``optax.apply_updates`` takes it; without params a ``None`` update stays ``None``."""
    if p is None:
        return jnp.zeros_like(u) if frozen and u is not None else u
    if u is None or frozen:
        return jnp.zeros(jnp.shape(p), jnp.result_type(p))
    return u


def update_flat(spec: AdamSpec, grads: optax.Updates, state: AdamState, params: optax.Params) -> Leaf:
    """``update`` with flat state: the units are the whole flat buffers (one per dtype group).

    The gradients are concatenated once; unscaling, the window, clipping, the moments and
    the average are whole-buffer operations, and each leaf's update is a slice of the
    whole-buffer update (``clipnorm`` takes one norm per slice). Returns ``None`` where this
    does not apply (``None`` gradients, grads wider than their group, state fields grouped
    differently from the arithmetic): the caller then runs :func:`update_tree` on views.
    """
    if any(spec.quantized_leaves(params)):  # 8-bit leaves: the per-leaf step on their views
        return None
    g_l, p_l, treedef = _tree.align_grads(grads, params)
    on = spec.fields_on
    lay = _flat.layout(p_l, lambda p: _tree.compute_dtype(jnp.result_type(p)))
    groups = tuple(s.group for s in lay.slots)
    if any(not _checks.is_trainable(jnp.result_type(p)) or jnp.iscomplexobj(p) for p in p_l):
        return None  # integer/bool leaves (left alone) and complex leaves: the per-leaf step
    if any(g is None for g in g_l) or any(
        _tree.compute_dtype(g.dtype) != lay.dtypes[s.group] for g, s in zip(g_l, lay.slots)
    ):
        return None
    if any(tuple(s.group for s in layout(spec, f, p_l).slots) != groups for f in on):
        return None
    if any(rounds(spec, p) for p in p_l):  # param_rounding works per leaf: the leaf-wise path
        return None
    bufs = {f: _flat.checked_buffers(getattr(state, f), lay, f) for f in on}
    ng = len(lay.dtypes)
    members = [[i for i, s in enumerate(lay.slots) if s.group == j] for j in range(ng)]
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)  # noqa: E731

    def piece(buf: Sequence[Leaf], i: int) -> Leaf:
        return _flat.view(buf, lay.slots[i])

    n = state.count
    sc = scalars(spec, n)
    gf = unscale(spec, list(_flat.pack(g_l, lay).buffers))
    nones = _none_list(ng)
    st = Moments(
        acc=list(bufs.get("acc", nones)),
        mu=list(bufs["mu"]),
        nu=list(bufs["nu"]),
        nu_max=list(bufs.get("nu_max", nones)),
    )
    d, st = direction(
        spec,
        n,
        lambda: sc,
        gf,
        st,
        split=lambda us: [piece(us, i) for i in range(len(p_l))],
        join=lambda ls: list(_flat.pack(ls, lay).buffers),
    )
    real = None if spec.window is None else sc.is_real
    keep = (
        _decay.decay_mask_leaves(params, spec.exclude, spec.weight_decay_mask) if spec.decay_on else [False] * len(p_l)
    )

    def finish(d: Leaf, p: Leaf, dec: bool) -> Leaf:
        """The update in the params' dtype; zero on micro-steps (``d`` is a placeholder there)."""
        u = descent(sc, d, p, dec, p.dtype)
        return u if real is None else jnp.where(real, u, jnp.zeros_like(u))

    # Groups whose leaves share the params' dtype and the decay mask get their updates (and
    # the params an average needs) as whole buffers too: one loop per leaf remains.
    pdts = [jnp.dtype(jnp.result_type(p)) for p in p_l]
    uniform = [len({(pdts[i], keep[i]) for i in members[j]}) == 1 for j in range(ng)]
    p_flat: list[Leaf] = _none_list(ng)
    u_flat: list[Leaf] = _none_list(ng)
    for j in range(ng):
        if uniform[j]:
            p_flat[j] = cat([jnp.ravel(p_l[i]) for i in members[j]])
            u_flat[j] = finish(d[j], p_flat[j], keep[members[j][0]])
    u_l = [
        piece(u_flat, i) if uniform[s.group] else finish(piece(d, i), p_l[i], keep[i]) for i, s in enumerate(lay.slots)
    ]
    ema = None
    if spec.use_ema:
        p_new = [
            _tree.rounded_sum(p_flat[j], u_flat[j], lay.dtypes[j])
            if uniform[j]
            else cat([jnp.ravel(_tree.rounded_sum(p_l[i], u_l[i], lay.dtypes[j])) for i in members[j]])
            for j in range(ng)
        ]
        ema = [average(sc, a, pn) for a, pn in zip(bufs["ema"], p_new)]
        if spec.ema_overwrite_frequency is not None:
            for i, p in enumerate(p_l):
                u_l[i] = _averaging.overwrite_update(sc.overwrite, piece(ema, i), p, u_l[i])
    fields = {"mu": st.mu, "nu": st.nu, "nu_max": st.nu_max, "acc": st.acc, "ema": ema, "comp": bufs.get("comp")}
    fb = lambda xs: _flat.FlatBuffers(tuple(xs))  # noqa: E731
    return jax.tree_util.tree_unflatten(treedef, u_l), next_state(spec, n, fb, fields)


def update_flat_by_leaf(spec: AdamSpec, grads: optax.Updates, state: AdamState, params: optax.Params) -> Leaf:
    """:func:`update_tree` on views of the flat buffers (what :func:`update_flat` does not take)."""
    as_tree, repack = tree_views(spec, state, params)
    updates, new = update_tree(spec, grads, as_tree, params)
    return updates, repack(new)
