"""Synthetic Criteo-shaped batches made on the device, inside `jax.jit`.

`SyntheticCriteo.batch(step)` is a pure function of (seed, step): it draws
every id, dense feature and label of the batch with `jax.random` in one
jitted program, so a training step can generate its own batch at its own
rate and nothing crosses from the host.

* Ids: per feature a bounded power law P(rank r) ~ r^-alpha over its
  cardinality (continuous inverse CDF, with the low bits of a large rank
  filled in so that every rank is reachable), then a fixed affine bijection
  of [0, cardinality) per feature so that hot ids are spread over the table.
* Dense features: log(floor(x) + 3) of lognormal counts x (the preprocessed
  Criteo transform), with per-feature lognormal parameters.
* Labels: Bernoulli(sigmoid(planted logit)), the planted logit being a bias,
  plus per feature the mean over its bag of a per-id weight, plus a linear
  term of the standardized dense features. A per-id weight is a hash of
  (seed, feature, id) mapped to a uniform of the chosen standard deviation:
  computed on the device for any id, with no table of weights. The planted
  logit ranks samples as well as anything can (`planted_logits`), so its
  AUC is the ceiling a trained model approaches.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sok_jax.data.base import Batch, SparseFeature

_GOLDEN = 0x9E3779B1


def _mix32(x):
    """murmur3's 32-bit finalizer: a bijection of uint32 that mixes every bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _mix32_np(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def _unit(bits):
    """uint32 -> float32 uniform in [0, 1) from the top 24 bits."""
    return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _bijection(rng: np.random.Generator, n: int) -> tuple[int, int]:
    """(a, b) with k -> (a*k + b) mod n a bijection of [0, n) whose products
    stay below 2^32 (so it runs in uint32 on the device)."""
    if n <= 1:
        return 1, 0
    top = max(1, (2**32 - 1 - n) // n)
    lo = max(1, top // 2)
    for _ in range(1000):
        a = int(rng.integers(lo, top + 1))
        if math.gcd(a, n) == 1:
            return a, int(rng.integers(0, n))
    return 1, int(rng.integers(0, n))


class SyntheticCriteo:
    """Endless Criteo-shaped batches with a planted model (see the module
    docstring). Implements `sok_jax.data.Loader` on the device.

    Args:
      features: the sparse features (ids of feature k lie in
        [0, cardinality_k); every sample has nnz_k of them).
      batch_size: samples per batch.
      seed: everything (ids, dense, labels, the planted model) follows from it.
      alpha: the power-law exponent, one for all features or one per feature.
      num_dense: dense features (13 for Criteo).
      key_weight_std: standard deviation of an id's planted weight.
      dense_weight_std: standard deviation of a dense feature's planted weight.
      bias: the planted logit's constant.
    """

    on_device = True
    num_batches = None

    def __init__(
        self,
        features: Sequence[SparseFeature],
        batch_size: int,
        *,
        seed: int = 0,
        alpha: float | Sequence[float] = 1.1,
        num_dense: int = 13,
        key_weight_std: float = 0.5,
        dense_weight_std: float = 0.3,
        bias: float = -1.0,
    ):
        self.features = tuple(features)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_dense = int(num_dense)
        self.bias = float(bias)
        self.key_weight_std = float(key_weight_std)
        nf = len(self.features)
        alphas = [float(alpha)] * nf if np.ndim(alpha) == 0 else [float(a) for a in alpha]
        if len(alphas) != nf or min(alphas) <= 0:
            raise ValueError(f"alpha must be positive, one value or one per feature ({nf})")
        self.alphas = tuple(alphas)
        rng = np.random.default_rng([self.seed, 0x5EED])

        # Per column of the [B, sum(nnz)] id block: its feature's constants.
        col_feature = np.repeat(np.arange(nf), [f.nnz for f in self.features])
        card = np.array([f.cardinality for f in self.features], np.float64)
        a = np.array(alphas)
        one_minus = 1.0 - a
        is_log = np.abs(one_minus) < 1e-6  # alpha == 1: log-uniform ranks
        q = np.where(is_log, 0.0, np.power(card + 1.0, np.where(is_log, 1.0, one_minus)))
        bij = [_bijection(rng, f.cardinality) for f in self.features]
        salts = [
            _mix32_np((self.seed * 0x27D4EB2F + k * _GOLDEN + 1) & 0xFFFFFFFF) for k in range(nf)
        ]

        def per_col(values, dtype):
            return np.asarray(values, dtype)[col_feature]

        self._c_card = per_col(card, np.uint32)
        self._c_log_top = per_col(np.log(card + 1.0), np.float32)
        self._c_q1 = per_col(q - 1.0, np.float32)
        self._c_inv = per_col(
            np.where(is_log, 0.0, 1.0 / np.where(is_log, 1.0, one_minus)), np.float32
        )
        self._c_is_log = per_col(is_log, bool)
        self._c_a = per_col([b[0] for b in bij], np.uint32)
        self._c_b = per_col([b[1] for b in bij], np.uint32)
        self._salts = tuple(salts)
        self._splits = np.cumsum([f.nnz for f in self.features])[:-1]

        # Dense: lognormal counts per feature, standardized in the planted term
        # by moments measured once on a fixed host sample.
        self._mu = rng.uniform(0.0, 3.0, self.num_dense).astype(np.float32)
        self._sigma = rng.uniform(0.5, 2.0, self.num_dense).astype(np.float32)
        sample = np.log(
            np.floor(
                np.exp(self._mu + self._sigma * rng.standard_normal((1 << 16, self.num_dense)))
            )
            + 3.0
        )
        self._dense_mean = sample.mean(0).astype(np.float32)
        self._dense_std = (sample.std(0) + 1e-6).astype(np.float32)
        self._dense_w = rng.normal(0.0, dense_weight_std, self.num_dense).astype(np.float32)

    # ------------------------------------------------------------------ ids
    def _ids(self, key, batch: int):
        """int32 [batch, sum(nnz)]: every column's ids, drawn from its law."""
        cols = self._c_card.shape[0]
        bits = jax.random.bits(key, (batch, cols), jnp.uint32)
        u = _unit(bits)
        fill = (bits & jnp.uint32(0xFF)).astype(jnp.float32) * np.float32(2.0**-8)
        x_pow = jnp.exp(jnp.log1p(u * self._c_q1) * self._c_inv)
        x_log = jnp.exp(u * self._c_log_top)
        x = jnp.where(self._c_is_log, x_log, x_pow)  # in [1, cardinality + 1)
        # float32 holds a large rank only to its spacing: fill the low bits in.
        rank = jnp.floor(x) - 1.0 + jnp.floor(fill * jnp.maximum(jnp.spacing(x), 1.0))
        card = self._c_card
        rank = jnp.clip(rank, 0.0, (card - 1).astype(jnp.float32)).astype(jnp.uint32)
        return ((rank * self._c_a + self._c_b) % card).astype(jnp.int32)

    def _split(self, cols) -> dict:
        parts = jnp.split(cols, self._splits, axis=1) if len(self.features) > 1 else [cols]
        return {f.name: p for f, p in zip(self.features, parts)}

    # -------------------------------------------------------- planted model
    def key_weights(self, feature: int, ids):
        """The planted weight of each id (any int array) of feature number
        `feature`: a hash of (seed, feature, id) mapped to a uniform with
        standard deviation `key_weight_std`."""
        h = _mix32(ids.astype(jnp.uint32) * jnp.uint32(_GOLDEN) ^ jnp.uint32(self._salts[feature]))
        return (2.0 * _unit(h) - 1.0) * np.float32(self.key_weight_std * math.sqrt(3.0))

    def planted_logits(self, batch: Batch):
        """float32 [B]: the planted model's logit of each sample (the labels
        are Bernoulli draws of its sigmoid). Jit-able; padding ids (-1) are
        left out of their bag's mean."""
        logit = (
            self.bias
            + ((jnp.asarray(batch.dense) - self._dense_mean) / self._dense_std) @ self._dense_w
        )
        for k, f in enumerate(self.features):
            ids = jnp.asarray(batch.sparse[f.name])
            valid = ids >= 0
            w = jnp.where(valid, self.key_weights(k, jnp.maximum(ids, 0)), 0.0)
            logit = logit + w.sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1)
        return logit

    # --------------------------------------------------------------- batches
    def _make(self, split: int, step) -> Batch:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), split), step)
        k_ids, k_dense, k_label = jax.random.split(key, 3)
        b = self.batch_size
        sparse = self._split(self._ids(k_ids, b))
        z = jax.random.normal(k_dense, (b, self.num_dense), jnp.float32)
        dense = jnp.log(jnp.floor(jnp.exp(self._mu + self._sigma * z)) + 3.0)
        batch = Batch(dense, sparse, jnp.zeros((b,), jnp.float32))
        p = jax.nn.sigmoid(self.planted_logits(batch))
        labels = (jax.random.uniform(k_label, (b,)) < p).astype(jnp.float32)
        return batch._replace(labels=labels)

    def batch(self, step) -> Batch:
        """Training batch `step` (an int or a traced int32 scalar)."""
        return self._make(0, step)

    def eval_batch(self, index) -> Batch:
        """Held-out batch `index`: a stream disjoint from the training one."""
        return self._make(1, index)
