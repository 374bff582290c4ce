"""MLPerf Training's DLRM-DCNv2, as `examples/train_dlrm.py --model dcnv2
--preset NAME` runs it (benchmarks/bench_dlrm.py takes its sizes and
hyperparameters from here too).

* `mlperf`: the benchmark as the mlcommons reference runs it
  (mlcommons/training `recommendation_v2/torchrec_dlrm`, README "Running the
  MLPerf DLRM v2 benchmark"): multi-hot bags of MLPerf's sizes (214 ids per
  sample), tables trained by exact, per-element Adagrad, batch 65536, an
  evaluation every 0.05 of the run. The tables and their Adagrad
  accumulators are bfloat16 written by stochastic rounding (the math in
  float32), so that the full model's state (26.1 G parameters, 104.7 GB)
  fits one H200; in float32 it would take 209 GB.
* `mlperf-onehot`: the same model with one id per feature and row-wise
  Adagrad on float32 tables (one accumulator per row): what `mlperf` meant
  before it followed the reference, kept for comparison with earlier runs.

The hyperparameters, and where each comes from:

* lr 0.005 for tables and dense part alike, no warm-up or decay
  (`--learning_rate 0.005`, `--lr_warmup_steps 0`, `--lr_decay_*` 0 in the
  reference's command);
* the tables: `apply_optimizer_in_backward(torch.optim.Adagrad, ..., {"lr":
  lr})`, which TorchRec maps to FBGEMM's EXACT_ADAGRAD with FBGEMM's
  defaults for the rest: eps 1e-8 (`SplitTableBatchedEmbeddingBagsCodegen`'s
  `eps: float = 1.0e-8`) and a zero-filled float32 accumulator
  (`momentum1`, `torch.zeros`);
* the dense part: `torch.optim.Adagrad(lr, lr_decay=0, weight_decay=0,
  initial_accumulator_value=0, eps=1e-10)` (dlrm_main.py's ADAGRAD_*
  constants);
* the model: bottom MLP 512-256-128, DCN with 3 layers of rank 512, top MLP
  1024-1024-512-256-1, D 128 (`--dense_arch_layer_sizes`,
  `--dcn_num_layers`, `--dcn_low_rank_dim`, `--over_arch_layer_sizes`,
  `--embedding_dim`); tables of the Criteo 1TB cardinalities capped at 40M
  rows (`--num_embeddings_per_feature`, `sok_jax.data.MLPERF_CARDINALITIES`);
* evaluation every TOTAL_TRAINING_SAMPLES / (GLOBAL_BATCH_SIZE * 20) steps of
  its one epoch (`--validation_freq_within_epoch`): every 0.05 of the run.

FBGEMM and torch add eps outside the square root, `g / (sqrt(acc) + eps)`;
sok_jax's sparse Adagrads and optax's add it inside, `g / sqrt(acc + eps)`.
`eps_inside(eps)` = eps**2 makes the two denominators equal at acc = 0 and
for acc >> eps**2, and at most sqrt(2) apart in between (at acc = eps**2).
"""

from __future__ import annotations

import dataclasses

from sok_jax import data

MLPERF_LR = 0.005  # --learning_rate
TABLE_EPS = 1e-8  # FBGEMM EXACT_ADAGRAD's default eps (outside the square root)
DENSE_EPS = 1e-10  # dlrm_main.py ADAGRAD_EPS (torch.optim.Adagrad: outside)
INITIAL_ACCUMULATOR = 0.0  # dlrm_main.py ADAGRAD_INIT_ACC; FBGEMM's momentum1 starts at zeros
EVAL_FRACTION = 0.05  # --validation_freq_within_epoch = samples / (batch * 20), one epoch
H200_BYTES = 141e9  # NVIDIA H200's HBM3e (datasheet): the card a preset's state must fit


def eps_inside(eps_outside: float) -> float:
    """The eps of `g / sqrt(acc + eps)` (sok_jax, optax) that stands for the
    eps of `g / (sqrt(acc) + eps)` (FBGEMM, torch): see the module docstring."""
    return eps_outside**2


@dataclasses.dataclass(frozen=True)
class Preset:
    """A DCNv2 configuration: the tables and their training, the dense model,
    the batch and the evaluation schedule. Optimizer eps are in sok_jax's and
    optax's form (inside the square root)."""

    multi_hot: bool  # MLPerf's bag sizes (data.MLPERF_MULTI_HOT_SIZES), else one id each
    table_optimizer: str  # a sok_jax.optim.by_name name
    table_dtype: str  # the tables' storage dtype
    slot_dtype: str  # the storage dtype of the tables' optimizer slots
    stochastic_rounding: bool  # 16-bit tables' and slots' updates written by stochastic rounding
    cardinalities: tuple = dataclasses.field(default=data.MLPERF_CARDINALITIES, repr=False)
    dim: int = 128
    bottom: tuple = (512, 256, 128)
    top: tuple = (1024, 1024, 512, 256, 1)
    cross_layers: int = 3
    cross_rank: int = 512
    batch_size: int = 65536
    lr: float = MLPERF_LR
    initial_accumulator_value: float = INITIAL_ACCUMULATOR
    table_eps: float = eps_inside(TABLE_EPS)
    dense_eps: float = eps_inside(DENSE_EPS)
    eval_fraction: float = EVAL_FRACTION

    def shapes(self) -> dict:
        """The dense model's sizes (`dlrm_model.DCNv2`'s keywords)."""
        return dict(
            bottom=self.bottom,
            top=self.top,
            cross_layers=self.cross_layers,
            cross_rank=self.cross_rank,
        )


PRESETS = {
    "mlperf": Preset(
        multi_hot=True,
        table_optimizer="adagrad",
        table_dtype="bfloat16",
        slot_dtype="bfloat16",
        stochastic_rounding=True,
    ),
    "mlperf-onehot": Preset(
        multi_hot=False,
        table_optimizer="rowwise_adagrad",
        table_dtype="float32",
        slot_dtype="float32",
        stochastic_rounding=False,
    ),
}
