"""DLRM training with sok_jax on Criteo-shaped data, made on the device.

Two models (the dense halves are flax NNX, `examples/dlrm_model.py`):

* `--model dlrm` (the default, the quickstart's job): a small DLRM (bottom
  MLP, pairwise dots, top MLP) over 13 dense and 26 sparse features, the
  Criteo Kaggle cardinalities scaled into `--table-rows` (1M) rows of D 16.
  About half a minute on a 2-core CPU (8 forced host devices).
* `--model dcnv2`: MLPerf Training's DLRM-DCNv2 at full size (bottom MLP
  512-256-128, 3 low-rank (512) cross layers, top MLP 1024-1024-512-256-1,
  bfloat16 compute with float32 parameters, dense Adagrad lr 0.005, batch
  65536; 26 tables of the Criteo 1TB cardinalities capped at 40M rows,
  204,184,588 rows x D 128), in one of two presets (`examples/dlrm_presets.py`
  says where every hyperparameter comes from):
  - `--preset mlperf` (the default), the benchmark as the mlcommons
    reference runs it: MLPerf's multi-hot bags (214 ids per sample), exact
    per-element Adagrad on the tables (lr 0.005, eps and initial accumulator
    FBGEMM's EXACT_ADAGRAD's), the tables and their accumulators bfloat16
    with stochastic rounding, an evaluation every 0.05 of the run;
  - `--preset mlperf-onehot`: one id per feature, row-wise Adagrad on
    float32 tables (104.5 GB, one accumulator per row).
  `--scale s` shrinks every table by s (the same preset on a CPU); every
  preset value can be overridden (`--optimizer`, `--table-dtype`,
  `--slot-dtype`, `--no-stochastic-rounding`, `--multi-hot`, `--dim`,
  `--batch-size`, `--eval-every`). The memory plan (tables, slots, dense state) is printed
  before anything is allocated, against one H200's 141 GB.

The embedding side is a `sok_jax.EmbeddingCollection` with one table per
feature, placed by its planner (printed at start; `CollectionEmbedding`), or
with `--embedding one-table` SOK v1's one `DistributedEmbedding` holding
every feature's rows at per-feature offsets (`TableEmbedding`), either
driven through the NNX module `sok_jax.flax.ShardedEmbedding` (its variables
hold the tables and optimizer slots) and trained with the sparse path inside
one jitted step that donates all state. The data is `sok_jax.data.SyntheticCriteo`,
generated inside that step from the step number (power-law ids, lognormal
dense features, labels from a planted model whose AUC is printed beside the
trained one), or the preprocessed NumPy Criteo files with `--criteo-dir`.
`--eval-quantized int8` also prints the held-out AUC with the trained
tables served in int8 rows (`sok_jax.serving.quantize`), either embedding.

    python examples/train_dlrm.py                       # the small default
    python examples/train_dlrm.py --model dcnv2 --scale 1e-4 --batch-size 1024
    python examples/train_dlrm.py --model dcnv2 --preset mlperf-onehot --plot m.png --json m.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Forced host devices exist only for the CPU ("host") platform, so this is
# harmless on GPUs; it must happen before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# The full-size tables and slots and the step's activations need more of an
# H200 than JAX's default 75% preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dlrm_model as dm  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from dlrm_presets import H200_BYTES, PRESETS  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sok_jax  # noqa: E402
from sok_jax import data, optim  # noqa: E402

AXIS = "data"
# Table learning rates of the small model that train well here. The loss is
# a batch mean, so a row's gradient is ~1/batch: plain SGD needs a large rate,
# and Adagrad/FTRL (whose 0.1 initial accumulator dominates such small
# gradients) a larger one than usual; Adam normalizes the scale away.
DEFAULT_LR = {"sgd": 20.0, "adagrad": 0.5, "rowwise_adagrad": 0.5, "adam": 0.01, "ftrl": 0.5}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dlrm", choices=["dlrm", "dcnv2"])
    p.add_argument(
        "--preset",
        default="mlperf",
        choices=sorted(PRESETS),
        help="dcnv2: MLPerf's benchmark (mlperf) or its one-hot variant (examples/dlrm_presets.py)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="dcnv2: shrink every table by this")
    p.add_argument(
        "--multi-hot",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dcnv2: MLPerf's bag sizes (default: the preset's)",
    )
    p.add_argument("--table-rows", type=int, default=1_000_000, help="dlrm: total table rows")
    p.add_argument("--dim", type=int, default=None, help="embedding size D (dlrm 16, dcnv2 128)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (4096 / 65536)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (100 / 500)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (3 / 4)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between evaluations (dcnv2: 0.05 of the run, as MLPerf's reference; dlrm: "
        "an epoch); every epoch's end is evaluated too",
    )
    p.add_argument("--optimizer", default=None, choices=sorted(DEFAULT_LR), help="the tables'")
    p.add_argument("--lr", type=float, default=None, help="the tables' learning rate")
    p.add_argument("--dense-lr", type=float, default=None, help="the dense part's learning rate")
    p.add_argument(
        "--table-dtype", default=None, choices=sorted(DTYPES), help="dlrm: float32; dcnv2: preset's"
    )
    p.add_argument(
        "--stochastic-rounding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write 16-bit tables' (and slots') updates by stochastic rounding (seeded by "
        "--seed; default: the dcnv2 preset's, off for dlrm)",
    )
    p.add_argument(
        "--slot-dtype",
        default=None,
        choices=sorted(DTYPES),
        help="storage of the sparse optimizer's slots, math in float32 (dlrm: float32; "
        "dcnv2: the preset's)",
    )
    p.add_argument("--compute-dtype", default=None, choices=sorted(DTYPES), help="dense compute")
    p.add_argument(
        "--embedding",
        default="collection",
        choices=["collection", "one-table"],
        help="one table per feature (EmbeddingCollection, the planner's placements) or one "
        "shared table with per-feature key offsets (DistributedEmbedding, SOK v1)",
    )
    p.add_argument("--pack", type=int, default=None, help="one-table: ids per lookup slot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=1.0,
        help="exchange bucket size (0: never overflow, n times the traffic)",
    )
    p.add_argument("--check", action="store_true", help="raise if a step dropped keys")
    p.add_argument(
        "--hbm-budget",
        type=float,
        default=None,
        help="collection: GiB of HBM per device the tables may take; the planner keeps the "
        "rest in host memory behind HBM caches (storage='host_cached')",
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="with --hbm-budget: each step's lookup also brings the next batch's rows into the "
        "HBM caches, while the step's dense half runs (synthetic data: the step makes both)",
    )
    p.add_argument(
        "--dense-path",
        action="store_true",
        help="train the table with jax.grad + optax (O(table) per step)",
    )
    p.add_argument("--criteo-dir", default=None, help="preprocessed NumPy Criteo (day_*.npy)")
    p.add_argument("--train-days", default="0-22", help="with --criteo-dir: e.g. 0-22 or 0,1")
    p.add_argument("--eval-day", type=int, default=23, help="with --criteo-dir: its first half")
    p.add_argument("--no-split", action="store_true", help="skip timing the step's parts")
    p.add_argument("--split-steps", type=int, default=10, help="calls per timing sample")
    p.add_argument("--json", default=None, help="write final metrics here")
    p.add_argument(
        "--coordinator",
        default=None,
        help="host:port of process 0: run as one of --num-processes processes "
        "(jax.distributed; without these, cluster auto-detection where there is one)",
    )
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--plot", default=None, help="write a PNG of loss and AUC here")
    p.add_argument(
        "--eval-quantized",
        default="",
        help="after training, the held-out AUC with the tables served in these "
        "inference row formats (comma-separated: int8,bfloat16,float16; sok_jax.serving.quantize)",
    )
    args = p.parse_args(argv)
    dcn = args.model == "dcnv2"
    if args.multi_hot and not dcn:
        p.error("--multi-hot is for --model dcnv2")
    preset = PRESETS[args.preset] if dcn else None
    args.dim = args.dim or (preset.dim if dcn else 16)
    args.batch_size = args.batch_size or (preset.batch_size if dcn else 4096)
    args.steps = args.steps or (500 if dcn else 100)
    args.epochs = args.epochs or (4 if dcn else 3)
    args.optimizer = args.optimizer or (preset.table_optimizer if dcn else "adam")
    args.compute_dtype = args.compute_dtype or ("bfloat16" if dcn else "float32")
    args.table_dtype = args.table_dtype or (preset.table_dtype if dcn else "float32")
    # the preset's slots are the sparse optimizer's (the dense path's optax has its own)
    args.slot_dtype = args.slot_dtype or (
        preset.slot_dtype if dcn and not args.dense_path else "float32"
    )
    args.multi_hot = bool(preset.multi_hot if dcn and args.multi_hot is None else args.multi_hot)
    if args.stochastic_rounding is None:  # the preset's (the dense path has none)
        args.stochastic_rounding = dcn and preset.stochastic_rounding and not args.dense_path
    if args.lr is None:
        adagrads = ("adagrad", "rowwise_adagrad")
        args.lr = preset.lr if dcn and args.optimizer in adagrads else DEFAULT_LR[args.optimizer]
    if args.dense_lr is None:
        args.dense_lr = preset.lr if dcn else 1e-3
    if args.hbm_budget is not None and (args.embedding != "collection" or args.dense_path):
        p.error("--hbm-budget is for --embedding collection (the planner offloads its tables)")
    if args.prefetch and (args.hbm_budget is None or args.criteo_dir):
        p.error(
            "--prefetch is for --hbm-budget (tables behind HBM caches) on the synthetic data "
            "(each step makes its own batch and the next)"
        )
    args.eval_quantized = [d for d in args.eval_quantized.split(",") if d]
    return args


def eval_quantized(dtypes, embed, graphdef, state, held_out, eval_labels) -> dict:
    """{dtype: held-out AUC and bytes per row} of the trained model with its
    tables served in each inference row format (`sok_jax.serving.quantize`
    of the layer or the collection), the dense part unchanged."""

    @jax.jit
    def predict(params, qstate, batch):
        pooled, _ = embed.apply_table(qstate, batch.sparse)
        return nnx.merge(graphdef, params)(batch.dense, pooled)

    layer_state = embed.module(state.emb).state
    out = {}
    for dtype in dtypes:
        qstate = sok_jax.serving.quantize(embed.layer, layer_state, dtype)
        logits = np.concatenate([to_host(predict(state.params, qstate, b)) for b in held_out])
        out[dtype] = dict(
            auc=data.roc_auc(eval_labels, logits),
            bytes_per_row=sok_jax.serving.bytes_per_row(embed.dim, dtype),
        )
    return out


def _days(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


# --------------------------------------------------------------- set-up
def table_optimizer(args):
    """The tables' sparse optimizer (or its optax twin for --dense-path)."""
    kw = {}
    if args.model == "dcnv2" and args.optimizer in ("adagrad", "rowwise_adagrad"):
        preset = PRESETS[args.preset]
        kw = dict(initial_accumulator_value=preset.initial_accumulator_value, eps=preset.table_eps)
    if not args.dense_path:
        if args.stochastic_rounding:
            kw.update(stochastic_rounding=True, seed=args.seed % 2**32)
        return optim.by_name(args.optimizer, args.lr, slot_dtype=args.slot_dtype, **kw)
    if args.stochastic_rounding or args.slot_dtype != "float32":
        raise SystemExit(
            "--stochastic-rounding and --slot-dtype are for the sparse path, not --dense-path"
        )
    twins = {
        "sgd": lambda: optax.sgd(args.lr),
        "adam": lambda: optax.adam(args.lr),
        "adagrad": lambda: optax.adagrad(
            args.lr, kw.get("initial_accumulator_value", 0.1), kw.get("eps", 1e-7)
        ),
    }
    if args.optimizer not in twins:
        raise SystemExit(
            f"--dense-path takes --optimizer {sorted(twins)}; {args.optimizer} is sparse-only"
        )
    return twins[args.optimizer]()


