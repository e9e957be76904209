"""Store torchao's fp8 and 4-bit Adam trajectories, and its low-bit codecs on adversarial inputs.

Output: ``data/torchao_lowbit.npz`` (+ ``data/torchao_lowbit.json``: versions, hyperparameters,
the quantize-or-not rule as torchao applied it). ``tests/test_lowbit_reference.py`` replays it
with the NumPy reference ``tests/reference_lowbit.py``; ``tests/test_lowbit.py`` checks adamx's
JAX codecs (``adamx/_lowbit.py``) against that reference. Array names: see ``tests/references/README.md``.

torchao is not a dependency of adamx. Run from the repository root, in a venv of its own:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 torchao==0.18.0 numpy
    /tmp/torchvenv/bin/python tests/references/make_torchao_lowbit_refs.py

The optimizers run as torchao runs them: ``torch.compile`` (inductor, CPU) of its
``single_param_adam`` per parameter. That needs a C++ compiler (g++); the first run compiles
for a minute or two.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import torch
import torchao
from torchao.optim import Adam4bit, AdamFp8, AdamW4bit
from torchao.optim.quant_utils import quantize_4bit_with_qmap, scale_tensor
from torchao.optim.subclass_4bit import OptimState4bit
from torchao.optim.subclass_fp8 import OptimStateFp8, quantize_fp8

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")

# The trajectories. "w" (64, 64) = 4096 elements is quantized by both formats (torchao: numel >= 4096
# and numel % block_size == 0); its fp8 blocks (256) span 4 rows, its 4-bit blocks (128) span 2 rows.
# "b" (6, 10) is too small: torchao keeps it float32 (it takes the same step).
SHAPES = {"w": (64, 64), "b": (6, 10)}
N_STEPS = 10
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
RUNS = {  # name: (class, what torchao adds weight decay to)
    "fp8_adam": AdamFp8,  # Adam*: L2, g + wd * p
    "4bit_adamw": AdamW4bit,  # AdamW*: decoupled, p - lr * wd * p first
}
# Shapes whose state torchao quantizes, or not (the rule, recorded from the real classes at step 1).
RULE_SHAPES = [(4096,), (64, 64), (33, 128), (4100,), (4095,), (16, 128), (8, 512), (2, 2048), (10,)]
# Per 128-element block of "w": the gradient magnitude (tiny to large) of each step, in decades.
BLOCK_DECADES = np.array([-30, -20, -12, -8, -6, -4, -3, -2, -1, 0, 0, 0, 1, 2, 3, 6] * 2, dtype=np.float64)


def make_grads(seed: int = 0) -> dict[str, np.ndarray]:
    """``grads[key]``: (N_STEPS, *shape) float32. Normal values times a per-128-block magnitude, 10% exact zeros.

    Every value is rounded to 8 significant bits (exact in bfloat16, stored as float32) so the file compresses.

    "w": block k has magnitude ``10**BLOCK_DECADES[k]`` (1e-30 to 1e6), its blocks shuffled each step so a block's
    scale jumps between steps; one whole 128-block is zero on steps 3..6 (m decays towards 0 there), and the whole
    first fp8 block (256) is zero on step 9.
    """
    rng = np.random.default_rng(seed)
    out = {k: np.empty((N_STEPS, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(N_STEPS):
        dec = rng.permutation(BLOCK_DECADES)
        g = rng.standard_normal(4096) * np.repeat(10.0**dec, 128)
        g[rng.random(4096) < 0.1] = 0.0
        if 2 <= t <= 5:
            g[5 * 128 : 6 * 128] = 0.0
        if t == 8:
            g[:256] = 0.0
        out["w"][t] = g.astype(np.float32).reshape(SHAPES["w"])
        out["b"][t] = (rng.standard_normal(SHAPES["b"]) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
    for k, g in out.items():
        out[k] = torch.from_numpy(g).bfloat16().float().numpy()  # round to nearest even, 8 significant bits
    return out


def state_arrays(state: torch.Tensor) -> dict[str, np.ndarray]:
    """The stored bits of one torchao state tensor: fp8 codes as uint8 bits, 4-bit packed bytes, or plain float32."""
    if isinstance(state, OptimStateFp8):
        return {"codes": state.codes.view(torch.uint8).numpy().copy(), "scales": state.scale.numpy().copy()}
    if isinstance(state, OptimState4bit):
        return {"codes": state.codes.numpy().copy(), "scales": state.scale.numpy().copy()}
    return {"values": state.detach().numpy().copy()}


def run(name: str, cls: type, grads: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    opt = cls(list(params.values()), **HYPER)
    out: dict[str, list[np.ndarray]] = {}

    def put(key: str, value: np.ndarray) -> None:
        out.setdefault(f"{name}/{key}", []).append(value)

    for k in SHAPES:
        put(f"params/{k}", init[k])
    for t in range(N_STEPS):
        for k, p in params.items():
            p.grad = torch.from_numpy(grads[k][t].copy())
        opt.step()
        for k, p in params.items():
            put(f"params/{k}", p.detach().numpy().copy())
            for moment, field in (("m", "exp_avg"), ("v", "exp_avg_sq")):
                for part, arr in state_arrays(opt.state[p][field]).items():
                    put(f"{moment}_{part}/{k}", arr)
    return {k: np.stack(v) for k, v in out.items()}


def quantized_or_not() -> list[dict]:
    """For each of RULE_SHAPES and each format: did torchao create a quantized state (one real step)?"""
    rows = []
    for shape in RULE_SHAPES:
        row: dict = {"shape": list(shape)}
        for fmt, cls in (("fp8", AdamFp8), ("4bit", Adam4bit)):
            p = torch.nn.Parameter(torch.zeros(shape))
            opt = cls([p])
            p.grad = torch.ones(shape)
            opt.step()
            row[fmt] = isinstance(opt.state[p]["exp_avg"], (OptimStateFp8, OptimState4bit))
        rows.append(row)
    return rows


def qmaps() -> tuple[np.ndarray, np.ndarray]:
    s = OptimState4bit.zeros((256,), signed=True, block_size=128)
    u = OptimState4bit.zeros((256,), signed=False, block_size=128)
    return s.qmap.numpy().copy(), u.qmap.numpy().copy()


def adversarial_inputs(qmap_signed: np.ndarray, qmap_unsigned: np.ndarray) -> np.ndarray:
    """(rows of 256) float32 inputs for the codecs alone. Built from bit patterns and the maps; not expected outputs.

    Row by row: every float8 e4m3fn value and every midpoint between neighbours (ties) times 1/448 of a
    block whose absmax is 1 (so ``x / scale`` lands on them, or one float32 ulp off); the 4-bit maps'
    values and the midpoints ``q[c] + (q[c+1] - q[c]) * 0.5`` with their float32 neighbours, in a block
    of absmax 1; zeros and -0.0; subnormals; huge (1e38) and tiny (1e-30, 1e-13) blocks; NaN and inf blocks.
    """
    f32 = np.float32
    rows = []
    one = lambda r: np.concatenate([r, np.ones(1, np.float32)])  # noqa: E731  absmax 1 in the block
    # fp8: all 127 positive finite e4m3fn values and their midpoints, with neighbours, over 448 (so y = x / (1/448))
    pos = torch.arange(1, 127, dtype=torch.uint8)  # 0x01..0x7e: subnormals and normals up to 448
    vals = pos.view(torch.float8_e4m3fn).float().numpy()
    mids = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)
    grid = np.concatenate([vals, mids, np.nextafter(mids, f32(0)), np.nextafter(mids, f32(1e9))])
    grid = grid / f32(448)  # the block's absmax is 1, its scale 1/448: x / scale lands near the grid
    for chunk in np.array_split(grid, 2):
        r = np.concatenate([chunk, -chunk[: 255 - chunk.size]])[:255]
        rows.append(one(r))
    # 4-bit maps: values, ties and neighbours, block absmax 1
    for q in (qmap_signed, qmap_unsigned):
        half = (q[1:] - q[:-1]) * f32(0.5)
        t = q[:-1] + half
        r = np.concatenate([q, t, np.nextafter(t, f32(-2)), np.nextafter(t, f32(2)), np.nextafter(q, f32(2))])
        r = np.concatenate([r, np.zeros(255 - r.size, np.float32)])
        rows.append(one(r))
    rng = np.random.default_rng(7)
    base = rng.standard_normal(256).astype(np.float32)
    z = base.copy()
    z[::3] = 0.0
    z[1::3] = -0.0
    rows.append(z)  # zeros and -0.0 among normal values
    rows.append(np.zeros(256, np.float32))  # an all-zero block: scale max(0, 1e-12)
    rows.append(np.where(np.arange(256) % 2 == 0, f32(0), -f32(0)).astype(np.float32))  # all +-0
    sub = (rng.integers(1, 2**23, 256).astype(np.uint32)).view(np.float32) * np.where(base > 0, 1, -1).astype(
        np.float32
    )
    rows.append(sub)  # subnormals only: absmax < 1e-12, clipped
    rows.append(np.concatenate([sub[:128], base[:128]]))  # subnormals beside normal values
    rows.append(base * f32(1e38))  # huge
    rows.append(base * f32(1e-30))  # tiny: absmax clipped to 1e-12
    rows.append(base * f32(1e-13))  # absmax just below the 1e-12 clip
    n = base.copy()
    n[5] = np.nan
    rows.append(n)  # NaN block
    i = base.copy()
    i[9] = np.inf
    rows.append(i)  # +inf block
    i = base.copy()
    i[9] = -np.inf
    i[10] = np.inf
    rows.append(i)  # +-inf block
    x = np.stack(rows).astype(np.float32)
    assert x.shape[1] == 256
    return x


def codecs(x: np.ndarray, qmap_signed: np.ndarray, qmap_unsigned: np.ndarray) -> dict[str, np.ndarray]:
    """torchao's own encoders (eager) on ``x``: fp8 (block 256) and both 4-bit maps (block 128, |x| for v)."""
    xt = torch.from_numpy(x.ravel().copy())
    codes, scale = quantize_fp8(xt, 256)
    out = {"codec/fp8_codes": codes.view(torch.uint8).numpy().copy(), "codec/fp8_scales": scale.numpy().copy()}
    for tag, q, xi in (("m4", qmap_signed, xt), ("v4", qmap_unsigned, xt.abs())):
        y, s = scale_tensor(xi, 128)
        c = quantize_4bit_with_qmap(y, torch.from_numpy(q))
        out[f"codec/{tag}_codes"] = c.numpy().copy()
        out[f"codec/{tag}_packed"] = ((c[::2] << 4) | c[1::2]).numpy().copy()
        out[f"codec/{tag}_scales"] = s.numpy().copy()
    return out


