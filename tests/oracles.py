"""Independent oracles for the tests: random bags in a form-independent
layout and their conversion into each id form `sok_jax.embed` accepts, a
numpy brute force of the lookup and its gradients, numpy/optax optimizer
steps written from the published formulas, and tolerances.

None of it calls sok_jax's ops: the lookup oracle loops over bags in float64
on the same (possibly low-precision) table values, upcast.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sok_jax

COMBINERS = ("sum", "mean", "sqrtn")
FORMS = ("padded", "ragged", "bcoo")
KEY_DTYPES = ("int32", "uint32", "int64")
TABLE_DTYPES = ("float32", "bfloat16", "float16")

# (rtol, atol) per table dtype for values of magnitude ~1. float32 sees only
# reordering of float32 sums; the low-precision ones also a final rounding of
# the kernel's float32 accumulator, which may land one ulp away from the
# rounded float64 oracle.
TOL = {
    "float32": dict(rtol=1e-5, atol=1e-5),
    "bfloat16": dict(rtol=2e-2, atol=2e-2),
    "float16": dict(rtol=2e-3, atol=2e-3),
}


@contextlib.contextmanager
def x64_if(key_dtype: str):
    """Enables x64 for int64 keys (jax.experimental.enable_x64 where it
    exists, else the `jax.enable_x64` context of newer JAX)."""
    if key_dtype != "int64":
        yield
        return
    ctx = getattr(jax.experimental, "enable_x64", None)
    if ctx is not None:
        with ctx():
            yield
    else:
        with jax.enable_x64(True):
            yield


def pad_value(key_dtype: str) -> int:
    return 0xFFFFFFFF if key_dtype == "uint32" else -1


def oob_values(key_dtype: str, rows: int) -> list[int]:
    """Ids that are neither padding nor rows: skipped, and counted invalid."""
    if key_dtype == "int32":
        return [rows, rows + 5, -2, -(2**31)]
    if key_dtype == "uint32":
        # 0x80000001 is negative if misread as int32; 0xFFFFFFFE is not padding.
        return [rows, rows + 3, 0x80000001, 0xFFFFFFFE]
    # 2**32 + 1 aliases row 1 if truncated to 32 bits.
    return [rows, 2**32 + 1, -2, -(2**40)]


# --------------------------------------------------------------------------
# Form-independent bags.


@dataclasses.dataclass
class BagSet:
    """keys[b][s] is a list of python ints (valid, padding or out-of-range);
    weights[b][s] the matching float32 weights (None if unweighted)."""

    keys: list
    weights: list | None
    batch: int
    slots: int
    nnz: int
    rows: int
    key_dtype: str


def random_bags(
    rng: np.random.Generator,
    *,
    batch: int,
    slots: int,
    nnz: int,
    rows: int,
    key_dtype: str,
    weighted: bool,
    with_oob: bool = False,
    with_pad_keys: bool = True,
) -> BagSet:
    """Random bags with the awkward cases built in: the first bag is empty,
    the second all padding, the third (if weighted) has all-zero weights,
    keys repeat inside and across bags (rows is small), some bags are full."""
    pad = pad_value(key_dtype)
    oob = oob_values(key_dtype, rows)
    keys, weights = [], []
    for b in range(batch):
        krow, wrow = [], []
        for s in range(slots):
            i = b * slots + s
            if i == 0:
                n = 0
            elif i % 4 == 3:
                n = nnz
            else:
                n = int(rng.integers(0, nnz + 1))
            ks = [int(k) for k in rng.integers(0, rows, size=n)]
            if n >= 2 and rng.random() < 0.5:
                ks[-1] = ks[0]  # a duplicate inside the bag
            for j in range(n):
                u = rng.random()
                if with_pad_keys and u < 0.1:
                    ks[j] = pad
                elif with_oob and u < 0.25:
                    ks[j] = int(rng.choice(oob))
            if i == 1:
                ks = [pad] * nnz
            ws = [float(w) for w in rng.uniform(0.25, 1.5, size=len(ks)).astype(np.float32)]
            if i == 2:
                ws = [0.0] * len(ks)
            krow.append(ks)
            wrow.append(ws)
        keys.append(krow)
        weights.append(wrow)
    return BagSet(keys, weights if weighted else None, batch, slots, nnz, rows, key_dtype)


def _np_key_dtype(key_dtype: str):
    return np.dtype(key_dtype)


@dataclasses.dataclass
class Built:
    """One id form: what to pass to embed, and where each bag entry lives in
    the flat weights array of that form (for the weight gradient)."""

    ids: object
    weights: object  # array of the form's weight shape, or None
    slot_num: int | None
    positions: list  # positions[b][s][j] -> flat index into weights
    weight_shape: tuple


def build_form(bags: BagSet, form: str, rng: np.random.Generator) -> Built:
    kd = _np_key_dtype(bags.key_dtype)
    pad = pad_value(bags.key_dtype)
    B, S, nnz = bags.batch, bags.slots, bags.nnz
    # Garbage weights where no key is: must be ignored.
    positions = [[None] * S for _ in range(B)]
    if form == "padded":
        ids = np.full((B, S, nnz), pad, dtype=np.int64)
        w = rng.uniform(-3, 3, size=(B, S, nnz)).astype(np.float32)
        for b in range(B):
            for s in range(S):
                ks = bags.keys[b][s]
                # Keys at scattered slots, padding interleaved (not left-justified).
                cols = np.sort(rng.choice(nnz, size=len(ks), replace=False))
                positions[b][s] = [int((b * S + s) * nnz + c) for c in cols]
                for j, c in enumerate(cols):
                    ids[b, s, c] = ks[j]
                    if bags.weights is not None:
                        w[b, s, c] = bags.weights[b][s][j]
        return Built(
            ids.astype(kd), w if bags.weights is not None else None, None, positions, (B, S, nnz)
        )
    if form == "ragged":
        flat, wflat, lengths = [], [], np.zeros((B, S), np.int32)
        for b in range(B):
            for s in range(S):
                ks = bags.keys[b][s]
                positions[b][s] = list(range(len(flat), len(flat) + len(ks)))
                flat.extend(ks)
                wflat.extend(bags.weights[b][s] if bags.weights is not None else [0.0] * len(ks))
                lengths[b, s] = len(ks)
        # Unused capacity holding valid-looking and bad ids: ignored. The
        # capacity is fixed by (B, S, nnz) so that jit caches hit across seeds.
        extra = B * S * nnz + 7 - len(flat)
        filler = oob_values(bags.key_dtype, bags.rows)[:2]
        filler += [int(k) for k in rng.integers(0, bags.rows, size=extra - 2)]
        values = np.asarray(flat + filler, dtype=np.int64).astype(kd)
        w = np.asarray(wflat + list(rng.uniform(1, 2, size=extra)), np.float32)
        ids = sok_jax.RaggedIds.from_lengths(values, lengths)
        return Built(ids, w if bags.weights is not None else None, None, positions, w.shape)
    if form == "bcoo":
        from jax.experimental import sparse as jsparse

        data, idx, wd = [], [], []
        for b in range(B):
            for s in range(S):
                ks = bags.keys[b][s]
                cols = rng.choice(nnz, size=len(ks), replace=False)
                positions[b][s] = list(range(len(data), len(data) + len(ks)))
                for j, c in enumerate(cols):
                    data.append(ks[j])
                    idx.append((b * S + s, int(c)))
                    wd.append(bags.weights[b][s][j] if bags.weights is not None else 0.0)
        # BCOO-style padding entries (out-of-bounds indices): dropped. They
        # also fix nse at B*S*nnz + 3, so that jit caches hit across seeds.
        for _ in range(B * S * nnz + 3 - len(data)):
            data.append(int(rng.integers(0, bags.rows)))
            idx.append((B * S, nnz))
            wd.append(1.0)
        perm = rng.permutation(len(data))  # BCOO need not be sorted
        inv = np.argsort(perm)
        data = np.asarray(data, np.int64)[perm].astype(kd)
        idx = np.asarray(idx, np.int32)[perm]
        wd = np.asarray(wd, np.float32)[perm]
        positions = [[[int(inv[p]) for p in positions[b][s]] for s in range(S)] for b in range(B)]
        ids = jsparse.BCOO((jnp.asarray(data), jnp.asarray(idx)), shape=(B * S, nnz))
        return Built(ids, wd if bags.weights is not None else None, S, positions, wd.shape)
    raise AssertionError(form)


# --------------------------------------------------------------------------
# Numpy brute force.


def _bag_terms(bags: BagSet, b: int, s: int):
    """(entry index j, row, weight) of the valid entries of a bag."""
    out = []
    for j, k in enumerate(bags.keys[b][s]):
        if 0 <= k < bags.rows:  # padding and out-of-range ids are skipped
            w = 1.0 if bags.weights is None else float(bags.weights[b][s][j])
            out.append((j, k, w))
    return out


def _scale(combiner: str, ws) -> float:
    if combiner == "sum":
        return 1.0
    if combiner == "mean":
        t = float(np.sum(ws)) if ws else 0.0
        return 1.0 / t if t != 0 else 0.0
    t = float(np.sum(np.square(ws))) if ws else 0.0
    return 1.0 / np.sqrt(t) if t > 0 else 0.0


def np_embed(table, bags: BagSet, combiner: str) -> np.ndarray:
    """[B, S, D] float64 combine of the (float64-upcast) table."""
    t = np.asarray(table, np.float64)
    out = np.zeros((bags.batch, bags.slots, t.shape[1]))
    for b in range(bags.batch):
        for s in range(bags.slots):
            terms = _bag_terms(bags, b, s)
            f = _scale(combiner, [w for _, _, w in terms])
            for _, r, w in terms:
                out[b, s] += w * f * t[r]
    return out


def np_embed_grads(table, bags: BagSet, combiner: str, g, built: Built | None = None):
    """Gradients of sum(g * embed) w.r.t. the table and (if weighted) the
    weights of `built`'s form (zero where no valid key is)."""
    t = np.asarray(table, np.float64)
    g = np.asarray(g, np.float64)
    d_table = np.zeros_like(t)
    d_w = None
    if bags.weights is not None and built is not None:
        d_w = np.zeros(int(np.prod(built.weight_shape)))
    for b in range(bags.batch):
        for s in range(bags.slots):
            terms = _bag_terms(bags, b, s)
            ws = [w for _, _, w in terms]
            f = _scale(combiner, ws)
            gb = g[b, s]
            for _, r, w in terms:
                d_table[r] += gb * w * f
            if d_w is None or not terms:
                continue
            out_b = sum(w * f * t[r] for _, r, w in terms)
            for j, r, w in terms:
                gdot = float(gb @ t[r])
                if combiner == "sum":
                    dw = gdot
                elif combiner == "mean":
                    # out = S/W: d/dw_j = (e_j - out)/W
                    dw = (gdot - float(gb @ out_b)) * f if f else 0.0
                else:
                    # out = S/r, r = sqrt(sum w^2): d/dw_j = e_j/r - out w_j/r^2
                    dw = (gdot * f - float(gb @ out_b) * w * f * f) if f else 0.0
                d_w[built.positions[b][s][j]] += dw
    if d_w is not None:
        d_w = d_w.reshape(built.weight_shape)
    return d_table, d_w


