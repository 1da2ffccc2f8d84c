#!/bin/bash
# Sequence-parallel attention across Slurm nodes: one process per node, all of the
# job's devices on one mesh axis. Each process calls efficient_attn.parallel.distributed.initialize(),
# which reads the Slurm environment that srun sets (SLURM_JOB_ID, SLURM_NTASKS,
# SLURM_PROCID, SLURM_STEP_NODELIST, ...) through jax.distributed's cluster detection:
# process 0's node hosts the coordinator. On CPU-only nodes it selects gloo collectives.
#
#   sbatch scripts/slurm_sequence_parallel.sh                   # defaults below
#   LENGTHS="65536 262144" STRATEGY=all_to_all HEADS=8 sbatch scripts/slurm_sequence_parallel.sh
#
# Part 2 (optional, SWEEP=1) runs the single-node sweep preset on every node as a Slurm
# array-style shard (--shard $SLURM_PROCID/$SLURM_NTASKS), so the 48 points of
# `efficient-attn sweep sequence_parallel` are split over the nodes; `efficient-attn report`
# merges the shard files afterwards.
#
#SBATCH --job-name=sequence-parallel
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=00:30:00
#SBATCH --output=sequence-parallel-%j.out
# On GPU nodes also request them, e.g.:
##SBATCH --gpus-per-node=4

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# Activate the environment that has efficient_attn installed (pip install -e .), e.g.:
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

LENGTHS=${LENGTHS:-"32768 131072"}
STRATEGY=${STRATEGY:-ring}
HEADS=${HEADS:-4}
# CPU-only nodes: split each node's CPU into this many devices (unset on GPU nodes).
CPU_DEVICES=${CPU_DEVICES:-8}
cpu_flag=()
if [ -n "$CPU_DEVICES" ]; then cpu_flag=(--cpu-devices "$CPU_DEVICES"); fi

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes ($SLURM_JOB_NODELIST), $SLURM_NTASKS processes"

# Part 1: one process per node; initialize() needs no arguments under srun.
for length in $LENGTHS; do
  srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
    python scripts/multinode_sequence_parallel.py \
      --length "$length" --strategy "$STRATEGY" --heads "$HEADS" "${cpu_flag[@]}"
done

# Part 2: the single-node sweep, its points sharded over the nodes (each point runs in
# a fresh process on its node's split host devices, as on a workstation).
if [ "${SWEEP:-0}" = 1 ]; then
  OUT=${OUT:-experiments/results/slurm-$SLURM_JOB_ID/sequence_parallel}
  srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 bash -c \
    "efficient-attn sweep sequence_parallel --out '$OUT' --no-report --shard \$SLURM_PROCID/\$SLURM_NTASKS"
  efficient-attn report "$OUT"
fi
