#!/usr/bin/env bash
# The TRACT-vs-BTD budget sweep (benchmarks/quality_sweep.py) on one GPU within a time limit.
#
#   bash benchmarks/gpu_sweep.sh TEACHER [SECONDS=330] [extra quality_sweep.py flags ...]
#
# TEACHER: a params checkpoint or teacher workdir of the digits teacher (configs/demo.py's model).
# The five methods run as five processes side by side on the one GPU (the 826k-parameter model at
# batch 256 leaves a GPU mostly idle between kernels; five streams of work fill it), each over every
# budget in ascending order with batch 256, and each stops starting new runs 100 s before the limit
# and is stopped (SIGTERM: a checkpoint, then exit 75) at the limit. Finished rows survive; a re-run
# with the same WORKDIR resumes. Memory is allocated on demand (no preallocation), so the processes
# share the GPU.
# Writes the rows, each process's log and the aggregate (sweep.json, sweep.md; the plot needs
# matplotlib) to $OUT/sweep (OUT defaults to .), the run directories to ${SWEEP_WORKDIR:-/tmp/sweep}.
set -u -o pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: bash benchmarks/gpu_sweep.sh TEACHER [SECONDS] [quality_sweep.py flags]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
PY="${PYTHON:-python3}"
TEACHER="$1"
LIMIT="${2:-330}"
shift $(( $# >= 2 ? 2 : 1 ))
WORKDIR="${SWEEP_WORKDIR:-/tmp/sweep}"
DEST="${OUT:-.}/sweep"
mkdir -p "${WORKDIR}" "${DEST}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
METHODS="${SWEEP_METHODS:-tract_1024-32-1 tract_1024-1 btd_1 tract_1024-32-2 btd_2}"
START=$(date +%s)
pids=()
for method in ${METHODS}; do
  timeout --signal=TERM --kill-after=20 "${LIMIT}" "${PY}" "${ROOT}/benchmarks/quality_sweep.py" \
      --teacher="${TEACHER}" --workdir="${WORKDIR}" --methods="${method}" \
      --config.batch_size=256 --deadline_s=$(( LIMIT > 200 ? LIMIT - 100 : LIMIT / 2 )) "$@" \
      > "${DEST}/log_${method}.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
echo "sweep processes done in $(( $(date +%s) - START )) s (last non-zero status: ${status})"
cp -r "${WORKDIR}/rows" "${DEST}/" 2>/dev/null
"${PY}" "${ROOT}/benchmarks/quality_sweep.py" --workdir="${WORKDIR}" --collect > "${DEST}/collect.txt" 2>&1
cp "${WORKDIR}"/sweep.* "${WORKDIR}"/quality_sweep.png "${DEST}/" 2>/dev/null
cat "${DEST}/collect.txt"
grep -h "budget .* seed .*: FID\|deadline\|Error\|error" "${DEST}"/log_*.txt | head -60