def np_sparse_rows(bags: BagSet) -> np.ndarray:
    """The distinct valid rows any bag looks up, ascending."""
    rows = {k for brow in bags.keys for ks in brow for k in ks if 0 <= k < bags.rows}
    return np.asarray(sorted(rows), np.int64)


def np_count_invalid(bags: BagSet) -> int:
    pad = pad_value(bags.key_dtype)
    return sum(
        1 for brow in bags.keys for ks in brow for k in ks if k != pad and not 0 <= k < bags.rows
    )


def round_to(x, dtype_name: str) -> np.ndarray:
    """Rounds values through a (possibly low-precision) dtype, in numpy
    (ml_dtypes rounds to nearest even like XLA), back to float64."""
    return np.asarray(x, np.float32).astype(jnp.dtype(dtype_name)).astype(np.float64)


def random_table(rng, rows: int, dim: int, dtype_name: str):
    """A random table in `dtype_name`, and its exact values as float64."""
    t = rng.normal(size=(rows, dim)).astype(np.float32).astype(jnp.dtype(dtype_name))
    return jnp.asarray(t), t.astype(np.float64)


def assert_close(got, want, dtype_name: str, scale: float = 1.0, what: str = ""):
    tol = TOL[dtype_name]
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64),
        np.asarray(want, np.float64),
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        err_msg=what,
    )


