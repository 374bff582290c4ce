#!/usr/bin/env bash
# One multi-GPU session in one device call: tools/gpu_session.sh with the
# multi-GPU defaults, i.e. the distributed and memory tests on every GPU of
# the machine, then bench_distributed over 1, 2, 4, ... GPUs (up to all of
# them). Any variable gpu_session.sh reads overrides these defaults; set
# one to the empty string to skip that part (TESTS= runs no tests).
#   OUT=/tmp/o bash tools/gpu_multigpu.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$ngpu" -lt 2 ]; then
  echo "gpu_multigpu.sh: $ngpu GPU(s) here; it is for 2 or more (use gpu_session.sh)"
  exit 2
fi
counts=1
for c in 2 4 8 16; do [ "$c" -le "$ngpu" ] && counts="$counts,$c"; done
export TESTS=${TESTS-"tests/test_distributed.py tests/test_hash_distributed.py tests/test_memory.py"}
export BENCH=${BENCH-bench_distributed}
export BENCH_ARGS_bench_distributed=${BENCH_ARGS_bench_distributed-"--devices $counts --nnz 1,8 --iters 10 --warmup 2"}
exec bash "$here/gpu_session.sh"
