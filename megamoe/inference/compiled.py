"""A decode step compiled by torch.compile: the small operations of each layer (norms, the conv shift, the state
update, the router, gates and residuals; about 250 kernels a step in eager PyTorch, ~7 us each on CPU) fused
into a few generated kernels, each weight-reading product still one MKL or oneDNN call (ops.linear), the
experts of several tokens one opaque op (model/moe_step.py), all called from a C++ wrapper on CPU.

    model = compile_decoding(model, batch_sizes=[8])   # then generate / Engine / forward_cached step through it

One compilation per batch size (the graph is specialised to its shapes, `dynamic=False`), at the first step of
that size: 10-20 s on a 2-core CPU (Inductor needs a C++ compiler there), less from Inductor's on-disk cache
later. The prompt (prefill) stays eager. The compiled step keeps only the guards on tensors (shapes, dtypes,
devices, strides): the model's other attributes (top-k, score functions, patterns) are read once, when it
compiles; so compile a model as it will decode. Each call compiles for its own model alone.

Refused, with a message: models with attention blocks (their KV cache grows every step, which would recompile
or trace dynamic shapes at every length), and tensor-parallel models. On a GPU it runs (Inductor's Triton
kernels), but no GPU number has been measured, and CUDA graphs are not set up: a one-token MoE reads its
experts' indices on the host, which a graph cannot capture.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from megamoe.config import block_kinds
from megamoe.errors import InferenceError
from megamoe.inference.generation import allocate_cache, check_model, decode_step, forward_cached, tp_group


def compile_decoding(model, batch_sizes: Sequence[int] = ()):
    """The model, whose decode steps (forward_cached after the prompt) now run compiled: for `batch_sizes` now
    (a step of zero states apiece), for others at their first step. InferenceError for a model that compiling
    cannot serve (see above)."""
    check_model(model)
    if any("A" in kind for kind in block_kinds(model.cfg)):
        raise InferenceError("--compile decodes models without attention blocks (their KV cache changes shape "
                             "every step); run this model without --compile")
    if tp_group(model) is not None:
        raise InferenceError("--compile decodes a model in one process; run a tensor-parallel model without "
                             "--compile")
    options = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    if model.embedding.weight.device.type == "cpu":  # a C++ wrapper around the kernels: 0.8x the step's time of
        options["cpp_wrapper"] = True  # the Python one on a 2-core CPU (that step's ~300 buffer and call lines)
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, isolate_recompiles=True, options=options)

    def step(model, tokens, states):
        try:
            with torch._dynamo.config.patch(capture_scalar_outputs=True):  # a token's experts (model/moe_step.py)
                return compiled(model, tokens, states)
        except (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode) as e:  # compiling, before the
            # step ran: the states are as they were
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InferenceError(f"torch.compile could not compile the decode step ({reason[:300]}); run without "
                                 "--compile, or give Inductor the C++ compiler it needs on CPU (g++)") from e

    model.__dict__["compiled_step"] = step
    for batch in batch_sizes:
        scratch = allocate_cache(model, batch)
        scratch.lengths = [1] * batch  # a step, not a prompt
        forward_cached(model, torch.zeros(batch, 1, dtype=torch.long), scratch)
    return model
