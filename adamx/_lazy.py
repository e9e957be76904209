"""``lazy_adam``: Adam for embedding tables whose step costs O(touched rows).

A table leaf gets a row gradient (a ``jax.experimental.sparse.BCOO`` whose indices
are row numbers, one row of values each). Only the rows it names change: their
moments and weights are gathered, updated and scattered back; every other row's
weight and moments stay bit-for-bit as they were. Other leaves get ordinary Adam.
Row indices may have any integer dtype; their range is checked in that dtype. Integer and
bool params are left alone; a float leaf given an integer gradient is refused (naming its
path), as is a state of other params. Optax transformations map over a ``BCOO``'s indices
like any array leaf: clip with lazy_adam's own options, and scale ``update``'s output only
where it is dense.

Which library does which (read from their source):

* TF Addons ``LazyAdam`` (``_resource_apply_sparse``): the "hat" rows of :func:`lazy_adam`, op
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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse as jsparse

from adamx import _checks, _clipping, _hyper, _moments, _tree
from adamx._types import Leaf, Update, spec_of

EpsilonMode = Literal["hat", "paper"]


class LazyAdamState(NamedTuple):
    """State of :func:`lazy_adam`. Field names are the checkpoint format."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; update() calls so far (the global step), saturating
    mu: optax.Updates  # first moment, like params, float32 at least (float32 for f32/bf16/f16 params)
    nu: optax.Updates  # second moment, like params, float32 at least


def _update(
    spec: LazyAdamSpec, grads: Leaf, state: LazyAdamState, params: Leaf = None, **extra: Leaf
) -> tuple[Leaf, Leaf]:
    """``update`` of a :class:`LazyAdam` (its :class:`adamx._types.Update` carries ``spec``)."""
    del extra
    return step(spec, grads, state, params, apply=False)


