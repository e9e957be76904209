"""The NumPy reference of torchao's fp8 / 4-bit formats (tests/reference_lowbit.py) replays torchao bit for bit.

The fixture ``tests/references/data/torchao_lowbit.npz`` comes from the real torchao 0.18
(``tests/references/make_torchao_lowbit_refs.py``). Passing here proves both the fixture and the
spec the JAX codecs (``adamx/_lowbit.py``, tested in ``tests/test_lowbit.py``) are held to.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests import reference_lowbit as R
from tests.conftest import REFERENCE_DIR

NPZ = os.path.join(REFERENCE_DIR, "torchao_lowbit.npz")
META = os.path.join(REFERENCE_DIR, "torchao_lowbit.json")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(NPZ) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def meta() -> dict:
    with open(META) as f:
        return json.load(f)


def bits(x: np.ndarray) -> np.ndarray:
    """float32 bit patterns: equality of these is bit-for-bit equality (NaN == NaN, 0.0 != -0.0)."""
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def test_qmaps_are_torchaos():
    with np.load(NPZ) as f:
        assert np.array_equal(bits(R.qmap_signed()), bits(f["qmap_signed"]))
        assert np.array_equal(bits(R.qmap_unsigned()), bits(f["qmap_unsigned"]))
    q = R.qmap_signed()
    assert q[0] == np.float32(-0.8875) and q[-1] == 1 and 0 in q and -1 not in q  # asymmetric: no -1
    assert 0 not in R.qmap_unsigned()


def test_quantize_or_not_rule_is_torchaos(meta):
    rows = meta["quantized_or_not"]
    assert {True, False} <= {r["fp8"] for r in rows} and any(r["fp8"] != r["4bit"] for r in rows)
    for row in rows:
        n = int(np.prod(row["shape"]))
        assert R.is_quantized(n, R.FP8_BLOCK) == row["fp8"], row
        assert R.is_quantized(n, R.Q4_BLOCK) == row["4bit"], row


def test_e4m3fn_rounding_round_trips_every_value():
    vals = R.e4m3fn_values()
    finite = ~np.isnan(vals)
    assert finite.sum() == 254 and vals[finite].max() == 448 and vals[1] == 2.0**-9
    assert np.array_equal(R.e4m3fn_bits(vals[finite]), np.arange(256, dtype=np.uint8)[finite])
    # ties go to the even pattern: 1 + 1/16 lies between 1 (0x38) and 1.125 (0x39)
    assert R.e4m3fn_bits(np.float32([1.0625, -1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10])).tolist() == [
        0x38,
        0xB8,
        0x3A,
        0x00,
        0x02,
    ]


def test_codecs_are_torchaos_on_adversarial_inputs(ref):
    x = ref["codec/x"].ravel()
    codes, scales = R.fp8_quantize(x, 256)
    assert np.array_equal(codes, ref["codec/fp8_codes"])
    assert np.array_equal(bits(scales), bits(ref["codec/fp8_scales"]))
    for tag, q, xi in (("m4", R.qmap_signed(), x), ("v4", R.qmap_unsigned(), np.abs(x))):
        c, s = R.q4_quantize(xi, q, 128)
        assert np.array_equal(c, ref[f"codec/{tag}_codes"]), tag
        assert np.array_equal(R.pack4(c), ref[f"codec/{tag}_packed"]), tag
        assert np.array_equal(R.unpack4(ref[f"codec/{tag}_packed"]), c), tag
        assert np.array_equal(bits(s), bits(ref[f"codec/{tag}_scales"])), tag


def test_adversarial_inputs_reach_the_rounding_rules(ref):
    """The codec fixture holds exact ties for both rules, -0.0, NaN and inf: the tests above could fail on them."""
    x = ref["codec/x"]
    # fp8: a y exactly halfway between two e4m3fn values, and both directions of a tie taken
    y = (x[:2] / (np.float32(1) / np.float32(448))).ravel()
    vals = R.e4m3fn_values()[:127].astype(np.float64)
    mids = (vals[:-1] + vals[1:]) / 2
    assert np.isin(y.astype(np.float64), mids).sum() > 50
    # 4-bit: y - q[c] == (q[c+1] - q[c]) * 0.5 exactly (a tie, which goes up)
    for row, q in ((2, R.qmap_signed()), (3, R.qmap_unsigned())):
        t = q[:-1] + (q[1:] - q[:-1]) * np.float32(0.5)
        assert np.isin(t, x[row]).all()
    assert np.isnan(x).any() and np.isinf(x).any() and (np.signbit(x) & (x == 0)).any()
    assert np.array_equal(ref["codec/fp8_codes"][np.isnan(x.ravel())], [0x7F])  # NaN input: code NaN


@pytest.mark.parametrize("run,fmt,adamw", [("fp8_adam", "fp8", False), ("4bit_adamw", "4bit", True)])
def test_replays_torchaos_trajectory(ref, meta, run, fmt, adamw):
    """Start from torchao's initial params and replay every step with the reference's own state: codes, scales,
    float32 states and params equal torchao's at every step."""
    h = meta["hyper"]
    shapes = {k: tuple(s) for k, s in meta["shapes"].items()}
    states = {k: (R.State(fmt, s, True), R.State(fmt, s, False)) for k, s in shapes.items()}
    assert states["w"][0].quantized and not states["b"][0].quantized
    params = {k: ref[f"{run}/params/{k}"][0] for k in shapes}
    for t in range(meta["n_steps"]):
        for k in shapes:
            m, v = states[k]
            params[k], _, _ = R.adam_step(
                params[k],
                ref[f"grads/{k}"][t],
                m,
                v,
                t + 1,
                lr=h["lr"],
                betas=tuple(h["betas"]),
                eps=h["eps"],
                weight_decay=h["weight_decay"],
                adamw=adamw,
            )
            where = f"{run} step {t + 1} {k}"
            assert np.array_equal(bits(params[k]), bits(ref[f"{run}/params/{k}"][t + 1])), where
            for name, s in (("m", m), ("v", v)):
                if s.quantized:
                    assert np.array_equal(s.codes, ref[f"{run}/{name}_codes/{k}"][t]), f"{where} {name} codes"
                    assert np.array_equal(bits(s.scales), bits(ref[f"{run}/{name}_scales/{k}"][t])), where
                else:
                    assert np.array_equal(bits(s.values), bits(ref[f"{run}/{name}_values/{k}"][t])), where
