#!/usr/bin/env bash
# One lent-GPU session: build from the checkout, run the tests on the GPU,
# then the benchmarks named in $BENCH (space separated script names, with
# their flags in BENCH_ARGS_<name>). SANITIZE_KERNELS=1 runs every FFI target
# under compute-sanitizer (tools/sanitize_kernels.py, one small
# process). PROFILE=1 runs Nsight Compute on tools/profile_lookup.py.
# Logs go under $OUT (default ./gpu_out).
#   OUT=/tmp/o BENCH="bench_lookup" bash tools/gpu_session.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/session.log"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/session.log"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/session.log"
# The device copy's git metadata can lag the copied tree: also print a hash
# of the sources, to tie results to a commit (compare with the same command
# run on the checkout).
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit (git metadata) /' | tee -a "$OUT/session.log"
cat CMakeLists.txt xla_ffi/* sok_jax/*.py sok_jax/ops/*.py | sha1sum | sed 's/^/sources sha1 /' | tee -a "$OUT/session.log"

log "build"
SOK_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
  $PY -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
# Benchmarks import the checkout: put the built modules beside its sources.
pkg=$(cd / && $PY -c "import sok_jax, os; print(os.path.dirname(sok_jax.__file__))")
cp "$pkg"/_sok_*.so sok_jax/
(cd / && $PY -c "import sok_jax; assert sok_jax.has_cuda(); print('cuda targets ok')") 2>&1 | tee -a "$OUT/session.log"

if [ -n "${TESTS:-}" ]; then
  log "tests: $TESTS"
  timeout ${TEST_TIMEOUT:-240} pytest -q ${PYTEST_ARGS:-} $TESTS -p no:cacheprovider > "$OUT/tests.log" 2>&1
  echo "tests exit $?" >> "$OUT/tests.log"; tail -15 "$OUT/tests.log"
fi
if [ -n "${TESTS2:-}" ]; then
  log "tests: $TESTS2"
  timeout ${TEST_TIMEOUT:-240} pytest -q $TESTS2 -p no:cacheprovider > "$OUT/tests2.log" 2>&1
  echo "tests exit $?" >> "$OUT/tests2.log"; tail -15 "$OUT/tests2.log"
fi
if [ -n "${SANITIZE:-}" ]; then
  log "compute-sanitizer memcheck: $SANITIZE"
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout ${SAN_TIMEOUT:-200} \
    compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
    $PY -m pytest -q -x -p no:cacheprovider $SANITIZE > "$OUT/sanitizer.log" 2>&1
  echo "sanitizer exit $?" | tee -a "$OUT/sanitizer.log"; grep -E "^=========|passed|failed" "$OUT/sanitizer.log" | head -20
fi
if [ -n "${SANITIZE_KERNELS:-}" ]; then
  k=${SAN_SHARDS:-4}
  log "compute-sanitizer memcheck: tools/sanitize_kernels.py in $k parallel shards"
  # A shard whose process crashes on the host (seen: segfaults of the Python
  # process under the sanitizer, at random cases, with 0 errors reported) is
  # run again, up to 3 times; 99 (an error found) is never retried.
  san_shard() {
    local i=$1 a rc
    for a in 1 2 3; do
      XLA_FLAGS=--xla_gpu_autotune_level=0 timeout ${SAN_TIMEOUT:-300} \
        compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
        $PY tools/sanitize_kernels.py --shard $i/$k > "$OUT/sanitize_kernels.$i.log" 2>&1
      rc=$?
      echo "shard $i attempt $a exit $rc" >> "$OUT/session.log"
      [ $rc -eq 0 ] || [ $rc -eq 99 ] || [ $rc -eq 124 ] && return $rc
    done
    return $rc
  }
  # At most SAN_PAR shards at once (all 8 at once crashed every shard), each
  # on the next GPU when there are several.
  ngpu=$(nvidia-smi -L | wc -l)
  rc=0
  for i in $(seq 0 $((k - 1))); do
    CUDA_VISIBLE_DEVICES=$((i % ngpu)) san_shard $i &
    if [ $(jobs -rp | wc -l) -ge ${SAN_PAR:-4} ]; then wait -n || rc=$?; fi
  done
  for j in $(jobs -p); do wait $j || rc=$?; done
  echo "sanitizer exit (last nonzero) $rc" | tee -a "$OUT/session.log"
  tail -q -n 1 "$OUT"/sanitize_kernels.*.log | tee -a "$OUT/session.log"
  grep -hE "^=========|FAIL" "$OUT"/sanitize_kernels.*.log | head -20
  cat "$OUT"/sanitize_kernels.*.log | grep -c "^ok" | sed 's/^/sanitizer ok lines: /' | tee -a "$OUT/session.log"
  # One file back instead of k (the device tool returns a limited number).
  for i in $(seq 0 $((k - 1))); do
    echo "#### shard $i"; cat "$OUT/sanitize_kernels.$i.log"; rm -f "$OUT/sanitize_kernels.$i.log"
  done > "$OUT/sanitize_kernels.log"
fi
if [ -n "${PROFILE:-}" ]; then
  # PROFILE_SCRIPT (default profile_lookup.py) under ncu with PROFILE_NCU
  # (default: the forward kernels' speed-of-light sections). For the train
  # step: PROFILE_SCRIPT=profile_train_step.py PROFILE_NCU="--profile-from-start off
  # --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv"
  # (summarized by tools/ncu_summary.py).
  ps=${PROFILE_SCRIPT:-profile_lookup.py}
  log "ncu: tools/$ps ${PROFILE_ARGS:-}"
  timeout ${PROFILE_TIMEOUT:-150} ncu ${PROFILE_NCU:---kernel-name regex:'EmbedFwd|gather' --launch-count ${PROFILE_LAUNCHES:-12} \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats} \
    $PY tools/$ps ${PROFILE_ARGS:-} > "$OUT/ncu.log" 2>&1
  echo "ncu exit $?" | tee -a "$OUT/ncu.log"
  if grep -q '^"ID"' "$OUT/ncu.log"; then
    $PY tools/ncu_summary.py "$OUT/ncu.log" | tee "$OUT/ncu_summary.log" | tail -60
  else
    grep -E "EmbedFwd|gather|Duration|DRAM Throughput|Achieved Occupancy|Registers Per" "$OUT/ncu.log" | head -60
  fi
fi
for b in ${BENCH:-}; do
  var="BENCH_ARGS_$b"
  log "bench $b ${!var:-}"
  # JAX's default preallocation for the benchmarks (one allocator region):
  # in growth mode (PREALLOCATE=false, kept for the tests and the parallel
  # sanitizer shards) the 20 GiB Adam step ran out of memory on an H100.
  XLA_PYTHON_CLIENT_PREALLOCATE=${BENCH_PREALLOCATE:-true} \
    timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/$b.py ${!var:-} --out "$OUT/$b.json" 2>&1 | tee "$OUT/$b.log" | tail -40
done
log "done"
