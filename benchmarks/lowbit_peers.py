"""Low-bit Adam against its peers: state bytes/param, step time and MNIST convergence of adamx's
moment formats beside torchao's ``AdamW8bit``/``AdamWFp8``/``AdamW4bit`` and bitsandbytes' ``Adam8bit``.

One file, two halves:

* the JAX side (the default, run by the project's venv) writes the shared inputs to an ``.npz``
  (the MNIST MLP's data split, its initial weights per seed, the minibatch indices, and the
  float32-pretrained weights of the fine-tune case, all from ``benchmarks/quantized_convergence.py``),
  runs this same file under the torch venv with ``--torch IN.npz OUT.json``, measures adamx,
  and writes ``benchmarks/results/quantized_peers.md`` and ``quantized_peers.json``;
* the torch side (``--torch``) imports only numpy, torch, torchao and bitsandbytes.

Measured, per optimizer:

* memory: the bytes of the optimizer's own state objects after one step on one (4096, 4096)
  float32 leaf (16M params), over the params: adamx's ``mu``/``nu`` arrays' ``nbytes`` (codes and
  scales), torch's state tensors' ``nbytes`` (torchao's ``OptimState*`` subclasses flattened into
  their codes, scales and code maps; bitsandbytes' states, absmax and maps), the step counter left out;
* speed: one step on that leaf on the CPU, median of interleaved repeats after warm-up, and its
  ratio to the same library's own float32 Adam measured beside it in the same process (adamx:
  ``adamx.adam()`` through the fused kernel; torchao: ``torch.optim.Adam``; bitsandbytes:
  ``bnb.optim.Adam32bit``);
* convergence: the MNIST MLP of ``quantized_convergence.py`` (784-128-128-10, lr 1e-3, batch 32,
  250 steps) and its fine-tune at 10x the learning rate (a fresh optimizer at lr 1e-2 for 200
  steps from the float32-pretrained weights), the same initial weights (copied from numpy) and
  minibatch order in both libraries; final train loss on the 4000 training images. Every
  optimizer runs at its defaults for which tensors it quantizes (4096 elements and up, block
  divisible), so the (128, 10) output layer keeps float32 moments in all of them, and with
  ``eps=1e-7`` (torch's ``eps`` is the paper's, adamx's is Keras's epsilon hat), no weight decay.

    PYTHONPATH=. nice python benchmarks/lowbit_peers.py [--torch-python /tmp/torchvenv/bin/python]
        [--seeds 3] [--reps 7] [--quick]

The torch venv: ``python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0
torchao==0.18.0 bitsandbytes==0.50.2 numpy``. A peer that fails here is listed with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LEAF = (4096, 4096)  # 16M float32 params
LR, FT_LR, EPS, BATCH = 1e-3, 1e-2, 1e-7, 32
BLOWN_UP = 10.0  # a final loss above 10x adamx float32's (or not finite) is reported as diverged


# ------------------------------------------------------------------------------------------ torch side
def torch_peers() -> dict[str, tuple[str, str, Callable[..., Any]]]:
    """``{name: (library, its own float32 baseline, factory(params, lr))}``."""
    import bitsandbytes as bnb
    import torch
    import torchao.optim as ao

    return {
        "torch Adam (float32)": ("torch", "torch Adam (float32)", lambda p, lr: torch.optim.Adam(p, lr=lr, eps=EPS)),
        "torchao AdamW8bit": ("torchao", "torch Adam (float32)", lambda p, lr: ao.AdamW8bit(p, lr=lr, eps=EPS, weight_decay=0.0)),
        "torchao AdamWFp8": ("torchao", "torch Adam (float32)", lambda p, lr: ao.AdamWFp8(p, lr=lr, eps=EPS, weight_decay=0.0)),
        "torchao AdamW4bit": ("torchao", "torch Adam (float32)", lambda p, lr: ao.AdamW4bit(p, lr=lr, eps=EPS, weight_decay=0.0)),
        "bitsandbytes Adam32bit": ("bitsandbytes", "bitsandbytes Adam32bit", lambda p, lr: bnb.optim.Adam32bit(p, lr=lr, eps=EPS)),
        "bitsandbytes Adam8bit": ("bitsandbytes", "bitsandbytes Adam32bit", lambda p, lr: bnb.optim.Adam8bit(p, lr=lr, eps=EPS)),
    }  # fmt: skip


def torch_state_nbytes(opt: Any) -> int:
    """Bytes of every tensor in ``opt.state`` but the step counter; tensor subclasses (torchao's
    ``OptimState*``) count their inner tensors (codes, scales, code maps)."""
    import torch

    def nbytes(t: Any) -> int:
        if hasattr(type(t), "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(nbytes(v) for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step")


def torch_main(inp: str, out: str, reps: int) -> None:
    import torch

    data = np.load(inp)
    xtr, ytr = torch.from_numpy(data["xtr"]), torch.from_numpy(data["ytr"]).long()
    seeds = int(data["seeds"])
    res: dict[str, Any] = {"peers": {}, "versions": {}, "threads": torch.get_num_threads()}
    for mod in ("torch", "torchao", "bitsandbytes", "numpy"):
        res["versions"][mod] = __import__(mod).__version__
    peers = torch_peers()

    def mlp_loss(ws: list[torch.Tensor], idx: Any) -> torch.Tensor:
        x = xtr[idx] if idx is not None else xtr
        for i in range(0, len(ws) - 2, 2):
            x = torch.relu(x @ ws[i] + ws[i + 1])
        logits = x @ ws[-2] + ws[-1]
        return torch.nn.functional.cross_entropy(logits, ytr[idx] if idx is not None else ytr)

    def train(make: Callable[..., Any], lr: float, prefix: str, seed: int) -> float:
        names = sorted(k for k in data.files if k.startswith(f"{prefix}{seed}_"))
        ws = [torch.nn.Parameter(torch.from_numpy(data[k].copy())) for k in names]
        opt = make(ws, lr)
        for i in data[f"{prefix}idx{seed}"]:
            opt.zero_grad()
            mlp_loss(ws, torch.from_numpy(i).long()).backward()
            opt.step()
        with torch.no_grad():
            return float(mlp_loss(ws, None))

    # memory and speed on one 16M leaf, all optimizers side by side
    g = torch.randn(LEAF, generator=torch.Generator().manual_seed(0)) * 1e-3
    live: dict[str, tuple[Any, Any]] = {}
    for name, (_, _, make) in peers.items():
        entry: dict[str, Any] = {"library": peers[name][0], "baseline": peers[name][1]}
        res["peers"][name] = entry
        try:
            p = torch.nn.Parameter(torch.randn(LEAF, generator=torch.Generator().manual_seed(1)))
            opt = make([p], LR)
            p.grad = g.clone()
            for _ in range(2):  # the first step compiles torchao's kernels
                opt.step()
            entry["state_bytes_per_param"] = torch_state_nbytes(opt) / p.numel()
            live[name] = (p, opt)
            entry["step_ms"] = []
        except Exception as e:  # a peer that does not run here is reported, not hidden
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"{name}: {entry['error']}", flush=True)
    for _ in range(reps):
        for name, (_, opt) in live.items():
            t = time.perf_counter()
            opt.step()
            res["peers"][name]["step_ms"].append(1e3 * (time.perf_counter() - t))
    del live
    for name, entry in res["peers"].items():
        if "step_ms" in entry:
            entry["step_ms_median"] = statistics.median(entry["step_ms"])
            print(f"{name}: {entry['state_bytes_per_param']:.3f} B/param, {entry['step_ms_median']:.1f} ms", flush=True)
        if "error" in entry:
            continue
        for case, prefix, lr in (("mnist", "init", LR), ("finetune", "pre", FT_LR)):
            try:
                entry[case] = [train(peers[name][2], lr, prefix, s) for s in range(seeds)]
            except Exception as e:
                entry[f"{case}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"{name} {case}: {entry.get(case, entry.get(case + '_error'))}", flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


# -------------------------------------------------------------------------------------------- JAX side
ADAMX: dict[
    str, dict[str, Any]
] = {  # name -> adamx.adam keyword arguments (quantize_min_size left at its default 4096)
    "adamx float32": {},
    "adamx bfloat16 moments": {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16"},
    "adamx dynamic8": {"quantize_moments": True},
    "adamx fp8": {"quantize_moments": True, "moment_format": "fp8"},
    "adamx 4bit": {"quantize_moments": True, "moment_format": "4bit"},
}
MATCHES = {  # the peer each adamx format stores like
    "adamx dynamic8": "torchao AdamW8bit (same codes at step 1), bitsandbytes Adam8bit",
    "adamx fp8": "torchao AdamWFp8",
    "adamx 4bit": "torchao AdamW4bit",
    "adamx bfloat16 moments": "-",
    "adamx float32": "torch Adam, bitsandbytes Adam32bit",
}


def make_adamx(kw: dict[str, Any], lr: float) -> Any:
    import jax.numpy as jnp

    import adamx

    kw = {k: (jnp.bfloat16 if v == "bfloat16" else v) for k, v in kw.items()}
    return adamx.adam(lr, epsilon=EPS, **kw)


def export_inputs(path: str, seeds: int, steps: int, ft_steps: int) -> Any:
    """The MNIST MLP's data, initial and float32-pretrained weights and minibatch indices, as numpy."""
    import jax

    sys.path.insert(0, HERE)
    import quantized_convergence as qc

    data = qc.mnist_data()
    cfg = qc.MLPS["mnist"]
    arrays: dict[str, Any] = {"xtr": data[0][0], "ytr": data[0][1], "seeds": np.int64(seeds)}

    def put(prefix: str, seed: int, params: Any) -> None:
        for i, layer in enumerate(params):  # names sort as w/b per layer: l0_0w, l0_1b, ...
            arrays[f"{prefix}{seed}_l{i}_0w"] = np.asarray(layer["w"])
            arrays[f"{prefix}{seed}_l{i}_1b"] = np.asarray(layer["b"])

    n = data[0][0].shape[0]
    for seed in range(seeds):
        put("init", seed, qc.mlp_init(jax.random.key(seed), cfg["sizes"]))
        arrays[f"initidx{seed}"] = np.random.default_rng(seed).integers(0, n, size=(steps, BATCH))
        put("pre", seed, qc.pretrained_mnist(seed, qc.FINETUNE["pretrain_steps"], data))
        arrays[f"preidx{seed}"] = np.random.default_rng(100 + seed).integers(0, n, size=(ft_steps, BATCH))
    np.savez(path, **arrays)
    return qc, data