# ---------------------------------------------------------------------------
# Oracles. Each takes the table (float32 numpy [R, D]), its slots (numpy), the
# touched rows, their gradients [n, D] and the step's hyperparameters, and
# returns new (table, slots), full size.
# ---------------------------------------------------------------------------


def dense_grad(rows, grads, shape):
    g = np.zeros(shape, np.float32)
    g[rows] = grads
    return g


def sgd_oracle(w, slots, rows, grads, lr, step, kw):
    opt = optax.sgd(lr)
    upd, _ = opt.update(jnp.asarray(dense_grad(rows, grads, w.shape)), opt.init(w))
    return np.asarray(optax.apply_updates(jnp.asarray(w), upd)), []


def adagrad_oracle(w, slots, rows, grads, lr, step, kw):
    opt = optax.adagrad(lr, eps=kw.get("eps", 1e-7))
    state = opt.init(jnp.asarray(w))
    state = (state[0]._replace(sum_of_squares=jnp.asarray(slots[0])),) + state[1:]
    upd, state = opt.update(jnp.asarray(dense_grad(rows, grads, w.shape)), state)
    return (
        np.asarray(optax.apply_updates(jnp.asarray(w), upd)),
        [np.asarray(state[0].sum_of_squares)],
    )


def rowwise_adagrad_oracle(w, slots, rows, grads, lr, step, kw):
    eps = kw.get("eps", 1e-7)
    w = w.astype(np.float64)
    acc = slots[0].astype(np.float64).reshape(-1)
    g = grads.astype(np.float64)
    acc[rows] += np.mean(g * g, axis=1)
    a = acc[rows][:, None]
    scale = np.where(a > 0, 1.0 / np.sqrt(a + eps), 0.0)
    w[rows] -= lr * g * scale
    return w, [acc.reshape(slots[0].shape)]


