#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --cpus-per-task=12
#SBATCH --error=FOLDER/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --signal=USR2@300
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
export ESM3_WORKSPACE=/ws
module load cuda/12.4 || true
export NCCL_DEBUG=WARN
export ESM3_SCRATCH="$TMPDIR"

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output FOLDER/%j_%t_log.out --error FOLDER/%j_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER
