"""examples/train_dlrm.py end to end, on a tiny setting: it runs, and its
loss falls."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from subprocesses import child_env, free_port, run_checked, run_together

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_dlrm.py")


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--optimizer", "adagrad", "--check"],
        ["--dense-path", "--optimizer", "sgd"],
        ["--table-dtype", "bfloat16", "--slot-dtype", "bfloat16", "--stochastic-rounding"],
    ],
    ids=["default", "adagrad-check", "dense-path", "bf16-stochastic-rounding"],
)
def test_train_dlrm_learns(tmp_path, extra):
    pytest.importorskip("optax")
    pytest.importorskip("flax")
    pytest.importorskip("tqdm")
    out = tmp_path / "metrics.json"
    cmd = [
        sys.executable,
        SCRIPT,
        "--steps",
        "30",
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--table-rows",
        "20000",
        "--json",
        str(out),
        *extra,
    ]
    proc = run_checked(cmd, child_env(8), cwd=tmp_path)
    m = json.loads(out.read_text())
    assert m["devices"] == 8
    assert m["final_loss"] < 0.85 * m["first_loss"], m
    assert 0.5 < m["auc"] <= 1.0
    assert m["samples_per_s"] > 0
    assert "epoch 2:" in proc.stdout


def _run(tmp_path, args, devices=8, timeout=300):
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, SCRIPT, "--json", str(out), *args]
    proc = run_checked(cmd, child_env(devices), cwd=tmp_path, timeout=timeout)
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.parametrize(
    "preset,embedding,hbm_budget",
    [
        ("mlperf", "collection", None),
        ("mlperf", "one-table", None),
        ("mlperf-onehot", "collection", "0.0015"),
    ],
    ids=["mlperf-collection", "mlperf-one-table", "onehot-collection-offloaded"],
)
def test_dcnv2_presets_learn_at_tiny_scale(tmp_path, preset, embedding, hbm_budget):
    """Both MLPerf DLRM-DCNv2 presets with every table shrunk 10^4 times, on 2
    host devices (an exchange, at a CPU's pace): `mlperf` (multi-hot, exact
    Adagrad, bfloat16 tables with stochastic rounding) with each embedding
    side, evaluated every 0.05 of the run (the collection's tables then also
    served in int8 rows); `mlperf-onehot` (row-wise Adagrad,
    float32) with an HBM budget the tables exceed, so that the planner keeps
    the largest in host memory behind caches, and the step's time split.
    MLPerf's dense Adagrad rate (0.005, zero initial accumulator: the first
    update is a sign step of 0.005 on every weight) spikes the loss of a
    batch-128 run for its first steps; a lower rate keeps a 16-step run's
    loss falling."""
    for mod in ("optax", "flax", "tqdm"):
        pytest.importorskip(mod)
    png = tmp_path / "curves.png"
    args = ["--model", "dcnv2", "--preset", preset, "--scale", "1e-4", "--batch-size", "128"]
    args += ["--steps", "8", "--epochs", "2", "--dense-lr", "5e-4", "--plot", str(png)]
    args += ["--embedding", embedding]
    # The offloaded run prefetches each next batch into the caches.
    offload = ["--hbm-budget", hbm_budget, "--prefetch", "--split-steps", "1"]
    args += offload if hbm_budget else ["--no-split"]
    served = embedding == "collection" and not hbm_budget
    args += ["--eval-quantized", "int8"] if served else []
    m, stdout = _run(tmp_path, args, devices=2)
    if served:  # the collection's 16-bit tables served in int8 rows
        assert abs(m["quantized"]["int8"]["auc"] - m["auc"]) <= 0.01, m
    assert m["model"] == "dcnv2" and m["devices"] == 2
    assert m["final_loss"] < m["first_loss"], m
    assert 0.55 < m["auc"] <= 1.0 and 0.75 < m["planted_auc"] <= 1.0, m
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert "planted model" in stdout and "embedding plan" in stdout and "compiled" in stdout
    assert ("EmbeddingCollection" in stdout) == (embedding == "collection")
    config, memory = m["config"], m["memory"]
    assert config["dim"] == 128 and config["batch_size"] == 128
    # MLPerf's evaluation every 0.05 of the run: 16 steps evaluate after each.
    assert config["eval_every"] == 1 and [e["step"] for e in m["evals"]] == list(range(1, 17))
    assert "eval at step 8 (0.50 of the run)" not in stdout  # an epoch's end: its own line
    assert "eval at step 9 (0.56 of the run): loss" in stdout
    assert "memory plan" in stdout and "fits one H200 (141 GB)" in stdout
    if preset == "mlperf":
        assert config["optimizer"] == "adagrad" and config["multi_hot"]
        assert config["table_dtype"] == "bfloat16" and config["stochastic_rounding"]
        assert config["slot_dtype"] == "bfloat16"
        assert memory["slot_bytes"] == memory["table_bytes"]  # bfloat16 [R, D]
        assert "adagrad slots: bfloat16" in stdout
    else:
        assert config["optimizer"] == "rowwise_adagrad" and not config["multi_hot"]
        assert config["table_dtype"] == "float32" and not config["stochastic_rounding"]
        assert memory["slot_bytes"] == memory["table_bytes"] // 128  # one float32 a row
    if hbm_budget:
        assert "offloaded 'cat_" in stdout and "host_cached (" in stdout and config["prefetch"]
        split = m["step_split_s"]
        assert {"whole", "data", "embedding", "dense", "exchange"} <= set(split)
        assert all(v > 0 for v in split.values())
        assert "step time split" in stdout
    elif embedding == "one-table":
        assert "214 ids/sample packed" in stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in stdout
    else:
        assert png.stat().st_size > 0


def test_presets_follow_the_mlperf_reference():
    """The presets' hyperparameters are the reference's (mlcommons
    recommendation_v2/torchrec_dlrm + FBGEMM's EXACT_ADAGRAD defaults), with
    eps moved inside the square root as sok_jax and optax take it."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import dlrm_presets as pr
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    from sok_jax import data

    mlperf, onehot = pr.PRESETS["mlperf"], pr.PRESETS["mlperf-onehot"]
    for p in (mlperf, onehot):
        assert p.lr == 0.005 and p.batch_size == 65536 and p.dim == 128
        assert p.initial_accumulator_value == 0.0 and p.eval_fraction == 0.05
        assert p.table_eps == pytest.approx(1e-16) and p.dense_eps == pytest.approx(1e-20)
        assert p.cardinalities == data.MLPERF_CARDINALITIES
        assert sum(p.cardinalities) == 204_184_588
    assert mlperf.multi_hot and sum(data.MLPERF_MULTI_HOT_SIZES) == 214
    assert (mlperf.table_optimizer, mlperf.table_dtype) == ("adagrad", "bfloat16")
    assert mlperf.slot_dtype == "bfloat16" and onehot.slot_dtype == "float32"
    assert mlperf.stochastic_rounding
    # The two eps forms agree where the accumulator dwarfs eps**2 and at 0.
    for acc in (0.0, 1e-10, 1.0):
        fbgemm = np.sqrt(acc) + pr.TABLE_EPS
        ours = np.sqrt(acc + pr.eps_inside(pr.TABLE_EPS))
        assert ours == pytest.approx(fbgemm, rel=2e-3)


def test_train_dlrm_reads_criteo_numpy_files(tmp_path):
    """--criteo-dir: the same job on preprocessed NumPy Criteo files (two days
    written here, labels from a rule the model can learn)."""
    for mod in ("optax", "flax", "tqdm"):
        pytest.importorskip(mod)
    from sok_jax import data

    rng = np.random.default_rng(0)
    for day, n in ((0, 4096), (1, 1024)):
        sparse = rng.integers(0, 1000, (n, 26)).astype(np.int32)
        dense = np.log(rng.integers(0, 100, (n, 13)) + 3.0).astype(np.float32)
        labels = ((sparse[:, 0] % 2 == 0) ^ (rng.random(n) < 0.1)).astype(np.int32)
        data.write_day(str(tmp_path / "criteo"), day, dense, sparse, labels)
    args = ["--criteo-dir", str(tmp_path / "criteo"), "--train-days", "0", "--eval-day", "1"]
    args += ["--batch-size", "256", "--steps", "8", "--epochs", "2", "--table-rows", "20000"]
    m, stdout = _run(tmp_path, args + ["--split-steps", "1"])
    assert m["planted_auc"] is None and "read + transferred" in stdout
    assert m["final_loss"] < m["first_loss"] and m["auc"] > 0.6, m


# ------------------------------------------------- the example's embedding side
def _dlrm_model():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import dlrm_model
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return dlrm_model


def test_pack_width():
    dm = _dlrm_model()
    assert dm.pack_width([1] * 26, 128) == 1
    p = dm.pack_width(data_sizes(), 128)
    assert 1 < p < 100  # neither one slot per id nor every bag padded to 100


def data_sizes():
    from sok_jax import data

    return data.MLPERF_MULTI_HOT_SIZES


def test_table_embedding_init_and_pooled_lookup():
    """The chunked table init is `layer.init` (the same vectors), the
    embedding side's `sok_jax.flax.ShardedEmbedding` starts from it, and the
    pooled lookup of packed multi-hot bags is the sum of each bag's rows."""
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    import jax
    from jax.sharding import Mesh

    from sok_jax import data, optim

    dm = _dlrm_model()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    feats = [
        data.SparseFeature("a", 37, 5),
        data.SparseFeature("b", 11, 1),
        data.SparseFeature("c", 50, 12),
    ]
    embed = dm.TableEmbedding(
        feats,
        8,
        mesh=mesh,
        axis_name="x",
        optimizer=optim.adagrad(0.1),
        pack=4,
        init_chunk_rows=3,
        capacity_factor=None,
    )
    assert embed.num_slots == 2 + 1 + 3 and embed.pack == 4
    state = embed.init_table(7)
    ref = embed.layer.init(7)
    np.testing.assert_array_equal(np.asarray(state.table), np.asarray(ref.table))
    emb = embed.init(7)
    module = embed.module(emb)
    np.testing.assert_array_equal(np.asarray(module.state.table), np.asarray(ref.table))

    rng = np.random.default_rng(0)
    n = 2 * len(jax.devices())
    sparse = {f.name: rng.integers(0, f.cardinality, (n, f.nnz)).astype(np.int32) for f in feats}
    sparse["c"][0, 3:] = -1  # a shorter bag
    pooled = jax.jit(lambda e, b: embed.apply(embed.module(e), b))(emb, sparse)
    table = embed.layer.logical_rows(state, np.arange(embed.total_rows))
    for k, (f, off) in enumerate(zip(feats, embed.offsets)):
        ids = sparse[f.name]
        want = np.stack([table[off + row[row >= 0]].sum(0) for row in ids])
        np.testing.assert_allclose(np.asarray(pooled[:, k]), want, rtol=1e-6, atol=1e-6)


def test_train_dlrm_trains_the_same_on_1x8_and_2x4(tmp_path):
    """The example under JAX's multi-controller runtime: 2 processes x 4 CPU
    devices (--coordinator on 127.0.0.1) train as 1 process x 8 devices."""
    for mod in ("optax", "flax", "tqdm"):
        pytest.importorskip(mod)
    args = ["--steps", "12", "--epochs", "2", "--batch-size", "256", "--table-rows", "20000"]
    args += ["--no-split"]
    one, _ = _run(tmp_path, args)
    out = tmp_path / "two.json"
    port = free_port()
    cmds = [
        [sys.executable, SCRIPT, *args, "--json", str(out), "--coordinator", f"127.0.0.1:{port}"]
        + ["--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]
    run_together(cmds, child_env(4), cwd=tmp_path)
    two = json.loads(out.read_text())
    assert two["processes"] == 2 and two["devices"] == one["devices"] == 8
    for k in ("first_loss", "final_loss", "eval_loss", "auc"):
        assert two[k] == pytest.approx(one[k], rel=1e-5), k


def test_int8_served_table_keeps_the_auc(tmp_path):
    """Issue 23's target: the briefly trained example served from an int8
    table (sok_jax.serving.quantize) within 0.002 held-out AUC of float32."""
    pytest.importorskip("optax")
    pytest.importorskip("flax")
    pytest.importorskip("tqdm")
    m, stdout = _run(
        tmp_path,
        ["--steps", "30", "--epochs", "2", "--batch-size", "256", "--table-rows", "20000",
         "--eval-batches", "8", "--embedding", "one-table", "--no-split",
         "--eval-quantized", "int8,bfloat16"],
    )
    assert m["auc"] > 0.7, m  # it learned
    for dtype, size in (("int8", 16 + 8), ("bfloat16", 2 * 16)):
        q = m["quantized"][dtype]
        assert abs(q["auc"] - m["auc"]) <= 0.002, (dtype, q, m["auc"])
        assert q["bytes_per_row"] == size
    assert "served int8: auc" in stdout
