#!/usr/bin/env bash
# The prepared accelerator check of issue 16: one script, at most 6 minutes on one GPU (a time budget
# caps every run), nothing downloaded (random data and random weights of the paper shapes).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--with-demo] [--autotune=N] [--budget=SECONDS]
#
# Runs, in this order of priority, each in its own process (so that each peak_bytes_in_use belongs
# to one benchmark):
#   cifar10_bf16   CIFAR-10 paper UNet (60.0M params), TRACT step, batch 256, bf16 (student, teacher
#                  and self-teacher forwards; parameters, optimiser, EMAs, targets, loss float32)
#   imagenet64_bf16  ImageNet-64 paper UNet (295.9M params), TRACT step, batch 64, bf16
#   cifar10_f32    the CIFAR-10 step in float32
#   fid            FID Inception feature pass (batch 200, 32x32 -> 299) and the implied time of a
#                  50k-sample FID at 1 step of the CIFAR-10 model (bf16 sampler)
#   cifar10_bf16_remat  (--with-remat) the bf16 CIFAR-10 step with --remat=blocks: memory saving
#   imagenet64_bf16_autotune0  (--compare-autotune) the ImageNet-64 step compiled with
#                  --xla_gpu_autotune_level=0: cold compile time vs step time of XLA's autotuning
#   demo           (--with-demo only, outside the 6-minute budget) the demo end to end through the
#                  public CLI: python3 -m tract_jax.main --config=configs/demo.py --workdir=...
# Each step benchmark reports lower + XLA compile time with an EMPTY persistent compilation cache
# (cold) and again from that cache (cached), ms/step, images/s, honest FLOPs (lowered program; on
# jax 0.11 GPU, where its analysis returns None, a jaxpr count of the convolutions and matmuls,
# 99.7% of it), % of the matmul peak measured in the step's dtype, and device peak memory.
# Prints one table and writes one JSON: $OUT/gpu_check.json when OUT is set, else ./gpu_check.json.
# Measured on one H200 (jax 0.11.2, 2026-11-27): a CIFAR-10 run takes about 95 s, 65-70 s of it
# the cold compile, so the default 6-minute budget covers the CIFAR-10 runs and gives the ImageNet-64
# run the rest (its cold compile has taken over 190 s in float32); --budget=600 runs everything.
#
# Options:
#   --dry-run       CPU, tiny models and 8x8 images (same code paths): under a minute; for tests.
#   --with-demo     also run the demo end to end (about 2 minutes on one GPU; CPU: 7 minutes).
#   --with-remat, --compare-autotune   the optional runs above (inside the budget, after the rest).
#   --autotune=N    XLA GPU autotuning level 0-4 (XLA's default 4 autotunes every convolution and
#                   GEMM: fastest steps, longest cold compile; 0 = no autotuning). Added to XLA_FLAGS.
#                   Caution, measured on an H200 (jax 0.11.2): at level 0 the 8192^2 bf16 matmul ran
#                   at 10.6 TFLOP/s instead of ~660: level 0 is a compile-time probe, not a setting.
#   --runs=A,B      only these runs, in the order above (e.g. --runs=cifar10_bf16,cifar10_f32).
#   --budget=S      total seconds for the four benchmarks (default 360); each run gets at most its
#                   own cap and what is left, and a run that is cut off is reported as "timeout".
# Environment: PYTHON (default python3), XLA_FLAGS (passed through and recorded), OUT, and
#   GPU_CHECK_CAP=S: every run's cap in seconds instead of its default (110-200 s);
#   GPU_CHECK_CACHE=DIR: use DIR as every run's persistent compilation cache instead of a fresh
#   empty one (then "cold" is only cold the first time; the tests use it to reuse compilations).
# Needs jax, flax, optax, numpy, absl and ml_collections importable; the repository root is put on
# PYTHONPATH here, nothing is installed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
PY="${PYTHON:-python3}"
DRY_RUN=0
WITH_DEMO=0
WITH_REMAT=0
COMPARE_AUTOTUNE=0
AUTOTUNE=""
BUDGET=360
RUNS=""