def adamx_train(qc: Any, data: Any, name: str, lr: float, prefix: str, seed: int, arrays: Any) -> float:
    import jax.numpy as jnp

    (xtr, ytr), _ = (tuple(jnp.asarray(a) for a in d) for d in data)
    names = sorted(k for k in arrays.files if k.startswith(f"{prefix}{seed}_"))
    params = [{"w": jnp.asarray(arrays[w]), "b": jnp.asarray(arrays[b])} for w, b in zip(names[::2], names[1::2])]
    opt = make_adamx(ADAMX[name], lr)
    state = opt.init(params)
    chunk = qc.mlp_chunk(f"peers-{prefix}", name, opt)
    params, state, loss = chunk(params, state, jnp.asarray(arrays[f"{prefix}idx{seed}"]), xtr, ytr)
    return float(loss)


def adamx_speed(reps: int) -> dict[str, dict[str, Any]]:
    import jax

    import adamx
    import adamx.fused

    g = jax.random.normal(jax.random.key(0), LEAF) * 1e-3
    live: dict[str, list[Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, kw in ADAMX.items():
        opt = make_adamx(kw, LR)
        p = jax.random.normal(jax.random.key(1), LEAF)
        state = opt.init(p)
        step = jax.jit(opt.apply_gradients)
        for _ in range(2):
            p, state = step(g, state, p)
        jax.block_until_ready(p)
        out[name] = {
            "library": "adamx",
            "baseline": "adamx float32",
            "state_bytes_per_param": adamx.state_bytes_per_param((state.mu, state.nu), p),
            "step_ms": [],
            "fused": adamx.fused.why_not(opt, g, state, p) is None,
        }
        live[name] = [step, p, state]
    for _ in range(reps):
        for name, slot in live.items():
            step, p, state = slot
            t = time.perf_counter()
            p, state = step(g, state, p)
            jax.block_until_ready(p)
            out[name]["step_ms"].append(1e3 * (time.perf_counter() - t))
            slot[1:] = [p, state]
    for entry in out.values():
        entry["step_ms_median"] = statistics.median(entry["step_ms"])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", nargs=2, metavar=("IN_NPZ", "OUT_JSON"), help="run the torch side (torch venv)")
    ap.add_argument("--torch-python", default="/tmp/torchvenv/bin/python", help="python of the torch venv")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=250, help="MNIST MLP steps")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7, help="timed steps per optimizer (interleaved)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 20 + 20 steps, 2 reps")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.finetune_steps, args.reps = 1, 20, 20, 2
    if args.torch:
        torch_main(args.torch[0], args.torch[1], args.reps)
        return
    t0, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        inp, tout = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "torch.json")
        qc, data = export_inputs(inp, args.seeds, args.steps, args.finetune_steps)
        cmd = [args.torch_python, os.path.abspath(__file__), "--torch", inp, tout, "--reps", str(args.reps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(tout):
            sys.exit(f"the torch side failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
        with open(tout) as f:
            peers = json.load(f)
        arrays = np.load(inp)
        ours = adamx_speed(args.reps)
        for name, entry in ours.items():
            for case, prefix, lr in (("mnist", "init", LR), ("finetune", "pre", FT_LR)):
                entry[case] = [adamx_train(qc, data, name, lr, prefix, s, arrays) for s in range(args.seeds)]
            print(f"{name}: {entry['state_bytes_per_param']:.3f} B/param, {entry['step_ms_median']:.1f} ms, "
                  f"mnist {entry['mnist']}, finetune {entry['finetune']}", flush=True)  # fmt: skip
    write(args, ours, peers, time.perf_counter() - t0, load_before, os.getloadavg())


def write(args: Any, ours: dict[str, Any], peers: dict[str, Any], elapsed: float, load0: Any, load1: Any) -> None:
    import jax

    from benchmarks import record

    rows_in = {**ours, **peers["peers"]}
    ref = np.mean(ours["adamx float32"]["mnist"])
    ref_ft = np.mean(ours["adamx float32"]["finetune"])
    rows = []
    for name, e in rows_in.items():
        row: dict[str, Any] = {"optimizer": name, "library": e["library"], "matches": MATCHES.get(name, "")}
        if "error" in e:
            row["error"] = e["error"]
        else:
            base = rows_in[e["baseline"]]["step_ms_median"]
            row.update(
                state_bytes_per_param=e["state_bytes_per_param"],
                step_ms=e["step_ms_median"],
                step_vs_own_float32=e["step_ms_median"] / base,
                mnist_train_loss=e.get("mnist"),
                finetune_train_loss=e.get("finetune"),
            )
        rows.append(row)

    def loss_cell(v: Any, r0: float) -> str:
        if not v:
            return "-"
        m = float(np.mean(v))
        blown = sum(not np.isfinite(x) or x > BLOWN_UP * r0 for x in v)
        if blown:
            return f"diverged on {blown}/{len(v)} seeds (mean {m:.3g})"
        return f"{m:.4f} ({100 * (m / r0 - 1):+.1f}%)"

    cmd = (
        f"PYTHONPATH=. nice python benchmarks/lowbit_peers.py --seeds {args.seeds} --steps {args.steps} "
        f"--finetune-steps {args.finetune_steps} --reps {args.reps} --torch-python {args.torch_python}"
    )
    v = peers["versions"]
    lines = [
        "# Low-bit Adam state: adamx's formats beside torchao and bitsandbytes",
        "",
        f"Command: `{cmd}` (total {elapsed:.0f} s)." + (" **A `--quick` smoke run.**" if args.quick else ""),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other engineers' jobs (load "
        f"average {load0[0]:.1f} before, {load1[0]:.1f} after; torch ran {peers['threads']} threads). JAX side: "
        f"Python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}. Torch side: torch "
        f"{v['torch']}, torchao {v['torchao']}, bitsandbytes {v['bitsandbytes']} (CPU).",
        "",
        "How it was measured (see the script's docstring): state bytes/param from the optimizers' own state "
        "objects after a step on one (4096, 4096) float32 leaf (codes, block scales and code maps counted, the "
        f"step counter not); step time on that leaf, median of {args.reps} interleaved repeats after two warm-up "
        "steps, and its ratio to the same library's float32 Adam timed beside it (adamx: `adamx.adam()`, "
        "fused; torchao: `torch.optim.Adam`; bitsandbytes: `Adam32bit`); MNIST MLP (784-128-128-10, "
        f"{args.steps} steps at lr {LR}, batch {BATCH}) and its fine-tune ({args.finetune_steps} steps at lr "
        f"{FT_LR} from the float32-pretrained weights, fresh optimizer), same initial weights and minibatches "
        f"in both libraries, final train loss on the 4000 training images, mean of {args.seeds} seeds (vs "
        "adamx float32). eps 1e-7 everywhere, no weight decay (torchao's `AdamW*` at `weight_decay=0` is its "
        "`Adam*`), default quantization thresholds (so the (128, 10) output layer keeps float32 moments).",
        "",
        "| optimizer | stores like | state B/param | step ms (16M leaf) | vs own float32 | MNIST train loss | "
        "fine-tune 10x lr train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | {r['matches']} | does not run here: `{r['error']}` | | | | |")
            continue
        lines.append(
            f"| {r['optimizer']} | {r['matches'] or '-'} | {r['state_bytes_per_param']:.3f} | {r['step_ms']:.1f} | "
            f"{r['step_vs_own_float32']:.2f}x | {loss_cell(r['mnist_train_loss'], ref)} | "
            f"{loss_cell(r['finetune_train_loss'], ref_ft)} |"
        )
    lines += [
        "",
        "Per seed, final train loss (MNIST; fine-tune): "
        + "; ".join(
            f"{r['optimizer']}: "
            + ", ".join(f"{x:.4f}" for x in r["mnist_train_loss"] or [])
            + "; "
            + ", ".join(f"{x:.4f}" for x in r["finetune_train_loss"] or [])
            for r in rows
            if "error" not in r
        ),
        "",
        "Every peer ran on this CPU (torch CPU build, no GPU)."
        if not any("error" in r for r in rows)
        else "Did not run here: " + "; ".join(f"{r['optimizer']}: `{r['error']}`" for r in rows if "error" in r) + ".",
        "",
        "adamx's steps run `opt.apply_gradients` (the fused C++ kernel where `adamx.fused.why_not` says "
        "nothing). Step times on a shared 2-core machine move by tens of percent between runs; the ratios "
        "within one library are the comparable numbers.",
        "",
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quantized_peers.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    record.write(
        os.path.join(args.out, "quantized_peers.json"),
        "lowbit_peers",
        rows,
        {k: v for k, v in vars(args).items() if k not in ("out", "torch")},
        {"torch_versions": v, "torch_threads": peers["threads"], "elapsed_s": elapsed, "load": [load0[0], load1[0]]},
    )


if __name__ == "__main__":
    main()
