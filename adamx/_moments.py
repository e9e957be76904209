"""Adam's moments and step direction: the per-leaf math, and ``scale_by_adam``.

Every adamx optimizer (``adam``, ``adamw``, ``tf1_adam``, ``scale_by_adam``) calls
the two leaf functions here, so the arithmetic is written once; Keras, TF1, optax and
PyTorch conventions differ only by options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamx import _hyper, _tree
from adamx._types import Leaf

EpsilonMode = Literal["hat", "paper"]
MomentForm = Literal["kernel", "textbook"]


def update_moments(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    *,
    b1: jax.Array | None,
    b2: jax.Array | None,
    c1: jax.Array,
    c2: jax.Array,
    form: MomentForm,
    g2: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """New first and second moments, in the dtypes of ``m`` and ``v``.

    ``kernel`` (Keras 3, the TF ``ApplyAdam`` kernel): ``m + (g - m) * c1``,
    ``v + (g2 - v) * c2``. ``textbook`` (optax, PyTorch, TF1's sparse path):
    ``b1*m + c1*g``, ``b2*v + c2*g2``. ``c1``, ``c2`` are ``1 - b1``, ``1 - b2`` as
    the caller rounded them. ``g2`` is ``g*g`` unless given (a complex leaf passes the
    real ``|g|^2``); the scalars are cast to each moment's dtype (no-ops for real leaves).
    """
    g2 = g * g if g2 is None else g2
    cm, cv = _caster(m), _caster(v)
    if form == "kernel":
        return m + (g - m) * cm(c1), v + (g2 - v) * cv(c2)
    assert b1 is not None and b2 is not None, "the textbook form needs b1 and b2"
    return m * cm(b1) + g * cm(c1), v * cv(b2) + g2 * cv(c2)


def _caster(x: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """Casts to ``x``'s dtype (the first moment of a complex leaf is complex, its second moment real)."""
    return lambda y: y.astype(x.dtype)


def direction_hat(m: jax.Array, v: jax.Array, *, alpha: jax.Array, eps: jax.Array) -> jax.Array:
    """Keras/TF's step direction: ``(m * alpha) / (sqrt(v) + eps)``, ``eps`` is "epsilon hat"."""
    cm, cv = _caster(m), _caster(v)
    return (m * cm(alpha)) / cm(jnp.sqrt(v) + cv(eps))


def direction(
    m: jax.Array,
    v: jax.Array,
    *,
    alpha: jax.Array,
    b1p: jax.Array,
    b2p: jax.Array,
    eps: jax.Array,
    eps_root: jax.Array,
    mode: EpsilonMode,
) -> jax.Array:
    """Adam's step direction (to be subtracted) from the moments.

    ``hat`` (Keras, TF): ``(m * alpha) / (sqrt(v) + eps)`` with
    ``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)``; ``eps`` is "epsilon hat".
    ``paper`` (optax, PyTorch): ``alpha * m_hat / (sqrt(v_hat + eps_root) + eps)``
    with ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``. Scalars are cast to the
    moments' dtypes (no-ops for real leaves; a complex leaf's ``m`` is complex, ``v`` real).
    """
    if mode == "hat":
        return direction_hat(m, v, alpha=alpha, eps=eps)
    cm, cv = _caster(m), _caster(v)
    m_hat = m / cm(1 - cv(b1p))
    v_hat = v / (1 - cv(b2p))
    return cm(cv(alpha)) * (m_hat / cm(jnp.sqrt(v_hat + cv(eps_root)) + cv(eps)))


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`. Field names are the checkpoint format."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; completed steps, saturating
    mu: optax.Updates  # first moment, like params, dtype mu_dtype
    nu: optax.Updates  # second moment, like params, dtype nu_dtype
    nu_max: optax.Updates | None  # AMSGrad: running max of raw nu; None without amsgrad


def moment_buffers(params: Leaf, dtype: Leaf | None, *, second: bool = False) -> Leaf:
    """Zero moments like params. The second moment of a complex leaf is real (optax's convention)."""

    def one(p: Leaf) -> jax.Array:
        pdt = jnp.result_type(p)
        if jnp.issubdtype(pdt, jnp.complexfloating):
            if not second:
                return _tree.zeros_like(p, _tree.compute_dtype(pdt))  # complex first moment
            pdt = _tree.real_dtype(pdt)
        return _tree.zeros_like(p, _tree.state_dtype(pdt, dtype))

    return jax.tree.map(one, params)


def scale_by_adam(
    b1: _hyper.ScalarOrSchedule = 0.9,
    b2: _hyper.ScalarOrSchedule = 0.999,
    eps: float = 1e-7,
    *,
    eps_root: float = 0.0,
    epsilon_mode: EpsilonMode = "hat",
    amsgrad: bool = False,
    mu_dtype: Leaf | None = None,
    nu_dtype: Leaf | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates by Adam's moments (learning rate not included).

    With ``t`` the 1-based step, ``g`` the incoming update and every scalar in float32:

    .. code-block:: text

        # epsilon_mode="hat" (Keras / TF: eps is "epsilon hat", default 1e-7)
        m = m + (g - m) * (1 - b1)
        v = v + (g*g - v) * (1 - b2)
        v_used = max(v_used, v) if amsgrad else v        # max over RAW v (Keras, PyTorch)
        out = m * (sqrt(1 - b2^t) / (1 - b1^t)) / (sqrt(v_used) + eps)

        # epsilon_mode="paper" (optax / PyTorch / the Adam paper's Algorithm 1)
        m = b1*m + (1 - b1)*g ;  v = b2*v + (1 - b2)*g*g
        v_used = max(v_used, v) if amsgrad else v
        out = (m / (1 - b1^t)) / (sqrt(v_used / (1 - b2^t) + eps_root) + eps)

    The two forms differ only in where ``eps`` sits: ``hat`` equals ``paper`` with a
    step-dependent ``eps_paper(t) = eps_hat / sqrt(1 - b2^t)``, so no constant optax
    ``eps`` reproduces Keras.

    .. warning::
       ``amsgrad=True`` here is the Keras/PyTorch variant (max over the raw second
       moment, bias-corrected afterwards). ``optax.amsgrad`` takes the max over the
       bias-corrected moment, which gives different numbers.

    Args:
      b1: decay rate of the first moment, in [0, 1), or a schedule ``count -> b1``.
      b2: decay rate of the second moment, in [0, 1), or a schedule.
      eps: epsilon, >= 0; its placement is set by ``epsilon_mode``.
      eps_root: added inside the square root (``paper`` mode only), >= 0.
      epsilon_mode: ``"hat"`` (Keras/TF) or ``"paper"`` (optax/PyTorch).
      amsgrad: keep the running max of the second moment.
      mu_dtype, nu_dtype: storage dtypes of the moments. Default: float32 for
        float32/bfloat16/float16 params (the arithmetic is always float32 at least).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamState`.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> tx = optax.chain(adamx.scale_by_adam(), optax.scale(-1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
      >>> bool(jnp.allclose(updates["w"], -1e-3, rtol=1e-4))
      True
    """
    _check_adam_args(b1, b2, eps, eps_root)
    if epsilon_mode not in ("hat", "paper"):
        raise ValueError(f"`epsilon_mode` must be 'hat' or 'paper', got {epsilon_mode!r}.")
    form: MomentForm = "kernel" if epsilon_mode == "hat" else "textbook"

    def init_fn(params: optax.Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=moment_buffers(params, mu_dtype),
            nu=moment_buffers(params, nu_dtype, second=True),
            nu_max=moment_buffers(params, nu_dtype, second=True) if amsgrad else None,
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdamState, params: Leaf = None
    ) -> tuple[optax.Updates, ScaleByAdamState]:
        del params
        g_leaves, _, treedef = _tree.align_grads(updates, state.mu)
        sc = adam_scalars(
            b1, b2, eps, eps_root, state.count, alpha_lr=1.0, keras_rounding=(form == "kernel"), mode=epsilon_mode
        )
        mu_l = treedef.flatten_up_to(state.mu)
        nu_l = treedef.flatten_up_to(state.nu)
        nm_l = treedef.flatten_up_to(state.nu_max) if amsgrad else [None] * len(mu_l)
        d_l, mu_n, nu_n, nm_n = adam_leaves(g_leaves, mu_l, nu_l, nm_l, sc, form=form, mode=epsilon_mode)
        out = [None if g is None else d.astype(g.dtype) for g, d in zip(g_leaves, d_l)]
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(out), ScaleByAdamState(
            count=optax.safe_increment(state.count),
            mu=unflat(mu_n),
            nu=unflat(nu_n),
            nu_max=unflat(nm_n) if amsgrad else None,
        )

    return optax.GradientTransformation(init_fn, update_fn)


class AdamScalars(NamedTuple):
    """Per-step scalars of the Adam update, float32 (float64 under x64 + f64 params)."""

    b1: jax.Array
    b2: jax.Array
    c1: jax.Array  # 1 - b1, rounded as the convention says
    c2: jax.Array
    b1p: jax.Array  # b1 ** t
    b2p: jax.Array
    alpha: jax.Array  # lr * sqrt(1 - b2p) / (1 - b1p) ("hat"); lr ("paper")
    eps: jax.Array
    eps_root: jax.Array


def adam_scalars(
    b1: Leaf,
    b2: Leaf,
    eps: Leaf,
    eps_root: Leaf,
    count: jax.Array,
    *,
    alpha_lr: Leaf,
    keras_rounding: bool,
    t: jax.Array | None = None,
    powers: tuple[jax.Array, jax.Array] | None = None,
    mode: EpsilonMode = "hat",
    sched_count: jax.Array | None = None,
) -> AdamScalars:
    """Evaluate the step's scalars once (not per leaf). ``t`` defaults to ``count + 1``.

    ``powers`` overrides ``b^t`` (TF1's running products). Schedules are called with
    ``sched_count`` (default ``count``).
    """
    dt = jnp.float32
    sc = count if sched_count is None else sched_count
    b1_now = _hyper.value_at(b1, sc, dt)
    b2_now = _hyper.value_at(b2, sc, dt)
    c1 = _hyper.one_minus(b1, b1_now, dt, keras_rounding=keras_rounding)
    c2 = _hyper.one_minus(b2, b2_now, dt, keras_rounding=keras_rounding)
    if powers is None:
        tt = count.astype(dt) + 1 if t is None else t.astype(dt)  # count + 1 would wrap at int32 max
        b1p, b2p = jnp.power(b1_now, tt), jnp.power(b2_now, tt)
    else:
        b1p, b2p = powers
    lr = jnp.asarray(alpha_lr, dt)
    alpha = (lr * jnp.sqrt(1 - b2p)) / (1 - b1p) if mode == "hat" else lr
    return AdamScalars(
        b1=b1_now,
        b2=b2_now,
        c1=c1,
        c2=c2,
        b1p=b1p,
        b2p=b2p,
        alpha=alpha,
        eps=jnp.asarray(eps, dt),
        eps_root=jnp.asarray(eps_root, dt),
    )


def adam_leaf(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array | None,
    sc: AdamScalars,
    *,
    form: MomentForm,
    mode: EpsilonMode,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One leaf of Adam: returns ``(direction, m, v, v_max)``.

    Arithmetic runs in float32 (or wider, if the leaf is float64); moments are stored
    back in their own dtypes. ``direction`` is in the compute dtype.
    """
    cd = _tree.compute_dtype_of(g, m, v)
    g2 = None
    vd = cd
    if jnp.iscomplexobj(m):  # optax's convention: complex first moment, real second moment of |g|^2
        cd = _tree.compute_dtype(m.dtype)
        vd = _tree.real_dtype(cd)
        g2 = (jnp.conj(g.astype(cd)) * g.astype(cd)).real
    gf = g.astype(cd)
    if vd != jnp.dtype(jnp.float32):  # float64 leaves (x64): the float32 scalars, cast explicitly
        sc = AdamScalars(*(x.astype(vd) for x in sc))
    m2, v2 = update_moments(gf, m.astype(cd), v.astype(vd), b1=sc.b1, b2=sc.b2, c1=sc.c1, c2=sc.c2, form=form, g2=g2)
    v_used, vm2 = _running_max(v_max, v2, vd)
    d = direction(m2, v_used, alpha=sc.alpha, b1p=sc.b1p, b2p=sc.b2p, eps=sc.eps, eps_root=sc.eps_root, mode=mode)
    return d, m2.astype(m.dtype), v2.astype(v.dtype), vm2


def _running_max(v_max: jax.Array | None, v2: jax.Array, dt: Leaf) -> tuple[jax.Array, jax.Array | None]:
    """amsgrad: ``(the second moment the direction uses, the new stored running max)``;
    without a running max, ``(v2, None)``."""
    if v_max is None:
        return v2, None
    v_used = jnp.maximum(v_max.astype(dt), v2)
    return v_used, v_used.astype(v_max.dtype)


def adam_leaves(
    g_l: list[Leaf],
    mu_l: list[Leaf],
    nu_l: list[Leaf],
    nm_l: list[Leaf],
    sc: AdamScalars,
    *,
    form: MomentForm,
    mode: EpsilonMode,
) -> tuple[list[Leaf], list[Leaf], list[Leaf], list[Leaf]]:
    """:func:`adam_leaf` over lists of leaves: ``(directions, mu, nu, nu_max)``.

    A ``None`` gradient gives a ``None`` direction and leaves that leaf's moments as they are.
    """
    d_l, mu_n, nu_n, nm_n = [], [], [], []
    for g, m, v, vm in zip(g_l, mu_l, nu_l, nm_l):
        d, m2, v2, vm2 = (None, m, v, vm) if g is None else adam_leaf(g, m, v, vm, sc, form=form, mode=mode)
        d_l.append(d)
        mu_n.append(m2)
        nu_n.append(v2)
        nm_n.append(vm2)
    return d_l, mu_n, nu_n, nm_n


def _check_adam_args(b1: Leaf, b2: Leaf, eps: Leaf, eps_root: Leaf = 0.0) -> None:
    _hyper.check_scalar("beta_1", b1, lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
    _hyper.check_scalar("beta_2", b2, lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
    _hyper.check_scalar("epsilon", eps, lo=0.0)
    _hyper.check_scalar("eps_root", eps_root, lo=0.0)
