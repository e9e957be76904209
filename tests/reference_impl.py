"""A per-op NumPy reference of adamx.adam's documented update (one step).

Written from the `adamx.adam` docstring, not from its code: every scalar and every
array op is float32 (NumPy float32 ops round each result once, no FMA), parameters
are stored in their own dtype (bfloat16/float16 through ml_dtypes), the moments,
accumulator and average in float32. The tests feed it adamx's own state each step, so
a disagreement shows up at the step where it happens instead of being hidden by
chaotic divergence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

f32 = np.float32


def _one_minus(b: float) -> np.float32:
    return f32(1.0 - b)  # Python-double subtraction, rounded once (Keras)


def adam_step(
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    state: dict[str, Any],
    *,
    learning_rate: float = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    weight_decay: float | None = None,
    decay_keys: tuple[str, ...] | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(new_params, new_state)``; ``state`` has count, mu, nu, nu_max, acc, ema (dicts of float32)."""
    n = int(state["count"])
    k = gradient_accumulation_steps or 1
    keys = list(params)
    g = {key: grads[key].astype(f32) for key in keys}
    if loss_scale_factor is not None:
        g = {key: g[key] / f32(loss_scale_factor) for key in keys}
    mu, nu = dict(state["mu"]), dict(state["nu"])
    nu_max = dict(state["nu_max"]) if amsgrad else None
    acc = dict(state["acc"]) if k > 1 else None
    new_p = {key: params[key] for key in keys}

    if (n + 1) % k == 0:
        if k > 1:
            g = {key: (g[key] + acc[key]) / f32(k) for key in keys}
            acc = {key: np.zeros_like(acc[key]) for key in keys}
        if clipnorm is not None:
            c = f32(clipnorm)
            for key in keys:
                norm = np.sqrt(np.sum(g[key] * g[key], dtype=f32))
                g[key] = (g[key] * c) / max(norm, c)
        elif global_clipnorm is not None:
            c = f32(global_clipnorm)
            total = f32(0)
            for key in keys:
                total = f32(total + np.sum(g[key] * g[key], dtype=f32))
            norm = np.sqrt(total)
            scale = c * min(f32(1) / norm, f32(1) / c)
            g = {key: g[key] * scale for key in keys}
        elif clipvalue is not None:
            g = {key: np.clip(g[key], -f32(clipvalue), f32(clipvalue)) for key in keys}
        lr = f32(learning_rate)
        t = f32(n // k + 1)
        b1, b2 = f32(beta_1), f32(beta_2)
        b1p, b2p = f32(b1**t), f32(b2**t)
        alpha = (lr * np.sqrt(f32(1) - b2p)) / (f32(1) - b1p)
        c1, c2 = _one_minus(beta_1), _one_minus(beta_2)
        for key in keys:
            m = mu[key] + (g[key] - mu[key]) * c1
            v = nu[key] + (g[key] * g[key] - nu[key]) * c2
            mu[key], nu[key] = m, v
            v_used = v
            if amsgrad:
                v_used = np.maximum(nu_max[key], v)
                nu_max[key] = v_used
            step = (m * alpha) / (np.sqrt(v_used) + f32(epsilon))
            u = -step
            p32 = params[key].astype(f32)
            if weight_decay and (decay_keys is None or key in decay_keys):
                u = u - (p32 * f32(weight_decay)) * lr
            u = u.astype(params[key].dtype)  # updates come in the param dtype
            new_p[key] = (p32 + u.astype(f32)).astype(params[key].dtype)
    else:
        acc = {key: acc[key] + g[key] for key in keys}

    ema = None
    if use_ema:
        it = n // k
        mom = f32(ema_momentum) if it != 0 else f32(0)
        one_m = f32(1) - mom
        ema = {key: mom * state["ema"][key] + one_m * new_p[key].astype(f32) for key in keys}
        if ema_overwrite_frequency is not None and (it + 1) % ema_overwrite_frequency == 0:
            for key in keys:
                p = params[key]
                to_avg = (ema[key] - p.astype(f32)).astype(p.dtype)
                new_p[key] = (p.astype(f32) + to_avg.astype(f32)).astype(p.dtype)
    new_state = dict(count=n + 1, mu=mu, nu=nu, nu_max=nu_max, acc=acc, ema=ema)
    return new_p, new_state
