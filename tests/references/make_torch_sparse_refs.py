"""Generate ``torch.optim.SparseAdam`` reference trajectories (CPU, float32) for ``adamx.lazy_adam``.

Run with a Python that has torch (2.13.0+cpu was used), from any directory:

    python tests/references/make_torch_sparse_refs.py

One embedding table of shape ``(12, 4)``. Inputs, from ``np.random.default_rng(seed)`` in
this order: the initial table (``standard_normal``); then per step t = 1..n a scale
``s_t ~ U(0.5, 1)``, ``K`` row indices ``integers(0, 10)`` (so rows 10 and 11 are never
touched) with ``idx[1] = idx[0]`` and ``idx[2] = idx[0]`` on even steps (a duplicate on every
step, a triplicate on every other), and ``K`` rows of values ``standard_normal * s_t``. Case
``torch_sparse_adam_custom`` also has steps with no entry at all (``EMPTY_STEPS``): torch
skips the update there but still counts the step.

Each step builds ``torch.sparse_coo_tensor(indices[None], values, table.shape)`` (not
coalesced: torch coalesces, i.e. sums the duplicates, itself), sets it as ``p.grad`` and
calls ``optimizer.step()``.

Stored in ``data/<case>.npz``: ``params`` (n+1, 12, 4; row 0 = initial), ``m``, ``v`` (n, 12, 4:
``exp_avg``, ``exp_avg_sq`` after step t), ``sparse_indices`` (n, K) int64 padded with -1 past
``nnz[t]``, ``sparse_values`` (n, K, 4; 0 on padding), ``nnz`` (n,) int64, ``step`` (n,)
float64 (torch's ``state['step']``). ``data/<case>.json``: kwargs, versions, ``optimizer.defaults``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402

SHAPE = (12, 4)
TOUCHABLE = 10  # rows 10, 11 are never touched
K = 7
CASES = {
    "torch_sparse_adam_defaults": dict(kwargs={}, n_steps=30, seed=0, empty_steps=()),
    "torch_sparse_adam_custom": dict(
        kwargs={"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-4}, n_steps=30, seed=1, empty_steps=(5, 6, 17)
    ),
}


def make_inputs(seed: int, n_steps: int, empty_steps: tuple[int, ...]):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal(SHAPE).astype(np.float32)
    idx = np.full((n_steps, K), -1, np.int64)
    vals = np.zeros((n_steps, K, SHAPE[1]), np.float32)
    nnz = np.zeros(n_steps, np.int64)
    for t in range(1, n_steps + 1):
        s = rng.uniform(0.5, 1.0)
        i = rng.integers(0, TOUCHABLE, K)
        i[1] = i[0]
        if t % 2 == 0:
            i[2] = i[0]
        v = (rng.standard_normal((K, SHAPE[1])) * s).astype(np.float32)
        if t in empty_steps:
            continue
        idx[t - 1], vals[t - 1], nnz[t - 1] = i, v, K
    return table, idx, vals, nnz


def run_case(name: str, spec: dict) -> None:
    table, idx, vals, nnz = make_inputs(spec["seed"], spec["n_steps"], spec["empty_steps"])
    kwargs = dict(spec["kwargs"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    p = torch.nn.Parameter(torch.tensor(table))
    opt = torch.optim.SparseAdam([p], **kwargs)
    rec: dict[str, list] = {"params": [table.copy()], "m": [], "v": []}
    steps = []
    for t in range(spec["n_steps"]):
        k = int(nnz[t])
        p.grad = torch.sparse_coo_tensor(
            torch.tensor(idx[t, :k][None]), torch.tensor(vals[t, :k]).reshape(k, SHAPE[1]), SHAPE, check_invariants=True
        )
        opt.step()
        st = opt.state[p]
        rec["params"].append(p.detach().numpy().copy())
        rec["m"].append(st["exp_avg"].numpy().copy())
        rec["v"].append(st["exp_avg_sq"].numpy().copy())
        steps.append(float(st["step"]))
    arrays = {k: np.stack(v).astype(np.float32) for k, v in rec.items()}
    arrays.update(sparse_indices=idx, sparse_values=vals, nnz=nnz, step=np.asarray(steps, np.float64))
    meta = {
        "name": name,
        "library": "torch",
        "library_version": torch.__version__,
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "optimizer": "torch.optim.SparseAdam",
        "execution": "CPU, float32; p.grad = uncoalesced sparse_coo_tensor, then optimizer.step(), one call per step",
        "dtype": "float32",
        "n_steps": spec["n_steps"],
        "seed": spec["seed"],
        "shape": list(SHAPE),
        "k": K,
        "touchable_rows": TOUCHABLE,
        "empty_steps": list(spec["empty_steps"]),
        "kwargs": spec["kwargs"],
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in opt.defaults.items()},
    }
    C.save(name, arrays, meta)


def sanity_checks() -> None:
    for name in CASES:
        a, meta = C.load(name)
        p = a["params"]
        assert np.array_equal(p[:, TOUCHABLE:], np.repeat(p[:1, TOUCHABLE:], p.shape[0], 0)), "untouched rows moved"
        assert np.all(a["m"][:, TOUCHABLE:] == 0) and np.all(a["v"][:, TOUCHABLE:] == 0)
        assert np.array_equal(a["step"], np.arange(1, meta["n_steps"] + 1)), "step counts every step() call"
        for t in range(meta["n_steps"]):
            touched = set(a["sparse_indices"][t, : a["nnz"][t]].tolist())
            still = [r for r in range(TOUCHABLE) if r not in touched]
            # a row not in this step's gradient keeps its weights and moments exactly
            assert np.array_equal(p[t + 1, still], p[t, still])
            if t > 0:
                assert np.array_equal(a["m"][t, still], a["m"][t - 1, still])
        for t in meta["empty_steps"]:
            assert np.array_equal(p[t], p[t - 1])
    print("sanity checks passed")


def main() -> None:
    for name, spec in CASES.items():
        run_case(name, spec)
        print(f"wrote {name}")
    sanity_checks()


if __name__ == "__main__":
    main()
