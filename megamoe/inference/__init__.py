"""Using a trained model: loading a checkpoint into one process, recurrent generation (ragged batches too;
continuous batching in engine.py, served over HTTP by server.py), perplexity, the log-likelihoods
lm-evaluation-harness asks for (scoring.py; the harness's model itself: harness.py, optional); decode steps
through torch.compile (compiled.py)."""
from megamoe.errors import InferenceError
from megamoe.inference.compiled import compile_decoding
from megamoe.inference.engine import Engine, Request
from megamoe.inference.evaluation import (
    dataset_batches,
    dataset_chunks,
    evaluate_perplexity,
    text_batches,
    token_batches,
)
from megamoe.inference.generation import (
    InferenceCache,
    allocate_cache,
    check_model,
    filter_logits,
    forward_cached,
    generate,
    prefill,
    sample,
)
from megamoe.inference.loading import (
    add_loading_arguments,
    available_bytes,
    checkpoint_tokenizer,
    load_for_inference,
)
from megamoe.inference.scoring import continuation_logprobs

__all__ = ["Engine", "InferenceCache", "InferenceError", "Request", "add_loading_arguments", "allocate_cache",
           "available_bytes", "check_model", "checkpoint_tokenizer", "compile_decoding", "continuation_logprobs",
           "dataset_batches", "dataset_chunks", "evaluate_perplexity", "filter_logits", "forward_cached", "generate",
           "load_for_inference", "prefill", "sample", "text_batches", "token_batches"]
