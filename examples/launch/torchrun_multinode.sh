#!/usr/bin/env bash
# Multi-node pretraining with torchrun: run this on every node with the same MASTER_ADDR.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node-0 host> bash examples/launch/torchrun_multinode.sh \
#       --config examples/paper/moe_mamba_100m.yaml --data-path /data/c4_text_document \
#       --tokenizer-model /data/tokenizer.model --save /ckpt/moe_mamba_100m --load /ckpt/moe_mamba_100m
# With --save X --load X the same command starts the run and resumes it; MAX_RESTARTS=N lets torchrun bring the
# job back by itself N times after a rank dies (it resumes from the newest complete checkpoint).
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
# As Megatron-LM's examples: one hardware queue, so TP all-reduces overlap GEMMs in the order megatron-core issues them.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m megamoe.cli.train \
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
    --expert-model-parallel-size "${EP:-1}" "$@"
