"""Generate torch.optim.Adam / AdamW reference trajectories (CPU, float32).

Run with a Python that has torch (2.13.0+cpu was used) (any working directory):

    python tests/references/make_torch_refs.py

For every case in ``cases.TORCH_CASES`` it builds ``torch.optim.Adam`` or
``torch.optim.AdamW`` with ``foreach=False`` (the single-tensor loop) and the
case kwargs, on one float32 tensor per parameter, sets ``p.grad`` and calls
``optimizer.step()`` once per step.  Recorded: the parameters and the state
``exp_avg`` (as ``m``), ``exp_avg_sq`` (``v``), ``max_exp_avg_sq`` (``vhat``,
amsgrad only) and ``step``.  ``torch_weight_decay_l2_0.1`` is Adam's coupled L2
decay (``g + wd * p``); ``torch_adamw_wd_0.1`` is decoupled (``p *= 1 - lr * wd``).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402

STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vhat"}


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def run_case(case: C.Case) -> None:
    params0, grads = C.make_inputs(case)
    keys = list(params0)
    tensors = [torch.nn.Parameter(torch.tensor(params0[k], dtype=torch.float32)) for k in keys]
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[case.optimizer]
    kwargs = dict(case.kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    opt = cls(tensors, foreach=False, **kwargs)

    rec: dict[str, list] = {f"params/{k}": [p.detach().numpy().copy()] for k, p in zip(keys, tensors)}
    steps = []
    for t in range(case.n_steps):
        for k, p in zip(keys, tensors):
            p.grad = torch.tensor(grads[k][t])
        opt.step()
        for k, p in zip(keys, tensors):
            rec[f"params/{k}"].append(p.detach().numpy().copy())
            for state_key, prefix in STATE_NAMES.items():
                if state_key in opt.state[p]:
                    rec.setdefault(f"{prefix}/{k}", []).append(opt.state[p][state_key].numpy().copy())
        steps.append(float(opt.state[tensors[0]]["step"]))

    arrays = {name: np.stack(vals).astype(np.float32) for name, vals in rec.items()}
    arrays.update({f"grads/{k}": grads[k] for k in keys})
    arrays["step"] = np.asarray(steps, np.float64)
    meta = {
        "case": case.to_json(),
        "name": case.name,
        "library": "torch",
        "library_version": torch.__version__,
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "execution": "CPU, foreach=False, p.grad set then optimizer.step(), one call per step",
        "optimizer": f"torch.optim.{case.optimizer}",
        "dtype": case.dtype,
        "stored_dtype": "float32",
        "n_steps": case.n_steps,
        "param_keys": keys,
        "kwargs": dict(case.kwargs, foreach=False),
        "config": {k: _jsonable(v) for k, v in opt.defaults.items()},  # torch's optimizer.defaults
    }
    C.save(case.name, arrays, meta)


def sanity_checks() -> None:
    t, _ = C.load("torch_defaults")
    k, _ = C.load("keras_defaults")
    d = np.abs(t["params/dense/kernel"] - k["params/dense/kernel"][: t["params/dense/kernel"].shape[0]]).max()
    assert 0 < d < 1e-4, d  # same inputs, eps 1e-8 vs 1e-7 and different rounding
    a, _ = C.load("torch_amsgrad")
    for key in C.DENSE_SHAPES:
        assert np.all(a[f"vhat/{key}"] >= a[f"v/{key}"])
    print(f"sanity checks passed (torch_defaults vs keras_defaults max |dparams| = {d:.2g})")


def main() -> None:
    for case in C.TORCH_CASES:
        run_case(case)
        print(f"wrote {case.name}")
    sanity_checks()


if __name__ == "__main__":
    main()
