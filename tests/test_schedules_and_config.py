"""Keras schedules and configs, checked against the real Keras 3 (JAX backend) in this process."""

import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import adamx  # noqa: E402
from tests.conftest import REFERENCE_DIR  # noqa: E402

KS = keras.optimizers.schedules
SCHEDULES = [
    ("ExponentialDecay", dict(initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5)),
    ("ExponentialDecay", dict(initial_learning_rate=0.01, decay_steps=7, decay_rate=0.3, staircase=True)),
    ("PiecewiseConstantDecay", dict(boundaries=[5, 15], values=[0.01, 0.005, 0.001])),
    ("PiecewiseConstantDecay", dict(boundaries=[3], values=[1.0, 0.5])),
    ("InverseTimeDecay", dict(initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5)),
    ("InverseTimeDecay", dict(initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5, staircase=True)),
    ("PolynomialDecay", dict(initial_learning_rate=0.01, decay_steps=20, end_learning_rate=0.001, power=2.0)),
    (
        "PolynomialDecay",
        dict(initial_learning_rate=0.01, decay_steps=8, end_learning_rate=0.001, power=0.5, cycle=True),
    ),
    ("CosineDecay", dict(initial_learning_rate=0.01, decay_steps=20, alpha=0.1)),
    ("CosineDecay", dict(initial_learning_rate=0.0, decay_steps=15, warmup_target=0.01, warmup_steps=5)),
    ("CosineDecay", dict(initial_learning_rate=0.001, decay_steps=10, alpha=0.2, warmup_target=0.1, warmup_steps=3)),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.01, first_decay_steps=5, t_mul=2.0, m_mul=0.5, alpha=0.1)),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.01, first_decay_steps=4, t_mul=1.0, m_mul=0.9)),
]


