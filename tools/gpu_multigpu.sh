#!/usr/bin/env bash
# One multi-GPU session in one device call (<= 10 min): build (gpu_session.sh),
# run diag_multigpu.py over every case, then, with the XLA/JAX settings of the
# first variant under which the full grad program compiles and runs, the
# distributed tests and (time left) bench_distributed. Logs under $OUT.
#   OUT=/tmp/o bash benchmarks/gpu_multigpu.sh
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - START) )); }

if [ -z "${SKIP_BUILD:-}" ]; then
  OUT=$OUT bash benchmarks/gpu_session.sh || exit 1
fi
python3 benchmarks/diag_multigpu.py --variants default ${DIAG_CASES:+--cases $DIAG_CASES} 2>&1 | tee "$OUT/diag.log"
crashed=$(grep -oP '^\[default\] \K[a-z_0-9]+(?=: rc=-11)' "$OUT/diag.log" | paste -sd, -)
if [ -n "$crashed" ]; then
  python3 benchmarks/diag_multigpu.py --variants no_shardy --cases "$crashed" 2>&1 | tee -a "$OUT/diag.log"
fi
variant=
if grep -q "^\[default\] grad_ffi: rc=0" "$OUT/diag.log"; then
  variant=default
else
  python3 benchmarks/diag_multigpu.py --cases embed_bwd,grad_ffi \
    --variants ${VARIANTS:-no_lhs,no_cmdbuf,no_shardy,autotune0} \
    --dump ${DUMP_CASE:-embed_bwd} --gdb ${GDB_CASE:-embed_bwd} 2>&1 | tee -a "$OUT/diag.log"
  variant=$(grep -oP '^\[\K[a-z_0-9]+(?=\] grad_ffi: rc=0)' "$OUT/diag.log" | head -1)
fi
echo "== working variant: ${variant:-none} ($(left) s left)" | tee -a "$OUT/diag.log"
[ -z "$variant" ] && exit 0
envs=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import diag_multigpu as d; print(' '.join(f'{k}={v}' for k, v in d.VARIANTS['$variant'].items()))")
t=$(( $(left) - ${BENCH_RESERVE:-150} ))
if [ "$t" -gt 30 ]; then
  echo "== tests under [$variant] with ${t}s" | tee -a "$OUT/diag.log"
  env $envs timeout $t pytest -q --maxfail=5 -p no:cacheprovider ${TESTS:-tests/test_distributed.py tests/test_hash_distributed.py} \
    > "$OUT/tests_multi.log" 2>&1
  echo "tests exit $?" >> "$OUT/tests_multi.log"; tail -8 "$OUT/tests_multi.log"
fi
t=$(( $(left) - 10 ))
if [ "$t" -gt 30 ] && [ -n "${BENCH_ARGS:-}" ]; then
  echo "== bench_distributed $BENCH_ARGS under [$variant] with ${t}s" | tee -a "$OUT/diag.log"
  env $envs timeout $t python3 benchmarks/bench_distributed.py $BENCH_ARGS --out "$OUT/bench_distributed.json" \
    2>&1 | tee "$OUT/bench_distributed.log" | tail -40
fi
t=$(( $(left) - 5 ))
if [ "$t" -gt 30 ] && [ -n "${POST:-}" ]; then
  echo "== post: $POST under [$variant] with ${t}s" | tee -a "$OUT/diag.log"
  env $envs timeout $t bash -c "$POST" 2>&1 | tee "$OUT/post.log" | tail -40
fi
