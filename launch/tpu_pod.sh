#!/bin/bash
# Training on a Cloud TPU pod slice: the same command on every worker; jax.distributed
# auto-detects the pod (coordinator, process count and index).
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/remoteclip.py:ViT-L-14 gs://bucket/runs/rc_l14 \
#       --config.data.train=/mnt/disks/data/shards
#
# The workdir may be a gs:// path (orbax writes to GCS). Preemption of a spot/queued resource
# sends SIGTERM: rsclip saves a checkpoint and exits; rerun this script to resume. For multi-slice,
# put the slow axis in DCN: --config.mesh.dcn_shape="(NUM_SLICES,1,1)".
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
REPO_URL=${REPO_URL:-}  # set to clone the project on the workers, or pre-install it there
# Quote every argument for the remote shell: overrides such as --config.mesh.shape="(1,-1,1)"
# contain characters bash would otherwise interpret.
ARGS=$(printf '%q ' --config "$CONFIG" --workdir "$WORKDIR" "$@")
SETUP="pip install -e ~/rsclip_jax 'jax[tpu]==0.10.2'"
CLONE=""
if [ -n "$REPO_URL" ]; then CLONE="git clone $(printf '%q' "$REPO_URL") ~/rsclip_jax 2>/dev/null || true; "; fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "${CLONE}cd ~/rsclip_jax && $SETUP && rsclip train --distributed $ARGS"
