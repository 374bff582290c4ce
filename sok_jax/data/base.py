"""The types every loader shares: a feature's description, a batch, and the
loader interface the training programs consume.

A batch is `Batch(dense, sparse, labels)`: float32 dense features [B, 13],
one int32 id array [B, nnz] per sparse feature (a dict keyed by feature
name, -1 = no key), float32 labels [B]. The per-feature dict is the batch
form of a many-tables embedding (`{feature: ids [B, max_nnz]}`); a one-table
layer offsets and stacks the arrays itself. Read the dict by name: a dict
that went through `jax.jit` comes back with its keys sorted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """One categorical feature: its name, how many distinct ids it has (its
    table's rows; ids lie in [0, cardinality)) and how many ids a sample has
    for it (`nnz`: 1 for one-hot, the bag size for multi-hot)."""

    name: str
    cardinality: int
    nnz: int = 1

    def __post_init__(self):
        if self.cardinality <= 0 or self.nnz <= 0:
            raise ValueError(
                f"feature {self.name!r}: cardinality and nnz must be positive, got "
                f"{self.cardinality} and {self.nnz}"
            )


class Batch(NamedTuple):
    """dense: float32 [B, num_dense]; sparse: {feature name: int32 [B, nnz]}
    (-1 = no key); labels: float32 [B] in {0, 1}."""

    dense: Any
    sparse: dict
    labels: Any


class Loader(Protocol):
    """What a training loop needs from a data source.

    `batch(step)` returns the global batch number `step` (`batch_size`
    samples). When `on_device` is True it is a pure function of `step` that
    may run inside `jax.jit` with a traced step (the synthetic generator);
    otherwise it returns host numpy arrays (a file reader) for the loop to
    `device_put`. `num_batches` is None for an endless source.
    """

    features: tuple[SparseFeature, ...]
    batch_size: int
    num_dense: int
    on_device: bool

    def batch(self, step) -> Batch: ...

    @property
    def num_batches(self) -> int | None: ...
