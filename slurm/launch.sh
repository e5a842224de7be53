#!/usr/bin/env bash
# Run one fedmetanas search as the job step of a Slurm batch job, and survive preemption.
#
# The *.sbatch scripts in this folder set their #SBATCH resources and then `exec` this script, so it
# *is* the batch shell: `--signal=B:USR1@T` reaches it T seconds before the time limit. It then
#   1. forwards USR1 to the launcher (srun forwards it to every task; mpirun's hydra to every rank);
#   2. every rank finishes the current round, rank 0 writes a checkpoint, the step exits with 75;
#   3. on 75 it requeues the job (`scontrol requeue`, needs `#SBATCH --requeue`); Slurm starts the same
#      job id again later, this script runs again, and `--resume` continues from the checkpoint.
#      Only after USR1: a run stopped by SIGTERM (`scancel`, or past the time limit) is not requeued, so
#      a cancelled job stays cancelled; resubmit with the same RUN_NAME to continue it.
# Every start passes `--resume`: the first one finds no checkpoint and starts a new run.
#
# Settings, from the environment (sbatch exports the submitting shell's variables by default):
#   CONFIG     YAML config                                   [configs/default.yaml]
#   RUN_NAME   run directory name under output.dir           [<job name>-<job id>; stable across requeues]
#   NP         number of ranks                               [SLURM_NTASKS]
#   LAUNCHER   srun | mpirun                                 [srun]
#   SRUN_MPI   srun's --mpi: none (ranks meet through torch's TCP store at MASTER_ADDR/MASTER_PORT,
#              derived from the job; no MPI library involved), pmi2 (MPICH, e.g. the venv's wheel),
#              pmix (OpenMPI)                                [none]
#   OVERRIDES  extra `section.key=value` config overrides, space separated (no spaces inside a value)
#   PYTHON     interpreter                                   [<repo>/.venv/bin/python]
#   REPO       repository root                               [the directory sbatch was run from]
set -uo pipefail  # not -e: the step's exit status is examined below

# All in one function that bash reads whole before running it: a job that is running (or waiting to
# be requeued) is not thrown off when this file is edited or updated by git meanwhile.
main() {
  REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
  if ! cd "$REPO" 2>/dev/null || [ ! -f launch/main.py ]; then
    echo "error: $REPO has no launch/main.py; submit from the repository root or set REPO" >&2
    exit 2
  fi
  PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
  CONFIG="${CONFIG:-configs/default.yaml}"
  RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-fedmetanas}-${SLURM_JOB_ID:-local}}"
  NP="${NP:-${SLURM_NTASKS:-1}}"
  LAUNCHER="${LAUNCHER:-srun}"
  SRUN_MPI="${SRUN_MPI:-none}"
  # One torch/OpenMP thread per allocated CPU of a task: ranks are the parallelism, threads fill the task.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

  args=(launch/main.py --config "$CONFIG" --name "$RUN_NAME" --resume "runtime.threads_per_rank=$OMP_NUM_THREADS")
  read -r -a extra <<< "${OVERRIDES:-}"
  args+=("${extra[@]}")

  case "$LAUNCHER" in
    # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective.
    srun)   cmd=(srun --mpi="$SRUN_MPI" --ntasks="$NP" --kill-on-bad-exit=1 "$PYTHON" "${args[@]}") ;;
    # The venv's MPICH: under Slurm, hydra starts its per-node proxies with srun itself.
    mpirun) cmd=("$REPO/scripts/mpirun.sh" -np "$NP" "$PYTHON" "${args[@]}") ;;
    *) echo "error: LAUNCHER=$LAUNCHER is not supported; use srun or mpirun" >&2; exit 2 ;;
  esac

  echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} start ${SLURM_RESTART_COUNT:-0}: ${cmd[*]}"
  "${cmd[@]}" &
  child=$!
  # Slurm signals only this shell (B:); pass it on. `wait` returns early when a trapped signal arrives,
  # so wait again until the launcher has really exited; bash keeps its status for the last `wait`.
  preempted=0
  on_usr1() {
    preempted=1
    echo "[$(date -Is)] USR1: asking the run to checkpoint and stop"
    kill -USR1 "$child" 2>/dev/null
  }
  trap on_usr1 USR1
  trap 'kill -TERM "$child" 2>/dev/null' TERM
  while kill -0 "$child" 2>/dev/null; do
    wait "$child"
  done
  wait "$child"
  status=$?
  echo "[$(date -Is)] launcher exited with $status"

  if [ "$status" = 75 ]; then  # EX_TEMPFAIL: a checkpoint was written; continue in a new allocation
    if [ "$preempted" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; then
      echo "[$(date -Is)] requeued job $SLURM_JOB_ID; it continues with --resume when it starts again"
      sleep 60 & wait $!  # Slurm ends this shell as part of the requeue
    elif [ "$preempted" = 1 ]; then
      echo "error: could not requeue; resubmit with RUN_NAME=$RUN_NAME to continue from the checkpoint" >&2
    else
      echo "stopped without a preemption signal (cancelled or out of time), not requeued;" \
           "resubmit with RUN_NAME=$RUN_NAME to continue from the checkpoint" >&2
    fi
  fi
  exit "$status"
}

main "$@"
exit $?
