"""The fused Adam step, and one-line ways to use it from Flax.

``opt.update`` returns optax *updates*, which the caller adds to the params. On XLA:CPU
that costs three full-size loops per leaf; :func:`apply_gradients` instead updates
params and optimizer state in one in-place pass (a C++ kernel called through
``jax.ffi``), with the same numbers. On a GPU or TPU with coded moments
(``quantize_moments=True``: dynamic8, fp8 or 4bit) it runs one Pallas kernel per leaf
(Triton, Mosaic: ``_pallas``), which moves the ideal bytes where ``update`` cannot. It falls back to ``tx.update`` + ``optax.apply_updates`` wherever no kernel applies
(see :func:`why_not`), so it is always safe to call. See docs/performance.md for the design
and the measurements.

===========================================  ===========================================
instead of                                   write
===========================================  ===========================================
``u, s = opt.update(g, s, p)``;               ``p, s = opt.apply_gradients(g, s, p)``
``p = optax.apply_updates(p, u)``
linen ``state.apply_gradients(grads=g)``      ``adamx.fused.train_state_apply_gradients(state, g)``
nnx ``optimizer.update(model, grads)``        ``adamx.fused.nnx_update(optimizer, model, grads)``
===========================================  ===========================================

Jit the step and donate params and optimizer state (``donate_argnums``) so the update
happens in the donated buffers.

Layout: ``kernel.cc`` (the C++ kernel, package data), ``_build`` (compile, cache, load,
check the scalar layout), ``_plan`` (which options and arrays the kernel takes, and why
not), ``_kernel`` (the ``jax.ffi`` calls), ``_pallas`` (the GPU/TPU kernels), ``__main__`` (``python -m adamx.fused build``: the
kernel built on its own, with the loader's command). ``ADAMX_FUSED=0`` switches the kernel off.
"""

from __future__ import annotations

import logging
import threading

import jax
import optax

from adamx._types import PyTree
from adamx.fused import _kernel, _pallas, _plan
from adamx.fused._build import available, status
from adamx.fused._plan import SUPPORTED

__all__ = [
    "SUPPORTED",
    "apply_gradients",
    "available",
    "nnx_update",
    "status",
    "train_state_apply_gradients",
    "why_not",
]


log = logging.getLogger("adamx")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def why_not(tx: object, grads: PyTree, opt_state: PyTree, params: PyTree) -> str | None:
    """``None`` when :func:`apply_gradients` takes a fused path on the default backend (the C++
    kernel on CPU, the Pallas kernels for coded moments on GPU and TPU), else the reason it does not."""
    if jax.default_backend() != "cpu":
        return _pallas.plan(tx, grads, opt_state, params)[0]
    return _plan.plan(tx, grads, opt_state, params)[0]


def _warn_fallback(reason: str) -> None:
    """A ``logging`` WARNING on the ``adamx`` logger, once per distinct reason per process."""
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    log.warning(
        "adamx.fused: the fused kernel does not apply (%s); apply_gradients takes update + "
        "optax.apply_updates (same numbers, slower). adamx.fused.why_not(...) gives the reason.",
        reason,
    )


