#!/usr/bin/env bash
# One lent-GPU session in one call: build the checkout, then run what the
# variables below name, each part only when its variable is set.
#
# The build goes into a folder of its own with `pip install --target`, never
# an editable install (an editable install's import hook answers every
# `import sok_jax`, whatever PYTHONPATH says, which would break an A/B), and
# every program runs with PYTHONPATH=<that folder> from an empty working
# directory, so the source folder sok_jax/ (no compiled modules) is never
# imported in its place.
#
#   TESTS="tests -n 4"     pytest arguments; words starting with "tests" are
#                          taken relative to the repository. PYTEST_ARGS: more.
#   SANITIZE_DRIVER=1      tools/sanitize/run.sh (if it exists), with OUT, REPO,
#                          PY and PYTHONPATH set, from the empty directory.
#   SANITIZE_KERNELS=1     tools/sanitize_kernels.py under compute-sanitizer
#                          memcheck, in SAN_SHARDS shards, SAN_PAR at once.
#   PROFILE=1              ncu on tools/$PROFILE_SCRIPT (profile_lookup.py)
#                          with PROFILE_ARGS and PROFILE_NCU (ncu's flags).
#   BENCH="bench_lookup"   benchmarks/<name>.py with BENCH_ARGS_<name>, JSON
#                          to <name>.json.
#   TOOL="profile_host_cache.py --trace --dist zipf"
#                          tools/<script> with its arguments, against the
#                          build (several: separated by ";"), each cut at
#                          TOOL_TIMEOUT (200 s); output in tools.log.
#   AB=.ab_base            a second source tree (tools/make_ab_base.sh makes
#                          it; carry it), built the same way; then each bench
#                          of AB_BENCH (bench_lookup bench_train_step) runs
#                          AB_ROUNDS (2) times against each build, alternately
#                          (new, base, new, base: drift hits both), with
#                          AB_ARGS_<name>, and tools/ab_table.py prints
#                          new/base per point beside the run-to-run noise.
#                          Each run is cut at AB_TIMEOUT (150 s); run the A/B
#                          alone in a call: the defaults are sized for about
#                          6 minutes on one H200.
#   CPU=1                  no GPU: SOK_CUDA=OFF, JAX on the CPU, tiny A/B
#                          defaults: a smoke test of this script.
#   BUDGET=570             seconds for the whole call; a part that would start
#                          with less than 30 s left is skipped, reported.
#
# A build is kept for the next call on the same (warm) machine while the
# sources hash (--sha1) is unchanged: a second call right after the first
# skips the build.
#
# Logs and JSON go under $OUT (default ./gpu_out): session.log (all that is
# printed), summary.txt, ab_table.txt, and results.tar (every other log and
# JSON, added as each part ends: the device returns at most 8 files).
#   OUT=/tmp/o TESTS=tests BENCH=bench_lookup bash tools/gpu_session.sh
#   bash tools/gpu_session.sh --sha1 [dir]   the sources hash of a tree, here
set -uo pipefail
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}

sources_sha1() {  # the hash printed for each build: compare with --sha1 on a checkout
  (cd "$1" && find CMakeLists.txt pyproject.toml xla_ffi sok_jax -type f \
      ! -path '*/__pycache__/*' ! -name '*.so' ! -name '*.pyc' 2>/dev/null \
    | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12)
}
if [ "${1:-}" = "--sha1" ]; then sources_sha1 "${2:-$REPO}"; exit; fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUN=$(mktemp -d)             # the working directory of every program
SITE_NEW=${SITE_NEW:-/tmp/site_new}
SITE_BASE=${SITE_BASE:-/tmp/site_base}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "${CPU:-}" ]; then
  export JAX_PLATFORMS=cpu
  BUILD_ENV=(SOK_CUDA=OFF)
else
  BUILD_ENV=(SOK_CUDA=ON CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90)
fi
SUMMARY=()