def adam_oracle(w, slots, rows, grads, lr, step, kw):
    """LazyAdam (Kingma & Ba, on the touched rows only)."""
    b1, b2 = kw.get("b1", 0.9), kw.get("b2", 0.999)
    eps, eps_root = kw.get("eps", 1e-8), kw.get("eps_root", 0.0)
    w, m, v = (x.astype(np.float64) for x in (w, *slots))
    g = grads.astype(np.float64)
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    m_hat = m[rows] / (1 - b1**step)
    v_hat = v[rows] / (1 - b2**step)
    w[rows] -= lr * m_hat / (np.sqrt(v_hat + eps_root) + eps)
    return w, [m, v]


def ftrl_oracle(w, slots, rows, grads, lr, step, kw):
    """TF's ApplyFtrlV2 (McMahan et al. 2013), sign form, plus Keras' beta."""
    lrp = kw.get("learning_rate_power", -0.5)
    l1 = kw.get("l1_regularization_strength", 0.0)
    l2 = kw.get("l2_regularization_strength", 0.0)
    shrink = kw.get("l2_shrinkage_regularization_strength", 0.0)
    beta = kw.get("beta", 0.0)
    w, n, z = (x.astype(np.float64) for x in (w, *slots))
    g = grads.astype(np.float64)
    wr, nr, zr = w[rows], n[rows], z[rows]
    g_shr = g + 2 * shrink * wr
    n_new = nr + g * g
    sigma = (n_new ** (-lrp) - nr ** (-lrp)) / lr
    zr = zr + g_shr - sigma * wr
    quad = n_new ** (-lrp) / lr + 2 * (l2 + beta / (2 * lr))
    w[rows] = np.where(np.abs(zr) > l1, (np.sign(zr) * l1 - zr) / quad, 0.0)
    n[rows] = n_new
    z[rows] = zr
    return w, [n, z]


def acc_slot(rng, shape):
    """A random accumulator slot, with some exact zeros."""
    a = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    a[rng.random(shape) < 0.1] = 0.0  # exercises the acc > 0 guard
    return a


def bits(x):
    """The raw bits of an array of 2- or 4-byte floats."""
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


# --------------------------------------------------------------------------
# Hash tables: the insertion rule of xla_ffi/hash_math.h from its definition,
# on Python ints (no sok_jax code).

_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1
BUCKET_SLOTS = 16
FOUND, INSERTED, MISSING, FULL, NOT_ADMITTED, PADDING = range(6)


