"""Timing harness for benchmarks/run.py: interleaved, paired, in one process.

Every competitor owns its buffers and steps them in place (JAX steps are jitted with
params and optimizer state donated). ``interleave`` runs one step of every competitor
per round, alternating the order every round, so slow drifts of the machine (other
users, frequency changes) hit all competitors alike; ratios are taken per round
(paired) and summarised by their median and range.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            model = m.group(1).strip()
        m = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
        if m:
            cores = int(m.group(1))
        caches = ", ".join(
            f"{k} {v}" for k, v in re.findall(r"^(L\d\w? cache):\s*(.+)$", out, re.M) if "instances" in v or "MiB" in v
        )
    except (OSError, subprocess.SubprocessError):
        caches = ""
    try:
        import psutil

        mem_gb = psutil.virtual_memory().total / 2**30
    except ImportError:  # pragma: no cover
        mem_gb = float("nan")
    versions = {"python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__}
    for mod in ("jaxlib", "numpy", "keras", "torch", "adamx"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = "not installed"
    return {
        "cpu": model,
        "cores": cores,
        "caches": caches,
        "memory_gb": round(mem_gb, 1),
        "platform": platform.platform(),
        "versions": versions,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def available_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover
        return 8.0


# ------------------------------------------------------------------ competitors


@dataclasses.dataclass
class Runner:
    """One competitor: ``step()`` does one optimizer step on its own buffers and waits."""

    name: str
    step: Callable[[], None]
    traffic: float | None = None  # minimum bytes per parameter this step must move
    group: str = ""
    close: Callable[[], None] = lambda: None


def jax_runner(
    name: str,
    step_fn: Callable[..., Any],
    params: Any,
    state: Any,
    grads: Any,
    *,
    traffic: float | None = None,
    donate: bool = True,
    group: str = "",
    inner: int = 1,
) -> Runner:
    """``step_fn(params, state, grads) -> (params, state)``, jitted, params and state donated.

    ``inner > 1`` runs that many steps per call (``lax.fori_loop``), so the per-call
    dispatch cost of many small arrays is amortized and the timing shows the compute.
    """
    if inner > 1:
        one = step_fn

        def step_fn(p, s, g):
            return jax.lax.fori_loop(0, inner, lambda i, c: one(c[0], c[1], g), (p, s))

    f = jax.jit(step_fn, donate_argnums=(0, 1) if donate else ())
    box = [params, state]

    def step() -> None:
        box[0], box[1] = f(box[0], box[1], grads)
        jax.block_until_ready(box)

    def close() -> None:
        box.clear()

    return Runner(name, step, traffic, group, close)


def optax_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def fused_step(tx: Any) -> Callable[..., Any]:
    def step(params, state, grads):
        return tx.apply_gradients(grads, state, params)

    return step


def stream_runner(n: int, name: str = "roofline (XLA stream)", inner: int = 1) -> Runner:
    """Memory roofline: a jitted, donated, in-place ``x = x * a + b`` over n float32.

    XLA runs it on all cores; it reads and writes every byte once (8 bytes per element,
    no write-allocate traffic since the store hits the line just read), the pattern of
    an in-place optimizer step. Its bandwidth ``8 n / t`` converts a competitor's
    minimum traffic into a roofline time.
    """

    def one(x):
        return x * jnp.float32(1.0000001) + jnp.float32(1e-9)

    def body(x):
        return jax.lax.fori_loop(0, inner, lambda i, y: one(y), x) if inner > 1 else one(x)

    f = jax.jit(body, donate_argnums=0)
    box = [jnp.ones((n,), jnp.float32)]

    def step() -> None:
        box[0] = f(box[0])
        box[0].block_until_ready()

    return Runner(name, step, None, "roofline", box.clear)


def torch_runner(
    name: str,
    shapes: list[tuple[int, ...]],
    *,
    fused: bool,
    weight_decay: float = 0.0,
    traffic: float = 28.0,
    inner: int = 1,
) -> Runner | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    kw = {"fused": True} if fused else {"foreach": True}
    cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    opt = cls(params, lr=1e-3, weight_decay=weight_decay, **kw)

    def step() -> None:
        for _ in range(inner):
            opt.step()

    def close() -> None:
        params.clear()
        opt.state.clear()

    return Runner(name, step, traffic, "torch", close)


def keras_runner(name: str, shapes: list[tuple[int, ...]], traffic: float = 28.0) -> Runner | None:
    """Keras 3 Adam on the JAX backend, ``stateless_apply`` jitted with donation."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        return None
    os.environ["KERAS_BACKEND"] = "jax"
    try:
        import keras
    except ImportError:
        return None
    opt = keras.optimizers.Adam(learning_rate=1e-3)
    variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
    opt.build(variables)
    tv = [v.value for v in variables]
    ov = [v.value for v in opt.variables]
    grads = [jnp.full(s, 0.01, jnp.float32) for s in shapes]
    del variables

    def kstep(tv, ov, grads):
        new_tv, new_ov = opt.stateless_apply(ov, grads, tv)
        return new_tv, new_ov

    return jax_runner(name, kstep, tv, ov, grads, traffic=traffic, group="keras")


