"""Log-likelihoods of continuations, batched: what lm-evaluation-harness asks of a model (harness.py), computed
with megamoe's own forward.

    continuation_logprobs(model, pairs, batch_size) -> [(log-probability, whether greedy decoding gives it)]

Each pair (context ids, continuation ids) is one sequence, context + continuation minus its last token, whose last
len(continuation) positions predict the continuation. Rows are sorted by length, longest first, and padded on the
right within a batch: causal layers never look ahead, and the MoE layers run without a capacity limit (as
generation does), so a row's score does not depend on the rows it is batched with.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megamoe.errors import InferenceError
from megamoe.model import moe_capacity


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence, batch_size: int = 8, vocab_size: Optional[int] = None) -> list:
    """[(sum of the continuation's log-probabilities, whether each of its tokens is the argmax)] per pair, in order.
    vocab_size: the argmax looks at ids below it only (the tokenizer's; generation never produces the padding)."""
    if batch_size < 1:
        raise InferenceError(f"batch_size={batch_size} must be >= 1")
    for context, continuation in pairs:
        if not context or not continuation:
            raise InferenceError("each request needs a non-empty context and continuation (lm_eval gives the EOD "
                                 "as context to an empty one)")
    device = model.embedding.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list = [None] * len(pairs)
    with moe_capacity(model, 0.0):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            seqs = [list(pairs[i][0]) + list(pairs[i][1])[:-1] for i in rows]
            width = max(map(len, seqs))
            tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
            logprobs = torch.log_softmax(model(tokens).logits.float(), dim=-1)
            for row, i in enumerate(rows):
                target = torch.tensor(pairs[i][1], dtype=torch.long, device=device)
                lp = logprobs[row, len(seqs[row]) - len(target):len(seqs[row])]
                greedy = (lp[:, :vocab_size] if vocab_size else lp).argmax(-1)
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((greedy == target).all()))
    return out
