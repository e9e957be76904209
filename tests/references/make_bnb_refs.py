"""Store bitsandbytes' 8-bit code maps and its CPU block-wise quantization of a fixed input.

Output: ``data/bnb_quant.npz`` (+ ``data/bnb_quant.json`` with versions). ``tests/test_quantize.py``
compares adamx's maps (``adamx._quantize``) and quantizer with these arrays.

bitsandbytes is not a dependency of adamx. Install it beside torch without touching the venv:

    pip install --no-deps --target /tmp/bnb bitsandbytes==0.50.2
    PYTHONPATH=/tmp/bnb python tests/references/make_bnb_refs.py

(run from the repository root, in a venv with torch 2.13 CPU and numpy).
"""

from __future__ import annotations

import json
import os
import platform

import bitsandbytes
import bitsandbytes.functional as F
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")


def make_input(seed: int = 0, n: int = 64 * 256 + 77) -> np.ndarray:
    """Normal values with a per-block magnitude spread over 6 decades, some exact zeros, one all-zero block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x *= (10.0 ** rng.uniform(-6, 0, size=n // 256 + 1)).repeat(256)[:n].astype(np.float32)
    x[rng.random(n) < 0.1] = 0.0
    x[256:512] = 0.0
    return x


def main() -> None:
    os.makedirs(DATA, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    for signed in (True, False):
        tag = "signed" if signed else "unsigned"
        out[f"dynamic_{tag}"] = F.create_dynamic_map(signed=signed).numpy()
        out[f"linear_{tag}"] = F.create_linear_map(signed=signed).numpy()
    x = make_input()
    out["x"] = x
    for signed in (True, False):
        tag = "signed" if signed else "unsigned"
        xi = x if signed else np.abs(x)
        code = torch.from_numpy(out[f"dynamic_{tag}"])
        q, state = F.quantize_blockwise(torch.from_numpy(xi), code=code, blocksize=256)
        out[f"bnb_codes_{tag}"] = q.numpy()
        out[f"bnb_scales_{tag}"] = state.absmax.numpy()
    np.savez(os.path.join(DATA, "bnb_quant.npz"), **out)
    meta = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "block_size": 256,
        "input": "make_input(seed=0, n=64*256+77); unsigned case quantizes abs(x)",
    }
    with open(os.path.join(DATA, "bnb_quant.json"), "w") as f:
        json.dump(meta, f, indent=1)
    # sanity checks
    for k in ("dynamic_signed", "dynamic_unsigned"):
        assert out[k].shape == (256,) and np.all(np.diff(out[k]) > 0), k
    print("wrote", sorted(out), meta)


if __name__ == "__main__":
    main()
