"""Fingerprints of the compiled train steps: does a code change alter what XLA runs?

Prints, for a set of optimizer configurations, a hash of the optimized HLO of one jitted
step (reference path ``update`` + ``optax.apply_updates``, and ``apply_gradients``), with
metadata (source lines, op names) and instruction numbering stripped (the instructions are
compared as a sorted list, so an order that only follows tracing order does not count). Two adamx versions that print the same
fingerprints compile to the same programs, so their step time and compile time are the
same by construction; run it on both sides of a refactor:

    python benchmarks/hlo_fingerprint.py > after.txt
    git stash; python benchmarks/hlo_fingerprint.py > before.txt; git stash pop   # or a worktree
    diff before.txt after.txt

Uses only the public API that both versions share (``adamx.adam``, ``apply_gradients``).
"""

from __future__ import annotations

import hashlib
import re

import jax
import jax.numpy as jnp
import optax

import adamx

CONFIGS = {
    "plain": {},
    "amsgrad": dict(amsgrad=True),
    "clipnorm+wd": dict(clipnorm=1.0, weight_decay=0.01),
    "global_clipnorm": dict(global_clipnorm=1.0),
    "clipvalue+lsf": dict(clipvalue=0.5, loss_scale_factor=8.0),
    "ema_overwrite": dict(use_ema=True, ema_overwrite_frequency=3),
    "accumulation": dict(gradient_accumulation_steps=3),
    "every option": dict(
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=5,
        loss_scale_factor=4.0,
        gradient_accumulation_steps=2,
    ),
    "bf16 moments": dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
}


def params_tree() -> dict:
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "a": jax.random.normal(k[0], (64, 32)),
        "b": jnp.zeros((32,)),
        "c": jax.random.normal(k[1], (32, 16)).astype(jnp.bfloat16),
        "d": jax.random.normal(k[2], (17,)),
    }


def fingerprint(fn, *args) -> str:
    text = jax.jit(fn).lower(*args).compile().as_text()
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    # the source-location tables (file and function names, stack frames) are metadata too
    text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n.*?\n\n", "", text, flags=re.M | re.S)
    text = re.sub(r"^HloModule \S+", "HloModule m", text, flags=re.M)
    # instruction numbering and the order of independent instructions follow tracing order:
    # compare the multiset of instructions with their numbers stripped
    text = re.sub(r"([%\w-]+)\.\d+\b", r"\1", text)
    text = "\n".join(sorted(text.splitlines()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main() -> None:
    print(f"jax {jax.__version__}, adamx {adamx.__version__}")
    params = params_tree()
    grads = jax.tree.map(lambda p: (p * 0.1).astype(p.dtype), params)
    for name, kw in CONFIGS.items():
        for flat in (False, True):
            opt = adamx.adam(learning_rate=1e-3, flat_state=flat, **kw)
            state = opt.init(params)

            def ref(p, s, g, opt=opt):
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            def fused(p, s, g, opt=opt):
                return opt.apply_gradients(g, s, p)

            print(
                f"{name:16s} flat={flat!s:5s} reference {fingerprint(ref, params, state, grads)}"
                f"  fused {fingerprint(fused, params, state, grads)}"
            )


if __name__ == "__main__":
    main()
