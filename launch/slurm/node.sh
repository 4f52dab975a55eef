#!/bin/bash
# Runs on every node of a SLURM job (one srun task per node, started by train.sbatch): starts
# that node's launcher, which starts one training process per GPU.
#
#   bash launch/slurm/node.sh [launch/train.py flags...]
#
# Reads from the environment: SLURM_NODEID, SLURM_JOB_NUM_NODES (or SLURM_NNODES),
# SLURM_JOB_NODELIST (set by srun), MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE and LAUNCHER
# (deepspeed or torchrun; set by train.sbatch), NODE_STATUS_DIR (optional: the launcher's exit
# status is written to NODE_STATUS_DIR/node<N>).
#
# Pre-emption signals (USR1 from train.sbatch, TERM from SLURM) are for the training processes,
# which checkpoint and exit with status 75: this script and the launcher it starts ignore them
# (the dispositions are inherited; the training processes and DeepSpeed's per-node launcher
# install their own handlers), so that the status comes back here.
#
# The status this script reports (and writes to NODE_STATUS_DIR/node<N>) is 75 whenever the ranks
# stopped for a requeue, whatever the launcher's own status: DeepSpeed's per-node launcher exits
# with 1 when it was signalled itself (it stops its ranks, which checkpoint and exit 75), and a
# killed launcher reports 137. It relies on the ranks' requeue marker: gorp_ds writes the file
# named by GORP_DS_REQUEUE_FILE (set here, node-local) when its ranks exit with 75 (each node's
# local rank 0 writes it; gorp_ds/cl/preemption.py). Ranks whose launcher died notice it within a
# second (gorp_ds/cl/launcher_watch.py), checkpoint and exit; this script waits for them (at most
# RANK_WAIT_S, default 150 s: the ranks' own deadline is 90 s) before it reads the marker, so that
# the step does not end, and SLURM stop them, in the middle of a checkpoint.
set -euo pipefail
trap '' USR1 TERM

NODE_RANK=${SLURM_NODEID:?node.sh runs inside srun (SLURM_NODEID is not set)}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_NNODES is not set}}
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${GPUS_PER_NODE:?}"
LAUNCHER=${LAUNCHER:-deepspeed}
TRAIN=launch/train.py
PREEMPT_STATUS=75
RANK_WAIT_S=${RANK_WAIT_S:-150}
GORP_DS_REQUEUE_FILE=$(mktemp -u "${TMPDIR:-/tmp}/gorp-requeue-node$NODE_RANK.XXXXXX")
export GORP_DS_REQUEUE_FILE

echo "[$(date '+%F %T')] node $NODE_RANK/$NNODES ($(hostname)): $LAUNCHER, $GPUS_PER_NODE GPU(s)," \
     "master $MASTER_ADDR:$MASTER_PORT"

# The launchers number this node's GPUs 0..GPUS_PER_NODE-1 (the usual case with whole nodes or
# with SLURM's cgroup device isolation); say so when SLURM handed out other device numbers.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    expected=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
    if [[ "$CUDA_VISIBLE_DEVICES" != "$expected" ]]; then
        echo "warning: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES, but the launcher uses devices $expected;" \
             "request whole nodes (--exclusive) or enable ConstrainDevices in SLURM's cgroup.conf" >&2
    fi
fi

STATUS_FILE=${NODE_STATUS_DIR:+$NODE_STATUS_DIR/node$NODE_RANK}
set +e
case "$LAUNCHER" in
deepspeed)
    # `deepspeed --no_ssh` starts only this node's processes. It still needs a hostfile naming
    # every node: without one it knows only "localhost", refuses --num_nodes > 1 and would
    # replace --master_addr with 127.0.0.1. Only the number of hosts and their slots matter.
    HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/gorp-hostfile.XXXXXX")
    trap 'rm -f "$HOSTFILE" "$GORP_DS_REQUEUE_FILE"' EXIT
    scontrol show hostnames "$SLURM_JOB_NODELIST" | while read -r host; do
        echo "$host slots=$GPUS_PER_NODE"
    done > "$HOSTFILE"
    deepspeed --hostfile="$HOSTFILE" --no_ssh \
        --node_rank="$NODE_RANK" --num_nodes="$NNODES" --num_gpus="$GPUS_PER_NODE" \
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        "$TRAIN" "$@"
    ;;
torchrun)
    torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        "$TRAIN" "$@"
    ;;
*)
    echo "node.sh: unknown LAUNCHER '$LAUNCHER' (deepspeed or torchrun)" >&2
    (exit 2)
    ;;
esac
STATUS=$?
# Ranks that outlived a killed launcher (they are in this script's process group, their command
# lines name the training script) are waited for; none are left after a launcher that returned normally.
if (( STATUS != 0 )) && command -v pgrep >/dev/null 2>&1; then
    PGID=$(ps -o pgid= -p $$ | tr -d ' ')
    for ((waited = 0; waited < RANK_WAIT_S; waited++)); do
        pgrep -g "$PGID" -f -- "$TRAIN" >/dev/null || break
        sleep 1
    done
fi
if (( STATUS != 0 && STATUS != PREEMPT_STATUS )) && [[ -f "$GORP_DS_REQUEUE_FILE" ]]; then
    echo "[$(date '+%F %T')] node $NODE_RANK: the launcher exited with status $STATUS after its ranks" \
         "checkpointed and stopped for a requeue ($(<"$GORP_DS_REQUEUE_FILE")): status $PREEMPT_STATUS"
    STATUS=$PREEMPT_STATUS
fi
rm -f "$GORP_DS_REQUEUE_FILE"
set -e
if [[ -n "$STATUS_FILE" ]]; then
    echo "$STATUS" > "$STATUS_FILE"
fi
echo "[$(date '+%F %T')] node $NODE_RANK: launcher finished with status $STATUS"
exit "$STATUS"