def _fmix32(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _mix64(z: int) -> int:
    z &= _M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def py_order_word(key: int, wide: bool) -> int:
    """The claim order of a key (wide: int64 keys)."""
    return _mix64(key) if wide else _fmix32(key)


def py_hash_word(key: int, wide: bool) -> int:
    o = py_order_word(key, wide)
    return o >> 32 if wide else o


def py_num_buckets(capacity: int) -> int:
    return -(-capacity // BUCKET_SLOTS)


def py_bucket(word: int, n: int) -> int:
    return (word * n) >> 32


def py_bucket_slots(b: int, capacity: int) -> range:
    nb = py_num_buckets(capacity)
    return range(b * capacity // nb, (b + 1) * capacity // nb)


def py_home(key: int, capacity: int, wide: bool) -> int:
    return py_bucket(py_hash_word(key, wide), py_num_buckets(capacity))


def py_sketch_cells(key: int, depth: int, width: int, wide: bool) -> list[int]:
    o = py_order_word(key, wide)
    out = []
    for h in range(depth):
        if wide:
            w = _mix64((o + (h + 1) * 0x9E3779B97F4A7C15) & _M64) >> 32
        else:
            w = _fmix32((o + (h + 1) * 0x9E3779B9) & _M32)
        out.append(h * width + py_bucket(w, width))
    return out


class HashShardOracle:
    """One hash shard under the rule, on Python lists: slots (EMPTY = None),
    per-row last_seen and count, the admission sketch. `call` is one
    find-or-insert call and returns (rows, is_new, evicted, status) per
    position, evicted None where no key was evicted."""

    def __init__(self, capacity, wide, policy=None, admit_after=0, depth=1, width=0):
        self.capacity, self.wide = capacity, wide
        self.policy, self.admit_after = policy, admit_after
        self.depth, self.width = depth, width
        self.slots = [None] * capacity
        self.last_seen = [0] * capacity
        self.count = [0] * capacity
        self.sketch = [0] * (depth * width)

    @property
    def nb(self):
        return py_num_buckets(self.capacity)

    def home(self, key):
        return py_home(key, self.capacity, self.wide)

    def find(self, key):
        b = self.home(key)
        for _ in range(self.nb):
            slots = py_bucket_slots(b, self.capacity)
            for s in slots:
                if self.slots[s] == key:
                    return s
            if self.policy is not None or None in [self.slots[s] for s in slots]:
                return -1
            b = (b + 1) % self.nb
        return -1

    def estimate(self, key):
        return min(self.sketch[c] for c in py_sketch_cells(key, self.depth, self.width, self.wide))

    def call(self, keys, insert, step, padding=None):
        n = len(keys)
        rows, is_new, evicted, status = [-1] * n, [0] * n, [None] * n, [PADDING] * n
        misses = {}  # key -> its positions, in order
        stamped = set()
        for i, k in enumerate(keys):
            if k == padding:
                continue
            r = self.find(k)
            if r >= 0:
                rows[i], status[i] = r, FOUND
                if insert and r not in stamped:
                    stamped.add(r)
                    self.last_seen[r] = step
                    self.count[r] += 1
            elif insert:
                misses.setdefault(k, []).append(i)
            else:
                status[i] = MISSING
        if not insert:
            return rows, is_new, evicted, status
        new = sorted(misses, key=lambda k: py_order_word(k, self.wide))
        admitted = {k: True for k in new}
        init = {k: 1 for k in new}
        if self.admit_after:
            for k in new:
                for c in py_sketch_cells(k, self.depth, self.width, self.wide):
                    self.sketch[c] += 1
            for k in new:
                init[k] = self.estimate(k)
                admitted[k] = init[k] >= self.admit_after
        placed = {}

        def place(k, r, old):
            self.slots[r] = k
            self.last_seen[r], self.count[r] = step, init[k]
            placed[k] = r
            first = misses[k][0]
            is_new[first] = 1
            evicted[first] = old

        leftover = []
        by_bucket = {}
        for k in new:
            if admitted[k]:
                by_bucket.setdefault(self.home(k), []).append(k)
        for b, ks in by_bucket.items():
            slots = list(py_bucket_slots(b, self.capacity))
            free = [s for s in slots if self.slots[s] is None]
            score = self.last_seen if self.policy == "lru" else self.count
            victims = sorted(
                (s for s in slots if self.slots[s] is not None and self.last_seen[s] != step),
                key=lambda s: (score[s], self.slots[s]),
            )
            for k in ks:
                if free:
                    place(k, free.pop(0), None)
                elif self.policy is not None and victims:
                    s = victims.pop(0)
                    place(k, s, self.slots[s])
                elif self.policy is None:
                    leftover.append(k)
        for k in sorted(leftover, key=lambda k: py_order_word(k, self.wide)):
            b = self.home(k)
            for _ in range(self.nb - 1):
                b = (b + 1) % self.nb
                free = [s for s in py_bucket_slots(b, self.capacity) if self.slots[s] is None]
                if free:
                    place(k, free[0], None)
                    break
        for k, ps in misses.items():
            for i in ps:
                if k in placed:
                    rows[i], status[i] = placed[k], INSERTED
                else:
                    status[i] = FULL if admitted[k] else NOT_ADMITTED
        return rows, is_new, evicted, status