# ------------------------------------------------------------------ timing


def interleave(runners: list[Runner], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of every runner, one step each per round, order alternating."""
    for r in runners:
        for _ in range(warmup):
            r.step()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(rounds):
        for r in runners if i % 2 == 0 else runners[::-1]:
            t0 = time.perf_counter()
            r.step()
            times[r.name].append(time.perf_counter() - t0)
    return times


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Per-round ratios a/b."""
    return summary([x / y for x, y in zip(a, b)])


def close_all(runners: list[Runner]) -> None:
    for r in runners:
        r.close()
    runners.clear()
    gc.collect()


# ------------------------------------------------------------------ trees


def gpt2_shapes(width: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> dict[str, Any]:
    """GPT-2 small's parameter shapes (148 leaves, 124M params at width 768)."""
    d = width
    tree: dict[str, Any] = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f": {"scale": (d,), "bias": (d,)}}
    for i in range(layers):
        tree[f"h{i:02d}"] = {
            "ln_1": {"scale": (d,), "bias": (d,)},
            "attn": {"c_attn": {"kernel": (d, 3 * d), "bias": (3 * d,)}, "c_proj": {"kernel": (d, d), "bias": (d,)}},
            "ln_2": {"scale": (d,), "bias": (d,)},
            "mlp": {"c_fc": {"kernel": (d, 4 * d), "bias": (4 * d,)}, "c_proj": {"kernel": (4 * d, d), "bias": (d,)}},
        }
    return tree


def is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def shape_leaves(tree: Any) -> list[tuple[int, ...]]:
    return jax.tree_util.tree_leaves(tree, is_leaf=is_shape)


def n_params(tree: Any) -> int:
    return int(sum(np.prod(s) for s in shape_leaves(tree)))


def make_tree(shapes: Any, seed: int, scale: float = 1.0, dtype: Any = jnp.float32) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=is_shape)
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(
        treedef, [(jax.random.normal(k, s, jnp.float32) * scale).astype(dtype) for k, s in zip(keys, leaves)]
    )


# ------------------------------------------------------------------ compile time and memory


def memory_per_param(step_fn: Callable[..., Any], params: Any, state: Any, grads: Any, n: int) -> dict[str, float]:
    """From the compiled step's memory_analysis(): bytes per parameter.

    ``peak_above_pg``: everything live at once beyond params and grads, i.e. optimizer
    state + temporaries + outputs that cannot reuse a donated buffer.
    """
    c = jax.jit(step_fn, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    ma = c.memory_analysis()
    pg = sum(x.nbytes for x in jax.tree_util.tree_leaves((params, grads)))
    args, outs, alias, temp = (
        ma.argument_size_in_bytes,
        ma.output_size_in_bytes,
        ma.alias_size_in_bytes,
        ma.temp_size_in_bytes,
    )
    peak = args + outs - alias + temp
    return {
        "state_B": (args - pg) / n,
        "temp_B": temp / n,
        "unaliased_out_B": (outs - alias) / n,
        "peak_above_pg_B": (peak - pg) / n,
    }
