# Shared body of the sbatch templates (sourced with the template's arguments; CONFIG is set by the caller).
# Environment knobs: LAUNCHER=srun|torchrun (default srun: one task per GPU), PYTHON (default python),
# EXTRA_SRUN_ARGS, NCCL_* (defaults below).

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
OVERRIDES=("$@")

# sbatch runs a copy of the script from the spool dir: work from the submit dir (the repo root).
if [[ -n "${SLURM_SUBMIT_DIR:-}" ]]; then
  cd "$SLURM_SUBMIT_DIR"
else
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
fi
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
PYTHON=${PYTHON:-python}
export LAUNCHER=${LAUNCHER:-srun}

# MASTER_ADDR (first node), MASTER_PORT (from the job id), NNODES, GPUS_PER_NODE, HOSTFILE.
ENV_LINES=$("$PYTHON" acomp/train/slurm.py env --hostfile "$LOG_DIR/hostfile-${SLURM_JOB_ID:-0}") || exit $?
eval "$ENV_LINES"

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the others
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
export PYTHONUNBUFFERED=1

# A signal makes the trainer checkpoint and exit 75 (train.preempt_exit_code; its default is 0): requeue below.
TRAIN=("$PYTHON" -u launchers/train.py --config "$CONFIG" train.resume=auto train.preempt_exit_code=75
       "${OVERRIDES[@]}")

if [[ $DRY_RUN == 1 ]]; then
  "$PYTHON" acomp/train/slurm.py dry-run -- "${TRAIN[@]}" || exit $?
  echo "# hostfile $HOSTFILE:"
  sed 's/^/#   /' "$HOSTFILE"
  exit 0
fi

mapfile -d '' SRUN < <("$PYTHON" acomp/train/slurm.py srun -- "${TRAIN[@]}")
(( ${#SRUN[@]} )) || exit 2  # slurm.py said why (a bad LAUNCHER, say): no job that runs nothing and exits 0
echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} nodes x ${GPUS_PER_NODE} GPUs"

REQUEUE=0
forward() {  # the signal reached the batch shell: pass it on to every task, then requeue once they exit
  echo "[$(date -Is)] got $1: asking the trainer to checkpoint"
  REQUEUE=1
  kill -s "$1" "$SRUN_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${SRUN[@]}" ${EXTRA_SRUN_ARGS:-} &
SRUN_PID=$!
while true; do
  wait "$SRUN_PID"
  RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break  # wait returned because of a trapped signal: keep waiting
done

echo "[$(date -Is)] srun exited with $RC"
# 75: the trainer checkpointed on the signal; a signal with another failure came before any step (nothing to
# save); a run that finished (0) while the signal was on its way is not started again.
if [[ $RC == 75 || ( $REQUEUE == 1 && $RC != 0 ) ]]; then
  echo "[$(date -Is)] requeueing job ${SLURM_JOB_ID}; it resumes from the latest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$RC"
