"""DLRM-style CTR training with sok_jax on synthetic Criteo-shaped data.

Bottom MLP over 13 dense features, one `sok_jax.DistributedEmbedding` shared
by the 26 categorical slots (SOK style: slot s's keys are offset so slots
never collide), pairwise-dot interaction, top MLP, binary cross-entropy.
Dense layers are Flax linen + optax, data-parallel (replicated parameters,
batch sharded over the mesh axis). The table is model-parallel and trained
with the sparse path: only the rows a batch touched are updated, by a fused
kernel, inside the same jitted step, with the table and its optimizer slots
donated. `--dense-path` trains the table with `jax.grad` + optax instead.

Runs as is on a CPU (8 forced host devices) in about half a minute on two cores:

    python examples/train_dlrm.py [--optimizer adagrad] [--dense-path] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

# Forced host devices exist only for the CPU ("host") platform, so this is
# harmless on GPUs; it must happen before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sok_jax  # noqa: E402
from sok_jax import optim  # noqa: E402

# Per-slot cardinalities of the Criteo Kaggle display-advertising data set.
CRITEO_CARDINALITIES = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]
NUM_DENSE, NUM_SLOTS, AXIS = 13, 26, "data"
# Embedding learning rates that train well here. The loss is a batch mean, so
# a row's gradient is ~1/batch: plain SGD needs a large rate, and Adagrad/FTRL
# (whose 0.1 initial accumulator dominates such small gradients) a larger one
# than usual; Adam normalizes the scale away.
DEFAULT_LR = {"sgd": 20.0, "adagrad": 0.5, "rowwise_adagrad": 0.5, "adam": 0.01, "ftrl": 0.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4096, help="global batch")
    p.add_argument("--table-rows", type=int, default=1_000_000, help="total rows of the table")
    p.add_argument("--dim", type=int, default=16, help="embedding size D")
    p.add_argument("--optimizer", default="adam", choices=sorted(DEFAULT_LR))
    p.add_argument("--lr", type=float, default=None, help="embedding lr (default per optimizer)")
    p.add_argument("--dense-lr", type=float, default=1e-3, help="adam lr of the MLPs")
    p.add_argument("--steps", type=int, default=100, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=1.0,
        help="exchange bucket size (0: never overflow, n times the traffic)",
    )
    p.add_argument("--check", action="store_true", help="raise if a step dropped keys")
    p.add_argument(
        "--dense-path",
        action="store_true",
        help="train the table with jax.grad + optax (O(table) per step)",
    )
    p.add_argument("--json", default=None, help="write final metrics here")
    return p.parse_args(argv)


# ----------------------------------------------------------------- data
def make_sampler(rng, cards, offsets):
    """Returns `sample(num) -> (dense [num, 13], ids [num, 26, 1], labels [num])`:
    Criteo-shaped samples, Zipf keys per slot, lognormal counts as dense
    features, and labels from a fixed logistic model of both (a per-key
    weight summed over the slots plus a dense term), so there is something to
    learn and a fresh draw is a fair eval set."""
    key_weight = rng.normal(0, 0.5, offsets[-1] + cards[-1]).astype(np.float32)
    dense_weight = rng.normal(0, 0.3, NUM_DENSE).astype(np.float32)
    # Finite Zipf(1.1) by inverse CDF: a few hot keys, a long tail.
    cdfs = [np.cumsum(1.0 / np.arange(1, c + 1) ** 1.1) for c in cards]
    cdfs = [c / c[-1] for c in cdfs]

    def sample(num):
        ids = np.empty((num, NUM_SLOTS, 1), np.int32)
        for s, cdf in enumerate(cdfs):
            local = np.minimum(np.searchsorted(cdf, rng.random(num)), len(cdf) - 1)
            ids[:, s, 0] = offsets[s] + local
        dense = np.log1p(rng.lognormal(1.0, 1.5, (num, NUM_DENSE))).astype(np.float32)
        logit = key_weight[ids[:, :, 0]].sum(1) + (dense - 1.5) @ dense_weight - 1.0
        labels = (rng.random(num) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        return dense, ids, labels

    return sample


def auc(labels, scores):
    """ROC AUC by the Mann-Whitney rank sum (tied scores share their mean rank)."""
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


# ---------------------------------------------------------------- model
class MLP(nn.Module):
    features: tuple

    @nn.compact
    def __call__(self, x, final_relu=True):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i + 1 < len(self.features) or final_relu:
                x = nn.relu(x)
        return x


class DLRM(nn.Module):
    """Everything but the table: it gets the looked-up embeddings [B, 26, D]."""

    dim: int

    @nn.compact
    def __call__(self, dense, emb):
        bottom = MLP((64, self.dim))(dense)
        x = jnp.concatenate([bottom[:, None], emb.astype(bottom.dtype)], axis=1)  # [B, 27, D]
        dots = jnp.einsum("bid,bjd->bij", x, x)
        i, j = np.triu_indices(x.shape[1], k=1)  # each pair once, no self-dots
        top_in = jnp.concatenate([bottom, dots[:, i, j]], axis=1)
        return MLP((128, 64, 1))(top_in, final_relu=False)[:, 0]


def bce(logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def dense_table_optimizer(name, lr):
    """The optax twin of a sparse optimizer, for --dense-path."""
    table = {
        "sgd": lambda: optax.sgd(lr),
        "adam": lambda: optax.adam(lr),
        "adagrad": lambda: optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7),
    }
    if name not in table:
        raise SystemExit(f"--dense-path takes --optimizer {sorted(table)}; {name} is sparse-only")
    return table[name]()


# ----------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if args.dense_path:
        table_tx = dense_table_optimizer(args.optimizer, lr)
    else:
        table_tx = optim.by_name(args.optimizer, lr)
    devices = jax.devices()
    n = len(devices)
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by {n} devices")
    mesh = Mesh(np.array(devices), (AXIS,))
    repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    # Scale the real cardinalities into the row budget; slot s owns keys
    # [offsets[s], offsets[s] + cards[s]) of the one shared table.
    scale = args.table_rows / sum(CRITEO_CARDINALITIES)
    cards = [max(2, int(c * scale)) for c in CRITEO_CARDINALITIES]
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
    total_rows = int(sum(cards))
    path = "dense" if args.dense_path else "sparse"
    print(f"devices: {n} x {devices[0].platform} ({devices[0].device_kind})")
    print(
        f"config: {vars(args)} | embedding lr {lr} | table {total_rows} rows x {args.dim} "
        f"({math.ceil(total_rows / n)} per device) | {path} path"
    )

    rng = np.random.default_rng(args.seed)
    sample = make_sampler(rng, cards, offsets)
    n_eval = 4 * args.batch_size
    evals = sample(n_eval)  # held out: never trained on

    emb = sok_jax.DistributedEmbedding(
        combiner="sum",
        max_vocabulary_size_per_gpu=math.ceil(total_rows / n),
        embedding_vec_size=args.dim,
        slot_num=NUM_SLOTS,
        max_nnz=1,
        mesh=mesh,
        axis_name=AXIS,
        capacity_factor=args.capacity_factor or None,
        check=args.check,
    )
    model = DLRM(args.dim)
    dense_tx = optax.adam(args.dense_lr)
    params = model.init(
        jax.random.key(args.seed), evals[0][:2], jnp.zeros((2, NUM_SLOTS, args.dim))
    )
    params = jax.device_put(params, repl)
    dense_opt = jax.device_put(dense_tx.init(params), repl)
    emb_state = emb.init(args.seed)
    if args.dense_path:
        table_opt = jax.jit(table_tx.init)(emb_state.table)
    else:
        table_opt = emb.init_optimizer(table_tx, emb_state)

    # Explicit shardings: the table and its optimizer slots are row-sharded,
    # the stats are per device, the dense side is replicated.
    emb_sh = emb.state_shardings()
    if args.dense_path:  # an optax state: its table-shaped leaves follow the table
        opt_sh = jax.tree.map(
            lambda x: emb.table_sharding if x.shape == emb_state.table.shape else repl, table_opt
        )
    else:
        opt_sh = emb.optimizer_shardings(table_opt)
    state_sh = (
        jax.tree.map(lambda _: repl, params),
        jax.tree.map(lambda _: repl, dense_opt),
        emb_sh,
        opt_sh,
    )
    data_sh = (batch_sh, batch_sh, batch_sh)

    def train_step(params, dense_opt, emb_state, table_opt, dense, ids, labels):
        if args.dense_path:  # the whole [rows, D] gradient, through jax.grad

            def loss_fn(params, table):
                out, new_state = emb.apply(dataclasses.replace(emb_state, table=table), ids)
                return bce(model.apply(params, dense, out), labels), new_state.stats

            (loss, stats), (g_params, g_table) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
                params, emb_state.table
            )
            upd, table_opt = table_tx.update(g_table, table_opt, emb_state.table)
            new_table = optax.apply_updates(emb_state.table, upd)
            emb_state = dataclasses.replace(emb_state, table=new_table, stats=stats)
        else:  # sparse: differentiate w.r.t. the looked-up vectors only
            out, ctx, emb_state = emb.lookup(emb_state, ids)
            loss, (g_params, g_out) = jax.value_and_grad(
                lambda p, e: bce(model.apply(p, dense, e), labels), (0, 1)
            )(params, out)
            # Touched rows only, summed on their owners and updated in place
            # (= apply_gradients(..., sparse_grad(ctx, g_out)) in one pass).
            emb_state, table_opt = emb.sparse_update(emb_state, table_tx, table_opt, ctx, g_out)
        # Replicated params + sharded batch: XLA all-reduces g_params itself.
        upd, dense_opt = dense_tx.update(g_params, dense_opt, params)
        params = optax.apply_updates(params, upd)
        return params, dense_opt, emb_state, table_opt, loss, emb_state.stats.total()

    step = jax.jit(
        train_step,
        in_shardings=state_sh + data_sh,
        out_shardings=state_sh + (repl, repl),
        donate_argnums=(0, 1, 2, 3),
    )

    @jax.jit
    def predict(params, emb_state, dense, ids):
        out, _ = emb.apply(emb_state, ids, training=False)
        return model.apply(params, dense, out)

    def put(arrays, lo, hi):
        return tuple(jax.device_put(a[lo:hi], batch_sh) for a in arrays)

    state = (params, dense_opt, emb_state, table_opt)
    t0 = time.perf_counter()
    step = step.lower(*state, *put(evals, 0, args.batch_size)).compile()  # shapes only
    print(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
    first_loss = None
    for epoch in range(1, args.epochs + 1):
        # Fresh samples every epoch, like one pass over a click log far larger
        # than the run (repeating a small set lets the tail keys memorize it).
        data = sample(args.steps * args.batch_size)
        losses, dropped = [], []
        t0 = time.perf_counter()
        bar = tqdm(range(args.steps), desc=f"epoch {epoch}/{args.epochs}", unit="step", leave=False)
        for i in bar:
            batch = put(data, i * args.batch_size, (i + 1) * args.batch_size)
            *state, loss, drop = step(*state, *batch)
            losses.append(loss)
            dropped.append(drop)
            if i % 10 == 0:  # reading a value waits for the step; not every step
                bar.set_postfix(loss=f"{float(loss):.4f}")
        losses = np.asarray(jax.device_get(losses))
        elapsed = time.perf_counter() - t0
        first_loss = float(losses[0]) if first_loss is None else first_loss
        logits = np.concatenate(
            [
                np.asarray(predict(state[0], state[2], *put(evals[:2], lo, lo + args.batch_size)))
                for lo in range(0, n_eval, args.batch_size)
            ]
        )
        eval_auc = auc(evals[2], logits)
        eval_loss = float(bce(jnp.asarray(logits), jnp.asarray(evals[2])))
        sps = args.steps * args.batch_size / elapsed
        print(
            f"epoch {epoch}: loss {losses.mean():.4f} (last step {losses[-1]:.4f}) | eval loss "
            f"{eval_loss:.4f} auc {eval_auc:.4f} | {sps:,.0f} samples/s | "
            f"dropped keys {int(np.sum(jax.device_get(dropped)))}"
        )
    metrics = dict(
        first_loss=first_loss,
        final_loss=float(losses.mean()),
        eval_loss=eval_loss,
        auc=eval_auc,
        samples_per_s=sps,
        devices=n,
        platform=devices[0].platform,
        path=path,
        config=vars(args) | {"lr": lr},
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