def dense_optimizer(args):
    if args.model == "dcnv2":
        preset = PRESETS[args.preset]
        return optax.adagrad(
            args.dense_lr,
            initial_accumulator_value=preset.initial_accumulator_value,
            eps=preset.dense_eps,
        )
    return optax.adam(args.dense_lr)


def make_features(args):
    if args.model == "dcnv2":
        return data.criteo_features(
            PRESETS[args.preset].cardinalities, scale=args.scale, multi_hot=args.multi_hot
        )
    scale = min(1.0, args.table_rows / sum(data.KAGGLE_CARDINALITIES))
    return data.criteo_features(data.KAGGLE_CARDINALITIES, scale=scale, min_rows=2)


def make_model(args, features):
    kw = dict(dtype=DTYPES[args.compute_dtype], param_dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    if args.model == "dcnv2":
        shapes = PRESETS[args.preset].shapes()
        return dm.DCNv2(data.NUM_DENSE, len(features), args.dim, **shapes, **kw), shapes
    return dm.DLRM(data.NUM_DENSE, len(features), args.dim, **kw), {}


def make_loaders(args, features):
    """(training loader, list of held-out batches on the device, generator or None)."""
    if args.criteo_dir is None:
        gen = data.SyntheticCriteo(features, args.batch_size, seed=args.seed)
        make = jax.jit(gen.eval_batch)
        return gen, [make(i) for i in range(args.eval_batches)], gen
    kw = dict(features=features, multi_hot=args.multi_hot)
    train = data.CriteoNumpy(args.criteo_dir, _days(args.train_days), args.batch_size, **kw)
    held = data.CriteoNumpy(args.criteo_dir, [args.eval_day], args.batch_size, **kw)
    n = min(args.eval_batches, max(held.num_batches // 2, 1))  # the validation half
    return train, [held.batch(i) for i in range(n)], None


# --------------------------------------------------------------- timing
def median_time(call, calls: int, samples: int = 3) -> float:
    """Median seconds per call over `samples` runs of `calls` calls, each run
    blocking once on the last result (after one blocking warm-up call)."""
    jax.block_until_ready(call())
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def time_split(args, step, state, loader, embed, graphdef, dense_tx, put):
    """Times the whole step and its parts as jitted sub-steps of the same
    shapes: the batch (generated, or read and transferred), the embedding
    half (lookup + sparse update, given a cotangent), the dense half
    (forward, backward, optimizer, given the pooled vectors) and, on several
    devices, the exchange's all_to_alls alone. Trains `state` further (with a
    fixed cotangent): run it last."""
    calls, counter = args.split_steps, [0]
    box = {"state": state}

    def whole():
        counter[0] += 1
        box["state"], loss, _ = step(box["state"], counter[0] if loader.on_device else batch)
        return loss

    if loader.on_device:
        make_batch = jax.jit(lambda i: put(loader.batch(i)))  # sharded as in the step
        batch = make_batch(0)
        t_data = median_time(lambda: make_batch(counter[0]), calls)
    else:
        batch = put(loader.batch(0))
        t_data = median_time(lambda: put(loader.batch(0)), calls)
    res = {"whole": median_time(whole, calls), "data": t_data}
    state = box.pop("state")

    emb_step = jax.jit(dm.make_embedding_step(embed), donate_argnums=(0,))
    shape = (args.batch_size, len(embed.features), embed.dim)
    d_pooled = put(jax.random.normal(jax.random.key(1), shape, jnp.float32) * 1e-4)
    emb_box = [state.emb]

    def emb_call():
        emb_box[0] = emb_step(emb_box[0], batch.sparse, d_pooled)
        return emb_box[0]

    res["embedding"] = median_time(emb_call, calls)

    dense_step = jax.jit(dm.make_dense_step(graphdef, dense_tx), donate_argnums=(0, 1))
    pooled = put(d_pooled * 100.0)
    dense_box = [state.params, state.dense_opt]

    def dense_call():
        dense_box[0], dense_box[1], loss, _ = dense_step(
            dense_box[0], dense_box[1], batch.dense, pooled, batch.labels
        )
        return loss

    res["dense"] = median_time(dense_call, calls)
    fn, ex_args = dm.make_exchange_step(embed, args.batch_size)
    if fn is not None:
        fn = jax.jit(fn)
        res["exchange"] = median_time(lambda: fn(*ex_args), calls)
    return res


def print_split(res, batch_size, on_device):
    whole = res["whole"]
    print(
        f"step time split at batch {batch_size:,} (jitted sub-steps of the same shapes, "
        "median of 3 runs):"
    )
    rows = [
        ("whole training step", whole),
        (
            "data: " + ("generated on the device" if on_device else "read + transferred"),
            res["data"],
        ),
        ("embedding lookup + sparse update", res["embedding"]),
        ("exchange (all_to_alls alone)", res.get("exchange")),
        ("dense forward + backward + optimizer", res["dense"]),
    ]
    for name, t in rows:
        if t is None:
            why = (
                "one device: looked up locally, nothing exchanged"
                if jax.device_count() == 1
                else "not timed apart (the collection's exchange is inside the lookup)"
            )
            print(f"  {name:<40} {'-':>9}    {why}")
            continue
        extra = (
            f"{batch_size / t / 1e6:8.3f} M samples/s" if t is whole else f"{100 * t / whole:6.1f}%"
        )
        print(f"  {name:<40} {t * 1e3:9.3f} ms {extra}")
    parts = res["embedding"] + res["dense"] + (res["data"] if on_device else 0.0)
    print(
        f"  {'parts summed':<40} {parts * 1e3:9.3f} ms (whole - parts {1e3 * (whole - parts):+.3f} ms: "
        "what overlaps or fuses across the halves; the embedding part includes the exchange)"
    )


def write_plot(path, losses, evals, planted):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(np.arange(1, len(losses) + 1), losses, lw=0.6)
    a.set(xlabel="step", ylabel="training loss (BCE)", title="loss")
    if max(losses) > 20 * min(losses):  # an early spike would flatten the rest
        a.set_yscale("log")
    steps, aucs = zip(*[(e["step"], e["auc"]) for e in evals])
    b.plot(steps, aucs, "o-", label="trained model")
    if planted is not None:
        b.axhline(planted, color="gray", ls="--", label=f"planted model {planted:.4f}")
    b.set(xlabel="step", ylabel="held-out AUC", title="AUC")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------- main
def _local_share(x, sharding):
    """This process's rows of a host array of the whole batch, as one global
    array (rows in device order along the mesh axis)."""
    devices = list(sharding.mesh.devices.flat)
    rows = x.shape[0] // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    local = np.concatenate([x[i * rows : (i + 1) * rows] for i in mine])
    return jax.make_array_from_process_local_data(sharding, local, x.shape)


def start_processes(args):
    """Joins JAX's multi-controller runtime when asked (every process runs
    this program; each holds some devices of the one mesh). Only process 0
    prints and writes files."""
    if args.coordinator is None and args.num_processes is None:
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )
    if jax.process_index() != 0:
        import builtins

        builtins.print = lambda *a, **k: None


def to_host(x):
    """All of a (possibly multi-process) array on this host."""
    return sok_jax.distributed.host.to_host(x)


def main(argv=None):
    args = parse_args(argv)
    start_processes(args)
    table_tx, dense_tx = table_optimizer(args), dense_optimizer(args)
    devices = jax.devices()
    n = len(devices)
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by {n} devices")
    mesh = Mesh(np.array(devices), (AXIS,))
    repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    path = "dense" if args.dense_path else "sparse"
    print(f"devices: {n} x {devices[0].platform} ({devices[0].device_kind})")
    print(
        f"config: {vars(args)} | table optimizer {args.optimizer} lr {args.lr} | dense "
        f"{'adagrad' if args.model == 'dcnv2' else 'adam'} lr {args.dense_lr} | {path} path"
    )
    if args.model == "dcnv2":
        print(f"preset {args.preset}: {PRESETS[args.preset]}")

    features = make_features(args)
    model, shapes = make_model(args, features)
    graphdef, params = nnx.split(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    flops = dm.dense_flops(args.model, data.NUM_DENSE, len(features), args.dim, **shapes)
    print(
        f"dense model: {type(model).__name__}, {n_params:,} parameters (float32), "
        f"{args.compute_dtype} compute, {3 * flops / 1e6:.1f} MFLOP per sample per step"
    )
    memory = None
    if not args.dense_path:
        dense_bytes = dm.tree_bytes(params) + dm.tree_bytes(jax.eval_shape(dense_tx.init, params))
        memory = dm.memory_plan(
            features, args.dim, DTYPES[args.table_dtype], table_tx, args.optimizer, dense_bytes, n
        )
        print(memory.describe(H200_BYTES, "H200"))
        if memory.per_device > H200_BYTES:
            print(
                "  (16-bit tables and slots halve it: --table-dtype / --slot-dtype bfloat16 with "
                "--stochastic-rounding; or shrink the tables with --scale, spread them over more "
                "devices, or keep the largest in host memory with --hbm-budget)"
            )
    if args.embedding == "collection" and not args.dense_path:
        embed = dm.CollectionEmbedding(
            features,
            args.dim,
            mesh=mesh,
            axis_name=AXIS,
            optimizer=table_tx,
            batch_size=args.batch_size,
            dtype=DTYPES[args.table_dtype],
            capacity_factor=args.capacity_factor or None,
            check=args.check,
            hbm_budget=None if args.hbm_budget is None else int(args.hbm_budget * 2**30),
        )
    else:  # the dense path needs one table array: the one-table form
        embed = dm.TableEmbedding(
            features,
            args.dim,
            mesh=mesh,
            axis_name=AXIS,
            optimizer=table_tx if not args.dense_path else optim.sgd(0.0),
            dtype=DTYPES[args.table_dtype],
            capacity_factor=args.capacity_factor or None,
            check=args.check,
            pack=args.pack,
        )
    print(embed.plan(args.optimizer))

    t0 = time.perf_counter()
    emb_state = embed.init(args.seed)  # the ShardedEmbedding module's state
    emb_sh = embed.shardings(emb_state)
    table_opt = opt_sh = None
    if args.dense_path:
        table = embed.module(emb_state).state.table
        table_opt = jax.jit(table_tx.init)(table)
        opt_sh = jax.tree.map(
            lambda x: embed.layer.table_sharding if x.shape == table.shape else repl, table_opt
        )
    jax.block_until_ready((emb_state, table_opt))
    print(f"table initialized on the device(s) in {time.perf_counter() - t0:.1f}s")

    params = jax.device_put(params, repl)
    dense_opt = jax.device_put(dense_tx.init(params), repl)
    state = dm.TrainState(params, dense_opt, emb_state, table_opt)
    state_sh = dm.TrainState(
        jax.tree.map(lambda _: repl, params),
        jax.tree.map(lambda _: repl, dense_opt),
        emb_sh,
        opt_sh,
    )
    train_step = dm.make_train_step(
        graphdef, embed, dense_tx, table_tx=table_tx if args.dense_path else None
    )
    loader, held_out, gen = make_loaders(args, features)

    def put(batch):
        """The batch (or any [B, ...] arrays) sharded over the axis; inside
        jit a sharding constraint. Host arrays of the whole batch: each
        process puts its devices' rows (the same on one process)."""
        if isinstance(jax.tree.leaves(batch)[0], jax.core.Tracer):
            return jax.lax.with_sharding_constraint(batch, batch_sh)
        if jax.process_count() > 1 and not isinstance(jax.tree.leaves(batch)[0], jax.Array):
            return jax.tree.map(lambda x: _local_share(np.asarray(x), batch_sh), batch)
        return jax.device_put(batch, batch_sh)

    if loader.on_device:  # the batch is made inside the step, from its number

        def synthetic_step(state, step_number):
            upcoming = put(loader.batch(step_number + 1)) if args.prefetch else None
            return train_step(state, put(loader.batch(step_number)), upcoming)

        step = jax.jit(
            synthetic_step,
            in_shardings=(state_sh, None),
            out_shardings=(state_sh, repl, repl),
            donate_argnums=(0,),
        )
        example = 0
    else:
        step = jax.jit(
            train_step,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, repl, repl),
            donate_argnums=(0,),
        )
        example = put(loader.batch(0))
    t0 = time.perf_counter()
    step = step.lower(state, example).compile()
    compile_s = time.perf_counter() - t0
    print(f"compiled the train step in {compile_s:.1f}s")

    predict = jax.jit(dm.make_predict(graphdef, embed))
    held_out = [put(b) for b in held_out]
    eval_labels = np.concatenate([to_host(b.labels) for b in held_out])
    planted_auc = None
    if gen is not None:
        planted = np.concatenate([to_host(jax.jit(gen.planted_logits)(b)) for b in held_out])
        planted_auc = data.roc_auc(eval_labels, planted)

    steps_per_epoch = args.steps
    if loader.num_batches is not None:
        steps_per_epoch = min(args.steps, loader.num_batches // args.epochs)
        if steps_per_epoch < 1:
            raise SystemExit(f"{loader.num_batches} batches cannot make {args.epochs} epochs")
    total_steps = steps_per_epoch * args.epochs
    if args.eval_every is None:  # MLPerf: every 0.05 of its one epoch; dlrm: every epoch
        fraction = PRESETS[args.preset].eval_fraction if args.model == "dcnv2" else None
        args.eval_every = max(1, round(total_steps * fraction)) if fraction else steps_per_epoch
    planted_txt = f" (planted model {planted_auc:.4f})" if planted_auc is not None else ""
    all_losses, evals, epochs, first_loss = [], [], [], None
    global_step = 0

    def evaluate():
        """Held-out loss and AUC of the state now, appended to `evals`."""
        logits = np.concatenate([to_host(predict(state.params, state.emb, b)) for b in held_out])
        evals.append(
            dict(
                step=global_step,
                fraction=global_step / total_steps,
                auc=data.roc_auc(eval_labels, logits),
                loss=float(dm.bce(jnp.asarray(logits), jnp.asarray(eval_labels))),
            )
        )
        return evals[-1]

    dropped_before = 0  # the counters accumulate from init: keys dropped before this epoch
    for epoch in range(1, args.epochs + 1):
        losses, dropped = [], None
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{args.epochs}",
            unit="step",
            leave=False,
            disable=jax.process_index() != 0,
        )
        t0, eval_s = time.perf_counter(), 0.0
        for i in bar:
            if loader.on_device:
                state, loss, drop = step(state, global_step)
            else:
                state, loss, drop = step(state, put(loader.batch(global_step)))
            global_step += 1
            losses.append(loss)
            dropped = drop
            if i % 10 == 0:  # reading a value waits for the step; not every step
                sps = (i + 1) * args.batch_size / (time.perf_counter() - t0 - eval_s)
                bar.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{sps:,.0f}")
            if global_step % args.eval_every == 0 and i + 1 < steps_per_epoch:
                jax.block_until_ready(loss)  # the steps before it are not the evaluation's time
                t_eval = time.perf_counter()
                ev = evaluate()
                eval_s += time.perf_counter() - t_eval
                if jax.process_index() == 0:
                    bar.write(
                        f"eval at step {global_step:,} ({ev['fraction']:.2f} of the run): "
                        f"loss {ev['loss']:.4f} auc {ev['auc']:.4f}{planted_txt}"
                    )
        losses = np.asarray([to_host(x) for x in losses])
        elapsed = time.perf_counter() - t0 - eval_s
        all_losses += losses.tolist()
        first_loss = float(losses[0]) if first_loss is None else first_loss
        ev = evaluate()  # every epoch's end
        eval_auc, eval_loss = ev["auc"], ev["loss"]
        sps = steps_per_epoch * args.batch_size / elapsed
        drops = int(to_host(dropped)) - dropped_before
        dropped_before += drops
        epochs.append(
            dict(epoch=epoch, step=global_step, auc=eval_auc, loss=eval_loss, samples_per_s=sps)
        )
        print(
            f"epoch {epoch}: loss {losses.mean():.4f} (last step {losses[-1]:.4f}) | eval loss "
            f"{eval_loss:.4f} auc {eval_auc:.4f}{planted_txt} | {sps:,.0f} samples/s "
            f"({1e3 * elapsed / steps_per_epoch:.2f} ms/step, evaluations excluded) | "
            f"dropped keys {drops}"
        )

    metrics = dict(
        first_loss=first_loss,
        final_loss=float(losses.mean()),
        eval_loss=eval_loss,
        auc=eval_auc,
        planted_auc=planted_auc,
        samples_per_s=sps,
        compile_s=compile_s,
        epochs=epochs,
        evals=evals,
        memory=memory._asdict() if memory is not None else None,
        devices=n,
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        path=path,
        model=args.model,
        table_rows=embed.total_rows,
        config=vars(args),
    )
    if args.eval_quantized:
        quantized = eval_quantized(
            args.eval_quantized, embed, graphdef, state, held_out, eval_labels
        )
        for dtype, q in quantized.items():
            print(
                f"served {dtype}: auc {q['auc']:.4f} (float32 {eval_auc:.4f}, "
                f"{q['auc'] - eval_auc:+.4f}) | {q['bytes_per_row']} bytes a row "
                f"(float32 {4 * embed.dim})"
            )
        metrics["quantized"] = quantized
    if args.plot and jax.process_index() == 0:
        write_plot(args.plot, all_losses, evals, planted_auc)
    if not args.no_split and not args.dense_path:
        split = time_split(args, step, state, loader, embed, graphdef, dense_tx, put)
        print_split(split, args.batch_size, loader.on_device)
        metrics["step_split_s"] = split
    metrics["processes"] = jax.process_count()
    if args.json and jax.process_index() == 0:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
