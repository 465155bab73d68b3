#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it, install this package on every worker, run the same
# command on all workers (jax.distributed.initialize() auto-detects the pod), tail logs, delete.
#
#   launch/tpu_pod.sh --name clip-v4 --zone us-central2-b --accelerator v4-32 \
#       --entry clipjax.train --config configs/clip/vit_b16.py --workdir gs://BUCKET/runs/vit_b16 \
#       [--queued] [--spot] [--version tpu-ubuntu2204-base] [--step all|create|setup|run|logs|delete] \
#       [--dry-run] [-- --config.batch_size=32768 ...]
#
# --dry-run prints every gcloud command instead of running it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

NAME="" ZONE="" ACCEL="" VERSION="tpu-ubuntu2204-base" ENTRY="clipjax.train" CONFIG="" WORKDIR=""
PROJECT="" QUEUED=0 SPOT=0 STEP="all" REMOTE_DIR="clipjax"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --entry) ENTRY="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --step) STEP="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see the header of $0)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$ACCEL" ]] || die "--accelerator is required (e.g. v4-32, v5litepod-256)"
if [[ "$STEP" == all || "$STEP" == run ]]; then
  [[ -n "$CONFIG" ]] || die "--config is required"
  [[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path: every worker must see it)"
fi
G=(gcloud compute tpus)
SCOPE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && SCOPE+=(--project="$PROJECT")

create() {
  if [[ "$QUEUED" == 1 ]]; then
    local extra=()
    [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run "${G[@]}" queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCEL" \
      --runtime-version="$VERSION" "${SCOPE[@]}" "${extra[@]}"
    echo "# wait until: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE shows ACTIVE"
  else
    local extra=()
    [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run "${G[@]}" tpu-vm create "$NAME" --accelerator-type="$ACCEL" --version="$VERSION" "${SCOPE[@]}" "${extra[@]}"
  fi
}

ssh_all() { run "${G[@]}" tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all --command="$1"; }

setup() {
  local tarball="/tmp/${NAME}-src.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv -C "$here/.." .
  run "${G[@]}" tpu-vm scp "$tarball" "$NAME:/tmp/src.tar.gz" "${SCOPE[@]}" --worker=all
  ssh_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/src.tar.gz -C $REMOTE_DIR && pip install -q -e '$REMOTE_DIR[tpu]'"
}

train() {
  local args
  args=$(quote_args --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")
  # CLIPJAX_DISTRIBUTED=1: every worker calls jax.distributed.initialize(), which finds the pod.
  ssh_all "cd $REMOTE_DIR && CLIPJAX_DISTRIBUTED=1 nohup python -m $ENTRY $args > train.log 2>&1 &"
}

logs() { run "${G[@]}" tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=0 --command="tail -f $REMOTE_DIR/train.log"; }

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run "${G[@]}" queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
  else
    run "${G[@]}" tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
  fi
}

case "$STEP" in
  create) create ;;
  setup) setup ;;
  run) train ;;
  logs) logs ;;
  delete) delete ;;
  all) create; setup; train; echo "# logs: $0 --name $NAME --zone $ZONE --accelerator $ACCEL --step logs"
       echo "# delete when done: $0 --name $NAME --zone $ZONE --accelerator $ACCEL --step delete" ;;
  *) die "--step must be all|create|setup|run|logs|delete" ;;
esac
