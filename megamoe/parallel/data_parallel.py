"""Data-parallel gradient reduction and global-norm clipping that counts every parameter once.

Parameter attributes (set by the parallelize step, megatron-core's convention where one exists):
- `is_expert`: the parameter belongs to local experts; its gradient is reduced over the expert-DP
  group, not the DP group (other EP ranks hold other experts).
- `shared_embedding_copy`: the last pipeline stage's copy of a tied embedding, counted once in the norm.
- `tensor_model_parallel`: the parameter is a shard along TP (megatron-core sets this); otherwise it is
  replicated across TP ranks and counted only on TP rank 0 in the norm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megamoe.parallel.comm import count_all_reduce

BUCKET_BYTES = 32 * 1024 * 1024


def is_expert(p: torch.Tensor) -> bool:
    return bool(getattr(p, "is_expert", False))


class _Bucket:
    def __init__(self, params: list, group, size: int):
        self.params, self.group, self.size = params, group, size
        self.ready, self.work, self.flat = 0, None, None


class GradientReducer:
    """Averages gradients over the data-parallel replicas of the loss, overlapping the backward.

    Each DP rank computes the mean loss of its own micro-batches. A dense gradient is averaged over the DP
    group. An expert's gradient already sums what every rank of its EP group sent it, so it is summed over
    the expert-DP group (the other copies of that expert) and divided by the same DP size, as megatron-core
    scales expert gradients.

    Parameters are packed into flat buckets in reverse order (the order the backward produces them). A hook
    counts each parameter's gradient accumulations; once every parameter of a bucket has its gradient from the
    step's last micro-batch, the bucket's all-reduce starts asynchronously while the backward goes on. Buckets
    start strictly in order, so every replica issues the same collectives in the same order even when a rank's
    experts got no tokens (those parameters never fire; `finish` reduces them, as zeros)."""

    def __init__(self, params, topo, bucket_bytes: int = BUCKET_BYTES):
        self.topo = topo
        params = [p for p in params if p.requires_grad]
        self.sequence_parallel = [p for p in params if getattr(p, "sequence_parallel", False)]
        self.buckets = []
        # Dense gradients are summed over CP (its ranks hold the same weights and other tokens, each loss already
        # divided by the whole micro-batch's token count) and averaged over DP: one reduction over DP x CP.
        dense_group = topo.dp_cp_group if topo.cp > 1 else topo.dp_group
        for expert, group, size in ((False, dense_group, topo.dp * topo.cp), (True, topo.edp_group, topo.edp)):
            members = [p for p in reversed(params) if is_expert(p) == expert]
            current, nbytes = [], 0
            for p in members:
                current.append(p)
                nbytes += p.numel() * p.element_size()
                if nbytes >= bucket_bytes:
                    self.buckets.append(_Bucket(current, group, size))
                    current, nbytes = [], 0
            if current:
                self.buckets.append(_Bucket(current, group, size))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.calls = {}
        self.expected = 0
        self.launched = 0
        # Expert-DP can exceed DP (whole experts under TP > 1 are copied over the TP ranks too).
        self.active = topo.dp * topo.cp > 1 or topo.edp > 1
        if self.active:
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def start(self, micro_batches: int) -> None:
        """Call before the step's backward passes: gradients complete after `micro_batches` of them."""
        self.expected, self.launched, self.calls = micro_batches, 0, {}
        for b in self.buckets:
            b.ready, b.work, b.flat = 0, None, None

    def _on_grad(self, p: torch.Tensor) -> None:
        n = self.calls[id(p)] = self.calls.get(id(p), 0) + 1
        if n == self.expected:
            self.bucket_of[id(p)].ready += 1
            while self.launched < len(self.buckets) and self._complete(self.buckets[self.launched]):
                self._launch(self.buckets[self.launched])

    def _sum_sequence_parallel_grads(self) -> None:
        grads = [p.grad for p in self.sequence_parallel if p.grad is not None]
        if self.topo.tp == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.topo.tp_group)
        count_all_reduce(flat, self.topo.tp_group, "tp_all_reduce")
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    @staticmethod
    def _complete(b: _Bucket) -> bool:
        return b.ready == len(b.params)

    def _launch(self, b: _Bucket) -> None:
        for p in b.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        b.flat = _flatten_dense_tensors([p.grad for p in b.params])
        b.flat /= self.topo.dp
        if b.size > 1:
            b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
            count_all_reduce(b.flat, b.group, "dp_all_reduce")
        self.launched += 1

    def finish(self) -> None:
        """Reduce what the hooks did not start, wait for everything, write the averaged gradients back; then
        sum over TP the gradients of parameters that saw only this rank's part of the sequence (norms under
        sequence parallelism). That sum comes after the write-back, which copies the buckets' values over the
        gradients; both are sums, so their order does not change the result."""
        if self.active:
            while self.launched < len(self.buckets):
                self._launch(self.buckets[self.launched])
            for b in self.buckets:
                if b.work is not None:
                    b.work.wait()
                for p, reduced in zip(b.params, _unflatten_dense_tensors(b.flat, [p.grad for p in b.params])):
                    p.grad.copy_(reduced)
                b.flat = b.work = None
        self._sum_sequence_parallel_grads()


def _sum_squares(grads: list) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().cpu()


def global_grad_norm(params, topo) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once across all ranks."""
    def counted(p, tp_rank):
        if getattr(p, "shared_embedding_copy", False):  # the last pipeline stage's tied head
            return False
        return getattr(p, "tensor_model_parallel", False) or tp_rank == 0

    with_grad = [p for p in params if p.grad is not None]
    dense = [p.grad for p in with_grad if not is_expert(p) and counted(p, topo.tp_rank)]
    expert = [p.grad for p in with_grad if is_expert(p) and counted(p, topo.etp_rank)]
    dense_sq, expert_sq = _sum_squares(dense), _sum_squares(expert)
    if topo.world_size > 1:
        device = topo.device
        dense_sq, expert_sq = dense_sq.to(device), expert_sq.to(device)
        dist.all_reduce(dense_sq, group=topo.model_parallel_group)
        dist.all_reduce(expert_sq, group=topo.expert_model_parallel_group)
    return float((dense_sq + expert_sq).sqrt())


def clip_gradients(params, max_norm: float, topo) -> float:
    """Scale gradients so the global norm is at most max_norm; returns the norm before clipping."""
    params = list(params)
    norm = global_grad_norm(params, topo)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
