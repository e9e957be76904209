"""``tf1_adam``: ``tf.compat.v1.train.AdamOptimizer``, dense and sparse."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import sparse as jsparse

from adamx import _hyper, _moments, _tree
from adamx._spec import check_moment_dtype
from adamx._types import Leaf


class Tf1AdamState(NamedTuple):
    """State of :func:`tf1_adam`. Field names are the checkpoint format."""

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; steps so far (for schedules), saturating
    beta1_power: jax.Array  # shape=(), dtype=float32; running product, starts at beta1
    beta2_power: jax.Array  # shape=(), dtype=float32; running product, starts at beta2
    mu: optax.Updates  # TF's slot "m"
    nu: optax.Updates  # TF's slot "v"


def tf1_adam(
    learning_rate: _hyper.ScalarOrSchedule = 0.001,
    beta1: _hyper.ScalarOrSchedule = 0.9,
    beta2: _hyper.ScalarOrSchedule = 0.999,
    epsilon: float = 1e-8,
    *,
    mu_dtype: Leaf | None = None,
    nu_dtype: Leaf | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""``tf.compat.v1.train.AdamOptimizer`` (defaults: ``epsilon=1e-8``).

    .. code-block:: text

        # dense gradient (TF's ApplyAdam kernel); 1 - beta computed in float32
        alpha = lr * sqrt(1 - beta2_power) / (1 - beta1_power)
        m = m + (g - m) * (1 - beta1) ;  v = v + (g*g - v) * (1 - beta2)
        params -= m * alpha / (sqrt(v) + epsilon)
        beta1_power *= beta1 ;  beta2_power *= beta2          # running float32 products

    A ``jax.experimental.sparse.BCOO`` gradient takes TF1's sparse path: duplicate
    indices are summed first (like ``tf.IndexedSlices`` through
    ``_apply_sparse_duplicate_indices``), then ``m = m*beta1 + g*(1-beta1)`` and
    ``v = v*beta2 + g*g*(1-beta2)``, over all rows: rows without a gradient keep
    moving while their ``m`` is non-zero, as in TF.

    The bias correction uses the running products ``beta1_power``/``beta2_power``, not
    a step count. With a schedule ``beta1(count)``, the power starts at ``beta1(0)`` and
    is multiplied by the current beta after each step: step ``t`` uses
    ``beta1(0) * prod_{s<t-1} beta1(s)``, TF1's lag with callable betas.

    Differences from TF1 by design: the arithmetic is float32 also for bfloat16 and
    float16 params (TF1 diverges in bf16 and gives NaN in fp16 with the defaults).
    ``use_locking`` and ``name`` have no meaning here.

    Args:
      learning_rate: float >= 0 or a schedule ``count -> lr``.
      beta1, beta2: in [0, 1) or schedules.
      epsilon: >= 0 (default 1e-8).
      mu_dtype, nu_dtype: storage dtypes of the moments (floating: bfloat16, float32, float64;
        float16 for ``mu`` only), as for :func:`adamx.adam`.

    Example:
      >>> import jax.numpy as jnp, optax, adamx
      >>> opt = adamx.tf1_adam(0.1)
      >>> params = jnp.array([1.0])
      >>> u, s = opt.update(jnp.array([2.0]), opt.init(params), params)
      >>> [round(float(x), 4) for x in optax.apply_updates(params, u)]
      [0.9]
    """
    spec = Tf1AdamSpec(learning_rate, beta1, beta2, epsilon, mu_dtype, nu_dtype)
    return optax.GradientTransformationExtraArgs(functools.partial(init, spec), functools.partial(update, spec))


@dataclasses.dataclass(frozen=True, eq=False)
class Tf1AdamSpec:
    """The options of a :func:`tf1_adam`, validated once when built (errors name the argument)."""

    learning_rate: _hyper.ScalarOrSchedule = 0.001
    beta1: _hyper.ScalarOrSchedule = 0.9
    beta2: _hyper.ScalarOrSchedule = 0.999
    epsilon: float = 1e-8
    mu_dtype: Leaf | None = None
    nu_dtype: Leaf | None = None

    def __post_init__(self) -> None:
        _hyper.check_scalar("learning_rate", self.learning_rate, lo=0.0, allow_schedule=True)
        _hyper.check_scalar("beta1", self.beta1, lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
        _hyper.check_scalar("beta2", self.beta2, lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
        _hyper.check_scalar("epsilon", self.epsilon, lo=0.0)
        check_moment_dtype("mu_dtype", self.mu_dtype)
        check_moment_dtype("nu_dtype", self.nu_dtype)


def init(spec: Tf1AdamSpec, params: optax.Params) -> Tf1AdamState:
    """Count 0, the beta powers at ``beta(0)``, zero moments."""
    zero = jnp.zeros([], jnp.int32)
    return Tf1AdamState(
        count=zero,
        beta1_power=_hyper.value_at(spec.beta1, zero),
        beta2_power=_hyper.value_at(spec.beta2, zero),
        mu=_moments.moment_buffers(params, spec.mu_dtype),
        nu=_moments.moment_buffers(params, spec.nu_dtype, second=True),
    )


def update(
    spec: Tf1AdamSpec, grads: optax.Updates, state: Tf1AdamState, params: optax.Params | None = None, **extra: Leaf
) -> tuple[optax.Updates, Tf1AdamState]:
    """One TF1 step: dense leaves by ``ApplyAdam``, ``BCOO`` leaves by TF1's sparse path."""
    del extra
    if not isinstance(state, Tf1AdamState):
        raise ValueError(
            f"`state` is a {type(state).__name__}, not the Tf1AdamState of adamx.tf1_adam: build it with this "
            "optimizer's `init`."
        )
    treedef: Any = jax.tree_util.tree_structure(state.mu)
    raw = treedef.flatten_up_to(grads)
    sparse_leaf = [isinstance(g, jsparse.BCOO) for g in raw]
    g_l, _, _ = _tree.align_grads(grads, state.mu)
    n = state.count
    lr = _hyper.value_at(spec.learning_rate, n)
    powers = (state.beta1_power, state.beta2_power)
    sc = _moments.adam_scalars(
        spec.beta1, spec.beta2, spec.epsilon, 0.0, n, alpha_lr=lr, keras_rounding=False, powers=powers
    )
    mu_l, nu_l = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    p_l = treedef.flatten_up_to(params) if params is not None else [None] * len(g_l)
    u_l: list[Leaf] = []
    mu_n: list[Leaf] = []
    nu_n: list[Leaf] = []
    for g, m, v, p, sp in zip(g_l, mu_l, nu_l, p_l, sparse_leaf):
        if g is None:
            u_l.append(None)
            mu_n.append(m)
            nu_n.append(v)
            continue
        d, m2, v2, _ = _moments.adam_leaf(g, m, v, None, sc, form="textbook" if sp else "kernel", mode="hat")
        u_l.append((-d).astype(g.dtype if p is None else jnp.asarray(p).dtype))
        mu_n.append(m2)
        nu_n.append(v2)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    return unflat(u_l), Tf1AdamState(
        count=optax.safe_increment(n),
        beta1_power=state.beta1_power * sc.b1,
        beta2_power=state.beta2_power * sc.b2,
        mu=unflat(mu_n),
        nu=unflat(nu_n),
    )
