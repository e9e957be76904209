"""Bad input is refused at construction with an error naming the argument."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamx


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-0.1), "`learning_rate` must be >= 0"),
        (dict(learning_rate=math.nan), "`learning_rate` must be finite"),
        (dict(learning_rate=math.inf), "`learning_rate` must be finite"),
        (dict(learning_rate=np.float32(-1)), "`learning_rate`"),
        (dict(learning_rate=jnp.array([1.0, 2.0])), "`learning_rate` must be a scalar"),
        (dict(beta_1=1.0), r"`beta_1` must be in \[0, 1\)"),
        (dict(beta_1=-0.1), "`beta_1`"),
        (dict(beta_2=1.5), "`beta_2`"),
        (dict(beta_2=math.nan), "`beta_2` must be finite"),
        (dict(epsilon=-1e-7), "`epsilon` must be >= 0"),
        (dict(weight_decay=-0.1), "`weight_decay` must be >= 0"),
        (dict(clipnorm=0.0), "`clipnorm` must be > 0"),
        (dict(clipnorm=-1.0), "`clipnorm` must be > 0"),
        (dict(clipvalue=-1.0), "`clipvalue` must be > 0"),
        (dict(global_clipnorm=0.0), "`global_clipnorm` must be > 0"),
        (dict(clipnorm=1.0, clipvalue=1.0), "Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"),
        (dict(clipnorm=0.0, global_clipnorm=1.0), "Only one of"),
        (dict(ema_momentum=1.5, use_ema=True), r"`ema_momentum` must be in \[0, 1\]"),
        (dict(ema_momentum=-0.1), "`ema_momentum`"),
        (dict(use_ema=True, ema_overwrite_frequency=0), "`ema_overwrite_frequency` must be an integer >= 1"),
        (dict(use_ema=True, ema_overwrite_frequency=-1), "`ema_overwrite_frequency`"),
        (dict(use_ema=True, ema_overwrite_frequency=2.0), "`ema_overwrite_frequency`"),
        (dict(gradient_accumulation_steps=0), "`gradient_accumulation_steps` must be an integer >= 1"),
        (dict(gradient_accumulation_steps=2.5), "`gradient_accumulation_steps`"),
        (dict(loss_scale_factor=0.0), "`loss_scale_factor` must be > 0"),
        (dict(exclude_from_weight_decay=["("]), "not a valid regex"),
    ],
)
def test_adam_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adamx.adam(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate="0.1"), "`learning_rate` must be a number or a schedule"),
        (dict(epsilon=lambda c: 1e-7), "`epsilon` must be a number"),
        (dict(amsgrad=1), "`amsgrad` must be a bool"),
        (dict(use_ema="yes"), "`use_ema` must be a bool"),
        (dict(exclude_from_weight_decay="bias"), "`exclude_from_weight_decay` must be a list"),
    ],
)
def test_adam_refuses_bad_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        adamx.adam(**kwargs)


def test_adamw_requires_weight_decay():
    with pytest.raises(ValueError, match="`weight_decay` must be a float"):
        adamx.adamw(weight_decay=None)


def test_tf1_and_blocks_validate():
    with pytest.raises(ValueError, match="`beta1`"):
        adamx.tf1_adam(beta1=1.0)
    with pytest.raises(ValueError, match="`epsilon`"):
        adamx.tf1_adam(epsilon=-1.0)
    with pytest.raises(ValueError, match="`clipnorm` must be > 0"):
        adamx.clip_by_norm(0.0)
    with pytest.raises(ValueError, match="`global_clipnorm` must be > 0"):
        adamx.clip_by_global_norm(-2.0)
    with pytest.raises(ValueError, match="`ema_momentum`"):
        adamx.ema_params(1.01)
    with pytest.raises(ValueError, match="`epsilon_mode`"):
        adamx.scale_by_adam(epsilon_mode="keras")
    with pytest.raises(ValueError, match=r"`weight_decay` must be >= 0"):
        adamx.decoupled_weight_decay(-1.0)


def test_schedules_validate():
    with pytest.raises(ValueError, match="`decay_steps` must be > 0"):
        adamx.schedules.ExponentialDecay(0.1, 0, 0.5)
    with pytest.raises(ValueError, match="boundaries should be 1 less"):
        adamx.schedules.PiecewiseConstantDecay([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="`first_decay_steps` must be > 0"):
        adamx.schedules.CosineDecayRestarts(0.1, 0)


def test_schedules_and_traced_values_are_accepted():
    adamx.adam(learning_rate=lambda c: 0.1 / (1 + c), beta_1=lambda c: 0.9)
    adamx.adam(learning_rate=jnp.float32(0.1), gradient_accumulation_steps=jnp.int32(2))

    @jax.jit
    def build_under_trace(lr):
        opt = adamx.adam(learning_rate=lr)  # traced: cannot be checked, used as given
        params = {"w": jnp.ones(2)}
        u, _ = opt.update({"w": jnp.ones(2)}, opt.init(params), params)
        return u["w"]

    assert build_under_trace(0.5).shape == (2,)


PARAMS = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "out": jnp.ones(4)}


def test_grads_tree_mismatch_names_the_path():
    opt = adamx.adam()
    state = opt.init(PARAMS)
    bad = {"dense": {"kernel": jnp.ones((2, 3)), "bais": jnp.zeros(3)}, "out": jnp.ones(4)}
    with pytest.raises(ValueError, match="dense/bias"):
        opt.update(bad, state, PARAMS)
    missing = {"dense": {"kernel": jnp.ones((2, 3))}, "out": jnp.ones(4)}
    with pytest.raises(ValueError, match="dense/bias"):
        opt.update(missing, state, PARAMS)


def test_grads_shape_mismatch_names_the_path():
    opt = adamx.adam()
    state = opt.init(PARAMS)
    bad = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(3)}, "out": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"dense/kernel.*shape \(3, 2\).*\(2, 3\)"):
        opt.update(bad, state, PARAMS)


def test_params_required_for_decay_and_ema():
    for kw in (dict(weight_decay=0.1), dict(use_ema=True)):
        opt = adamx.adam(**kw)
        with pytest.raises(ValueError, match="needs the params"):
            opt.update(PARAMS, opt.init(PARAMS))
    opt = adamx.adam()
    updates, _ = opt.update(PARAMS, opt.init(PARAMS))  # plain Adam does not need them
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_weight_decay_mask_must_fit_params():
    opt = adamx.adam(weight_decay=0.1, weight_decay_mask={"dense": True})
    with pytest.raises(ValueError, match="`weight_decay_mask`"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS)
    opt = adamx.adam(weight_decay=0.1, weight_decay_mask=lambda p: jax.tree.map(lambda x: 1, p))
    with pytest.raises(ValueError, match="Python bools"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS)
