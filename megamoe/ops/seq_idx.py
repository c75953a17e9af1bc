"""`seq_idx`: which packed document each token belongs to (mamba_ssm's Mamba-2 name), and its checks.

A training row holds several documents separated by EOD. seq_idx (batch, L) int32 numbers them within the row
(0, 0, 0, 1, 1, 2, ...: the EOD closes its document, the next token opens the next one), never decreasing. The
ops cut every recurrence where it changes: the scan's state restarts from zero, the conv reads no tap across it.
"""
from __future__ import annotations

import torch


def check_seq_idx(seq_idx: torch.Tensor, batch: int, length: int, where: str, monotone: bool = True) -> None:
    """ValueError unless seq_idx is an int32 (batch, L) document index that never decreases within a row
    (`monotone`: checked on CPU tensors; on a GPU it would wait for the device, so the model checks it once)."""
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype != torch.int32:
        raise ValueError(f"{where}: seq_idx must be an int32 tensor, got "
                         f"{getattr(seq_idx, 'dtype', type(seq_idx).__name__)}; "
                         "megamoe.data.packing.document_index makes it from a row's tokens")
    if tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"{where}: seq_idx must have shape (batch, L) = {(batch, length)}, got "
                         f"{tuple(seq_idx.shape)}")
    if monotone and length > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError(f"{where}: seq_idx decreases within a row; it numbers the documents of a packed row in "
                         "order (0, 0, 1, 1, 1, 2, ...)")


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, L) bool: the positions where a new document begins after another (seq_idx changes); never 0."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts
