#!/usr/bin/env bash
# Builds tools/sanitize's driver (sok_sanitize: the real CPU and CUDA FFI
# handlers, no XLA, no Python) and runs it under compute-sanitizer:
#   plain      the driver alone: CPU vs brute force, CUDA vs CPU
#   memcheck   every target, every case (--leak-check full)
#   racecheck  the targets whose kernels use shared memory: cub's sort,
#              run-length and scan in the backward (sok_embed_bwd,
#              sok_embed_bwd_dense, sok_embed_bwd_update), cub's partition
#              and sort and the overflow kernel of the hash insertion
#              (sok_hash_find_or_insert; grep __shared__ xla_ffi/); the
#              row movers (sok_rows_gather, _scatter, _copy) use none
#   synccheck  every target (the kernels' __shfl_sync / __ballot_sync masks)
# Logs go to $OUT (default ./sanitize_out); the last lines printed are one
# summary per tool. Exit status: 0 when every tool ran clean and the driver
# passed, 1 otherwise.
#
#   tools/sanitize/run.sh                 # from the repository root
#   TOOLS="memcheck" STRIDE=2 tools/sanitize/run.sh
#
# Environment: OUT, BUILD (default build/sanitize), TOOLS (default
# "plain memcheck racecheck synccheck"), STRIDE (every STRIDE-th case under
# memcheck and synccheck, default 1), RACE_STRIDE (the same for racecheck,
# default 3: its cases are the cub-heavy backward ones), PYTHON (the python3
# whose jax gives the XLA FFI headers), CUDA_ARCH (default 90), LIMIT_S
# (seconds each tool may run, default 240; a tool cut off says how far it
# got).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$PWD/sanitize_out}"
BUILD="${BUILD:-$ROOT/build/sanitize}"
TOOLS="${TOOLS:-plain memcheck racecheck synccheck}"
STRIDE="${STRIDE:-1}"
RACE_STRIDE="${RACE_STRIDE:-3}"
PYTHON="${PYTHON:-$(command -v python3)}"
CUDA_ARCH="${CUDA_ARCH:-90}"
LIMIT_S="${LIMIT_S:-240}"
RACE_TARGETS="sok_embed_bwd,sok_hash"  # the three backward targets and the hash one
mkdir -p "$OUT"

echo "== build ($BUILD)"
if ! { cmake -S "$ROOT/tools/sanitize" -B "$BUILD" -G Ninja \
         -DSOK_SANITIZE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
         -DPython_EXECUTABLE="$PYTHON" &&
       cmake --build "$BUILD"; } >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  echo "SUMMARY build: FAILED (see $OUT/build.log)"
  exit 1
fi
DRIVER="$BUILD/sok_sanitize"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
compute-sanitizer --version 2>/dev/null | tail -1

SUMMARIES=()
STATUS=0
# run TOOL ARGS...: one driver run, under compute-sanitizer unless TOOL
# is "plain"; adds its summary line.
run() {
  local tool="$1" log="$OUT/$1.log"
  shift
  local t0=$SECONDS rc
  echo "== $tool"
  if [ "$tool" = plain ]; then
    timeout "$LIMIT_S" "$DRIVER" "$@" >"$log" 2>&1
  else
    timeout "$LIMIT_S" compute-sanitizer --tool "$tool" --error-exitcode 99 \
      --print-limit 200 $([ "$tool" = memcheck ] && echo --leak-check full) \
      "$DRIVER" "$@" >"$log" 2>&1
  fi
  rc=$?
  local driver sanitizer
  driver="$(grep '^SUMMARY' "$log" | tail -1 | sed 's/^SUMMARY //')"
  sanitizer="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -1 | sed 's/^========= //')"
  grep '^FAIL' "$log" | head -5
  [ $rc -ne 0 ] && [ -z "$driver" ] && tail -5 "$log"
  [ -n "$sanitizer" ] && grep -B2 -A12 -m3 -E '^========= (Invalid|Race|Barrier|Warp|Error|Program hit|Leaked|Malloc|cuda)' "$log" | head -60
  local verdict=ok
  if [ $rc -eq 124 ]; then
    verdict="CUT OFF at ${LIMIT_S} s after $(grep '^\[' "$log" | tail -1 | cut -d' ' -f1 | tr -d '[')"
    STATUS=1
  elif [ $rc -ne 0 ]; then
    verdict="FAILED (exit $rc)"
    STATUS=1
  fi
  SUMMARIES+=("SUMMARY $tool: $verdict; ${sanitizer:-no sanitizer summary}; driver: ${driver:-no summary}; $((SECONDS - t0)) s")
}

for tool in $TOOLS; do
  case "$tool" in
    plain) run plain ;;
    memcheck | synccheck) run "$tool" --progress --stride "$STRIDE" ;;
    racecheck) run racecheck --progress --filter "$RACE_TARGETS" --stride "$RACE_STRIDE" ;;
    *) echo "unknown tool $tool"; STATUS=1 ;;
  esac
done

echo
printf '%s\n' "${SUMMARIES[@]}" | tee "$OUT/summary.txt"
exit $STATUS
