#!/usr/bin/env bash
# Run an entry point on this machine: one process (default), or N processes on localhost, each
# with D fake CPU devices, talking through jax.distributed (gloo) — a pod in miniature.
#
#   launch/local.sh --entry clipjax.train --config configs/clip/digits_tiny.py --workdir /tmp/run \
#       [--processes 2 --devices-per-process 4 --port 12355] [--dry-run] [-- --config.total_steps=10]
#
# With several processes it exits with the first failing process's status, after stopping the
# others (SIGTERM, then SIGKILL after 10 s), so a crash never leaves a peer blocked in a collective.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

ENTRY="clipjax.train" CONFIG="" WORKDIR="" PROCS=1 DEVICES=0 PORT=12355
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --entry) ENTRY="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --processes) PROCS="$2"; shift 2 ;;
    --devices-per-process) DEVICES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see the header of $0)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
ENVS=(JAX_PLATFORMS=cpu)
[[ "$DEVICES" -gt 0 ]] && ENVS+=(JAX_NUM_CPU_DEVICES="$DEVICES")
if [[ "$PROCS" == 1 ]]; then
  run env "${ENVS[@]}" python -m "$ENTRY" --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi
pids=()
alive() { local p; for p in ${pids[@]+"${pids[@]}"}; do kill -0 "$p" 2>/dev/null && echo "$p"; done; return 0; }
stop_all() {
  # SIGTERM first (the trainer saves and stops on it), SIGKILL after 10 s: a process blocked in a
  # collective with a dead peer never gets there (JAX's preemption notifier swallows the SIGTERM).
  local left t
  left=$(alive)
  [[ -n "$left" ]] || return 0
  kill -TERM $left 2>/dev/null || true
  for ((t = 0; t < 20; t++)); do
    left=$(alive)
    [[ -n "$left" ]] || return 0
    sleep 0.5
  done
  kill -KILL $left 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 143' INT TERM
for ((i = 0; i < PROCS; i++)); do
  cmd=(env "${ENVS[@]}" python -m "$ENTRY" --config="$CONFIG" --workdir="$WORKDIR"
       --config.distributed.initialize=True --config.distributed.coordinator_address="localhost:$PORT"
       --config.distributed.num_processes="$PROCS" --config.distributed.process_id="$i" ${EXTRA[@]+"${EXTRA[@]}"})
  printf '+'
  printf ' %q' "${cmd[@]}"
  printf ' &\n'
  if [[ "$DRY_RUN" == 0 ]]; then
    exec "${cmd[@]}" &   # the background job execs the command: its pid is the process itself
    pids+=($!)
  fi
done
# Wait for all; if one fails, stop the others at once (they would block in a collective until the
# coordinator's heartbeat timeout) and exit with the first failure's status.
status=0
remaining=(${pids[@]+"${pids[@]}"})
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for p in "${remaining[@]}"; do
    if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
    rc=0
    wait "$p" || rc=$?
    if [[ $rc != 0 && $status == 0 ]]; then
      status=$rc
      echo "error: process $p exited with status $rc; stopping the other processes" >&2
      stop_all
    fi
  done
  remaining=(${still[@]+"${still[@]}"})
  if [[ ${#remaining[@]} -gt 0 ]]; then sleep 1; fi
done
exit "$status"
