"""Lazy Adam benchmark: step time on a 1M x 64 embedding table, and a small recommender.

    PYTHONPATH=. python benchmarks/lazy.py            # writes benchmarks/results/lazy.md and lazy.json

Part 1 (step time). A float32 table of 1,000,000 x 64 rows; each step's gradient touches
1024 rows (indices drawn uniformly, seed 0, so a few are duplicates). Competitors, all in
this process, each on its own buffers, stepped one after the other in alternating order
(``harness.interleave``); the JAX steps are jitted with params and state donated:

* ``adamx.lazy_adam`` ``apply_gradients``, one call per step, and 100 steps per call
  (``lax.fori_loop``: the compute without the per-call dispatch);
* ``adamx.adam`` ``apply_gradients`` given the same BCOO gradient (Keras semantics: the
  gradient is densified and every row's moments and weights are updated);
* ``torch.optim.SparseAdam`` on the same table shape (``p.grad`` a sparse COO tensor of
  the same 1024 rows, uncoalesced; 20 steps per call).

Part 2 (small recommender). Synthetic matrix factorisation, ``make_ratings``: 20,000 users,
5,000 items, true rank 8 (``U*, V* ~ N(0, 1/sqrt(8))`` per entry), item popularity
Zipf-like (``p(item i) ~ 1/(i+10)``, so many items are rarely seen), user uniform;
rating ``<u*, v*> + N(0, 0.1^2)``; 400,000 training and 50,000 test pairs; all from
``np.random.default_rng(0)``. Model: user and item tables of width 16 (init N(0, 0.1)),
plus a dense global bias; loss: mean squared error over a batch of 1024 pairs
+ 1e-4 * mean squared norm of the gathered rows. Row gradients come from differentiating
with respect to the gathered rows (``adamx.row_gradient``). The same init, batches and
learning rate (0.003) for ``lazy_adam`` and dense ``adamx.adam``; 3000 steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

import adamx  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_ROWS, WIDTH, TOUCHED = 1_000_000, 64, 1024


def _step(opt):
    return lambda p, s, g: opt.apply_gradients(g, s, p)


def torch_sparse_runner(idx: np.ndarray, vals: np.ndarray, inner: int):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N_ROWS, WIDTH) * 0.1)
    grad = torch.sparse_coo_tensor(
        torch.tensor(idx[None].astype(np.int64)), torch.tensor(vals), (N_ROWS, WIDTH), check_invariants=False
    )
    opt = torch.optim.SparseAdam([p], lr=1e-3)

    def step() -> None:
        for _ in range(inner):
            p.grad = grad
            opt.step()

    def close() -> None:
        opt.state.clear()

    return H.Runner(f"torch.optim.SparseAdam ({inner} steps/call)", step, None, "torch", close)


def step_time(rounds: int) -> dict:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, N_ROWS, TOUCHED).astype(np.int32)
    vals = (rng.standard_normal((TOUCHED, WIDTH)) * 0.01).astype(np.float32)
    g = {"emb": adamx.row_gradient(jnp.asarray(idx), jnp.asarray(vals), N_ROWS)}

    def fresh():
        p = {"emb": jax.random.normal(jax.random.key(0), (N_ROWS, WIDTH)) * 0.1}
        return p

    lazy = adamx.lazy_adam(1e-3)
    dense = adamx.adam(1e-3)
    specs = [
        ("adamx.lazy_adam (1 step/call)", lazy, 1),
        ("adamx.lazy_adam (100 steps/call)", lazy, 100),
        ("adamx.adam, dense (1 step/call)", dense, 1),
    ]
    runners, inner_of = [], {}
    for name, opt, inner in specs:
        p = fresh()
        runners.append(H.jax_runner(name, _step(opt), p, opt.init(p), g, inner=inner))
        inner_of[name] = inner
    # the same 1024-row gradient on a table 100x smaller: an O(touched rows) step takes the same time
    small = 10_000
    p_small = {"emb": jax.random.normal(jax.random.key(0), (small, WIDTH)) * 0.1}
    g_small = {"emb": adamx.row_gradient(jnp.asarray(idx % small), jnp.asarray(vals), small)}
    name_small = f"adamx.lazy_adam, {small:,}-row table (100 steps/call)"
    runners.append(H.jax_runner(name_small, _step(lazy), p_small, lazy.init(p_small), g_small, inner=100))
    inner_of[name_small] = 100
    tr = torch_sparse_runner(idx, vals, 20)
    if tr is not None:
        runners.append(tr)
        inner_of[tr.name] = 20
    times = H.interleave(runners, rounds=rounds, warmup=2)
    # then each sparse competitor alone for a few calls (no XLA thread pool busy right before torch)
    alone = {}
    for r in runners:
        if "dense" in r.name:
            continue
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            r.step()
            ts.append((time.perf_counter() - t0) / inner_of[r.name])
        alone[r.name] = H.summary(ts)
    H.close_all(runners)
    per_step = {k: [x / inner_of[k] for x in v] for k, v in times.items()}
    dense_name = specs[2][0]
    out = {"per_step_s": {k: H.summary(v) for k, v in per_step.items()}, "dense_over": {}, "alone_s": alone}
    for k, v in per_step.items():
        out["dense_over"][k] = H.paired(per_step[dense_name], v)
    out["unique_rows"] = int(np.unique(idx).size)
    out["unique_rows_small"] = int(np.unique(idx % small).size)
    return out


# ---------------------------------------------------------------- recommender


def make_ratings(
    seed: int = 0, users: int = 20_000, items: int = 5_000, rank: int = 8, n_train: int = 400_000, n_test: int = 50_000
):
    """Synthetic ratings: ``(train, test, (users, items))``, each split ``(u, i, r)`` arrays."""
    rng = np.random.default_rng(seed)
    u_true = rng.standard_normal((users, rank)) / np.sqrt(rank)
    v_true = rng.standard_normal((items, rank)) / np.sqrt(rank)
    pop = 1.0 / (np.arange(items) + 10.0)
    pop /= pop.sum()
    n = n_train + n_test
    uu = rng.integers(0, users, n)
    ii = rng.choice(items, n, p=pop)
    r = np.sum(u_true[uu] * v_true[ii], axis=1) + 0.1 * rng.standard_normal(n)
    cast = lambda a, b, c: (a.astype(np.int32), b.astype(np.int32), c.astype(np.float32))  # noqa: E731
    return cast(uu[:n_train], ii[:n_train], r[:n_train]), cast(uu[n_train:], ii[n_train:], r[n_train:]), (users, items)


def recommender(steps: int = 3000, batch: int = 1024, width: int = 16, lr: float = 0.003) -> dict:
    train, test, (n_users, n_items) = make_ratings()
    k1, k2 = jax.random.split(jax.random.key(1))
    init = {
        "user": jax.random.normal(k1, (n_users, width)) * 0.1,
        "item": jax.random.normal(k2, (n_items, width)) * 0.1,
        "bias": jnp.zeros(()),
    }

    def batch_loss(u_rows, i_rows, bias, r):
        pred = jnp.sum(u_rows * i_rows, axis=-1) + bias
        reg = 1e-4 * (jnp.mean(jnp.sum(u_rows**2, -1)) + jnp.mean(jnp.sum(i_rows**2, -1)))
        return jnp.mean((pred - r) ** 2) + reg

    def mse(params, split):
        u, i, r = (jnp.asarray(x) for x in split)
        pred = jnp.sum(params["user"][u] * params["item"][i], -1) + params["bias"]
        return float(jnp.mean((pred - r) ** 2))

    def make_step(opt):
        def step(params, state, u, i, r):
            u_rows, i_rows = params["user"][u], params["item"][i]
            loss, (gu, gi, gb) = jax.value_and_grad(batch_loss, argnums=(0, 1, 2))(u_rows, i_rows, params["bias"], r)
            grads = {
                "user": adamx.row_gradient(u, gu, n_users),
                "item": adamx.row_gradient(i, gi, n_items),
                "bias": gb,
            }
            params, state = opt.apply_gradients(grads, state, params)
            return params, state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    order = np.random.default_rng(2).integers(0, train[0].shape[0], (steps, batch))
    out = {}
    for name, opt in [("adamx.lazy_adam", adamx.lazy_adam(lr)), ("adamx.adam (dense)", adamx.adam(lr))]:
        params = jax.tree.map(jnp.copy, init)
        state = opt.init(params)
        f = make_step(opt)
        params, state, _ = f(params, state, *(jnp.asarray(a[order[0]]) for a in train))  # compile
        jax.block_until_ready(params)
        params, state = jax.tree.map(jnp.copy, init), opt.init(init)
        t0 = time.perf_counter()
        curve = []
        for s in range(steps):
            params, state, loss = f(params, state, *(jnp.asarray(a[order[s]]) for a in train))
            if s % 100 == 99:
                curve.append(float(loss))
        jax.block_until_ready(params)
        secs = time.perf_counter() - t0
        out[name] = {
            "train_mse": mse(params, train),
            "test_mse": mse(params, test),
            "seconds": secs,
            "loss_every_100": curve,
            "items_never_seen": int(n_items - np.unique(train[1][order.reshape(-1)]).size),
        }
    out["setup"] = {
        "steps": steps,
        "batch": batch,
        "width": width,
        "lr": lr,
        "users": n_users,
        "items": n_items,
        "noise_floor_mse": 0.01,
    }
    return out


def write(res: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "lazy.json"), "w") as f:
        json.dump(res, f, indent=1)
    m, st, rec = res["machine"], res["step_time"], res["recommender"]
    lines = [
        "# Lazy Adam: embedding-table step time and a small recommender",
        "",
        f"- command: `{res['command']}` ({res['total_seconds']:.0f} s in all)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['platform']}; shared with other jobs: "
        f"1-minute load average {res['load_average_start']:.1f} at the start, {res['load_average_end']:.1f} at the end, "
        "so single timings spread widely (ranges below)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        f"## Step time: {N_ROWS:,} x {WIDTH} float32 table, {TOUCHED} touched rows per step "
        f"({st['unique_rows']} unique)",
        "",
        f"JAX steps jitted with params and state donated; {res['rounds']} interleaved rounds; "
        "per-step time = call time / steps per call. Speed-up = dense adamx.adam step time / this one, "
        "per round (median, range).",
        "",
        "| optimizer | median ms/step | min | max | dense adam / this (median) | range |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in st["per_step_s"].items():
        r = st["dense_over"][k]
        lines.append(
            f"| {k} | {v['median'] * 1e3:.4f} | {v['min'] * 1e3:.4f} | {v['max'] * 1e3:.4f} | "
            f"{r['median']:.1f}x | {r['min']:.1f}-{r['max']:.1f}x |"
        )
    lines += [
        "",
        f"Then each sparse competitor alone, {res['rounds']} calls in a row (torch is slowed when it runs right "
        "after an XLA step in the interleaved rounds):",
        "",
        "| optimizer | median ms/step | min | max |",
        "|---|---|---|---|",
    ]
    for k, v in st["alone_s"].items():
        lines.append(f"| {k} | {v['median'] * 1e3:.4f} | {v['min'] * 1e3:.4f} | {v['max'] * 1e3:.4f} |")
    alone = st["alone_s"]
    big = alone["adamx.lazy_adam (100 steps/call)"]["median"]
    small = next(v["median"] for k, v in alone.items() if "10,000-row" in k)
    lazy_alone = alone["adamx.lazy_adam (1 step/call)"]["median"]
    torch_alone = next((v["median"] for k, v in alone.items() if k.startswith("torch")), None)
    s = rec["setup"]
    lines += [
        "",
        "The lazy step is the XLA scatter path: the compiled step has no copy of, and no arithmetic over, the "
        "whole table (checked in tests/test_lazy.py on the compiled HLO). The 10,000-row row uses the same "
        f"gradient rows modulo 10,000 ({st['unique_rows_small']} unique): with 100x fewer rows the step is "
        f"{big / small:.1f}x faster (alone, medians), not 100x: the cost follows the touched rows; what remains "
        "is cache misses on rows scattered over a 256 MB table. A lazy step is a sort of the 1024 indices (to sum duplicates), a gather and a "
        "scatter of the touched rows of table, m and v, and the arithmetic on those rows."
        + (
            f" Alone, torch.optim.SparseAdam takes {torch_alone / lazy_alone:.1f}x the time of a lazy_adam step "
            "(1 step/call) on the same table."
            if torch_alone is not None
            else ""
        ),
        "",
        f"## Recommender: synthetic matrix factorisation ({s['users']:,} users x {s['items']:,} items, "
        f"width {s['width']}, batch {s['batch']}, {s['steps']} steps, lr {s['lr']})",
        "",
        "Generator and model: see the docstring of benchmarks/lazy.py (`make_ratings`). Same init and batches for "
        f"both. Noise floor (rating noise variance): {s['noise_floor_mse']}.",
        "",
        "| optimizer | final train MSE | test MSE | training seconds | items never in a batch |",
        "|---|---|---|---|---|",
    ]
    for k in ("adamx.lazy_adam", "adamx.adam (dense)"):
        v = rec[k]
        lines.append(
            f"| {k} | {v['train_mse']:.4f} | {v['test_mse']:.4f} | {v['seconds']:.1f} | {v['items_never_seen']} |"
        )
    lz, dn = rec["adamx.lazy_adam"], rec["adamx.adam (dense)"]
    lines += [
        "",
        f"Lazy Adam ends at a {'higher' if lz['train_mse'] > dn['train_mse'] else 'lower'} train MSE and a "
        f"{'higher' if lz['test_mse'] > dn['test_mse'] else 'lower'} test MSE than dense Adam at the same lr and step "
        "count here: dense Adam keeps moving every row with its decaying momentum on every step, rare items included, "
        "which on this problem acts like extra steps for the rarely seen rows. Lazy Adam does only what the "
        "gradients say; tune the lr (or train longer) when switching.",
    ]
    lines += [
        "",
        "Batch loss every 500 steps (lazy / dense): "
        + ", ".join(
            f"{a:.3f}/{b:.3f}"
            for a, b in zip(
                rec["adamx.lazy_adam"]["loss_every_100"][4::5], rec["adamx.adam (dense)"]["loss_every_100"][4::5]
            )
        ),
        "",
    ]
    with open(os.path.join(RESULTS, "lazy.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    t0 = time.perf_counter()
    rounds = int(os.environ.get("LAZY_BENCH_ROUNDS", "9"))
    res = {
        "machine": H.machine_info(),
        "command": "PYTHONPATH=. python benchmarks/lazy.py",
        "rounds": rounds,
        "load_average_start": os.getloadavg()[0],
    }
    res["step_time"] = step_time(rounds)
    print(json.dumps(res["step_time"], indent=1))
    res["recommender"] = recommender(steps=int(os.environ.get("LAZY_BENCH_STEPS", "3000")))
    print(
        json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "loss_every_100"} for k, v in res["recommender"].items()},
            indent=1,
        )
    )
    res["total_seconds"] = time.perf_counter() - t0
    res["load_average_end"] = os.getloadavg()[0]
    write(res)


if __name__ == "__main__":
    main()
