"""The placement planner of `EmbeddingCollection`: per table, "row",
"table" or "replicated", chosen from a cost model and packed into storage
units.

Cost model (bytes one device sends per training step, and bytes it holds):
  * a table's keys per step: its features' max_nnz summed, times the local
    batch b; its rows R, its dim D; each key sent as 4 bytes (8 for int64
    hash keys), each vector as D table-dtype values, each cotangent as D
    float32 values;
  * "row": one bucket per destination of C = ceil(c * b * keys / n) keys
    (c = capacity_factor; all the keys when None), at most the R / n rows a
    destination holds (direct mode); the device sends (n - 1) buckets:
    (n - 1) * C * (key + vector + cotangent). Holds R / n rows.
  * "table": the table's keys all go to its one device, so tables on
    different devices share buckets: a column of up to n tables sends
    (n - 1) * C * (key + vector + cotangent) with C the largest member's
    bucket (ceil(c * b * keys), at most its R), shared by its members.
    Holds R rows on one device.
  * "replicated": no exchange forward; the backward sums the gradients over
    the replicas: a dense psum of R rows, 2 (n - 1) / n * R * (4 + 4 D), or
    where that is larger a gather of every device's touched rows,
    (n - 1) * b * keys * (4 + 4 D). Holds R rows on every device.
  Memory counts the table and its optimizer slots (one float32 [R, D] slot
  unless the table's optimizer says otherwise).
"auto" replicates a table that fits in `replicate_bytes` when that sends
fewer bytes than "row"; otherwise it takes "table" when that sends fewer
bytes and the table fits on one device, else "row". Hash tables default to
"row". Table-wise tables are packed into columns of up to n (same dim,
dtype, mode, initializer and optimizer), the largest together, each column's
members spread over the least loaded devices. A table can be pinned with
`TableSpec.placement`; the logical tables never depend on the plan.

Storage (`TableSpec.storage`, `storage.py`): a table in host memory takes
no HBM for its rows ("host") or only its cache ("host_cached": cache_rows
rows with their slots, plus 4 bytes per row of the slot map and 12 per cache
row); it gets a unit (and a column) of its own and is never replicated
("auto" takes "row"). With an `hbm_budget`, tables whose storage is None
are offloaded while the HBM a device holds exceeds it: each becomes
"host_cached" with a cache of `OFFLOAD_CACHE_FRACTION` of its rows (at least
the rows two lookups can bring to a device, so that a step may prefetch the
next batch), cheapest first. The cost of
offloading a table is the host-link traffic it adds per byte of HBM it
frees: its keys per step x its row bytes (with slots) x the expected miss
rate (1 - the cache fraction, as for uniform keys), over its table bytes x
(1 - the cache fraction): tables read rarely for their size go first, as
TorchRec's offload proposer ranks by the cost of the cache misses. The plan
says what it offloaded and why.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from sok_jax.distributed import storage as storage_tiers

DEFAULT_MEMORY = 16 << 30  # planning budget when the device does not report one
REPLICATE_BYTES = 16 << 20
# The local batch the costs assume when the collection is given no batch_size.
DEFAULT_BATCH_PER_DEVICE = 16384
OFFLOAD_CACHE_FRACTION = 0.2  # TorchRec's default cache_load_factor


@dataclasses.dataclass(frozen=True)
class TablePlan:
    """One table's placement: its unit (storage array), the devices that
    hold it, the rows and bytes (table + slots) it takes on each of them,
    and the bytes a device sends for it per training step (estimated)."""

    table: str
    placement: str
    unit: str
    devices: tuple
    rows_per_device: int
    bytes_per_device: int
    exchange_bytes: int
    pinned: bool
    storage: str = "hbm"
    cache_rows: int | None = None
    host_bytes_per_device: int = 0


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """A storage array: its placement, its member tables (a column: the
    table on each device, or None) and the rows it holds per device."""

    name: str
    placement: str
    members: tuple
    rows_per_device: int
    storage: object = None  # the unit's tier (storage.py); None: HBM


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's choices (`print(plan)` shows them): per table its
    placement and costs, the storage units, and the global `batch_size` the
    bytes sent per step assume."""

    tables: tuple
    units: tuple
    num_devices: int
    batch_size: int
    memory_per_device: tuple
    exchange_bytes: int
    row_wise_exchange_bytes: int
    host_memory_per_device: tuple = ()
    offloaded: tuple = ()  # one sentence per table the budget offloaded
    hbm_budget: int | None = None

    def table(self, name: str) -> TablePlan:
        for t in self.tables:
            if t.table == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        size = _size
        rows = [
            ("table", "placement", "devices", "rows/device", "storage", "HBM/device",
             "host/device", "sent/step")
        ]
        for t in self.tables:
            devs = "all" if len(t.devices) == self.num_devices else ",".join(map(str, t.devices))
            pin = " (pinned)" if t.pinned else ""
            where = t.storage if t.cache_rows is None else f"{t.storage} ({t.cache_rows:,} rows)"
            rows.append(
                (
                    t.table,
                    t.placement + pin,
                    devs,
                    f"{t.rows_per_device:,}",
                    where,
                    size(t.bytes_per_device),
                    size(t.host_bytes_per_device),
                    size(t.exchange_bytes),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        mem = ", ".join(size(m) for m in self.memory_per_device)
        ratio = self.exchange_bytes / max(self.row_wise_exchange_bytes, 1)
        lines.append(f"{self.num_devices} device(s); HBM memory per device: {mem}")
        lines.append(
            f"sent per device per step: {size(self.exchange_bytes)} "
            f"({ratio:.2f}x of all row-wise {size(self.row_wise_exchange_bytes)}) "
            f"at a global batch of {self.batch_size:,}"
        )
        lines.append(
            "(the batch the costs assume: EmbeddingCollection(batch_size=...), default "
            f"{DEFAULT_BATCH_PER_DEVICE:,} per device; the layer takes any batch)"
        )
        if any(self.host_memory_per_device):
            host = ", ".join(size(m) for m in self.host_memory_per_device)
            lines.append(f"host memory per device: {host}")
        if self.hbm_budget is not None:
            lines.append(f"HBM budget per device: {size(self.hbm_budget)}")
        lines += list(self.offloaded)
        return "\n".join(lines)


def _size(b) -> str:
    """Bytes in the largest binary unit under 1024 of it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _key_bytes(spec) -> int:
    return 8 if spec.use_hashtable and spec.key_dtype.itemsize == 8 else 4


def _per_key_bytes(spec) -> int:
    """Bytes crossing per bucket slot: the key, its vector, its cotangent."""
    return _key_bytes(spec) + spec.embedding_dim * (spec.dtype.itemsize + 4)


def _row_bucket(spec, keys: int, n: int, cf) -> int:
    c = keys if cf is None else min(max(math.ceil(cf * keys / n), 1), keys)
    return c if spec.use_hashtable else min(c, math.ceil(spec.vocabulary_size / n))


def _table_bucket(spec, keys: int, cf) -> int:
    c = keys if cf is None else min(max(math.ceil(cf * keys), 1), keys)
    return c if spec.use_hashtable else min(c, spec.vocabulary_size)


def row_exchange_bytes(spec, keys: int, n: int, cf) -> int:
    return (n - 1) * _row_bucket(spec, keys, n, cf) * _per_key_bytes(spec)


def replicated_exchange_bytes(spec, keys: int, n: int) -> int:
    """The backward's sum over replicas: a dense psum of [R, D] (and a
    touched count per row), or a gather of every device's touched rows,
    whichever is smaller (as the exchange chooses)."""
    row = 4 + 4 * spec.embedding_dim
    rows = spec.vocabulary_size
    if rows < n * keys // 2:
        return 2 * (n - 1) * rows * row // n
    return (n - 1) * keys * row


def _column_key(spec, optimizer, tier=None):
    init = spec.initializer if isinstance(spec.initializer, str) else id(spec.initializer)
    return (
        tier,
        spec.embedding_dim,
        str(spec.dtype),
        spec.use_hashtable,
        str(spec.key_dtype),
        init,
        id(optimizer),
        getattr(spec, "online", None),
    )


def device_memory() -> int:
    """Bytes of the first device, where it says (GPUs), else DEFAULT_MEMORY."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    return int(stats.get("bytes_limit", DEFAULT_MEMORY))


def make_plan(
    specs: dict,
    keys_per_sample: dict,
    *,
    num_devices: int,
    batch_size: int,
    capacity_factor=None,
    memory_per_device: int | None = None,
    slot_bytes_per_row: dict,
    replicate_bytes: int = REPLICATE_BYTES,
    hbm_budget: int | None = None,
) -> Plan:
    """The placement of every table (see the module docstring).

    Args:
      specs: {name: TableSpec}, in the collection's order.
      keys_per_sample: {table: its features' max_nnz summed}.
      num_devices: n, the devices of the axis.
      batch_size: the global batch the costs assume.
      capacity_factor: the collection's.
      memory_per_device: bytes each device may hold (default: the device's).
      slot_bytes_per_row: {table: bytes of its optimizer slots per row}.
      replicate_bytes: the largest table (with slots) "auto" replicates.
      hbm_budget: bytes of HBM each device may give the tables; tables whose
        storage is None are offloaded to host memory until they fit (see the
        module docstring). None: no offloading.

    Raises:
      ValueError: the tables do not fit the devices' memory (or the budget).
    """
    n = num_devices
    b = max(batch_size // n, 1)
    budget = hbm_budget or memory_per_device or device_memory()
    # None: in HBM, which the budget may change; a tier: as the spec says.
    tiers = {name: specs[name].tier if specs[name].storage is not None else None for name in specs}

    def tiered(name):
        return tiers[name] is not None and tiers[name].kind != "hbm"

    def row_bytes(name):
        s = specs[name]
        return s.row_bytes + slot_bytes_per_row[name]

    def hbm_bytes(name, rows):
        """HBM a device gives a table of which it holds `rows` rows."""
        tier = tiers[name]
        if not tiered(name):
            return rows * row_bytes(name)
        if not tier.cached:
            return 0
        return tier.cache_rows * (row_bytes(name) + 12) + 4 * rows

    def host_bytes(name, rows):
        return rows * row_bytes(name) if tiered(name) else 0

    def costs_of(name):
        """{placement: bytes sent per step} of the placements "auto" may take."""
        s = specs[name]
        keys = b * keys_per_sample[name]
        table_bytes = s.vocabulary_size * row_bytes(name)
        costs = {"row": row_exchange_bytes(s, keys, n, capacity_factor)}
        if table_bytes <= replicate_bytes:
            costs["replicated"] = replicated_exchange_bytes(s, keys, n)
        if table_bytes <= budget // 2:  # its share of a full column
            bucket = _table_bucket(s, keys, capacity_factor)
            costs["table"] = bucket * _per_key_bytes(s) * (n - 1) // n
        return costs

    def best(costs):
        return min(costs, key=lambda p: (costs[p], p != "row"))

    def choose(name):
        s = specs[name]
        if s.placement != "auto":
            return s.placement
        if n == 1 or s.use_hashtable or tiered(name):
            return "row"
        return best(costs_of(name))

    def held(name, p):
        v = specs[name].vocabulary_size
        return math.ceil(v / n) if p == "row" else v

    placement = {name: choose(name) for name in specs}
    load = np.zeros(n, np.int64)
    host_load = np.zeros(n, np.int64)
    for name, p in placement.items():
        if p in ("row", "replicated"):
            load += hbm_bytes(name, held(name, p))
            host_load += host_bytes(name, held(name, p))

    def bucket(m):
        return _table_bucket(specs[m], b * keys_per_sample[m], capacity_factor)

    def column_cost(names):
        width = max(bucket(m) for m in names)
        return (n - 1) * width * max(_per_key_bytes(specs[m]) for m in names)

    def others(m):
        return {p: c for p, c in costs_of(m).items() if p != "table"}

    # Columns of table-wise tables: those of the largest buckets together, n
    # at most each. A member whose share of its column's bytes exceeds what
    # its best other placement sends takes that instead (pinned ones stay).
    def column_key(name):
        return _column_key(specs[name], specs[name].optimizer, tiers[name] if tiered(name) else None)

    groups = {}
    for name in sorted(
        (t for t, p in placement.items() if p == "table"), key=lambda t: (-bucket(t), t)
    ):
        groups.setdefault(column_key(name), []).append(name)
    chunks = [members[i : i + n] for members in groups.values() for i in range(0, len(members), n)]
    settled = []
    while chunks:
        chunk = chunks.pop()
        share = column_cost(chunk) / len(chunk)
        leave = [
            m for m in chunk if specs[m].placement == "auto" and min(others(m).values()) <= share
        ]
        if not leave:
            settled.append(chunk)
            continue
        worst = max(leave, key=lambda m: (-min(others(m).values()), m))
        placement[worst] = best(others(worst))
        load += hbm_bytes(worst, held(worst, placement[worst]))
        host_load += host_bytes(worst, held(worst, placement[worst]))
        rest = [m for m in chunk if m != worst]
        if rest:
            chunks.append(rest)
    columns = []
    for chunk in settled:
        slots = [None] * n
        for name in chunk:  # the largest first, onto the least loaded device
            d = min((d for d in range(n) if slots[d] is None), key=lambda d: (load[d], d))
            slots[d] = name
            load[d] += hbm_bytes(name, specs[name].vocabulary_size)
            host_load[d] += host_bytes(name, specs[name].vocabulary_size)
        columns.append(tuple(slots))

    # Offload row-wise tables to host memory while the HBM budget is exceeded.
    offloaded = []

    def offload_cost(name):
        """(added host-link bytes per step per HBM byte freed, the cache)."""
        r = held(name, "row")
        cap = n * _row_bucket(specs[name], b * keys_per_sample[name], n, capacity_factor)
        cache = max(math.ceil(OFFLOAD_CACHE_FRACTION * r), min(2 * cap, r))  # room to prefetch
        if cache >= r:  # two lookups may touch every row: a cache cannot help
            return None
        f = cache / r
        traffic = b * keys_per_sample[name] * row_bytes(name) * 2 * (1 - f)
        return traffic / max(r * row_bytes(name) * (1 - f), 1), cache

    while hbm_budget is not None and load.max(initial=0) > hbm_budget:
        candidates = {
            t: offload_cost(t)
            for t, p in placement.items()
            if p == "row" and tiers[t] is None and offload_cost(t) is not None
        }
        if not candidates:
            break
        name = min(candidates, key=lambda t: (candidates[t][0], t))
        cost, cache = candidates[name]
        r = held(name, "row")
        before = hbm_bytes(name, r)
        tiers[name] = storage_tiers.CachedStorage(cache, "lru")
        load += hbm_bytes(name, r) - before
        host_load += host_bytes(name, r)
        offloaded.append(
            f"offloaded {name!r} to host memory behind an LRU cache of {cache:,} rows per "
            f"device ({cache / r:.0%}): it frees {_size(before - hbm_bytes(name, r))} of HBM per "
            f"device at the lowest expected miss traffic per byte freed ({cost:.3g}) of the "
            "tables left in HBM"
        )
    if load.max(initial=0) > budget:
        raise ValueError(
            f"the tables do not fit: per device {load.tolist()} bytes of HBM (tables and "
            f"optimizer slots) against a budget of {budget}; pin large tables to "
            "placement='row', give them storage='host_cached', pass hbm_budget= to offload "
            "them, or pass memory_per_device"
        )

    units, tables = [], {}
    taken = set(specs)

    def unit_name(prefix, k):
        name = f"{prefix}_{k}"
        while name in taken:
            name = "_" + name
        taken.add(name)
        return name

    # Row-wise direct tables of one kind share one array (a unit of several
    # members, each its own block of rows per device): one plan, one lookup
    # and one update for all of them. On several devices only those whose
    # bucket the rows a destination holds do not clamp: a shared bucket
    # holds the sum of its members' keys, so a clamped table keeps a unit
    # (and a bucket) of its own. The packed sort key (owner, local row) must
    # stay below 2^31, which caps a group's rows.
    def groupable(name):
        s = specs[name]
        if s.use_hashtable or tiered(name):
            return False
        keys = b * keys_per_sample[name]
        free = keys if capacity_factor is None else math.ceil(capacity_factor * keys / n)
        return n == 1 or _row_bucket(s, keys, n, capacity_factor) >= min(free, keys)

    groups = {}
    for name, p in placement.items():
        if p == "row" and groupable(name):
            groups.setdefault(column_key(name), []).append(name)
    row_units = []
    for members in groups.values():
        chunk, rows = [], 0
        for m in members:
            r = math.ceil(specs[m].vocabulary_size / n)
            if chunk and n * (rows + r) >= (1 << 31) - 1:
                row_units.append((tuple(chunk), rows))
                chunk, rows = [], 0
            chunk.append(m)
            rows += r
        row_units.append((tuple(chunk), rows))
    for k, (members, rows) in enumerate(row_units):
        name = members[0] if len(members) == 1 else unit_name("row_wise", k)
        units.append(UnitPlan(name, "row", members, rows))
    unit_of = {m: u.name for u in units for m in u.members}
    for name, p in placement.items():
        if p == "table":
            continue
        s = specs[name]
        rows = s.vocabulary_size if p == "replicated" else math.ceil(s.vocabulary_size / n)
        if name not in unit_of:  # hash or host row-wise, replicated: a unit of its own
            units.append(UnitPlan(name, p, (name,), rows, tiers[name] if tiered(name) else None))
            unit_of[name] = name
        keys = b * keys_per_sample[name]
        sent = (
            replicated_exchange_bytes(s, keys, n)
            if p == "replicated"
            else row_exchange_bytes(s, keys, n, capacity_factor)
        )
        if n == 1:
            sent = 0
        devices = tuple(range(n))
        tables[name] = _table_plan(
            name, p, unit_of[name], devices, rows, hbm_bytes(name, rows), sent,
            s.placement != "auto", tiers[name], host_bytes(name, rows),
        )
    for k, members in enumerate(columns):
        unit = unit_name("table_wise", k)
        names = [m for m in members if m is not None]
        rows = max(specs[m].vocabulary_size for m in names)
        tier = tiers[names[0]] if tiered(names[0]) else None
        units.append(UnitPlan(unit, "table", members, rows, tier))
        keys = {m: b * keys_per_sample[m] for m in names}
        width = max(_table_bucket(specs[m], keys[m], capacity_factor) for m in names)
        sent = (n - 1) * width * max(_per_key_bytes(specs[m]) for m in names) if n > 1 else 0
        for d, m in enumerate(members):
            if m is None:
                continue
            v = specs[m].vocabulary_size
            tables[m] = _table_plan(
                m, "table", unit, (d,), v, hbm_bytes(m, v), sent // len(names),
                specs[m].placement != "auto", tiers[m], host_bytes(m, v),
            )
    ordered = tuple(tables[name] for name in specs)
    row_wise = (
        sum(row_exchange_bytes(specs[t], b * keys_per_sample[t], n, capacity_factor) for t in specs)
        if n > 1
        else 0
    )
    return Plan(
        ordered,
        tuple(units),
        n,
        batch_size,
        tuple(int(x) for x in load),
        sum(t.exchange_bytes for t in ordered),
        row_wise,
        tuple(int(x) for x in host_load),
        tuple(offloaded),
        hbm_budget,
    )


def _table_plan(name, p, unit, devices, rows, hbm, sent, pinned, tier, host) -> TablePlan:
    kind = "hbm" if tier is None else tier.kind
    cache = tier.cache_rows if kind == "host_cached" else None
    return TablePlan(name, p, unit, devices, rows, hbm, sent, pinned, kind, cache, host)
