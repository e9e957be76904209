"""Train an embedding-bag classifier with ``adamx.lazy_adam``: row gradients in a JAX step.

The model: each example is a bag of 8 token ids out of a vocabulary of 50,000; its
features are the mean of the tokens' embedding rows (width 16), and a dense layer
gives the logit. The labels come from a hidden per-token score (synthetic, seeded).

The step shows the pattern for embedding tables:

1. gather the rows the batch uses: ``rows = params["emb"][tokens]``;
2. differentiate the loss with respect to ``rows`` (not the whole table) and the
   dense leaves;
3. turn ``(tokens, d loss / d rows)`` into the table's gradient with
   ``adamx.row_gradient`` (a BCOO; repeated tokens are summed by the optimizer);
4. ``opt.apply_gradients(grads, state, params)`` inside ``jax.jit`` with params and
   state donated, in the order the step returns them: only the touched rows of the
   table and of its moments are written, in place.

The script checks that rows of tokens that never appeared are bit-for-bit unchanged,
and that the accuracy beats chance. ``--smoke`` runs a few hundred steps (tests).

Run: ``python examples/lazy_embeddings.py [--steps 2000] [--smoke]``
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import adamx

VOCAB, WIDTH, BAG = 50_000, 16, 8


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token bags (Zipf-like token frequencies over the first 40,000 ids) and 0/1 labels."""
    rng = np.random.default_rng(seed)
    score = np.random.default_rng(123).standard_normal(VOCAB)
    p = 1.0 / (np.arange(40_000) + 5.0)
    tokens = rng.choice(40_000, (n, BAG), p=p / p.sum()).astype(np.int32)  # ids >= 40,000 never appear
    labels = (score[tokens].sum(axis=1) > 0).astype(np.float32)
    return tokens, labels


def init_params(seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "emb": jax.random.normal(k1, (VOCAB, WIDTH)) * 0.1,
        "dense": {"w": jax.random.normal(k2, (WIDTH,)) * 0.1, "b": jnp.zeros(())},
    }


def bag_loss(rows: jax.Array, dense: dict, labels: jax.Array) -> jax.Array:
    """``rows``: (batch, BAG, WIDTH), the gathered embedding rows."""
    logits = rows.mean(axis=1) @ dense["w"] + dense["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)  # binary cross-entropy


def make_train_step(opt: adamx.LazyAdam):
    def train_step(params, state, tokens, labels):
        rows = params["emb"][tokens]  # 1. gather
        loss, (g_rows, g_dense) = jax.value_and_grad(bag_loss, argnums=(0, 1))(rows, params["dense"], labels)  # 2.
        grads = {"emb": adamx.row_gradient(tokens, g_rows, VOCAB), "dense": g_dense}  # 3.
        params, state = opt.apply_gradients(grads, state, params)  # 4.
        return params, state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


def accuracy(params: dict, tokens: np.ndarray, labels: np.ndarray) -> float:
    logits = params["emb"][tokens].mean(axis=1) @ params["dense"]["w"] + params["dense"]["b"]
    return float(jnp.mean((logits > 0) == (labels > 0.5)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--smoke", action="store_true", help="300 steps")
    args = ap.parse_args()
    steps = 300 if args.smoke else args.steps

    tokens, labels = make_data(steps * args.batch, seed=0)
    test_tokens, test_labels = make_data(5000, seed=1)
    params = init_params(0)
    emb0 = np.asarray(params["emb"])
    opt = adamx.lazy_adam(learning_rate=args.lr)
    state = opt.init(params)
    step = make_train_step(opt)
    print(f"table {VOCAB} x {WIDTH}, batch {args.batch} bags of {BAG} tokens, {steps} steps, lr {args.lr}")

    first = last = None
    for s in range(steps):
        sl = slice(s * args.batch, (s + 1) * args.batch)
        params, state, loss = step(params, state, jnp.asarray(tokens[sl]), jnp.asarray(labels[sl]))
        if s == 0:
            first = float(loss)
        if s % max(1, steps // 5) == 0 or s == steps - 1:
            print(f"step {s + 1:5d}  loss {float(loss):.4f}")
        last = float(loss)

    emb = np.asarray(params["emb"])
    seen = np.zeros(VOCAB, bool)
    seen[tokens.reshape(-1)] = True
    unchanged = bool(np.array_equal(emb[~seen], emb0[~seen])) and not np.asarray(state.mu["emb"])[~seen].any()
    moved = bool((emb[seen] != emb0[seen]).any(axis=1).all())
    acc = accuracy(params, test_tokens, test_labels)
    print(f"tokens seen in training: {seen.sum()} of {VOCAB}")
    print(f"untouched rows unchanged (weights and moments, bit for bit): {unchanged}")
    print(f"every seen row moved: {moved}")
    print(f"test accuracy: {acc:.3f} (chance 0.5)")
    ok = unchanged and moved and last is not None and first is not None and last < first and acc > 0.6
    print("lazy embeddings: OK" if ok else "lazy embeddings: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