class LazyAdam(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` with ``spec`` and an in-place ``apply_gradients``."""

    @property
    def spec(self) -> LazyAdamSpec:
        """The options this optimizer was built with."""
        return spec_of(self.update, LazyAdamSpec)

    @property
    def hyperparams(self) -> dict[str, Leaf]:
        """The arguments :func:`lazy_adam` was called with (a copy)."""
        return self.spec.hyperparams

    def apply_gradients(self, grads: optax.Updates, state: LazyAdamState, params: optax.Params) -> tuple[Leaf, Leaf]:
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
        return step(self.spec, grads, state, params, apply=True)


def row_gradient(indices: Leaf, row_grads: Leaf, num_rows: int) -> jsparse.BCOO:
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


@dataclasses.dataclass(frozen=True, eq=False)
class LazyAdamSpec:
    """The options of a :func:`lazy_adam`, validated once when built (errors name the argument)."""

    learning_rate: _hyper.ScalarOrSchedule = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    epsilon_mode: EpsilonMode = "hat"
    weight_decay: _hyper.ScalarOrSchedule | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None

    def __post_init__(self) -> None:
        _hyper.check_scalar("learning_rate", self.learning_rate, lo=0.0, allow_schedule=True)
        _hyper.check_scalar("beta_1", self.beta_1, lo=0.0, hi=1.0, hi_open=True)
        _hyper.check_scalar("beta_2", self.beta_2, lo=0.0, hi=1.0, hi_open=True)
        _hyper.check_scalar("epsilon", self.epsilon, lo=0.0)
        if self.epsilon_mode not in ("hat", "paper"):
            raise ValueError(f"`epsilon_mode` must be 'hat' or 'paper', got {self.epsilon_mode!r}.")
        if self.weight_decay is not None:
            _hyper.check_scalar("weight_decay", self.weight_decay, lo=0.0, allow_schedule=True)
        set_clips = _clipping.check_clip_args(self.clipnorm, self.clipvalue, self.global_clipnorm)
        for k in set_clips:
            _hyper.check_scalar(k, getattr(self, k), lo=0.0, lo_open=True)

    @property
    def hyperparams(self) -> dict[str, Leaf]:
        """The options as a dict keyed by argument name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def decay_on(self) -> bool:
        """Whether weight decay runs (set, and not the constant 0)."""
        wd = self.weight_decay
        return wd is not None and (_hyper.is_schedule(wd) or _hyper.concrete(wd) != 0.0)

    @property
    def form(self) -> _moments.MomentForm:
        """The moment form of dense leaves: Keras's ``kernel`` form ("hat"), optax's ``textbook`` ("paper")."""
        return "kernel" if self.epsilon_mode == "hat" else "textbook"


class _Rows(NamedTuple):
    """A table leaf's gradient after de-duplication: ``rows`` (sorted, unique; padding
    slots hold distinct indices >= num_rows) and ``g`` (summed gradient per row, 0 on
    padding slots), both with ``nnz`` entries."""

    rows: jax.Array
    g: jax.Array


def _dedup(g: jsparse.BCOO, cd: Leaf) -> _Rows:
    """Sum duplicate rows of a row-gradient ``BCOO``: static size ``nnz`` (its number of entries).

    Rows are read as ``BCOO.todense()`` reads them: a negative index in
    ``[-num_rows, 0)`` counts from the end, any other index outside ``[0, num_rows)`` is
    dropped (``num_rows`` is BCOO's padding convention).
    """
    n_rows = g.shape[0]
    nnz = g.indices.shape[0]
    idx = _row_numbers(g.indices[:, 0], n_rows)
    sentinel = jnp.int32(n_rows)
    uniq, inv = jnp.unique(idx, size=nnz, fill_value=sentinel, return_inverse=True)
    inv = inv.reshape(nnz)
    summed = jax.ops.segment_sum(g.data.astype(cd), inv, num_segments=nnz)
    # every slot at or past the sentinel is padding: make them distinct (still sorted) and zero
    pad = uniq >= sentinel
    uniq = jnp.where(pad, sentinel + jnp.arange(nnz, dtype=jnp.int32), uniq)
    pad_b = pad.reshape((nnz,) + (1,) * (summed.ndim - 1))
    summed = jnp.where(pad_b, jnp.zeros((), cd), summed)
    return _Rows(uniq, summed)


def _row_numbers(idx: jax.Array, n_rows: int) -> jax.Array:
    """Row numbers as int32, ``n_rows`` for every ignored index. The range is checked in the
    indices' own dtype (widened to int32 first if narrower), before the cast, so a uint32 or
    int64 index past int32 cannot wrap onto another row."""
    if jnp.dtype(idx.dtype).itemsize < 4:
        idx = idx.astype(jnp.int32)  # int8/int16/uint8/uint16: lossless, and idx + n_rows cannot overflow
    top = jnp.asarray(n_rows, idx.dtype)
    if jnp.issubdtype(idx.dtype, jnp.signedinteger):
        idx = jnp.where(idx < 0, idx + top, idx)
        ok = (idx >= 0) & (idx < top)
    else:
        ok = idx < top
    return jnp.where(ok, idx, top).astype(jnp.int32)


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

    Which library does which: see the module's docstring.

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
    spec = LazyAdamSpec(
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
    return LazyAdam(functools.partial(init, spec), Update(spec, _update))


def init(spec: LazyAdamSpec, params: optax.Params) -> LazyAdamState:
    """The initial state of ``spec`` for ``params``: count 0, zero moments (float32 at least)."""
    del spec  # every option shares one state layout
    _check_params(params)
    return LazyAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=_moments.moment_buffers(params, None),
        nu=_moments.moment_buffers(params, None, second=True),
    )


class _Scalars(NamedTuple):
    """One step's scalars: the lr, the decay rate (``None`` without decay) and Adam's scalars
    for the touched rows (``sparse``) and for dense leaves."""

    lr: jax.Array
    wd: jax.Array | None
    sparse: _moments.AdamScalars
    dense: _moments.AdamScalars


def scalars(spec: LazyAdamSpec, n: jax.Array) -> _Scalars:
    """The scalars of the step after ``n`` calls. The rows take TF Addons' ``1 - beta`` rounded
    in float32 ("hat"); dense leaves Keras's (``adamx.adam``)."""
    lr = _hyper.value_at(spec.learning_rate, n, jnp.float32)
    wd = spec.weight_decay
    wd = _hyper.value_at(wd, n, jnp.float32) if spec.decay_on and wd is not None else None
    b1, b2, eps = spec.beta_1, spec.beta_2, spec.epsilon
    mode = spec.epsilon_mode
    de = _moments.adam_scalars(b1, b2, eps, 0.0, n, alpha_lr=lr, keras_rounding=True, mode=mode)
    sp = _moments.adam_scalars(b1, b2, eps, 0.0, n, alpha_lr=lr, keras_rounding=False, mode=mode)
    return _Scalars(lr, wd, sp if mode == "hat" else de, de)


def leaf_update(
    spec: LazyAdamSpec, g: Leaf, m: Leaf, v: Leaf, p: Leaf, sc: _Scalars, *, rows: bool
) -> tuple[Leaf, Leaf, Leaf]:
    """``(update in p's dtype, m, v)`` for gathered rows (``rows=True``) or a whole dense leaf.

    Adam's arithmetic is :func:`adamx._moments.adam_leaf`'s (the rows always take the
    textbook moments, TF Addons'); decay is Keras's ``p * wd * lr``, on these rows only.
    """
    form: _moments.MomentForm = "textbook" if rows else spec.form
    d, m2, v2, _ = _moments.adam_leaf(g, m, v, None, sc.sparse if rows else sc.dense, form=form, mode=spec.epsilon_mode)
    u = -d
    if sc.wd is not None:
        cd = u.dtype
        u = u - (p.astype(cd) * sc.wd.astype(cd)) * sc.lr.astype(cd)
    return u.astype(jnp.result_type(p)), m2, v2


class _Prepared(NamedTuple):
    """Each leaf's gradient in the compute dtype (``None``: no gradient or left alone) and,
    for a table leaf, its touched rows (``None`` for a dense leaf)."""

    g: list[Leaf]
    rows: list[jax.Array | None]


def _prepare(paths: list[str], g_l: list[Leaf], p_l: list[Leaf]) -> _Prepared:
    """De-duplicate row gradients and check every gradient against its leaf, naming the path."""
    rows: list[jax.Array | None] = []
    gs: list[Leaf] = []
    for path, g, p in zip(paths, g_l, p_l):
        cd = _tree.compute_dtype(jnp.result_type(p))
        if g is None or not _trainable(p):
            _check_frozen_grad(path, g, p)
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
            _check_grad_dtype(path, jnp.dtype(g.dtype), p)
            rows.append(None)
            gs.append(jnp.asarray(g).astype(cd))
        else:
            raise ValueError(f"grads do not match params at '{path}': grads has {type(g).__name__}")
    return _Prepared(gs, rows)


def step(
    spec: LazyAdamSpec, grads: Leaf, state: LazyAdamState, params: Leaf, *, apply: bool
) -> tuple[Leaf, LazyAdamState]:
    """One step, shared by ``update`` (``apply=False``: returns updates) and ``apply_gradients``
    (``apply=True``: returns the new params, rows scattered in place)."""
    if params is None:
        raise ValueError("adamx.lazy_adam needs the params: call update(grads, state, params).")
    treedef: Any = jax.tree_util.tree_structure(params)
    try:
        g_l = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as e:
        raise ValueError(f"grads do not match params: {_tree._first_mismatch(grads, params)}") from e
    check_state(state, params)
    p_l = treedef.flatten_up_to(params)
    mu_l, nu_l = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    n = state.count
    sc = scalars(spec, n)
    prep = _prepare(_tree.leaf_paths(params), g_l, p_l)
    mode, threshold = _clipping.clip_mode_of(spec.clipnorm, spec.global_clipnorm, spec.clipvalue)
    gs = _clipping.clip_units(mode, threshold, prep.g)
    out_l, mu_n, nu_n = [], [], []
    for g, r, p, m, v in zip(gs, prep.rows, p_l, mu_l, nu_l):
        if g is None:
            out_l.append(p if apply else _no_update(p))
            mu_n.append(m)
            nu_n.append(v)
        elif r is None:
            u, m2, v2 = leaf_update(spec, g, m, v, p, sc, rows=False)
            out_l.append(optax.apply_updates(p, u) if apply else u)
            mu_n.append(m2)
            nu_n.append(v2)
        else:
            p_rows = _gather(p, r)
            u, m2, v2 = leaf_update(spec, g, _gather(m, r), _gather(v, r), p_rows, sc, rows=True)
            mu_n.append(_scatter(m, r, m2))
            nu_n.append(_scatter(v, r, v2))
            if apply:
                new_rows = jnp.asarray(p_rows + u).astype(p_rows.dtype)  # as optax.apply_updates
                out_l.append(_scatter(p, r, new_rows))
            else:
                out_l.append(jsparse.BCOO((u, r[:, None]), shape=p.shape, indices_sorted=True, unique_indices=True))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    return unflat(out_l), LazyAdamState(count=optax.safe_increment(n), mu=unflat(mu_n), nu=unflat(nu_n))


def _no_update(p: Leaf) -> Leaf:
    """The update of a leaf without a gradient or left alone (integer/bool): zeros of its dtype,
    so ``optax.apply_updates`` takes it (as :func:`adamx.adam`)."""
    return jnp.zeros(jnp.shape(p), jnp.result_type(p))


def _trainable(p: Leaf) -> bool:
    return bool(jnp.issubdtype(jnp.result_type(p), jnp.inexact))


def _check_params(params: Leaf) -> None:
    for path, p in zip(_tree.leaf_paths(params), jax.tree_util.tree_leaves(params)):
        if jnp.issubdtype(jnp.result_type(p), jnp.complexfloating):
            raise ValueError(
                f"params leaf at '{path}' is {jnp.result_type(p).name}: lazy_adam trains real tables "
                "(use adamx.adam for complex params)."
            )


def _check_frozen_grad(path: str, g: Leaf, p: Leaf) -> None:
    """An integer/bool leaf is left alone: its gradient may be ``None``, ``float0``, integer or bool."""
    if g is None or _trainable(p) or not hasattr(g, "dtype"):
        return
    if isinstance(g, jsparse.BCOO) or jnp.issubdtype(g.dtype, jnp.inexact):
        raise ValueError(
            f"grads at '{path}' is a {g.dtype} gradient for an {jnp.result_type(p).name} params leaf: integer "
            "and bool leaves are left alone, their gradient must be None, float0 or integer."
        )


def _check_grad_dtype(path: str, gdt: Leaf, p: Leaf) -> None:
    if not jnp.issubdtype(gdt, jnp.inexact):
        raise ValueError(_checks.grad_dtype_error(path, gdt, jnp.result_type(p)))
    if jnp.issubdtype(gdt, jnp.complexfloating):
        raise ValueError(f"grads at '{path}' is {gdt.name}: a real params leaf needs a real gradient.")


def check_state(state: Leaf, params: Leaf) -> None:
    """Refuse a state that is not a :class:`LazyAdamState` for ``params``, naming the field and path."""
    if not isinstance(state, LazyAdamState):
        raise ValueError(
            f"`state` is a {type(state).__name__}, not the LazyAdamState of adamx.lazy_adam: build it with "
            "this optimizer's `init`."
        )
    c = state.count
    if not (hasattr(c, "dtype") and jnp.ndim(c) == 0 and jnp.issubdtype(c.dtype, jnp.integer)):
        raise ValueError(f"state field `count` must be a 0-d integer array, got {c!r}.")
    treedef: Any = jax.tree_util.tree_structure(params)
    paths = _tree.leaf_paths(params)
    p_l = treedef.flatten_up_to(params)
    for f in ("mu", "nu"):
        value = getattr(state, f)
        try:
            leaves = treedef.flatten_up_to(value)
        except (ValueError, TypeError):
            raise ValueError(
                f"state field `{f}` does not match params: {_tree._first_mismatch(value, params)} (the state was "
                "built for other params; build it with this optimizer's `init`)."
            ) from None
        for path, x, p in zip(paths, leaves, p_l):
            want = (tuple(jnp.shape(p)), _tree.compute_dtype(jnp.result_type(p)))
            got = (tuple(getattr(x, "shape", ())), jnp.dtype(getattr(x, "dtype", type(x))))
            if got != want:
                raise ValueError(
                    f"state field `{f}` at '{path}' is {got[1].name}{list(got[0])}, this optimizer keeps "
                    f"{want[1].name}{list(want[0])} for these params (the state was built for other params; build "
                    "it with this optimizer's `init`)."
                )


def _check_row_grad(path: str, g: jsparse.BCOO, p: Leaf) -> None:
    """A table leaf's ``BCOO`` must be a row gradient with the table's shape and integer rows."""
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
    if not jnp.issubdtype(g.indices.dtype, jnp.integer):
        raise TypeError(
            f"the row gradient at '{path}' has {g.indices.dtype} indices: a transformation before lazy_adam "
            "mapped over the BCOO's indices (optax transformations treat them as an array leaf); use "
            "lazy_adam's own clipnorm/clipvalue/global_clipnorm instead."
        )
    if not jnp.issubdtype(g.data.dtype, jnp.floating):
        raise ValueError(f"the row gradient at '{path}' has {g.data.dtype} data: a real table needs real floats.")
