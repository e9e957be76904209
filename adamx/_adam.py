"""``adam`` and ``adamw``: every argument of Keras 3's ``keras.optimizers.Adam``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from adamx import _averaging, _clipping, _decay, _flat, _hyper, _moments, _tree


class AdamState(NamedTuple):
    """State of :func:`adam` / :func:`adamw`. Field names are the checkpoint format.

    Optional features keep ``None`` in their field when off, so the tuple always has
    these six fields.
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; update() calls so far (micro-steps under accumulation), saturating
    # With flat_state=True each of the five buffer fields is an adamx.FlatBuffers instead of a tree.
    mu: optax.Updates  # first moment, like params; mu_dtype (default float32 for f32/bf16/f16 params)
    nu: optax.Updates  # second moment, like params; nu_dtype (default as mu)
    nu_max: Optional[optax.Updates]  # amsgrad: running max of raw nu, else None
    acc: Optional[optax.Updates]  # gradient_accumulation_steps: sum of this window's micro-step grads, else None
    ema: Optional[optax.Params]  # use_ema: moving average of params (float32 at least), else None


class Adam(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` that also remembers its arguments.

    ``hyperparams`` holds the arguments :func:`adam` was called with; ``get_config()``
    writes them as the dict Keras's ``Adam.get_config()`` prints (see
    :func:`adamx.to_keras_config`).
    """

    hyperparams: dict[str, Any]

    def get_config(self) -> dict[str, Any]:
        from adamx._config import to_keras_config

        return to_keras_config(self)

    def apply_gradients(self, grads: optax.Updates, state: Any, params: optax.Params) -> tuple[Any, Any]:
        """``update`` then ``optax.apply_updates`` in one call: ``(new_params, new_state)``.

        Same numbers as the two calls; on CPU one fused in-place pass over all leaves
        (see :func:`adamx._fused.apply_gradients`, docs/performance.md).
        """
        from adamx._fused import apply_gradients

        return apply_gradients(self, grads, state, params)


_CLIP_ARGS = ("clipnorm", "clipvalue", "global_clipnorm")


def _validate(a: dict[str, Any]) -> None:
    _hyper.check_scalar("learning_rate", a["learning_rate"], lo=0.0, allow_schedule=True)
    _moments._check_adam_args(a["beta_1"], a["beta_2"], a["epsilon"])
    if not isinstance(a["amsgrad"], bool):
        raise TypeError(f"`amsgrad` must be a bool, got {a['amsgrad']!r}.")
    if not isinstance(a["use_ema"], bool):
        raise TypeError(f"`use_ema` must be a bool, got {a['use_ema']!r}.")
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
    _hyper.check_scalar("ema_momentum", a["ema_momentum"], lo=0.0, hi=1.0)
    _hyper.check_int("ema_overwrite_frequency", a["ema_overwrite_frequency"], lo=1)
    _hyper.check_int("gradient_accumulation_steps", a["gradient_accumulation_steps"], lo=1)
    if a["loss_scale_factor"] is not None:
        _hyper.check_scalar("loss_scale_factor", a["loss_scale_factor"], lo=0.0, lo_open=True)
    _decay.check_exclude(a["exclude_from_weight_decay"])
    wdm = a["weight_decay_mask"]
    if wdm is not None and not callable(wdm) and not isinstance(wdm, (dict, list, tuple, bool)) and not hasattr(
        wdm, "__dataclass_fields__"
    ):
        jax.tree_util.tree_structure(wdm)  # must at least be a pytree


def _is_off(x: Any) -> bool:
    """``None`` and a concrete 0 switch a feature off (Keras: ``if self.weight_decay``)."""
    return x is None or (_hyper.concrete(x) == 0.0 and not _hyper.is_schedule(x))


def derived_options(hp: dict[str, Any]) -> tuple[Any, bool, Optional[list[str]]]:
    """``(k, decay_on, exclude)`` from :func:`adam`'s arguments: the accumulation window
    (``None`` for none or 1), whether weight decay is on, the exclusion patterns."""
    k = hp["gradient_accumulation_steps"]
    if k is not None and _hyper.concrete(k) == 1.0:
        k = None
    exclude = list(hp["exclude_from_weight_decay"]) if hp["exclude_from_weight_decay"] else None
    return k, not _is_off(hp["weight_decay"]), exclude


def step_scalars(hp: dict[str, Any], k: Any, decay_on: bool, n: jax.Array) -> tuple[Any, Any, Any]:
    """``(lr, adam_scalars, weight_decay or None)`` of a real step after ``n`` calls (Keras counting)."""
    lr = _hyper.value_at(hp["learning_rate"], n)
    t = n + 1 if k is None else n // k + 1
    sc = _moments.adam_scalars(
        hp["beta_1"], hp["beta_2"], hp["epsilon"], 0.0, n, alpha_lr=lr, keras_rounding=True, t=t, sched_count=n
    )
    wd = _hyper.value_at(hp["weight_decay"], n) if decay_on else None
    return lr, sc, wd


def adam(
    learning_rate: _hyper.ScalarOrSchedule = 0.001,
    beta_1: _hyper.ScalarOrSchedule = 0.9,
    beta_2: _hyper.ScalarOrSchedule = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    weight_decay: Optional[_hyper.ScalarOrSchedule] = None,
    clipnorm: Optional[float] = None,
    clipvalue: Optional[float] = None,
    global_clipnorm: Optional[float] = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: Optional[int] = None,
    loss_scale_factor: Optional[float] = None,
    gradient_accumulation_steps: Optional[int] = None,
    exclude_from_weight_decay: Optional[Sequence[str]] = None,
    weight_decay_mask: _decay.MaskOrFn = None,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
    flat_state: bool = False,
    name: str = "adam",
) -> Adam:
    r"""Adam with Keras 3's arguments, defaults and semantics.

    One call of ``update`` is one ``optimizer.apply`` of Keras. With ``n`` the number
    of earlier calls, ``k = gradient_accumulation_steps or 1`` and ``t = n // k + 1``:

    .. code-block:: text

        g   = grads / loss_scale_factor                        # if set
        # accumulation (k > 1): on micro-steps (n+1) % k != 0 only acc += g, no update
        g   = (g + acc) / k ;  acc = 0
        g   = clip(g)             # clipnorm: per tensor | global_clipnorm | clipvalue
        lr  = learning_rate(n)    # schedules see n, the raw call count (Keras)
        m   = m + (g - m) * (1 - beta_1)
        v   = v + (g*g - v) * (1 - beta_2)
        v_u = max(v_u, v) if amsgrad else v                    # max over RAW v
        alpha  = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        params = params - params * weight_decay * lr           # decoupled, masked
        params = params - m * alpha / (sqrt(v_u) + epsilon)    # epsilon-hat form
        # use_ema: average all params (first step: average = params); every
        # ema_overwrite_frequency steps params <- average

    ``update`` returns the difference as optax ``updates``; apply it with
    ``optax.apply_updates``. Arithmetic is float32 (wider for float64 params) and,
    by default, the moments, accumulator and average are float32 too, also for
    bfloat16/float16 params. (Keras keeps them in the parameter dtype, where
    ``bf16(0.999) == 1`` freezes training.)

    .. warning::
       ``epsilon`` is "epsilon hat" (default ``1e-7``), added to ``sqrt(v)`` without
       bias correction, as in Keras and TF. optax's ``eps`` (default ``1e-8``) is added
       to the bias-corrected ``sqrt(v_hat)``; no constant optax ``eps`` reproduces this.

    Non-finite gradients propagate (NaN in, NaN out) as in Keras; with
    ``global_clipnorm`` one non-finite gradient makes every update NaN. To skip such
    steps wrap the optimizer in ``optax.apply_if_finite``.

    Args:
      learning_rate: float >= 0 or a schedule ``count -> lr`` (see ``adamx.schedules``
        for Keras's schedules).
      beta_1, beta_2: in [0, 1), or schedules; the current value is used in
        ``beta^t`` and in ``1 - beta``, as Keras does with a variable beta.
      epsilon: >= 0, epsilon hat.
      amsgrad: Keras/PyTorch AMSGrad.
      weight_decay: decoupled decay rate (>= 0, or a schedule), scaled by the current lr.
      clipnorm: clip each gradient tensor to this L2 norm.
      clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]``.
      global_clipnorm: clip all gradients together to this L2 norm. At most one of
        the three clip arguments may be set.
      use_ema: keep a moving average of the parameters (read it with
        :func:`adamx.finalize_variable_values`).
      ema_momentum: in [0, 1].
      ema_overwrite_frequency: ``None`` or int >= 1: every that many steps the params
        are set to their average.
      loss_scale_factor: gradients are divided by it first (> 0).
      gradient_accumulation_steps: ``None`` or int >= 1: average this many calls'
        gradients into one update.
      exclude_from_weight_decay: regexes; leaves whose key path (``a/b/c``) matches
        any are not decayed.
      weight_decay_mask: pytree of bools or callable ``params -> pytree``: ``True``
        leaves are decayed (optax convention).
      mu_dtype, nu_dtype: storage dtypes of the moments (e.g. ``jnp.bfloat16``).
      flat_state: keep each per-parameter state field (``mu``, ``nu``, ``nu_max``,
        ``acc``, ``ema``) as one flat 1-D buffer per dtype (:class:`adamx.FlatBuffers`,
        params' leaves in tree order) instead of a tree like params. Same numbers;
        for models with many parameter tensors a jitted step then passes and compiles
        far fewer buffers (docs/performance.md). ``update`` then needs ``params``.
        Meant for single-device steps: flat buffers cannot follow the params' shardings.
      name: kept for ``get_config()``.

    Returns:
      An :class:`Adam` (an ``optax.GradientTransformationExtraArgs``) with state
      :class:`AdamState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamx
      >>> opt = adamx.adam(learning_rate=0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> [round(float(x), 4) for x in optax.apply_updates(params, updates)["w"]]
      [0.9, -1.9]
    """
    hp = dict(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        amsgrad=amsgrad,
        weight_decay=weight_decay,
        clipnorm=clipnorm,
        clipvalue=clipvalue,
        global_clipnorm=global_clipnorm,
        use_ema=use_ema,
        ema_momentum=ema_momentum,
        ema_overwrite_frequency=ema_overwrite_frequency,
        loss_scale_factor=loss_scale_factor,
        gradient_accumulation_steps=gradient_accumulation_steps,
        exclude_from_weight_decay=exclude_from_weight_decay,
        weight_decay_mask=weight_decay_mask,
    )
    _validate(hp)
    k, decay_on, exclude = derived_options(hp)
    needs_params = decay_on or use_ema

    field_dtypes: dict[str, Callable[[Any], Any]] = {
        "mu": lambda p: _tree.state_dtype(p.dtype, mu_dtype),
        "nu": lambda p: _tree.state_dtype(p.dtype, nu_dtype),
        "nu_max": lambda p: _tree.state_dtype(p.dtype, nu_dtype),
        "acc": lambda p: _tree.compute_dtype(p.dtype),
        "ema": lambda p: _tree.state_dtype(p.dtype, None),
    }

    def init_fn(params: optax.Params) -> AdamState:
        return AdamState(
            count=jnp.zeros([], jnp.int32),
            mu=_moments.moment_buffers(params, mu_dtype),
            nu=_moments.moment_buffers(params, nu_dtype),
            nu_max=_moments.moment_buffers(params, nu_dtype) if amsgrad else None,
            acc=jax.tree.map(lambda p: _tree.zeros_like(p, _tree.compute_dtype(p.dtype)), params)
            if k is not None
            else None,
            ema=_averaging.ema_buffers(params) if use_ema else None,
        )

    def update_fn(grads: optax.Updates, state: AdamState, params: Optional[optax.Params] = None, **extra: Any):
        del extra
        if params is None and needs_params:
            raise ValueError(
                "adamx.adam with weight_decay or use_ema needs the params: call update(grads, state, params)."
            )
        g_l, p_l, treedef = _tree.align_grads(grads, state.mu if params is None else params)
        if params is None:
            p_l = [None] * len(g_l)
        flat = treedef.flatten_up_to
        nl = len(g_l)
        mu_l, nu_l = flat(state.mu), flat(state.nu)
        nm_l = flat(state.nu_max) if amsgrad else [None] * nl
        acc_l = flat(state.acc) if k is not None else [None] * nl
        n = state.count

        g_l = unscale([None if g is None else g.astype(_tree.compute_dtype(g.dtype)) for g in g_l])
        keep = _decay.decay_mask_leaves(params, exclude, weight_decay_mask) if decay_on else [False] * nl

        def real_step(g_l, acc_l, mu_l, nu_l, nm_l):
            if k is not None:
                g_l, acc_l = window_mean(g_l, acc_l)
            g_l = _clip(g_l)
            lr, sc, wd = step_scalars(hp, k, decay_on, n)
            d_l, mu_n, nu_n, nm_n = _moments.adam_leaves(g_l, mu_l, nu_l, nm_l, sc, form="kernel", mode="hat")
            u_l = [
                None if d is None else descent(d, p, dec, lr, wd, g.dtype if p is None else jnp.asarray(p).dtype)
                for g, p, d, dec in zip(g_l, p_l, d_l, keep)
            ]
            return u_l, acc_l, mu_n, nu_n, nm_n

        def micro_step(g_l, acc_l, mu_l, nu_l, nm_l):
            acc_l = accumulate(g_l, acc_l)
            u_l = [
                None if g is None else jnp.zeros_like(g, dtype=g.dtype if p is None else jnp.asarray(p).dtype)
                for g, p in zip(g_l, p_l)
            ]
            return u_l, acc_l, mu_l, nu_l, nm_l

        ops = (g_l, acc_l, mu_l, nu_l, nm_l)
        if k is None:
            u_l, acc_l, mu_l, nu_l, nm_l = real_step(*ops)
        else:
            u_l, acc_l, mu_l, nu_l, nm_l = jax.lax.cond((n + 1) % k == 0, real_step, micro_step, *ops)

        ema_l = None
        if use_ema:
            u_l, ema_l = _averaging.ema_step(p_l, u_l, flat(state.ema), n, ema_momentum, ema_overwrite_frequency, k)
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(u_l), next_state(n, unflat, mu_l, nu_l, nm_l, acc_l, ema_l)

    def next_state(n: Any, wrap: Callable[[list[Any]], Any], mu: Any, nu: Any, nm: Any, acc: Any, ema: Any) -> AdamState:
        """The state after a step: each buffer field's leaves wrapped (tree or flat), unused fields None."""
        return AdamState(
            count=optax.safe_increment(n),
            mu=wrap(mu),
            nu=wrap(nu),
            nu_max=wrap(nm) if amsgrad else None,
            acc=wrap(acc) if k is not None else None,
            ema=wrap(ema) if use_ema else None,
        )

    def unscale(g_l: list[Any]) -> list[Any]:
        """Gradients divided by ``loss_scale_factor`` (``None`` leaves stay ``None``)."""
        if loss_scale_factor is None:
            return g_l
        s = jnp.asarray(loss_scale_factor, jnp.float32)
        return [None if g is None else g / s.astype(g.dtype) for g in g_l]

    def window_mean(g_l: list[Any], acc_l: list[Any]) -> tuple[list[Any], list[Any]]:
        """The last micro-step of an accumulation window: mean gradient, accumulators reset."""
        kf = jnp.asarray(k, jnp.float32)
        return (
            [None if g is None else (g + a) / kf.astype(g.dtype) for g, a in zip(g_l, acc_l)],
            [jnp.zeros_like(a) for a in acc_l],
        )

    def accumulate(g_l: list[Any], acc_l: list[Any]) -> list[Any]:
        """A micro-step: gradients added to the accumulators."""
        return [a if g is None else a + g.astype(a.dtype) for g, a in zip(g_l, acc_l)]

    def descent(d: Any, p: Any, dec: bool, lr: Any, wd: Any, dtype: Any) -> Any:
        """The update ``-d``, minus ``lr * wd * p`` where the leaf is decayed, in ``dtype``."""
        u = -d
        if dec:
            u = u - (p.astype(d.dtype) * wd.astype(d.dtype)) * lr.astype(d.dtype)
        return u.astype(dtype)

    def _clip(g_l: list[Any]) -> list[Any]:
        if clipnorm is not None:
            c = jnp.asarray(clipnorm, jnp.float32)
            return [None if g is None else _clipping.clip_leaf_by_norm(g, c) for g in g_l]
        if global_clipnorm is not None:
            c = jnp.asarray(global_clipnorm, jnp.float32)
            scale = _clipping.global_clip_scale(_clipping.global_norm(g_l), c)
            return [None if g is None else g * scale.astype(g.dtype) for g in g_l]
        if clipvalue is not None:
            c = jnp.asarray(clipvalue, jnp.float32)
            return [None if g is None else _clipping.clip_leaf_by_value(g, c) for g in g_l]
        return g_l

    def flat_vector_update(grads: optax.Updates, state: AdamState, params: optax.Params) -> Any:
        """``update`` on flat state with whole-buffer arithmetic (``None``: does not apply).

        The same elementwise operations as ``update_fn`` in the same order, but on one
        1-D buffer per dtype group instead of per leaf: the gradients are concatenated
        once, moments, accumulator, clipping and average are whole-buffer operations, and
        each leaf's update is a slice of the whole-buffer update (``clipnorm`` also takes
        one norm per slice). A jitted step then has one loop per leaf plus a handful of
        whole-buffer loops, instead of several loops per leaf.
        """
        g_l, p_l, treedef = _tree.align_grads(grads, params)
        on = [f for f in _FLAT_FIELDS if getattr(state, f) is not None]
        lay = _flat.layout(p_l, lambda p: _tree.compute_dtype(p.dtype))
        groups = tuple(s.group for s in lay.slots)
        if any(g is None for g in g_l) or any(
            _tree.compute_dtype(g.dtype) != lay.dtypes[s.group] for g, s in zip(g_l, lay.slots)
        ):
            return None  # None grads or grads wider than their params: per-leaf path
        if any(tuple(s.group for s in _flat.layout(p_l, field_dtypes[f]).slots) != groups for f in on):
            return None  # state fields grouped differently from the arithmetic (e.g. f64 + f32 params with mu_dtype)
        bufs = {f: _flat.checked_buffers(getattr(state, f), lay, f) for f in on}
        ng = len(lay.dtypes)
        members = [[i for i, s in enumerate(lay.slots) if s.group == j] for j in range(ng)]
        cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)  # noqa: E731

        def piece(buf: Any, i: int) -> Any:
            return _flat.view(buf, lay.slots[i])

        n = state.count
        gf = unscale(list(_flat.pack(g_l, lay).buffers))
        nones = [None] * ng
        ops = (gf, list(bufs.get("acc", nones)), list(bufs["mu"]), list(bufs["nu"]), list(bufs.get("nu_max", nones)))

        lr, sc, wd = step_scalars(hp, k, decay_on, n)

        def real_step(gf, acc, mu, nu, nm):
            if k is not None:
                gf, acc = window_mean(gf, acc)
            if clipnorm is not None:  # per tensor: norms of each leaf's slice
                gf = list(_flat.pack(_clip([piece(gf, i) for i in range(len(p_l))]), lay).buffers)
            else:
                gf = _clip(gf)
            d, mu, nu, nm = _moments.adam_leaves(gf, mu, nu, nm, sc, form="kernel", mode="hat")
            return d, acc, mu, nu, nm

        def micro_step(gf, acc, mu, nu, nm):
            return gf, accumulate(gf, acc), mu, nu, nm

        real = None if k is None else (n + 1) % k == 0
        if real is None:
            d, acc, mu, nu, nm = real_step(*ops)
        else:
            d, acc, mu, nu, nm = jax.lax.cond(real, real_step, micro_step, *ops)
        keep = _decay.decay_mask_leaves(params, exclude, weight_decay_mask) if decay_on else [False] * len(p_l)
        pdts = [jnp.dtype(jnp.asarray(p).dtype) for p in p_l]

        def finish(d: Any, p: Any, dec: bool) -> Any:
            """The update in the params' dtype; zero on micro-steps (``d`` is a placeholder there)."""
            u = descent(d, p, dec, lr, wd, p.dtype)
            return u if real is None else jnp.where(real, u, jnp.zeros_like(u))

        # Groups whose leaves share the params' dtype and the decay mask get their updates
        # (and the params an average needs) as whole buffers too: one loop per leaf remains,
        # the slice of the update (or of the average, on an overwrite step).
        uniform = [len({(pdts[i], keep[i]) for i in members[j]}) == 1 for j in range(ng)]
        p_flat: list[Any] = [None] * ng
        u_flat: list[Any] = [None] * ng
        for j in range(ng):
            if uniform[j]:
                i0 = members[j][0]
                p_flat[j] = cat([jnp.ravel(p_l[i]) for i in members[j]])
                u_flat[j] = finish(d[j], p_flat[j], keep[i0])
        u_l = [
            piece(u_flat, i) if uniform[s.group] else finish(piece(d, i), p_l[i], keep[i])
            for i, s in enumerate(lay.slots)
        ]
        ema = None
        if use_ema:
            mom, one_m, overwrite = _averaging.ema_scalars(n, ema_momentum, ema_overwrite_frequency, k)
            p_new = [
                _tree.rounded_sum(p_flat[j], u_flat[j], lay.dtypes[j])
                if uniform[j]
                else cat([jnp.ravel(_tree.rounded_sum(p_l[i], u_l[i], lay.dtypes[j])) for i in members[j]])
                for j in range(ng)
            ]
            ema = [mom.astype(a.dtype) * a + one_m.astype(a.dtype) * pn for a, pn in zip(bufs["ema"], p_new)]
            if overwrite is not None:
                for i, p in enumerate(p_l):
                    to_avg = (piece(ema, i) - p.astype(lay.dtypes[lay.slots[i].group])).astype(p.dtype)
                    u_l[i] = jnp.where(overwrite, to_avg, u_l[i])
        fb = lambda xs: _flat.FlatBuffers(tuple(xs))  # noqa: E731
        return jax.tree_util.tree_unflatten(treedef, u_l), next_state(n, fb, mu, nu, nm, acc, ema)

    if flat_state:
        opt = Adam(_flat_init(init_fn, field_dtypes), _flat_update(update_fn, field_dtypes, flat_vector_update))
    else:
        opt = Adam(init_fn, update_fn)
    opt.hyperparams = dict(hp, mu_dtype=mu_dtype, nu_dtype=nu_dtype, flat_state=bool(flat_state), name=name)
    return opt


_FLAT_FIELDS = ("mu", "nu", "nu_max", "acc", "ema")


def _flat_init(init_fn: Callable[[Any], AdamState], dtypes: dict[str, Callable[[Any], Any]]) -> Callable[[Any], AdamState]:
    def flat_init(params: optax.Params) -> AdamState:
        shapes = jax.eval_shape(init_fn, params)  # which fields are on, without allocating the trees
        leaves = jax.tree_util.tree_leaves(params)
        new: dict[str, Any] = {"count": jnp.zeros(shapes.count.shape, shapes.count.dtype)}
        for f in _FLAT_FIELDS:
            if getattr(shapes, f) is not None:
                lay = _flat.layout(leaves, dtypes[f])
                # the average starts as a fresh copy of params (never their own buffers)
                new[f] = _flat.pack(leaves, lay, fresh=True) if f == "ema" else _flat.zeros(lay)
        return shapes._replace(**new)

    return flat_init


def _flat_update(
    update_fn: Callable[..., Any], dtypes: dict[str, Callable[[Any], Any]], vector_update: Callable[..., Any]
) -> Callable[..., Any]:
    def flat_update(grads: optax.Updates, state: AdamState, params: Optional[optax.Params] = None, **extra: Any):
        if params is None:
            raise ValueError("adamx.adam(flat_state=True) needs the params: call update(grads, state, params).")
        out = vector_update(grads, state, params)
        if out is not None:
            return out
        # the per-leaf update on views of the flat buffers (cases the whole-buffer path does not take)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        lays = {f: _flat.layout(leaves, dtypes[f]) for f in _FLAT_FIELDS if getattr(state, f) is not None}
        as_tree = {f: jax.tree_util.tree_unflatten(treedef, _flat.unpack(getattr(state, f), lay)) for f, lay in lays.items()}
        updates, new = update_fn(grads, state._replace(**as_tree), params, **extra)
        packed = {f: _flat.pack(treedef.flatten_up_to(getattr(new, f)), lay) for f, lay in lays.items()}  # type: ignore[attr-defined]
        return updates, new._replace(**packed)

    return flat_update


def adamw(
    learning_rate: _hyper.ScalarOrSchedule = 0.001,
    weight_decay: _hyper.ScalarOrSchedule = 0.004,
    beta_1: _hyper.ScalarOrSchedule = 0.9,
    beta_2: _hyper.ScalarOrSchedule = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    clipnorm: Optional[float] = None,
    clipvalue: Optional[float] = None,
    global_clipnorm: Optional[float] = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: Optional[int] = None,
    loss_scale_factor: Optional[float] = None,
    gradient_accumulation_steps: Optional[int] = None,
    exclude_from_weight_decay: Optional[Sequence[str]] = None,
    weight_decay_mask: _decay.MaskOrFn = None,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
    flat_state: bool = False,
    name: str = "adam_w",
) -> Adam:
    """Keras 3's ``AdamW``: :func:`adam` with ``weight_decay=0.004`` by default.

    The argument order is Keras AdamW's (``weight_decay`` second). ``weight_decay``
    may not be ``None`` (Keras raises too).

    Example:
      >>> import adamx
      >>> adamx.adamw().hyperparams["weight_decay"]
      0.004
    """
    if weight_decay is None:
        raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
    return adam(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        amsgrad=amsgrad,
        weight_decay=weight_decay,
        clipnorm=clipnorm,
        clipvalue=clipvalue,
        global_clipnorm=global_clipnorm,
        use_ema=use_ema,
        ema_momentum=ema_momentum,
        ema_overwrite_frequency=ema_overwrite_frequency,
        loss_scale_factor=loss_scale_factor,
        gradient_accumulation_steps=gradient_accumulation_steps,
        exclude_from_weight_decay=exclude_from_weight_decay,
        weight_decay_mask=weight_decay_mask,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        flat_state=flat_state,
        name=name,
    )
