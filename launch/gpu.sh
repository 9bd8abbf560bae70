#!/usr/bin/env bash
# Runs a tract_jax job on this GPU host (all its GPUs), or as one process of a multi-host job.
#
#   launch/gpu.sh --config configs/cifar10_tract.py --workdir /data/runs/cifar10 \
#       [-- --config.batch_size=256 ...]
#
# Options:
#   --config FILE          job config, relative to the repository root                 (required)
#   --workdir DIR          checkpoints, samples, logs (shared storage, e.g. gs://, for multi-host) (required)
#   --venv DIR             virtual environment, default .venv in the repository root; created with
#                          --python (default python3.11) and given pip install -e '.[cuda]'
#   --no-install           skip the pip install (the venv must exist)
#   --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION, the share of GPU memory JAX takes up
#                          front, default 0.9
#   --gpus LIST            CUDA_VISIBLE_DEVICES, e.g. 0,1 (default: all)
#   --coordinator HOST:PORT --num-processes N --process-id I
#                          multi-host: run the same command on every host, each with its own
#                          --process-id (0 on the coordinator's host); exported as
#                          JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID for
#                          jax.distributed (tract_jax.parallel.maybe_initialize_distributed)
#   --background           run under nohup, appending to --log (default WORKDIR/run.log, or
#                          ./tract_jax_run.log when the workdir is on GCS)
#   --dry-run              print every command instead of running it
#   -- ARGS                passed to python -m tract_jax.main (config overrides)
#
# Resuming after an interruption: run the same command again; the job resumes from the latest
# Orbax checkpoint in --workdir.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  printf 'gpu.sh: %s\n' "$*" >&2
  exit 2
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config='' workdir='' venv="$root/.venv" python='python3.11' install=1 mem_fraction='0.9' gpus=''
coordinator='' num_processes='' process_id='' background=0 log='' dry_run=0
overrides=()

while (($#)); do
  if [[ $1 == --*=* && $1 != --config.* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --config | --workdir | --venv | --python | --mem-fraction | --gpus | --coordinator | \
      --num-processes | --process-id | --log)
      [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --venv) venv=$2 ;;
        --python) python=$2 ;;
        --mem-fraction) mem_fraction=$2 ;;
        --gpus) gpus=$2 ;;
        --coordinator) coordinator=$2 ;;
        --num-processes) num_processes=$2 ;;
        --process-id) process_id=$2 ;;
        --log) log=$2 ;;
      esac
      shift 2
      ;;
    --no-install) install=0; shift ;;
    --background) background=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n $config ]] || die '--config is required (e.g. configs/cifar10_tract.py)'
[[ -n $workdir ]] || die '--workdir is required'
[[ $mem_fraction =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction $mem_fraction: expected a number in (0, 1]"
if [[ -n $coordinator$num_processes$process_id ]]; then
  [[ -n $coordinator && -n $num_processes && -n $process_id ]] ||
    die 'multi-host needs --coordinator, --num-processes and --process-id together'
  [[ $num_processes =~ ^[1-9][0-9]*$ && $process_id =~ ^[0-9]+$ ]] ||
    die '--num-processes and --process-id must be integers'
  ((process_id < num_processes)) || die "--process-id $process_id must be below --num-processes $num_processes"
fi
# Paths given relative to where the script was called from, except --config (the repository root's).
absolute() { if [[ $1 == /* || $1 == gs://* ]]; then printf '%s' "$1"; else printf '%s' "$PWD/$1"; fi; }
workdir=$(absolute "$workdir")
venv=$(absolute "$venv")
[[ -z $log ]] || log=$(absolute "$log")
if [[ ! -f $root/$config ]]; then
  if [[ -f $config ]]; then config=$(absolute "$config"); else echo "gpu.sh: warning: $config does not exist" >&2; fi
fi
if [[ -z $log ]]; then
  if [[ $workdir == gs://* ]]; then log="$PWD/tract_jax_run.log"; else log="$workdir/run.log"; fi
fi

# One word as a shell needs it: bare when safe, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {
  local line='' word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s\n' "$line"
}

# Prints the command (bare with --dry-run, else as '+ command' on stderr) and runs it unless dry.
run() {
  if ((dry_run)); then
    show "$@"
  else
    printf '+ %s\n' "$(show "$@")" >&2
    "$@"
  fi
}

run cd "$root"

# --- Environment -----------------------------------------------------------------------------------
if [[ ! -x $venv/bin/python ]]; then
  ((install)) || die "--no-install: no virtual environment at $venv"
  run "$python" -m venv "$venv"
fi
if ((install)); then
  run "$venv/bin/pip" install -q -U pip
  run "$venv/bin/pip" install -q -e '.[cuda]'
fi

# --- The job ---------------------------------------------------------------------------------------
env_vars=(XLA_PYTHON_CLIENT_MEM_FRACTION="$mem_fraction")
[[ -z $gpus ]] || env_vars+=(CUDA_VISIBLE_DEVICES="$gpus")
if [[ -n $coordinator ]]; then
  env_vars+=(JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$num_processes"
    JAX_PROCESS_ID="$process_id")
fi
job=(env "${env_vars[@]}" "$venv/bin/python" -m tract_jax.main --config="$config" --workdir="$workdir"
  "${overrides[@]}")

if ((background)); then
  [[ $workdir == gs://* ]] || run mkdir -p "$workdir"
  if ((dry_run)); then
    printf 'nohup %s >> %s 2>&1 < /dev/null &\n' "$(show "${job[@]}")" "$(quote "$log")"
  else
    printf '+ nohup %s >> %s 2>&1 < /dev/null &\n' "$(show "${job[@]}")" "$(quote "$log")" >&2
    nohup "${job[@]}" >> "$log" 2>&1 < /dev/null &
    echo "Started (pid $!), log in $log. Resume after an interruption: run this command again." >&2
  fi
else
  run "${job[@]}"
fi
