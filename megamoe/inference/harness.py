"""megamoe as a model of EleutherAI's lm-evaluation-harness, registered under the name "megamoe":

    python tools/lm_eval.py --model megamoe --model_args load=ckpt/run1 --tasks hellaswag --batch_size 8
    (model_args: load, device, batch_size, max_length, max_gen_toks, tokenizer_model, seed)

or, from Python, `import megamoe.inference.harness` and then lm_eval's own `simple_evaluate(model="megamoe", ...)`.
The checkpoint (any saved layout) is loaded into one CPU or GPU process by loading.py; the tokenizer is the one its
config names. loglikelihood and rolling loglikelihood are megamoe's own forward (scoring.py), in batches; the
rolling windows are lm_eval's (max_length: the run's seq_length by default). generate_until decodes recurrently as
megamoe's generation does (no MoE capacity limit, greedy unless do_sample), prompts of any lengths in one batch,
and stops at the EOD or at the first of the `until` strings, which is cut off.
"""
from __future__ import annotations

from typing import Optional

import torch

from megamoe.checkpoint import load_config
from megamoe.errors import InferenceError
from megamoe.inference.generation import allocate_cache, forward_cached, prefill, sample
from megamoe.inference.loading import checkpoint_tokenizer, load_for_inference
from megamoe.inference.scoring import continuation_logprobs
from megamoe.logging import get_logger

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    raise InferenceError("lm-evaluation-harness is not installed: pip install megamoe[eval]") from None

log = get_logger()
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _positive(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise InferenceError(f"lm_eval model_args {name}={value!r}: give a positive integer")
    return number


@register_model("megamoe")
class MegaMoELM(TemplateLM):
    """A megamoe checkpoint for lm_eval; see the module docstring for its model_args."""

    def __init__(self, load: Optional[str] = None, device: Optional[str] = None, batch_size=8, max_length=None,
                 max_gen_toks=256, tokenizer_model: Optional[str] = None, seed=1234, max_batch_size=None, **unknown):
        super().__init__()
        if unknown or not load:
            raise InferenceError(f"lm_eval --model_args {', '.join(sorted(unknown)) or 'without load'}: give "
                                 "load=CHECKPOINT[,device=cpu|cuda,batch_size=N,max_length=N,max_gen_toks=N,"
                                 "tokenizer_model=PATH,seed=N]")
        if device and device.startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default: cuda:0
            log.warning(f"lm_eval asked for device {device}, but this machine has no CUDA device: running on CPU")
            device = "cpu"
        cfg = load_config(load)
        self.tok = checkpoint_tokenizer(cfg, tokenizer_model)  # before the model: a bad tokenizer fails fast
        self.model, self.cfg = load_for_inference(load, device or "cpu")
        self._device = self.model.embedding.weight.device
        self.batch_size = _positive(batch_size, "batch_size")
        self._max_length = _positive(max_length or cfg.data.seq_length, "max_length")
        self.max_gen_toks, self.seed = _positive(max_gen_toks, "max_gen_toks"), int(seed)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"megamoe-sentencepiece-{self.tok.fingerprint}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs) -> list:
        """requests: ((context, continuation), context ids, continuation ids); at most max_length tokens each."""
        pairs = []
        for _, context, continuation in requests:
            continuation = list(continuation)[-self.max_length:]
            whole = (list(context) + continuation)[-(self.max_length + 1):]
            pairs.append((whole[:len(whole) - len(continuation)], continuation))
        results = continuation_logprobs(self.model, pairs, override_bs or self.batch_size, self.tok.vocab_size)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Each text's log-likelihood: lm_eval's disjoint windows of max_length, every token scored once."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                             self.max_length, 1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, continuation_logprobs(self.model, windows, self.batch_size,
                                                                     self.tok.vocab_size)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        groups: dict = {}
        for i, req in enumerate(requests):
            context, options = req.args
            settings = self._settings(dict(options or {}))
            ids = self.tok_encode(context)[-max(1, self.max_length - settings[1]):] or [self.eot_token_id]
            groups.setdefault(settings, []).append((i, ids))
        results: list = [None] * len(requests)
        for settings, items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                for (i, _), text in zip(chunk, self._generate([ids for _, ids in chunk], *settings)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _settings(self, options: dict) -> tuple:
        """(until strings, max new tokens, temperature (0: greedy), top_k, top_p) of a request's gen_kwargs."""
        unknown = sorted(set(options) - GENERATION_KEYS)
        if unknown:
            raise InferenceError(f"generate_until: gen_kwargs {unknown} are not supported; megamoe takes "
                                 f"{sorted(GENERATION_KEYS)}")
        until = options.get("until") or []
        until = tuple([until] if isinstance(until, str) else until)
        temperature = float(options.get("temperature", 1.0)) if options.get("do_sample") else 0.0
        return (until, _positive(options.get("max_gen_toks", self.max_gen_toks), "max_gen_toks"), temperature,
                options.get("top_k"), options.get("top_p"))

    @torch.no_grad()
    def _generate(self, prompts: list, until: tuple, max_new: int, temperature: float, top_k, top_p) -> list:
        """Continuations of the prompts (a ragged batch), each cut at its first `until` string (or ended by EOD)."""
        cache = allocate_cache(self.model, len(prompts), max(map(len, prompts)) + max_new)
        generator = torch.Generator(device=self._device).manual_seed(self.seed) if temperature > 0 else None
        logits = prefill(self.model, cache, list(range(len(prompts))), prompts)
        rows, done = [[] for _ in prompts], [False] * len(prompts)
        for step in range(max_new):
            logits[:, self.tok.vocab_size:] = float("-inf")
            chosen = sample(logits, temperature, top_k, top_p, generator)
            for row, token in enumerate(chosen.tolist()):
                if done[row]:
                    continue
                done[row] = token == self.eot_token_id
                if not done[row]:
                    rows[row].append(token)
                    done[row] = any(s in self.tok.decode(rows[row]) for s in until)
            if all(done) or step + 1 == max_new:
                break
            logits = forward_cached(self.model, chosen[:, None], cache, last_only=True)[:, -1]
        texts = [self.tok.decode(row) for row in rows]
        return [min((t.split(s)[0] for s in until), key=len) if until else t for t in texts]
