#!/usr/bin/env bash
# Run an entry point on this machine: one process (default), or N processes on localhost, each
# with D fake CPU devices, talking through jax.distributed (gloo) — a pod in miniature.
#
#   launch/local.sh --entry clipjax.train --config configs/clip/digits_tiny.py --workdir /tmp/run \
#       [--processes 2 --devices-per-process 4 --port 12355] [--dry-run] [-- --config.total_steps=10]
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
  run env "${ENVS[@]}" python -m "$ENTRY" --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
  exit 0
fi
pids=()
for ((i = 0; i < PROCS; i++)); do
  run env "${ENVS[@]}" python -m "$ENTRY" --config="$CONFIG" --workdir="$WORKDIR" \
    --config.distributed.initialize=True --config.distributed.coordinator_address="localhost:$PORT" \
    --config.distributed.num_processes="$PROCS" --config.distributed.process_id="$i" "${EXTRA[@]}" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
