### structures#0
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-999%256
#SBATCH --cpus-per-task=12
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=structures
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

### structures#1
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-999%256
#SBATCH --cpus-per-task=12
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=structures
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

### structures#2
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-999%256
#SBATCH --cpus-per-task=12
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=structures
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

### structures#3
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-999%256
#SBATCH --cpus-per-task=12
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=structures
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

### structures#4
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-999%256
#SBATCH --cpus-per-task=12
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=structures
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

### tokens#0
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-999%256
#SBATCH --cpus-per-task=12
#SBATCH --dependency='afterok:<structures#0>:<structures#1>:<structures#2>:<structures#3>:<structures#4>'
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=tokens
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

### tokens#1
#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --array=0-499%256
#SBATCH --cpus-per-task=12
#SBATCH --dependency='afterok:<structures#0>:<structures#1>:<structures#2>:<structures#3>:<structures#4>'
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=tokens
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
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
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif python -u -m submitit.core._submit FOLDER