exec > >(tee -a "$OUT/session.log") 2>&1
log() { echo "== $(date -u +%H:%M:%S) [$(($(date +%s) - START)) s] $*"; }
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - START) )); }
note() { SUMMARY+=("$(printf '%-34s %s' "$1" "$2")"); }  # a row of the closing summary
stash() {  # moves files of $OUT into results.tar
  local f
  for f in "$@"; do
    [ -e "$OUT/$f" ] || continue
    tar -rf "$OUT/results.tar" -C "$OUT" "$f" && rm -rf "${OUT:?}/$f"
  done
}
# pyrun SITE SECONDS ARGS...: "$PY" ARGS against the build in SITE, from
# $RUN, under a timeout.
pyrun() {
  local site=$1 t=$2
  shift 2
  (cd "$RUN" && PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout "$t" "$PY" "$@")
}
# A part's timeout: the smaller of $1 and what is left less a margin (>= 10).
limit() {
  local t=$(( $(left) - 20 ))
  [ "$1" -lt "$t" ] && t=$1
  [ "$t" -lt 10 ] && t=10
  echo "$t"
}
enough() { [ "$(left)" -ge 30 ] || { log "skipped (time): $1"; note "$1" "skipped: $(left) s left"; return 1; }; }

build() {  # build SRC SITE NAME: pip --target, checked to import from SITE
  local src=$1 site=$2 name=$3 rc sha
  sha=$(sources_sha1 "$src")${CPU:+-cpu}  # the build mode too
  if [ "$(cat "$site/.sources_sha1" 2>/dev/null)" = "$sha" ]; then  # a warm machine's build
    echo "build $name: $site already holds sources $sha, kept" | tee "$OUT/build_$name.log"
    return 0
  fi
  rm -rf "$site"
  (cd "$src" && env "${BUILD_ENV[@]}" "$PY" -m pip install --no-build-isolation --no-deps -q \
      --target "$site" .) > "$OUT/build_$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then tail -40 "$OUT/build_$name.log"; return $rc; fi
  pyrun "$site" 120 - "$site" "${CPU:-}" <<'EOF' 2>&1 | tee -a "$OUT/build_$name.log"
import os, sys
import sok_jax
site, cpu = os.path.realpath(sys.argv[1]), sys.argv[2]
assert sok_jax.__file__, f"no sok_jax/__init__.py under {site}: the wheel left the Python files out"
where = os.path.realpath(sok_jax.__file__)
assert where.startswith(site + os.sep), f"sok_jax imported from {where}, not from {site}"
assert cpu or sok_jax.has_cuda(), "built without the CUDA targets"
print(f"sok_jax from {os.path.dirname(where)}, CUDA targets: {sok_jax.has_cuda()}")
EOF
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] && echo "$sha" > "$site/.sources_sha1"
  return "$rc"
}

# ------------------------------------------------------------------ machine
log "machine"
if [ -n "${CPU:-}" ]; then
  echo "CPU mode: $(uname -srm), $(nproc) cores"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
(cd "$RUN" && "$PY" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())")
# The device copy's git metadata can lag the copied tree: the sources hash
# ties a result to a commit (compare with `gpu_session.sh --sha1` there).
echo "commit (git metadata, may lag the tree): $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null | cut -c1-100)"
echo "library sources sha1 new: $(sources_sha1 "$REPO")"
if [ -n "${AB:-}" ]; then
  AB_DIR=$(cd "$REPO" && cd "$AB" 2>/dev/null && pwd) || { echo "AB=$AB: no such folder"; exit 2; }
  # make_ab_base.sh puts the tree in tree/; a bare `git archive | tar -x` in AB itself
  AB_SRC=$AB_DIR/tree
  [ -f "$AB_SRC/pyproject.toml" ] || AB_SRC=$AB_DIR
  echo "library sources sha1 base: $(sources_sha1 "$AB_SRC") ($AB_SRC; $(cat "$AB_DIR/AB_COMMIT" 2>/dev/null || echo 'no AB_COMMIT'))"
