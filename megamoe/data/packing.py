"""Packed documents: what a training row's EOD tokens mean to the model (Megatron's --reset-position-ids,
--reset-attention-mask, --eod-mask-loss; all off by default, as in Megatron).

megatron-core's GPTDataset packs several documents into every row, each closed by EOD. From the row's tokens:
    seq_idx       (batch, L) int32, the document of each token (an EOD closes its document): with
                  --reset-attention-mask the Mamba conv and scan restart at every document and attention is
                  block-diagonal causal, so no document sees another
    position_ids  (batch, L) int64, the position within the document: with --reset-position-ids RoPE restarts
    loss_mask     with --eod-mask-loss, 0 where the input token is EOD (no loss on guessing the next document's
                  first token)
"""
from __future__ import annotations

import torch


def document_index(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """seq_idx of packed rows `tokens` (batch, L): an EOD token ends its document, the next token starts one."""
    is_eod = (tokens == eod).to(torch.int32)
    return (torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod).contiguous()


def document_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """The position of each token within its document (0 at every document's first token)."""
    steps = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values
    return steps - first


def add_document_fields(batch: dict, eod: int, reset_position_ids: bool, reset_attention_mask: bool,
                        eod_mask_loss: bool) -> dict:
    """`batch` (tokens, labels, loss_mask) with the fields the flags ask for."""
    tokens = batch["tokens"]
    if reset_position_ids or reset_attention_mask:
        seq_idx = document_index(tokens, eod)
        if reset_attention_mask:
            batch["seq_idx"] = seq_idx
        if reset_position_ids:
            batch["position_ids"] = document_positions(seq_idx)
    if eod_mask_loss:
        batch["loss_mask"] = batch["loss_mask"] * (tokens != eod).to(batch["loss_mask"].dtype)
    return batch
