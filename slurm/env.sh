# shellcheck shell=bash
# Point SLURM clients (sbatch, srun, squeue, sacct, submitit...) at the local cluster of
# slurm/cluster.sh:   source slurm/env.sh
export SLURM_CONF="${IMGCLS_SLURM_DIR:-/tmp/imgcls-slurm}/etc/slurm.conf"