@pytest.mark.parametrize("cls, kw", SCHEDULES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(SCHEDULES)])
def test_schedule_values_equal_keras(cls, kw):
    """Same float32 ops as Keras on the JAX backend; jitted XLA may differ by a few ULP (sin/cos, pow)."""
    theirs = getattr(KS, cls)(**kw)
    ours = getattr(adamx.schedules, cls)(**kw)
    steps = np.arange(0, 60)
    want = np.array([float(theirs(jnp.int32(s))) for s in steps], np.float32)
    eager = np.array([float(ours(jnp.int32(s))) for s in steps], np.float32)
    jitted = np.asarray(jax.jit(jax.vmap(ours))(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(eager, want, rtol=4e-7, atol=0)
    np.testing.assert_allclose(jitted, want, rtol=2e-6, atol=1e-9)
    # serialized form equals Keras's, and reads back
    assert ours.serialize() == KS.serialize(theirs)
    assert adamx.schedules.deserialize(KS.serialize(theirs)) == ours


def test_piecewise_boundary_is_inclusive_on_the_left_piece():
    sched = adamx.schedules.PiecewiseConstantDecay([5, 15], [0.01, 0.005, 0.001])
    # step n (1-based) sees the counter n - 1: steps 1..6 use values[0]
    values = [float(sched(jnp.int32(c))) for c in range(7)]
    assert values[:6] == [pytest.approx(0.01)] * 6 and values[6] == pytest.approx(0.005)


def _keras_configs():
    with open(os.path.join(REFERENCE_DIR, "keras_configs.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("entry", _keras_configs(), ids=lambda e: e["desc"][:60])
def test_printed_keras_configs_round_trip(entry):
    config = entry["config"]
    opt = adamx.from_keras_config(config)
    if "inner_optimizer" in config:
        assert isinstance(opt, adamx.LossScaleOptimizer)
        assert opt.get_config() == config
        again = keras.optimizers.LossScaleOptimizer.from_config(opt.get_config())
        assert again.get_config() == config
        return
    assert opt.get_config() == config
    # and real Keras reads what adamx writes, into the same optimizer
    cls = keras.optimizers.AdamW if config["name"].startswith("adam_w") else keras.optimizers.Adam
    again = cls.from_config(opt.get_config())
    assert again.get_config() == config


def test_live_keras_get_config_every_argument():
    k = keras.optimizers.Adam(
        learning_rate=0.003,
        beta_1=0.85,
        beta_2=0.99,
        epsilon=1e-6,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=2.0,
        use_ema=True,
        ema_momentum=0.95,
        ema_overwrite_frequency=7,
        loss_scale_factor=256.0,
        gradient_accumulation_steps=4,
        name="mine",
    )
    config = k.get_config()
    assert adamx.from_keras_config(config).get_config() == config
    assert adamx.from_keras_config(keras.optimizers.serialize(k)).get_config() == config


LEGACY = {
    "name": "Adam",
    "learning_rate": 0.001,
    "decay": 0.0,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-07,
    "amsgrad": False,
}


def test_legacy_tf_keras_config():
    opt = adamx.from_keras_config(LEGACY)
    assert opt.hyperparams["learning_rate"] == 0.001 and opt.hyperparams["epsilon"] == 1e-07
    cfg = dict(LEGACY, decay=0.01, jit_compile=True, is_legacy_optimizer=True)
    opt = adamx.from_keras_config(cfg)
    lr = opt.hyperparams["learning_rate"]
    assert isinstance(lr, adamx.schedules.InverseTimeDecay)
    np.testing.assert_allclose(
        [float(lr(jnp.int32(s))) for s in (0, 10, 100)], [0.001 / (1 + 0.01 * s) for s in (0, 10, 100)], rtol=1e-6
    )
    # written back as Keras 3 config, which real Keras accepts
    written = opt.get_config()
    assert keras.optimizers.Adam.from_config(written).get_config()["learning_rate"]["class_name"] == "InverseTimeDecay"
    old = dict(LEGACY)
    old["lr"] = old.pop("learning_rate")
    assert adamx.from_keras_config(old).hyperparams["learning_rate"] == 0.001


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"Unknown key\(s\) in the Adam config: \['momentum'\]"):
        adamx.from_keras_config({"learning_rate": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="builds Adam and AdamW"):
        adamx.from_keras_config({"class_name": "SGD", "config": {}})
    with pytest.raises(ValueError, match="Unknown learning-rate schedule"):
        adamx.from_keras_config({"learning_rate": {"class_name": "Nope", "config": {}}})
    with pytest.raises(ValueError, match="both `lr` and `learning_rate`"):
        adamx.from_keras_config({"lr": 0.1, "learning_rate": 0.1})
    with pytest.raises(TypeError, match="must be a dict"):
        adamx.from_keras_config("adam")
    with pytest.raises(ValueError, match="`beta_1`"):
        adamx.from_keras_config({"beta_1": 1.5})
    with pytest.raises(ValueError, match="not one of adamx.schedules"):
        adamx.adam(learning_rate=lambda c: 0.1).get_config()
    with pytest.raises(ValueError, match="`weight_decay_mask` cannot be written"):
        adamx.adam(weight_decay=0.1, weight_decay_mask=lambda p: p).get_config()
    with pytest.raises(TypeError, match="made by adamx.adam"):
        adamx.to_keras_config(adamx.tf1_adam())


def test_adamx_only_options_round_trip_with_include_adamx():
    opt = adamx.adam(mu_dtype=jnp.bfloat16, exclude_from_weight_decay=["bias", "norm"], weight_decay=0.1)
    with pytest.raises(ValueError, match="include_adamx=True"):
        opt.get_config()
    cfg = adamx.to_keras_config(opt, include_adamx=True)
    assert cfg["mu_dtype"] == "bfloat16" and cfg["exclude_from_weight_decay"] == ["bias", "norm"]
    back = adamx.from_keras_config(cfg)
    assert adamx.to_keras_config(back, include_adamx=True) == cfg
    params = {"w": jnp.ones(2)}
    assert back.init(params).mu["w"].dtype == jnp.bfloat16