for arg in "$@"; do
  case "${arg}" in
    --dry-run) DRY_RUN=1 ;;
    --with-demo) WITH_DEMO=1 ;;
    --with-remat) WITH_REMAT=1 ;;
    --compare-autotune) COMPARE_AUTOTUNE=1 ;;
    --autotune=*) AUTOTUNE="${arg#--autotune=}" ;;
    --budget=*) BUDGET="${arg#--budget=}" ;;
    --runs=*) RUNS=",${arg#--runs=}," ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument ${arg} (see --help)" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT:-.}"
mkdir -p "${OUT_DIR}"
JSON_OUT="${OUT_DIR}/gpu_check.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT

if [[ -n "${AUTOTUNE}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=${AUTOTUNE}"
fi

if [[ "${DRY_RUN}" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  # One-level 8-channel UNets on 8x8x1 images (compiles dominate: keep them small); the ImageNet run
  # keeps attention (head_dim 4), class labels and the 'both' output, and times the cached compile.
  TINY=(--config.data.name=digits --config.model.ch=8 --config.model.emb_ch=16
        "--config.model.ch_mult=(1,)" --config.model.num_res_blocks=1 --config.model.num_groups=4
        --config.teacher_steps=16 --config.time_schedule=16,4,1 --batch=8 --steps=1
        --peak_size=128)
  CIFAR_ARGS=("${TINY[@]}" "--config.model.attn_resolutions=()" --config.model.out_ch=1
              --nocached_compile)
  IMAGENET_ARGS=("${TINY[@]}" "--config.model.attn_resolutions=(8,)" --config.model.out_ch=2
                 --config.model.head_dim=4)
  FID_ARGS=("${CIFAR_ARGS[@]}" --fid_batch=2 --fid_size=75)
  DEMO_ARGS=(--config.teacher_training.train_steps=4 --config.train_samples=1024
             --config.eval.num_samples=8 --config.eval.sample_batch=8 --config.eval_every=0)
  CAP_CIFAR=120; CAP_IMAGENET=120; CAP_FID=120; CAP_EXTRA=120
else
  CIFAR_ARGS=(--batch=256 --steps=10 --max_seconds=20)
  IMAGENET_ARGS=(--batch=64 --steps=5 --max_seconds=20)
  FID_ARGS=(--batch=256 --steps=5 --max_seconds=20 --fid_batch=200 --fid_size=299)
  DEMO_ARGS=()
  CAP_CIFAR=110; CAP_IMAGENET=200; CAP_FID=90; CAP_EXTRA=120
fi
if [[ -n "${GPU_CHECK_CAP:-}" ]]; then  # one cap for every run (seconds), e.g. for a slow cold compile
  CAP_CIFAR="${GPU_CHECK_CAP}"; CAP_IMAGENET="${GPU_CHECK_CAP}"; CAP_FID="${GPU_CHECK_CAP}"
  CAP_EXTRA="${GPU_CHECK_CAP}"
fi

START=$(date +%s)
declare -A STATUS

NAMES=()
# run NAME CAP ARGS...: throughput.py with its own empty compilation cache, within the budget.
# RUN_XLA_FLAGS (if set) is appended to XLA_FLAGS for this run only.
run() {
  local name="$1" cap="$2"
  shift 2
  if [[ -n "${RUNS}" && "${RUNS}" != *",${name},"* ]]; then
    return
  fi
  NAMES+=("${name}")
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    echo "== ${name}: skipped (budget of ${BUDGET}s used up)"
    STATUS[${name}]="skipped"
    return
  fi
  echo "== ${name} (at most ${limit}s)"
  XLA_FLAGS="${XLA_FLAGS:-}${RUN_XLA_FLAGS:+ ${RUN_XLA_FLAGS}}" \
  timeout --signal=TERM --kill-after=10 "${limit}" "${PY}" "${ROOT}/benchmarks/throughput.py" "$@" \
      --compile_cache="${GPU_CHECK_CACHE:-${WORK}/cache_${name}}" --json="${WORK}/${name}.json" \
      > "${WORK}/${name}.log" 2>&1
  local rc=$?
  if (( rc == 0 )); then
    STATUS[${name}]="ok"
  elif (( rc == 124 || rc == 137 )) && [[ -s "${WORK}/${name}.json" ]]; then
    STATUS[${name}]="ok"  # finished and wrote its results; cut off while exiting
  elif (( rc == 124 || rc == 137 )); then
    STATUS[${name}]="timeout after ${limit}s"
  else
    STATUS[${name}]="failed (exit ${rc})"
  fi
  grep -v '^W0000\|^I0000\|Warning' "${WORK}/${name}.log" | tail -n 25
  echo "-- ${name}: ${STATUS[${name}]} ($(( $(date +%s) - START ))s elapsed)"
}

# In order of priority, so that a budget cut loses the least important run.
run cifar10_bf16 "${CAP_CIFAR}" --config="${ROOT}/configs/cifar10_tract.py" --what=tract \
    --dtype=bfloat16 --teacher_dtype=bfloat16 "${CIFAR_ARGS[@]}"
run imagenet64_bf16 "${CAP_IMAGENET}" --config="${ROOT}/configs/imagenet64_tract.py" --what=tract \
    --dtype=bfloat16 --teacher_dtype=bfloat16 "${IMAGENET_ARGS[@]}"
run cifar10_f32 "${CAP_CIFAR}" --config="${ROOT}/configs/cifar10_tract.py" --what=tract \
    --dtype=float32 --teacher_dtype=float32 "${CIFAR_ARGS[@]}"
run fid "${CAP_FID}" --config="${ROOT}/configs/cifar10_tract.py" --what=fid --dtype=bfloat16 \
    --sample_steps=1 "${FID_ARGS[@]}"
if [[ "${COMPARE_AUTOTUNE}" == 1 ]]; then
  RUN_XLA_FLAGS="--xla_gpu_autotune_level=0" run imagenet64_bf16_autotune0 "${CAP_IMAGENET}" \
      --config="${ROOT}/configs/imagenet64_tract.py" --what=tract --dtype=bfloat16 \
      --teacher_dtype=bfloat16 "${IMAGENET_ARGS[@]}"
fi
if [[ "${WITH_REMAT}" == 1 ]]; then
  run cifar10_bf16_remat "${CAP_EXTRA}" --config="${ROOT}/configs/cifar10_tract.py" --what=tract \
      --dtype=bfloat16 --teacher_dtype=bfloat16 --remat=blocks "${CIFAR_ARGS[@]}"
fi

DEMO_STATUS="not run (pass --with-demo)"
DEMO_SECONDS=""
if [[ "${WITH_DEMO}" == 1 ]]; then
  echo "== demo (public CLI)"
  demo_start=$(date +%s)
  # Public CLI only: the driver's internals are not relied on.
  (cd "${ROOT}" && timeout 600 "${PY}" -m tract_jax.main --config="${ROOT}/configs/demo.py" \
      --workdir="${WORK}/demo" "${DEMO_ARGS[@]}") > "${WORK}/demo.log" 2>&1
  rc=$?
  DEMO_SECONDS=$(( $(date +%s) - demo_start ))
  if (( rc == 0 )); then DEMO_STATUS="ok"; else DEMO_STATUS="failed (exit ${rc})"; fi
  grep -v '^W0000\|^I0000\|Warning' "${WORK}/demo.log" | tail -n 15
fi

STATUS_LIST=""
for name in ${NAMES[@]+"${NAMES[@]}"}; do
  STATUS_LIST+="${STATUS_LIST:+,}${name}=${STATUS[${name}]:-not run}"
done

# With OUT set, keep every run's log and JSON next to the summary (for a machine that is handed back).
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "${OUT_DIR}/gpu_check_runs"
  cp "${WORK}"/*.log "${WORK}"/*.json "${OUT_DIR}/gpu_check_runs/" 2>/dev/null || true
fi

# One table and one JSON from the per-run JSON files (benchmarks/tables.py).
"${PY}" "${ROOT}/benchmarks/tables.py" --gpu_check_work="${WORK}" --json_out="${JSON_OUT}" \
    --dry_run="${DRY_RUN}" --demo_status="${DEMO_STATUS}" --demo_seconds="${DEMO_SECONDS}" \
    --elapsed="$(( $(date +%s) - START ))" --status="${STATUS_LIST}"