# ------------------------------------------------------------------ the step
def apply_gradients(
    tx: optax.GradientTransformation, grads: PyTree, opt_state: PyTree, params: PyTree
) -> tuple[PyTree, PyTree]:
    """``tx.update`` followed by ``optax.apply_updates``, as one fused pass where possible.

    Returns ``(new_params, new_opt_state)``: the same values as

    .. code-block:: python

        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    For an ``adamx.adam``/``adamx.adamw`` optimizer on CPU it runs one in-place pass over
    params, grads and optimizer state (jit the step and donate params and state to get
    the in-place update without copies); on a GPU or TPU with ``quantize_moments=True``, one
    Pallas kernel per coded leaf (the platform the step is compiled for picks). Anything else takes the two lines above, and the
    ``adamx`` logger prints a WARNING once per reason (the kernel is unavailable, an option
    or dtype it does not take, ...; :func:`why_not` returns it).

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> opt = adamx.adam(learning_rate=0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> params, state = opt.apply_gradients(grads, state, params)
      >>> [round(x, 4) for x in params["w"].tolist()]
      [0.9, -1.9]
    """
    reason, pl = _plan.plan(tx, grads, opt_state, params)
    accel_reason, accel = _pallas.plan(tx, grads, opt_state, params)
    if pl is None:
        own = getattr(tx, "apply_gradients", None)
        if getattr(tx, "spec", None) is None and callable(own):
            return own(grads, opt_state, params)  # e.g. a loss scaler around a fused adamx.adam
        if jax.default_backend() == "cpu":
            _warn_fallback(reason or "no plan")
        elif accel is None:
            _warn_fallback(accel_reason or "no plan")

    def reference() -> tuple[PyTree, PyTree]:
        updates, new_state = tx.update(grads, opt_state, params)
        return _apply_updates(params, updates), new_state

    def cpu() -> tuple[PyTree, PyTree]:
        return reference() if pl is None else _kernel.run(pl, opt_state, params)

    if accel is None:
        return cpu()
    # coded moments: the Pallas kernels on GPU and TPU (adamx/fused/_pallas.py), picked by the
    # platform the step is compiled for (a deviceless compile for an accelerator included)
    return jax.lax.platform_dependent(
        cpu=cpu,
        cuda=lambda: _pallas.run(accel, opt_state, "gpu"),
        tpu=lambda: _pallas.run(accel, opt_state, "tpu"),
        default=lambda: _pallas.run(accel, opt_state, "other"),  # the XLA step per leaf (ROCm, ...)
    )


def _apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``optax.apply_updates`` where a ``None`` update (no gradient) leaves the param alone."""
    # another transformation's updates may be wider than params (optax.apply_updates adds in the
    # promoted dtype and rounds back): its semantics, also under strict dtype promotion
    with jax.numpy_dtype_promotion("standard"):
        if params is None:
            return optax.apply_updates(params, updates)
        return jax.tree.map(
            lambda p, u: p if u is None else optax.apply_updates(p, u), params, updates, is_leaf=lambda x: x is None
        )


def train_state_apply_gradients(state: PyTree, grads: PyTree) -> PyTree:
    """Flax linen ``TrainState.apply_gradients(grads=grads)`` through the fused step.

    Works on any ``flax.training.train_state.TrainState`` (or an object with ``tx``,
    ``params``, ``opt_state``, ``step`` and ``replace``): returns the state with
    ``step + 1`` and the new params and optimizer state, the same values as
    ``state.apply_gradients(grads=grads)``.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> from flax.training import train_state
      >>> state = train_state.TrainState.create(
      ...     apply_fn=None, params={"w": jnp.array([1.0, -2.0])}, tx=adamx.adam(0.1))
      >>> grads = {"w": jnp.array([0.5, -0.5])}
      >>> state = jax.jit(train_state_apply_gradients, donate_argnums=0)(state, grads)
      >>> int(state.step), [round(x, 4) for x in state.params["w"].tolist()]
      (1, [0.9, -1.9])
    """
    params, opt_state = apply_gradients(state.tx, grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def nnx_update(optimizer: PyTree, model: PyTree, grads: PyTree) -> None:
    """``flax.nnx.Optimizer.update(model, grads)`` through the fused step.

    Updates ``model``'s parameters (those ``optimizer.wrt`` selects), ``optimizer.opt_state``
    and ``optimizer.step`` in place, with the same values as ``optimizer.update(model,
    grads)``. Unlike that method it returns nothing: the fused step never forms the
    updates. Call it inside ``nnx.jit`` (donate the model and optimizer with
    ``nnx.jit(..., donate_argnums=...)`` for the in-place update).

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, adamx.adam(0.1), wrt=nnx.Param)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...     grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      ...     adamx.fused.nnx_update(optimizer, model, grads)
      >>> train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))
      >>> int(optimizer.step[...])
      1
    """
    from flax import nnx

    kw = {"graph": optimizer.graph} if getattr(optimizer, "graph", None) is not None else {}
    params = nnx.as_pure(nnx.state(model, optimizer.wrt, **kw))
    grad_arrays = nnx.as_pure(nnx.state(grads, optimizer.wrt, **kw))
    opt_state = nnx.as_pure(optimizer.opt_state)
    new_params, new_opt_state = apply_gradients(optimizer.tx, grad_arrays, opt_state, params)
    nnx.update(model, new_params)
    nnx.update(optimizer.opt_state, nnx.state(new_opt_state, **kw))
    optimizer.step[...] += 1
