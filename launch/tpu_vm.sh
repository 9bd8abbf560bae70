#!/usr/bin/env bash
# Runs a tract_jax job on a Cloud TPU VM (one host, or every host of a multi-host slice).
#
#   launch/tpu_vm.sh --name tract-v4 --zone us-central2-b --accelerator v4-8 \
#       --config configs/cifar10_tract.py --workdir gs://MY_BUCKET/runs/cifar10 \
#       --teacher gs://MY_BUCKET/teachers/cifar10 --data-dir gs://MY_BUCKET/tensorflow_datasets \
#       [-- --config.batch_size=256 ...]
#
# Options:
#   --name NAME            TPU VM (and queued resource) name                          (required)
#   --zone ZONE            e.g. us-central2-b                                         (required)
#   --project PROJECT      default: gcloud's configured project
#   --accelerator TYPE     accelerator type, default v4-8 (v4-16 and up are multi-host)
#   --version VERSION      TPU runtime, default tpu-ubuntu2204-base
#   --queued               ask for the VM through a queued resource (waits until it is ACTIVE)
#   --spot                 spot capacity (cheaper, preemptible)
#   --config FILE          job config, relative to the repository root                 (required)
#   --workdir DIR          checkpoints, samples, logs: a path every worker shares that    (required)
#                          outlives the VM: gs://BUCKET/... (read and written by every worker
#                          through gcsfs and Orbax; see Resuming)
#   --teacher PATH         --config.teacher_checkpoint: the teacher every worker reads, e.g.
#                          gs://BUCKET/teachers/cifar10 (what import_teacher wrote); default: the
#                          config's (empty: the job trains a teacher first, in the workdir)
#   --data-dir PATH        --config.data.data_dir: the prepared TFDS data (array_record) every
#                          worker reads, e.g. gs://BUCKET/tensorflow_datasets; default: the config's
#   --copy                 ship this checkout to every worker (default): the files git lists,
#                          tracked and untracked-but-not-ignored
#   --repo URL [--branch B]  clone URL on every worker instead
#   --python PYTHON        interpreter for the venv on the VM, default python3.11 (installed with
#                          apt when missing: tpu-ubuntu2204-base ships 3.10, tract_jax needs 3.11)
#   --dry-run              print every command instead of running it
#   -- ARGS                passed to python -m tract_jax.main (config overrides)
#
# Steps: (1) reuse the VM if `describe` finds it usable, else create it (a preempted or failed one
# is deleted first); (2) stop if a tract_jax job is already running on it; (3) put the code in
# ~/tract_jax on every worker; (4) pip install -e '.[tpu]' into ~/tract_venv on every worker;
# (5) start python -m tract_jax.main on ALL workers at once (one process per host; jax.distributed
# finds the other hosts from the TPU metadata) under nohup, appending to ~/tract_jax_run.log.
#
# Resuming after preemption: run the same command again. It recreates the VM if needed, installs,
# and the job resumes from the latest Orbax checkpoint in --workdir (which is why the workdir must
# be in a bucket: the VM's disk goes with the VM, and the hosts of a slice must share it). A
# finished job restarted this way finds its checkpoints and only redoes what is missing.
#
# Follow:  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 --command='tail -f ~/tract_jax_run.log'
# Delete:  gcloud compute tpus tpu-vm delete NAME --zone=ZONE   (queued: gcloud compute tpus
#          queued-resources delete NAME --zone=ZONE --force)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  printf 'tpu_vm.sh: %s\n' "$*" >&2
  exit 2
}

name='' zone='' project='' accelerator='v4-8' version='tpu-ubuntu2204-base'
queued=0 spot=0 config='' workdir='' repo='' branch='' copy=0 dry_run=0 python='python3.11'
teacher='' data_dir=''
overrides=()

while (($#)); do
  if [[ $1 == --*=* && $1 != --config.* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --name | --zone | --project | --accelerator | --version | --config | --workdir | --repo | \
      --branch | --python | --teacher | --data-dir)
      [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator) accelerator=$2 ;;
        --version) version=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --repo) repo=$2 ;;
        --branch) branch=$2 ;;
        --python) python=$2 ;;
        --teacher) teacher=$2 ;;
        --data-dir) data_dir=$2 ;;
      esac
      shift 2
      ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --copy) copy=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n $name ]] || die '--name is required'
[[ -n $zone ]] || die '--zone is required'
[[ -n $config ]] || die '--config is required (e.g. configs/cifar10_tract.py)'
[[ -n $workdir ]] || die '--workdir is required (e.g. gs://MY_BUCKET/runs/cifar10)'
if ((copy)) && [[ -n $repo ]]; then
  die 'give --copy or --repo URL, not both'
