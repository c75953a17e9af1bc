# megamoe for GPU clusters: NGC PyTorch ships CUDA, NCCL, Triton, Transformer Engine, apex and OpenMPI.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megamoe
COPY . .
# Keep the container's torch, TE and apex: install megamoe and the rest without upgrading them. mpi4py is
# built against the container's OpenMPI (the `mpi` extra's mpich wheel is for machines without an MPI).
RUN pip install --no-cache-dir --no-build-isolation -e . \
 && pip install --no-cache-dir --no-build-isolation mpi4py \
 && python -c "import megamoe, megatron.core, transformer_engine, apex, mpi4py; print('megamoe ready')"

ENV NCCL_ASYNC_ERROR_HANDLING=1
CMD ["megamoe-train", "--help"]