fi

# ------------------------------------------------------------------ build
log "build new${AB:+ and base, in parallel}"
t0=$(date +%s)
build "$REPO" "$SITE_NEW" new & pid_new=$!
if [ -n "${AB:-}" ]; then build "$AB_SRC" "$SITE_BASE" base & pid_base=$!; fi
wait $pid_new; rc_new=$?
note "build new" "exit $rc_new, $(($(date +%s) - t0)) s"
if [ -n "${AB:-}" ]; then
  wait $pid_base; rc_base=$?
  note "build base" "exit $rc_base, $(($(date +%s) - t0)) s"
else
  rc_base=0
fi
stash build_new.log build_base.log
if [ $rc_new -ne 0 ]; then log "build failed"; printf '%s\n' "${SUMMARY[@]}"; exit 1; fi

# ------------------------------------------------------------------ tests
if [ -n "${TESTS:-}" ] && enough tests; then
  args=()
  for w in $TESTS ${PYTEST_ARGS:-}; do
    case $w in tests|tests/*) args+=("$REPO/$w") ;; *) args+=("$w") ;; esac
  done
  log "tests: ${args[*]}"
  pyrun "$SITE_NEW" "$(limit "${TEST_TIMEOUT:-400}")" -m pytest -q -p no:cacheprovider "${args[@]}" \
    > "$OUT/tests.log" 2>&1
  rc=$?
  tail -15 "$OUT/tests.log"
  note "tests" "exit $rc: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1 | cut -c1-80)"
  stash tests.log
fi

# ------------------------------------------------------------------ sanitizer
if [ -n "${SANITIZE_DRIVER:-}" ] && enough "sanitizer driver"; then
  drv=$REPO/tools/sanitize/run.sh
  if [ -f "$drv" ]; then
    log "sanitizer driver: $drv"
    (cd "$RUN" && OUT=$OUT REPO=$REPO PY=$PY PYTHONPATH="$SITE_NEW${PYTHONPATH:+:$PYTHONPATH}" \
      timeout "$(limit "${SAN_TIMEOUT:-400}")" bash "$drv")
    rc=$?
    note "sanitizer driver" "exit $rc"
  else
    log "sanitizer driver: $drv does not exist in this tree"
    note "sanitizer driver" "missing: tools/sanitize/run.sh"
  fi
fi
if [ -n "${SANITIZE_KERNELS:-}" ] && enough "sanitize_kernels"; then
  k=${SAN_SHARDS:-4}
  log "compute-sanitizer memcheck: tools/sanitize_kernels.py in $k shards, ${SAN_PAR:-4} at once"
  san_t=$(limit "${SAN_TIMEOUT:-300}")
  # A shard whose Python process dies on the host without a sanitizer error
  # (exit status other than 0, 99 = an error found, 124 = timeout) is run
  # again, up to 3 times; one that reports an error is never retried.
  san_shard() {
    local i=$1 a rc
    for a in 1 2 3; do
      (cd "$RUN" && PYTHONPATH="$SITE_NEW${PYTHONPATH:+:$PYTHONPATH}" \
        XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$san_t" \
        compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
        "$PY" "$REPO/tools/sanitize_kernels.py" --shard "$i/$k") > "$OUT/sanitize_kernels.$i.log" 2>&1
      rc=$?
      echo "shard $i attempt $a exit $rc"
      if [ $rc -eq 0 ] || [ $rc -eq 99 ] || [ $rc -eq 124 ]; then return $rc; fi
    done
    return $rc
  }
  # At most SAN_PAR shards at once (too many sanitized processes at once
  # crash on the host), each on the next GPU where there are several.
  ngpu=$(nvidia-smi -L | wc -l)
  rc=0
  for i in $(seq 0 $((k - 1))); do
    CUDA_VISIBLE_DEVICES=$((i % ngpu)) san_shard "$i" &
    if [ "$(jobs -rp | wc -l)" -ge "${SAN_PAR:-4}" ]; then wait -n || rc=$?; fi
  done
  for j in $(jobs -rp); do wait "$j" || rc=$?; done
  for i in $(seq 0 $((k - 1))); do
    f=$OUT/sanitize_kernels.$i.log
    echo "shard $i: $(grep -m1 'ERROR SUMMARY' "$f" || echo 'no sanitizer summary');" \
      "$(grep -E '^[0-9]+ failed' "$f" | tail -1)"
  done
  grep -hE "^========= (Invalid|Program hit|Error)|^FAIL" "$OUT"/sanitize_kernels.*.log | head -20
  oks=$(cat "$OUT"/sanitize_kernels.*.log | grep -c "^ok")
  clean=$(cat "$OUT"/sanitize_kernels.*.log | grep -c "ERROR SUMMARY: 0 errors")
  note "sanitize_kernels" "last nonzero exit $rc; $clean/$k shards 0 errors; $oks checks ok"
  for i in $(seq 0 $((k - 1))); do
    echo "#### shard $i"; cat "$OUT/sanitize_kernels.$i.log"; rm -f "$OUT/sanitize_kernels.$i.log"
  done > "$OUT/sanitize_kernels.log"
  stash sanitize_kernels.log
fi

# ------------------------------------------------------------------ profile
if [ -n "${PROFILE:-}" ] && enough profile; then
  # For the train step: PROFILE_SCRIPT=profile_train_step.py PROFILE_NCU="--profile-from-start
  # off --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv"
  # (then summarized by tools/ncu_summary.py).
  ps=${PROFILE_SCRIPT:-profile_lookup.py}
  log "ncu: tools/$ps ${PROFILE_ARGS:-}"
  # shellcheck disable=SC2086
  (cd "$RUN" && PYTHONPATH="$SITE_NEW${PYTHONPATH:+:$PYTHONPATH}" \
    timeout "$(limit "${PROFILE_TIMEOUT:-150}")" ncu --clock-control none \
    ${PROFILE_NCU:---kernel-name regex:'EmbedFwd|gather' --launch-count ${PROFILE_LAUNCHES:-12} \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats} \
    "$PY" "$REPO/tools/$ps" ${PROFILE_ARGS:-}) > "$OUT/ncu.log" 2>&1
  rc=$?
  if grep -q '^"ID"' "$OUT/ncu.log"; then
    "$PY" "$REPO/tools/ncu_summary.py" "$OUT/ncu.log" > "$OUT/ncu_summary.log"
    tail -60 "$OUT/ncu_summary.log"
  else
    grep -E "EmbedFwd|gather|Duration|DRAM Throughput|Achieved Occupancy|Registers Per" "$OUT/ncu.log" | head -60
  fi
  note "profile $ps" "ncu exit $rc"
  stash ncu.log ncu_summary.log
fi

# ------------------------------------------------------------------ benchmarks
# run_bench NAME SITE JSON SECONDS ARGS...: one benchmark run; its exit status.
run_bench() {
  local name=$1 site=$2 json=$3 t=$4; shift 4
  # JAX's default preallocation (one allocator region): in growth mode
  # (kept for the tests and the parallel sanitizer shards) the allocator
  # can fail a large step whose arrays fit the card.
  XLA_PYTHON_CLIENT_PREALLOCATE=${BENCH_PREALLOCATE:-true} \
    pyrun "$site" "$(limit "$t")" "$REPO/benchmarks/$name.py" "$@" --out "$json"
}
bench_line() {  # the closing line of a benchmark's log ("N points ok, M failed, T s")
  grep -E "points ok" "$1" | tail -1 | cut -c1-70 | grep . || echo "$(grep -c FAILED "$1") lines with FAILED"
}
for b in ${BENCH:-}; do
  enough "bench $b" || continue
  var="BENCH_ARGS_$b"
  log "bench $b ${!var:-}"
  # shellcheck disable=SC2086
  run_bench "$b" "$SITE_NEW" "$OUT/$b.json" "${BENCH_TIMEOUT:-300}" ${!var:-} > "$OUT/$b.log" 2>&1
  rc=$?
  tail -40 "$OUT/$b.log"
  note "bench $b" "exit $rc: $(bench_line "$OUT/$b.log")"
  stash "$b.log" "$b.json"
done

# ------------------------------------------------------------------ tools
IFS=';' read -ra TOOL_CMDS <<< "${TOOL:-}"
for t in "${TOOL_CMDS[@]}"; do
  read -ra words <<< "$t"
  [ "${#words[@]}" -gt 0 ] || continue
  enough "tool ${words[0]}" || continue
  log "tool $t"
  pyrun "$SITE_NEW" "$(limit "${TOOL_TIMEOUT:-200}")" "$REPO/tools/${words[0]}" "${words[@]:1}" \
    > "$OUT/tool.log" 2>&1
  rc=$?
  tail -60 "$OUT/tool.log"
  cat "$OUT/tool.log" >> "$OUT/tools.log" && rm -f "$OUT/tool.log"
  note "tool ${words[0]}" "exit $rc"
done
stash tools.log

# ------------------------------------------------------------------ A/B
if [ -n "${AB:-}" ] && [ "$rc_base" -ne 0 ]; then
  log "A/B skipped: the base build failed"
  note "A/B" "skipped: base build failed (build_base.log)"
elif [ -n "${AB:-}" ]; then
  # Quick defaults: one or two representative sizes, so that both builds x
  # AB_ROUNDS x both benches fit in about 6 minutes on one H200.
  if [ -n "${CPU:-}" ]; then
    : "${AB_ARGS_bench_lookup=--small --dims 16,128 --nnz 1 --dists uniform}"
    : "${AB_ARGS_bench_train_step=--small --devices 1 --optimizers sgd}"
  else
    : "${AB_ARGS_bench_lookup=--table-gb 4 --batch 16384 --slots 26 --dims 128 --nnz 1,32 --dists uniform --iters 10 --warmup 2 --copy-gb 1}"
    : "${AB_ARGS_bench_train_step=--devices 1 --table-gb 4 --batch 16384 --slots 26 --dim 128 --optimizers sgd,adam --iters 10 --warmup 2 --copy-gb 1}"
  fi
  mkdir -p "$OUT/ab"
  for b in ${AB_BENCH:-bench_lookup bench_train_step}; do
    var="AB_ARGS_$b"
    log "A/B $b ${!var:-}"
    for r in $(seq 1 "${AB_ROUNDS:-2}"); do
      for side in new base; do
        enough "A/B $b $side $r" || continue
        site=$SITE_NEW; [ $side = base ] && site=$SITE_BASE
        t1=$(date +%s)
        # shellcheck disable=SC2086
        run_bench "$b" "$site" "$OUT/ab/$b.$side.$r.json" "${AB_TIMEOUT:-150}" ${!var:-} \
          > "$OUT/ab/$b.$side.$r.log" 2>&1
        rc=$?
        echo "$b $side round $r: exit $rc, $(($(date +%s) - t1)) s, $(bench_line "$OUT/ab/$b.$side.$r.log")"
        [ $rc -eq 0 ] || tail -5 "$OUT/ab/$b.$side.$r.log"
      done
    done
  done
  "$PY" "$REPO/tools/ab_table.py" "$OUT/ab" --out "$OUT/ab_table.txt" > /dev/null
  note "A/B" "ab_table.txt; runs in results.tar (ab/)"
  stash ab
fi

# ------------------------------------------------------------------ summary
{
  [ -f "$OUT/ab_table.txt" ] && cat "$OUT/ab_table.txt" && echo
  echo "== summary ($(($(date +%s) - START)) s; logs and JSON in results.tar under $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
rm -rf "$RUN"