def main() -> None:
    torch.manual_seed(0)
    os.makedirs(DATA, exist_ok=True)
    grads = make_grads()
    out: dict[str, np.ndarray] = {f"grads/{k}": v for k, v in grads.items()}
    for name, cls in RUNS.items():
        out.update(run(name, cls, grads))
    qs, qu = qmaps()
    out["qmap_signed"], out["qmap_unsigned"] = qs, qu
    x = adversarial_inputs(qs, qu)
    out["codec/x"] = x
    out.update(codecs(x, qs, qu))
    rule = quantized_or_not()
    path = os.path.join(DATA, "torchao_lowbit.npz")
    np.savez_compressed(path, **out)
    meta = {
        "torchao": torchao.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "n_steps": N_STEPS,
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "hyper": HYPER,
        "runs": {name: cls.__name__ for name, cls in RUNS.items()},
        "execution": "torchao's own step(): torch.compile(single_param_adam) per parameter, inductor on CPU",
        "quantized_or_not": rule,
    }
    with open(os.path.join(DATA, "torchao_lowbit.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    # sanity checks: the rule as LOWBIT.md states it; states of "w" quantized, of "b" not; finite trajectories
    for row in rule:
        n = int(np.prod(row["shape"]))
        assert row["fp8"] == (n >= 4096 and n % 256 == 0), row
        assert row["4bit"] == (n >= 4096 and n % 128 == 0), row
    for name in RUNS:
        assert out[f"{name}/m_codes/w"].shape[0] == N_STEPS and f"{name}/m_values/b" in out, name
        assert np.all(np.isfinite(out[f"{name}/params/w"])), name
    print(f"wrote {path} ({os.path.getsize(path)} bytes), {len(out)} arrays")


if __name__ == "__main__":
    main()