fi
[[ -z $branch || -n $repo ]] || die '--branch needs --repo'
[[ -n $repo ]] || copy=1
if [[ $workdir != gs://* && $workdir != /mnt/* && $workdir != /gcs/* ]]; then
  echo "tpu_vm.sh: warning: --workdir $workdir must be shared by every worker and outlive the VM" \
    '(gs://BUCKET/...), or a preempted job cannot resume.' >&2
fi
for shared in "$teacher" "$data_dir"; do
  if [[ -n $shared && $shared != gs://* ]]; then
    echo "tpu_vm.sh: warning: $shared must exist at that path on every worker (gs://BUCKET/... is" \
      'read by all of them).' >&2
  fi
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ((copy)) && [[ ! -f $root/$config ]]; then
  echo "tpu_vm.sh: warning: $config does not exist in $root" >&2
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

# For read-only queries whose output the script uses: a dry run prints them (on fd 3, the real
# stdout, as they run inside $(...)) and assumes an empty answer.
exec 3>&1
query() {
  if ((dry_run)); then
    show "$@" >&3
  else
    "$@" 2>/dev/null || true
  fi
}

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)
spot_flag=()
((spot)) && spot_flag=(--spot)

on_all_workers() {  # on_all_workers COMMAND: runs a bash command line on every worker
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# --- 1. The VM -------------------------------------------------------------------------------------
if ((queued)); then
  state=$(query "${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)')
  case $state in
    SUSPENDED | FAILED)
      echo "Queued resource $name is $state: deleting it to ask again." >&2
      run "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
      state=''
      ;;
  esac
  if [[ -z $state ]]; then
    ((dry_run)) && echo '# (only when the describe above finds nothing)'
    run "${queued_resources[@]}" create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${spot_flag[@]}"
  fi
  if ((dry_run)); then
    echo '# (then every 60 s until it prints ACTIVE)'
    show "${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
  else
    while [[ $state != ACTIVE ]]; do
      state=$("${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)')
      case $state in
        ACTIVE) ;;
        FAILED | SUSPENDED) die "queued resource $name is $state; re-run this command to ask again" ;;
        *) echo "Queued resource $name: ${state:-unknown}; waiting..." >&2; sleep 60 ;;
      esac
    done
  fi
else
  state=$(query "${tpu_vm[@]}" describe "$name" "${where[@]}" --format='value(state)')
  case $state in
    PREEMPTED | TERMINATED)
      echo "TPU VM $name is $state: deleting it to create it again." >&2
      run "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
      state=''
      ;;
  esac
  if [[ -z $state ]]; then
    ((dry_run)) && echo '# (only when the describe above finds nothing)'
    run "${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${spot_flag[@]}"
  else
    echo "Reusing TPU VM $name ($state)." >&2
  fi
fi

# --- 2. Not twice ----------------------------------------------------------------------------------
# Remote paths use $HOME, expanded on the workers. [.] keeps pgrep from matching the shell that
# runs the check itself.
# shellcheck disable=SC2016
log='$HOME/tract_jax_run.log'
on_all_workers "if pgrep -f 'tract_jax[.]main' >/dev/null; then echo \"\$(hostname): a tract_jax job \
is already running (log: $log); not starting another\"; exit 3; fi"

# --- 3. The code -----------------------------------------------------------------------------------
if ((copy)); then
  tarball="${TMPDIR:-/tmp}/tract_jax_src_$name.tgz"
  list=(git -C "$root" ls-files -z --cached --others --exclude-standard)
  pack=(tar -C "$root" --null -T - -czf "$tarball")
  if ((dry_run)); then
    printf '%s | %s\n' "$(show "${list[@]}")" "$(show "${pack[@]}")"
  else
    printf '+ %s | %s\n' "$(show "${list[@]}")" "$(show "${pack[@]}")" >&2
    "${list[@]}" | "${pack[@]}"
  fi
  run "${tpu_vm[@]}" scp "$tarball" "$name:tract_jax_src.tgz" "${where[@]}" --worker=all
  # shellcheck disable=SC2016
  on_all_workers 'set -e; cd "$HOME"; rm -rf tract_jax.new; mkdir tract_jax.new;'\
' tar -xzf tract_jax_src.tgz -C tract_jax.new; rm -rf tract_jax; mv tract_jax.new tract_jax'
else
  clone=(git clone --quiet --depth=1)
  [[ -z $branch ]] || clone+=(--branch="$branch")
  clone+=("$repo" tract_jax)
  on_all_workers "set -e; cd \"\$HOME\"; rm -rf tract_jax; $(show "${clone[@]}")"
fi

# --- 4. Install ------------------------------------------------------------------------------------
py=$(quote "$python")
on_all_workers "set -e; cd \"\$HOME\"; if ! command -v $py >/dev/null; then sudo apt-get update -qq; \
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv; fi; \
[ -x tract_venv/bin/python ] || $py -m venv tract_venv; tract_venv/bin/pip install -q -U pip; \
cd tract_jax && ../tract_venv/bin/pip install -q -e \".[tpu]\""

# --- 5. Run on every worker ------------------------------------------------------------------------
# Only the python process goes to the background, with every descriptor redirected, so that ssh
# returns at once; setsid + nohup keep it alive when the session ends. (setsid and nohup exec, so
# $! is the python process.)
job=(-m tract_jax.main --config="$config" --workdir="$workdir")
[[ -z $teacher ]] || job+=(--config.teacher_checkpoint="$teacher")
[[ -z $data_dir ]] || job+=(--config.data.data_dir="$data_dir")
job+=("${overrides[@]}")
job_line="\"\$HOME/tract_venv/bin/python\" $(show "${job[@]}")"
on_all_workers "cd \"\$HOME/tract_jax\" && echo \"=== \$(date -u): \$(hostname) starts\" >> \"$log\" \
&& { setsid nohup $job_line >> \"$log\" 2>&1 < /dev/null & } && pid=\$! && sleep 5 \
&& if kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): started, log in $log\"; \
else echo \"\$(hostname): the job stopped at once:\"; tail -n 30 \"$log\"; exit 1; fi"

cat >&2 <<EOF
Follow: $(show "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=0 --command="tail -f $log")
Resume after a preemption: run this same command again.
EOF
