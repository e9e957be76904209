"""``lazy_adam``: Adam for embedding tables whose step costs O(touched rows).

A table leaf gets a row gradient (a ``jax.experimental.sparse.BCOO`` whose indices
are row numbers, one row of values each). Only the rows it names change: their
moments and weights are gathered, updated and scattered back; every other row's
weight and moments stay bit-for-bit as they were. Other leaves get ordinary Adam.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse as jsparse

from adamx import _clipping, _hyper, _moments, _tree

EpsilonMode = Literal["hat", "paper"]

_CLIP_ARGS = ("clipnorm", "clipvalue", "global_clipnorm")


class LazyAdamState(NamedTuple):
    """State of :func:`lazy_adam`. Field names are the checkpoint format."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; update() calls so far (the global step), saturating
    mu: optax.Updates  # first moment, like params, float32 at least (float32 for f32/bf16/f16 params)
    nu: optax.Updates  # second moment, like params, float32 at least


class _Update:
    """``update`` of a :class:`LazyAdam`: carries its options and the shared step."""

    __name__ = "update"

    def __init__(self, hyperparams: dict[str, Any], step: Callable[..., tuple[Any, Any]]) -> None:
        self.hyperparams = dict(hyperparams)
        self.step = step

    def __call__(self, grads: Any, state: LazyAdamState, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        del extra
        return self.step(grads, state, params, apply=False)


class LazyAdam(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` with an in-place ``apply_gradients``."""

    @property
    def hyperparams(self) -> dict[str, Any]:
        """The arguments :func:`lazy_adam` was called with (a copy)."""
        update: Any = self.update
        return dict(update.hyperparams)

    def apply_gradients(self, grads: optax.Updates, state: LazyAdamState, params: optax.Params) -> tuple[Any, Any]:
        """``(new_params, new_state)``: the same numbers as ``update`` + ``optax.apply_updates``.

        Table leaves are written with a scatter of the touched rows only. Under
        ``jax.jit(..., donate_argnums=...)`` with ``params`` and ``state`` donated, XLA
        updates table, ``mu`` and ``nu`` in place, so a step costs O(touched rows)
        (without donation XLA must first copy each table: O(table)).

        Donate in the order of the outputs: jit ``lambda p, s, g: opt.apply_gradients(g, s, p)``
        with ``donate_argnums=(0, 1)``. JAX pairs donated inputs with same-shaped outputs in
        order; donating ``(state, params)`` pairs the table's output with ``mu``'s buffer
        and XLA copies every table.
        """
        update: Any = self.update
        return update.step(grads, state, params, apply=True)


def row_gradient(indices: Any, row_grads: Any, num_rows: int) -> jsparse.BCOO:
    """The row gradient of a table with ``num_rows`` rows, as a ``BCOO``.

    ``indices``: integer array of the rows used (any shape, e.g. ``(batch, seq)``;
    repeats allowed, they are summed by :func:`lazy_adam`). ``row_grads``: the
    gradient with respect to the gathered rows ``table[indices]``, of shape
    ``indices.shape + row_shape``. Returns ``BCOO`` of shape ``(num_rows, *row_shape)``
    with ``indices.size`` entries: indices ``(nnz, 1)``, data ``(nnz, *row_shape)``.

    Its ``todense()`` is the gradient of the loss with respect to the whole table.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> table = jnp.ones((5, 2))
      >>> idx = jnp.array([3, 1, 3])
      >>> g_rows = jax.grad(lambda rows: jnp.sum(rows * 2.0))(table[idx])
      >>> g = adamx.row_gradient(idx, g_rows, 5)
      >>> g.todense()[3].tolist(), g.todense()[0].tolist()
      ([4.0, 4.0], [0.0, 0.0])
    """
    idx = jnp.asarray(indices)
    rg = jnp.asarray(row_grads)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"`indices` must be an integer array, got dtype {idx.dtype}.")
    if tuple(rg.shape[: idx.ndim]) != tuple(idx.shape):
        raise ValueError(
            f"`row_grads` must have shape indices.shape + row_shape = {tuple(idx.shape)} + (...), "
            f"got {tuple(rg.shape)}."
        )
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"`num_rows` must be a positive int, got {num_rows!r}.")
    row_shape = tuple(rg.shape[idx.ndim :])
    n = int(np.prod(idx.shape, dtype=np.int64))
    return jsparse.BCOO((rg.reshape((n, *row_shape)), idx.reshape(n, 1)), shape=(int(num_rows), *row_shape))


def _validate(a: dict[str, Any]) -> None:
    _hyper.check_scalar("learning_rate", a["learning_rate"], lo=0.0, allow_schedule=True)
    _hyper.check_scalar("beta_1", a["beta_1"], lo=0.0, hi=1.0, hi_open=True)
    _hyper.check_scalar("beta_2", a["beta_2"], lo=0.0, hi=1.0, hi_open=True)
    _hyper.check_scalar("epsilon", a["epsilon"], lo=0.0)
    if a["epsilon_mode"] not in ("hat", "paper"):
        raise ValueError(f"`epsilon_mode` must be 'hat' or 'paper', got {a['epsilon_mode']!r}.")
    if a["weight_decay"] is not None:
        _hyper.check_scalar("weight_decay", a["weight_decay"], lo=0.0, allow_schedule=True)
    set_clips = [k for k in _CLIP_ARGS if a[k] is not None]
    if len(set_clips) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
            f"Received: {', '.join(f'{k}={a[k]}' for k in set_clips)}."
        )
    for k in set_clips:
        _hyper.check_scalar(k, a[k], lo=0.0, lo_open=True)


class _Rows(NamedTuple):
    """A table leaf's gradient after de-duplication: ``rows`` (sorted, unique; padding
    slots hold distinct indices >= num_rows) and ``g`` (summed gradient per row, 0 on
    padding slots), both with ``nnz`` entries."""

    rows: jax.Array
    g: jax.Array


def _dedup(g: jsparse.BCOO, cd: Any) -> _Rows:
    """Sum duplicate rows of a row-gradient ``BCOO``: static size ``nnz`` (its number of entries).

    Rows are read as ``BCOO.todense()`` reads them: a negative index in
    ``[-num_rows, 0)`` counts from the end, any other index outside ``[0, num_rows)`` is
    dropped (``num_rows`` is BCOO's padding convention).
    """
    n_rows = g.shape[0]
    nnz = g.indices.shape[0]
    idx = g.indices[:, 0].astype(jnp.int32)
    sentinel = jnp.int32(n_rows)
    idx = jnp.where(idx < 0, idx + sentinel, idx)
    idx = jnp.where((idx >= 0) & (idx < n_rows), idx, sentinel)
    uniq, inv = jnp.unique(idx, size=nnz, fill_value=sentinel, return_inverse=True)
    inv = inv.reshape(nnz)
    summed = jax.ops.segment_sum(g.data.astype(cd), inv, num_segments=nnz)
    # every slot at or past the sentinel is padding: make them distinct (still sorted) and zero
    pad = uniq >= sentinel
    uniq = jnp.where(pad, sentinel + jnp.arange(nnz, dtype=jnp.int32), uniq)
    pad_b = pad.reshape((nnz,) + (1,) * (summed.ndim - 1))
    summed = jnp.where(pad_b, jnp.zeros((), cd), summed)
    return _Rows(uniq, summed)


def _gather(x: jax.Array, rows: jax.Array) -> jax.Array:
    return x.at[rows].get(mode="fill", fill_value=0, indices_are_sorted=True, unique_indices=True)


def _scatter(x: jax.Array, rows: jax.Array, vals: jax.Array) -> jax.Array:
    return x.at[rows].set(vals.astype(x.dtype), mode="drop", indices_are_sorted=True, unique_indices=True)


def lazy_adam(
    learning_rate: _hyper.ScalarOrSchedule = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    epsilon_mode: EpsilonMode = "hat",
    *,
    weight_decay: _hyper.ScalarOrSchedule | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
) -> LazyAdam:
    r"""Lazy (sparse) Adam: table rows and their moments change only when a gradient touches them.

    ``update(grads, state, params)`` takes, for a table leaf of shape
    ``(num_rows, *row_shape)``, a ``jax.experimental.sparse.BCOO`` row gradient
    (indices ``(nnz, 1)`` of row numbers, data ``(nnz, *row_shape)``; build it with
    :func:`adamx.row_gradient`) and, for every other leaf, a dense gradient. With
    ``n`` the number of earlier ``update`` calls and ``t = n + 1`` (the **global**
    step: a row touched for the first time at step 100 is bias-corrected with t=100,
    as in TF Addons ``LazyAdam`` and ``torch.optim.SparseAdam``):

    .. code-block:: text

        # table leaf, BCOO gradient: only the rows R it names
        g[r]  = sum of the entries for row r          # duplicates summed first
        g     = clip(g)              # clipnorm / global_clipnorm: norms of the summed rows
                                     # (= of the dense-equivalent gradient) | clipvalue
        lr    = learning_rate(n)
        m[R]  = beta_1 * m[R] + (1 - beta_1) * g      # 1 - beta rounded in float32 (TF)
        v[R]  = beta_2 * v[R] + (1 - beta_2) * g*g
        # epsilon_mode="hat" (default; TF Addons LazyAdam, per op):
        step  = (lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)) * m[R] / (sqrt(v[R]) + epsilon)
        # epsilon_mode="paper" (optax.adam's placement, on the touched rows):
        step  = lr * (m[R] / (1 - beta_1^t)) / (sqrt(v[R] / (1 - beta_2^t)) + epsilon)
        p[R]  = p[R] - p[R] * weight_decay * lr - step        # decay: touched rows only
        # rows not in R: p, m, v unchanged, bit for bit

        # any other leaf, dense gradient: ordinary Adam on the whole leaf, same t and lr
        #   "hat":   Keras 3 Adam (adamx.adam): m = m + (g - m) * (1 - beta_1), ...
        #   "paper": optax.adam: the textbook moments and the paper step above

    Which library does which (read from their source):

    * TF Addons ``LazyAdam`` (``_resource_apply_sparse``): the "hat" rows above, op
      for op (textbook moments, ``1 - beta`` computed in float32, ``beta^t`` by
      ``pow``, default epsilon 1e-7). Its dense leaves run Keras (legacy) Adam.
    * ``torch.optim.SparseAdam`` (torch 2.13, ``torch/optim/_functional.py``) is
      **also the epsilon-hat form**: ``denom = sqrt(v) + eps`` on the raw second
      moment and ``step_size = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)`` in float64.
      Its moments use the form ``m += (g - m) * (1 - beta_1)`` and its default
      ``eps`` is 1e-8. To migrate use ``epsilon_mode="hat", epsilon=1e-8``: the
      results agree to float32 rounding (about 1e-7 relative after 30 steps; tested
      against stored SparseAdam runs). Its ``step`` is per parameter tensor and only
      advances when that tensor has a gradient; here ``t`` counts every ``update``.
    * ``epsilon_mode="paper"``: epsilon added to the bias-corrected ``sqrt(v_hat)``,
      as optax's and ``torch.optim.Adam``'s dense Adam (none of the sparse
      optimizers above).

    Unlike this, Keras 3's and TF1's Adam (and :func:`adamx.adam`) given a sparse
    gradient behave as with the dense scatter-summed gradient: every row's moments
    decay every step and every row with a non-zero moment moves.

    ``update`` returns a ``BCOO`` update for a table leaf (``optax.apply_updates``
    adds it, densely); :meth:`LazyAdam.apply_gradients` scatters the rows straight
    into params, ``mu`` and ``nu`` and is the O(touched rows) path (jit it with params
    and state donated). Arithmetic is float32 (wider for float64 params); moments are
    float32 for float32/bfloat16/float16 params; the new rows are rounded to the
    param dtype. A ``None`` gradient leaves its leaf and moments as they are (the
    step count still advances). Row indices are read as ``BCOO.todense()`` reads them:
    ``-1`` is the last row, indices ``>= num_rows`` (BCOO's padding) and ``< -num_rows``
    are ignored.

    Args:
      learning_rate: float >= 0 or a schedule ``count -> lr``.
      beta_1, beta_2: in [0, 1).
      epsilon: >= 0; where it is added is set by ``epsilon_mode``.
      epsilon_mode: ``"hat"`` (TF Addons LazyAdam, torch SparseAdam, Keras) or
        ``"paper"`` (optax).
      weight_decay: decoupled decay rate, scaled by the current lr as in Keras
        (``p -= p * weight_decay * lr``), on touched rows and dense leaves. (TF
        Addons' ``extend_with_decoupled_weight_decay`` does not scale by lr: pass
        ``its_weight_decay / lr``.)
      clipnorm: clip each leaf's (summed) gradient to this L2 norm.
      clipvalue: clip each (summed) gradient element to ``[-clipvalue, clipvalue]``.
      global_clipnorm: clip all gradients together to this L2 norm. At most one of the
        three clip arguments may be set.

    Returns:
      A :class:`LazyAdam` with state :class:`LazyAdamState`.

    Example:
      >>> import jax, jax.numpy as jnp, adamx
      >>> params = {"emb": jnp.ones((4, 2)), "w": jnp.ones(2)}
      >>> opt = adamx.lazy_adam(learning_rate=0.1)
      >>> state = opt.init(params)
      >>> idx = jnp.array([2, 0, 2])
      >>> grads = {"emb": adamx.row_gradient(idx, jnp.ones((3, 2)), 4), "w": jnp.ones(2)}
      >>> step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
      >>> params, state = step(params, state, grads)
      >>> [round(float(x), 4) for x in params["emb"][:, 0]]
      [0.9, 1.0, 0.9, 1.0]
    """
    hp: dict[str, Any] = dict(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        epsilon_mode=epsilon_mode,
        weight_decay=weight_decay,
        clipnorm=clipnorm,
        clipvalue=clipvalue,
        global_clipnorm=global_clipnorm,
    )
    _validate(hp)
    decay_on = weight_decay is not None and (_hyper.is_schedule(weight_decay) or _hyper.concrete(weight_decay) != 0.0)

    def init_fn(params: optax.Params) -> LazyAdamState:
        return LazyAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=_zeros_state(params),
            nu=_zeros_state(params),
        )

    def scalars(n: jax.Array) -> tuple[Any, Any, Any, Any]:
        """``(lr, wd, sparse_scalars, dense_scalars)`` for the step after ``n`` calls."""
        lr = _hyper.value_at(learning_rate, n, jnp.float32)
        wd = _hyper.value_at(weight_decay, n, jnp.float32) if decay_on and weight_decay is not None else None
        if epsilon_mode == "hat":
            sp = _moments.adam_scalars(beta_1, beta_2, epsilon, 0.0, n, alpha_lr=lr, keras_rounding=False, mode="hat")
            de = _moments.adam_scalars(beta_1, beta_2, epsilon, 0.0, n, alpha_lr=lr, keras_rounding=True, mode="hat")
        else:
            sp = de = _moments.adam_scalars(
                beta_1, beta_2, epsilon, 0.0, n, alpha_lr=lr, keras_rounding=True, mode="paper"
            )
        return lr, wd, sp, de

    def leaf_update(g: Any, m: Any, v: Any, p: Any, sc: Any, form: Any, lr: Any, wd: Any) -> tuple[Any, Any, Any]:
        """``(update in p's dtype, m, v)`` for rows (or a whole dense leaf) ``g, m, v, p``."""
        cd = g.dtype
        m2, v2 = _moments.update_moments(
            g, m.astype(cd), v.astype(cd), b1=sc.b1, b2=sc.b2, c1=sc.c1, c2=sc.c2, form=form
        )
        if epsilon_mode == "hat":
            d = (m2 * sc.alpha.astype(cd)) / (jnp.sqrt(v2) + sc.eps.astype(cd))
        else:
            m_hat = m2 / (1 - sc.b1p).astype(cd)
            v_hat = v2 / (1 - sc.b2p).astype(cd)
            d = (m_hat / (jnp.sqrt(v_hat) + sc.eps.astype(cd))) * lr.astype(cd)
        u = -d
        if wd is not None:
            u = u - (p.astype(cd) * wd.astype(cd)) * lr.astype(cd)
        return u.astype(p.dtype), m2.astype(m.dtype), v2.astype(v.dtype)

    clip_mode, clip_threshold = _clipping.clip_mode_of(clipnorm, global_clipnorm, clipvalue)

    def step(grads: Any, state: LazyAdamState, params: Any, apply: bool) -> tuple[Any, LazyAdamState]:
        """Shared by ``update`` (``apply=False``: returns updates) and ``apply_gradients``."""
        if params is None:
            raise ValueError("adamx.lazy_adam needs the params: call update(grads, state, params).")
        treedef: Any = jax.tree_util.tree_structure(params)
        try:
            g_l = treedef.flatten_up_to(grads)
        except (ValueError, TypeError) as e:
            raise ValueError(f"grads do not match params: {_tree._first_mismatch(grads, params)}") from e
        p_l = treedef.flatten_up_to(params)
        mu_l = treedef.flatten_up_to(state.mu)
        nu_l = treedef.flatten_up_to(state.nu)
        paths = _tree.leaf_paths(params)
        n = state.count
        lr, wd, sp_sc, de_sc = scalars(n)

        # 1. sparse leaves: de-duplicate; everything: cast to the compute dtype, check shapes
        rows: list[jax.Array | None] = []
        gs: list[Any] = []
        for path, g, p in zip(paths, g_l, p_l):
            cd = _tree.compute_dtype(jnp.result_type(p))
            if g is None:
                rows.append(None)
                gs.append(None)
            elif isinstance(g, jsparse.BCOO):
                _check_row_grad(path, g, p)
                dd = _dedup(g, cd)
                rows.append(dd.rows)
                gs.append(dd.g)
            elif hasattr(g, "shape") and hasattr(g, "dtype"):
                if tuple(g.shape) != tuple(jnp.shape(p)):
                    raise ValueError(
                        f"grads do not match params at '{path}': grads has shape {tuple(g.shape)}, "
                        f"params has shape {tuple(jnp.shape(p))}"
                    )
                rows.append(None)
                gs.append(jnp.asarray(g).astype(cd))
            else:
                raise ValueError(f"grads do not match params at '{path}': grads has {type(g).__name__}")
        gs = _clipping.clip_units(clip_mode, clip_threshold, gs)

        # 2. Adam on the touched rows (gather, update, scatter) or on the whole leaf
        out_l, mu_n, nu_n = [], [], []
        for g, r, p, m, v in zip(gs, rows, p_l, mu_l, nu_l):
            if g is None:
                out_l.append(p if apply else None)
                mu_n.append(m)
                nu_n.append(v)
            elif r is None:
                u, m2, v2 = leaf_update(g, m, v, p, de_sc, "kernel" if epsilon_mode == "hat" else "textbook", lr, wd)
                out_l.append(optax.apply_updates(p, u) if apply else u)
                mu_n.append(m2)
                nu_n.append(v2)
            else:
                p_rows = _gather(p, r)
                u, m2, v2 = leaf_update(g, _gather(m, r), _gather(v, r), p_rows, sp_sc, "textbook", lr, wd)
                mu_n.append(_scatter(m, r, m2))
                nu_n.append(_scatter(v, r, v2))
                if apply:
                    new_rows = jnp.asarray(p_rows + u).astype(p_rows.dtype)  # as optax.apply_updates
                    out_l.append(_scatter(p, r, new_rows))
                else:
                    out_l.append(jsparse.BCOO((u, r[:, None]), shape=p.shape, indices_sorted=True, unique_indices=True))
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(out_l), LazyAdamState(count=optax.safe_increment(n), mu=unflat(mu_n), nu=unflat(nu_n))

    return LazyAdam(init_fn, _Update(hp, step))


def _zeros_state(params: Any) -> Any:
    return jax.tree.map(lambda p: _tree.zeros_like(p, _tree.compute_dtype(jnp.result_type(p))), params)


def _check_row_grad(path: str, g: jsparse.BCOO, p: Any) -> None:
    """A table leaf's ``BCOO`` must be a row gradient with the table's shape."""
    if tuple(g.shape) != tuple(jnp.shape(p)):
        raise ValueError(
            f"grads do not match params at '{path}': the BCOO gradient has shape {tuple(g.shape)}, "
            f"params has shape {tuple(jnp.shape(p))}"
        )
    if g.n_batch != 0 or g.n_sparse != 1:
        raise ValueError(
            f"lazy_adam needs a row gradient at '{path}': a BCOO with n_batch=0 and n_sparse=1 "
            f"(indices (nnz, 1) of rows, data (nnz, *row_shape)), got n_batch={g.n_batch}, "
            f"n_sparse={g.n_sparse}, n_dense={g.n_dense}. Build it with adamx.row_gradient(indices, row_grads, "
            "num_rows)."
        )
