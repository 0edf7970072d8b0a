# Shared by slurm/*.sbatch (sourced, not run). Everything here can be overridden from the
# environment of `sbatch` (it exports the submitting shell's environment by default). See
# docs/slurm.md for the list.

nld_log() { echo "[nld-slurm $(date +%Y-%m-%dT%H:%M:%S) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }
nld_die() { nld_log "error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || nld_die "run this script with sbatch (SLURM_JOB_ID is not set)"

# A site file for what only the cluster knows (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, module loads...).
if [[ -n ${NLD_ENV_FILE:-} ]]; then
  [[ -f $NLD_ENV_FILE ]] || nld_die "NLD_ENV_FILE=$NLD_ENV_FILE does not exist"
  # shellcheck disable=SC1090
  source "$NLD_ENV_FILE"
fi

# The Python that has nld-train installed (inside the container when NLD_CONTAINER_IMAGE is set).
NLD_PYTHON=${NLD_PYTHON:-python}

# Bare metal: fail here, with the fix in the message, rather than in every rank's log. (In a
# container the Python exists only inside the srun step, so there is nothing to check here.)
nld_check_python() {
  [[ -n ${NLD_CONTAINER_IMAGE:-} ]] && return 0
  "$NLD_PYTHON" -c "import nld_train" 2>/dev/null && return 0
  nld_die "NLD_PYTHON=$NLD_PYTHON ($(command -v "$NLD_PYTHON" || echo 'not found')) cannot import nld_train:" \
          "activate its venv before sbatch (source .venv/bin/activate) or set NLD_PYTHON=/path/to/venv/bin/python"
}

# --- CUDA / NCCL defaults for H100 + InfiniBand; each one only if not already set --------------
# One hardware queue per device: megatron-core orders TP/SP communication behind compute.
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
# A failed or timed-out collective raises (and ends the job) instead of hanging until the limit.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# Dump the state of in-flight collectives when the NCCL watchdog fires (post-mortem of hangs).
: "${TORCH_NCCL_DUMP_ON_TIMEOUT:=1}"
# Frees tensors used by collectives without recordStream (megatron-core's recommendation).
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"
: "${NCCL_DEBUG:=WARN}"
# InfiniBand retry timeout exponent (4.096 us * 2^22 ~ 17 s): survives short fabric hiccups.
: "${NCCL_IB_TIMEOUT:=22}"
# CPU threads per rank (the data path and the optimizer are GPU work; more threads oversubscribe)
: "${OMP_NUM_THREADS:=1}"
export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_DUMP_ON_TIMEOUT \
  TORCH_NCCL_AVOID_RECORD_STREAMS NCCL_DEBUG NCCL_IB_TIMEOUT OMP_NUM_THREADS

# --- logs: the batch log is --output (the submit directory); per-node / per-rank logs of
# train.sbatch go to <NLD_LOG_DIR or run.dir/logs>/<job name>-<job id> (nld_make_log_dir) --------
nld_make_log_dir() {  # $1: the root; sets NLD_LOG_DIR to this job's folder in it and creates it
  NLD_LOG_DIR=$1/${SLURM_JOB_NAME:-nld}-${SLURM_JOB_ID}
  mkdir -p "$NLD_LOG_DIR" || nld_die "cannot create the log folder $NLD_LOG_DIR"
}

# run.dir of the nld-train arguments "$@", as nld-train composes it (recipes set their own), or
# exit with nld-train's configuration error in the batch log. Printed, not started: --cfg job.
nld_run_dir() {
  local out rc
  if [[ -n ${NLD_CONTAINER_IMAGE:-} ]]; then  # the Python exists only inside the container
    out=$(srun --nodes=1 --ntasks=1 "${NLD_CONTAINER_ARGS[@]}" \
            "$NLD_PYTHON" -m nld_train.cli "$@" --cfg job --resolve --package run.dir)
  else
    out=$("$NLD_PYTHON" -m nld_train.cli "$@" --cfg job --resolve --package run.dir)
  fi
  rc=$?
  (( rc == 0 )) && [[ -n $out ]] || nld_die "nld-train could not compose its configuration from the arguments (above)"
  printf '%s\n' "$out"
}

# --- containers (pyxis), optional: only the srun line gets the flags ------------------------------
NLD_CONTAINER_ARGS=()
if [[ -n ${NLD_CONTAINER_IMAGE:-} ]]; then
  NLD_CONTAINER_ARGS=(--container-image="$NLD_CONTAINER_IMAGE"
                      --container-mounts="${NLD_CONTAINER_MOUNTS:-$PWD:$PWD}"
                      --container-workdir="$PWD")
fi

nld_describe() {
  nld_log "nodes=${SLURM_JOB_NODELIST:-?} (${SLURM_NNODES:-1}) cwd=$PWD python=$NLD_PYTHON" \
          "container=${NLD_CONTAINER_IMAGE:-none}${NLD_LOG_DIR:+ logs=$NLD_LOG_DIR}"
  nld_log "args: $*"
}
