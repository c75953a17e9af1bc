# megamoe for GPU clusters: NGC PyTorch ships CUDA, NCCL, Triton, Transformer Engine and apex.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megamoe
COPY . .
# Keep the container's torch, TE and apex: install megamoe and the rest without upgrading them.
RUN pip install --no-cache-dir --no-build-isolation -e ".[mpi]" \
 && python -c "import megamoe, megatron.core, transformer_engine, apex; print('megamoe ready')"

ENV NCCL_ASYNC_ERROR_HANDLING=1
CMD ["megamoe-train", "--help"]
