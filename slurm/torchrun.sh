#!/bin/bash
# Multi-GPU / multi-node training launched by torchrun (any cluster without SLURM, or inside containers).
# Run the same command on every node; Lightning reads torchrun's RANK/WORLD_SIZE/MASTER_ADDR itself.
#   GPUS=4 slurm/torchrun.sh                                     # one node, 4 GPUs
#   NODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=4 slurm/torchrun.sh --trainer.max_epochs=10   # on node0
#   NODES=2 NODE_RANK=1 MASTER_ADDR=node0 GPUS=4 slurm/torchrun.sh --trainer.max_epochs=10   # on node1
set -euo pipefail
EXP=${EXP:-sosvae_celeba_native}
NODES=${NODES:-1}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
PY=${PY:-.venv/bin/python}
# batch_size in the YAML is per GPU: the global batch is batch_size × GPUS × NODES.
exec "$PY" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$GPUS" --node-rank="${NODE_RANK:-0}" \
    --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
    -m structvae fit -c "configs/experiment/$EXP.yaml" \
    --trainer.accelerator=gpu --trainer.strategy=ddp --trainer.devices="$GPUS" --trainer.num_nodes="$NODES" "$@"
