#!/usr/bin/env bash
# mpirun with the flags each MPI needs here: OpenMPI refuses root and oversubscription unless
# told; MPICH (the default wheel) needs nothing. One torch/OpenMP thread per rank by default.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
mpirun="${MPIRUN:-$here/.venv/bin/mpirun}"
[ -x "$mpirun" ] || mpirun="$(command -v mpirun)"
flags=()
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
  flags+=(--oversubscribe)
  [ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$mpirun" "${flags[@]}" "$@"
