"""Recurrent generation: step-by-step logits equal the full forward for every block kind (and follow it in bf16),
greedy decoding equals repeated full forwards, seeded sampling, constant memory, batch independence, errors, and
tools/generate.py."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megamoe import checkpoint
from megamoe.config import ModelConfig, config_from_dict
from megamoe.inference import (
    InferenceError,
    allocate_cache,
    filter_logits,
    forward_cached,
    generate,
    load_for_inference,
    prefill,
    sample,
)
from megamoe.inference.loading import for_cpu_decoding, to_bf16
from megamoe.model import Experts, build_model
from megamoe.training import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
# MoE models get capacity_factor 0: decoding never drops a token (see megamoe/inference/generation.py), and a full
# forward with a capacity limit may, so the two agree only without one.
MODELS = {
    "mamba": dict(pattern="MMM"),
    "moe_mamba": dict(pattern="MEME", capacity_factor=0),
    "parallel_moe_mamba": dict(pattern="MEME", parallel_moe=True, capacity_factor=0),
    "attention_ffn": dict(pattern="AFMA"),
    "moe_in_mamba_projections": dict(pattern="MM", mamba_moe_projections=["conv", "gate", "output"],
                                     capacity_factor=0),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding is many tiny matmuls: one thread keeps BLAS from waiting on threads of a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(net, seed):
    """`net` with every weight moved off its structured initial value (A_log, D, norms)."""
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 1000 + i)))
    return net.eval()


def tiny_model(seed=3, **model):
    cfg = ModelConfig(d_model=32, d_state=8, vocab_size=VOCAB, num_experts=4, num_heads=4, **model)
    return perturbed(build_model(cfg, seed=seed), seed)


def tokens(batch, length, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt", [3, 6], ids=["prompt_shorter_than_d_conv", "prompt_6"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_recurrent_decoding_equals_full_forward(name, prompt):
    model = tiny_model(**MODELS[name])
    ids = tokens(2, 14)
    with torch.no_grad():
        full = model(ids).logits
    cache = allocate_cache(model, 2)
    parts = [forward_cached(model, ids[:, :prompt], cache)]  # prefill
    parts += [forward_cached(model, ids[:, t:t + 1], cache) for t in range(prompt, 11)]  # one token per call
    parts.append(forward_cached(model, ids[:, 11:], cache))  # several tokens after the prompt: stepped one by one
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["as_built", "for_cpu_decoding"])
def test_decoding_through_the_fast_products_equals_full_forward(batch, layout):
    """At widths where decode steps take ops.linear's oneDNN and row-blocked paths (d_model 256, 2 threads),
    stepping still equals the full forward: Mamba, MoE (top-2, shared expert), attention and FFN blocks, one
    sequence (one-token products, the MoE's one-token path) or two, with the experts as built or laid out as
    load_for_inference lays them out on CPU (which changes neither the full forward nor the state dict)."""
    cfg = ModelConfig(d_model=256, d_state=8, vocab_size=VOCAB, num_experts=4, num_heads=4, pattern="MEAF",
                      capacity_factor=0, top_k=2, shared_expert_intermediate_size=256)
    model = perturbed(build_model(cfg, seed=5), 5)
    ids = tokens(batch, 9)
    torch.set_num_threads(2)
    with torch.no_grad():
        full = model(ids).logits
        if layout == "for_cpu_decoding":
            state = {k: v.clone() for k, v in model.state_dict().items()}
            for_cpu_decoding(model)
            w1 = model.layers["1"].moe.experts.w1
            assert w1.shape == (4, 256, cfg.resolved_d_expert) and w1.transpose(1, 2).is_contiguous()
            assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            torch.testing.assert_close(model(ids).logits, full, rtol=1e-5, atol=1e-5)
    cache = allocate_cache(model, batch)
    parts = [forward_cached(model, ids[:, :4], cache)] + [forward_cached(model, ids[:, t:t + 1], cache)
                                                           for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_the_decay_a_step_reuses_follows_a_log():
    """MambaMixer.step computes A = -exp(A_log) once per value of A_log: after an in-place update of A_log (an
    optimizer's step, a load) the next step equals the step of a copy that never computed A before; a model
    built under torch.inference_mode, whose tensors keep no version, still steps as its full forward."""
    model = tiny_model(pattern="M")
    ids = tokens(1, 7)
    with torch.no_grad():
        cache = allocate_cache(model, 1)
        forward_cached(model, ids[:, :5], cache)
        forward_cached(model, ids[:, 5:6], cache)  # computes and keeps A
        model.layers["0"].mixer.A_log.add_(0.5)
        fresh, fresh_cache = copy.deepcopy(model), copy.deepcopy(cache)
        del fresh.layers["0"].mixer._decay_of
        assert torch.equal(forward_cached(model, ids[:, 6:], cache), forward_cached(fresh, ids[:, 6:], fresh_cache))
    with torch.inference_mode():  # a model built there has inference tensors, which keep no version to key on
        built = tiny_model(pattern="M")
        cache = allocate_cache(built, 1)
        forward_cached(built, ids[:, :6], cache)
        torch.testing.assert_close(forward_cached(built, ids[:, 6:], cache)[:, -1], built(ids).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_decoding_follows_the_bf16_forward(name):
    """--bf16: bfloat16 weights but for A_log and D, a float32 recurrent state; stepping follows the bf16 full
    forward within bf16 rounding, and without MoE routing (whose choices may flip) the fp32 model too."""
    model = tiny_model(**MODELS[name])
    half = to_bf16(copy.deepcopy(model))
    kept = {n: p.dtype for n, p in half.named_parameters() if n.rsplit(".", 1)[-1] in ("A_log", "D")}
    assert half.embedding.weight.dtype == torch.bfloat16 and set(kept.values()) <= {torch.float32}
    assert bool(kept) == ("M" in model.cfg.pattern)
    ids = tokens(2, 12)
    with torch.no_grad():
        full, full32 = half(ids).logits.float(), model(ids).logits
    cache = allocate_cache(half, 2)
    parts = [forward_cached(half, ids[:, :5], cache)] + [forward_cached(half, ids[:, t:t + 1], cache)
                                                          for t in range(5, 12)]
    stepped = torch.cat(parts, dim=1).float()
    for state in cache.states.values():
        if isinstance(state, tuple):  # Mamba: (conv_state in the weights' dtype, ssm_state in float32)
            assert (state[0].dtype, state[1].dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(stepped, full, rtol=0, atol=0.05)  # logits of about +-2; bf16 steps are 1/128
    if "E" not in model.cfg.pattern and not model.cfg.mamba_moe_projections:
        torch.testing.assert_close(stepped, full32, rtol=0, atol=0.05)


def _greedy_by_full_forwards(model, prompt, steps):
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["moe_mamba", "attention_ffn"])
def test_greedy_generation_equals_argmax_of_full_forwards(name):
    model = tiny_model(**MODELS[name])
    prompt = tokens(2, 5, seed=1)
    assert generate(model, prompt, 6, temperature=0) == _greedy_by_full_forwards(model, prompt, 6)
    assert generate(model, prompt[0].tolist(), 6, temperature=0) == _greedy_by_full_forwards(model, prompt[:1], 6)[0]


def test_seeded_sampling_is_reproducible_and_filters_work():
    model = tiny_model(**MODELS["moe_mamba"])
    prompt = tokens(3, 4, seed=2).tolist()
    first = generate(model, prompt, 10, temperature=1.0, seed=5)
    assert generate(model, prompt, 10, temperature=1.0, seed=5) == first
    assert generate(model, prompt, 10, temperature=1.0, seed=6) != first
    greedy = generate(model, prompt, 10, temperature=0)
    assert first != greedy
    assert generate(model, prompt, 10, temperature=0.7, top_k=1, seed=5) == greedy
    assert generate(model, prompt, 10, temperature=0.7, top_p=1e-6, seed=5) == greedy
    assert max(max(row) for row in generate(model, prompt, 10, seed=5, vocab_size=7)) < 7
    # a sequence stops after eod (included); the others go on
    eod = greedy[0][3]
    out = generate(model, prompt, 10, temperature=0, eod=eod)
    for row, full in zip(out, greedy):
        assert row == (full[:full.index(eod) + 1] if eod in full else full)


def test_filter_logits_top_k_and_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = lambda **kw: torch.isfinite(filter_logits(probs.log(), **kw))[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(top_k=2) == [1, 3] and kept(top_k=3) == [0, 1, 3]
    assert kept(top_p=0.5) == [1]  # the most likely token alone reaches 0.5
    assert kept(top_p=0.8) == [1, 3] and kept(top_p=0.81) == [0, 1, 3] and kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=3, top_p=0.6) == [1, 3]
    draws = sample(probs.log().expand(400, 4), 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}
    assert sample(probs.log(), 0.0).tolist() == [1]


def test_memory_per_sequence_is_constant_for_mamba_and_moe():
    model = tiny_model(**MODELS["moe_mamba"])
    cache = allocate_cache(model, 2)
    forward_cached(model, tokens(2, 5), cache)
    size = cache.nbytes()
    d_inner, layers = 64, 2  # expand 2 x d_model 32; two Mamba blocks in MEME
    assert size == layers * 2 * d_inner * (4 + 8) * 4  # batch x d_inner x (d_conv + d_state), fp32
    for t in range(40):
        forward_cached(model, tokens(2, 1, seed=t), cache)
    assert cache.nbytes() == size
    attention = tiny_model(**MODELS["attention_ffn"])
    cache = allocate_cache(attention, 2)
    forward_cached(attention, tokens(2, 5), cache)
    before = cache.nbytes()
    forward_cached(attention, tokens(2, 40), cache)
    assert cache.nbytes() > before  # a KV cache grows with the length


@pytest.mark.parametrize("name", sorted(MODELS))
def test_what_a_step_hands_back_takes_in_place_updates(name):
    """A Mamba model's steps run under torch.inference_mode (no autograd dispatch): the logits they return and
    the states they advance are plain tensors, which generation masks, and slots insert and release, in place."""
    model = tiny_model(**MODELS[name])
    cache, other = allocate_cache(model, 2), allocate_cache(model, 1)
    forward_cached(model, tokens(2, 3), cache)
    forward_cached(model, tokens(1, 4, seed=1), other)
    for t in range(3):
        logits = forward_cached(model, tokens(2, 1, seed=t), cache)
        forward_cached(model, tokens(1, 1, seed=t), other)
    states = [t for s in cache.states.values() for t in (s if isinstance(s, tuple) else (s.k, s.v))]
    assert not logits.is_inference() and not any(t.is_inference() for t in states)
    logits[:, :, 0] = float("-inf")
    alone = copy.deepcopy(other)
    cache.insert([1], other)
    cache.release([0])
    assert cache.lengths == [0, 7]
    step = tokens(2, 1, seed=9)
    torch.testing.assert_close(forward_cached(model, step, cache)[1], forward_cached(model, step[1:], alone)[0],
                               rtol=1e-5, atol=1e-5)


def test_batched_generation_does_not_depend_on_the_batch():
    """With a capacity limit a full forward drops tokens; generation runs MoE without one, so every sequence
    decodes as it would alone, and the model keeps its capacity_factor."""
    model = tiny_model(pattern="MEME", capacity_factor=0.5)
    prompt = tokens(4, 6, seed=3)
    with torch.no_grad():
        assert model(prompt).moe_stats["dropped"] > 0
    together = generate(model, prompt, 5, temperature=0)
    assert together == [generate(model, row.tolist(), 5, temperature=0) for row in prompt]
    assert all(m.capacity_factor == 0.5 for m in model.moe_layers())


RAGGED = [[5, 9], [1, 2, 3, 4, 5, 6, 7], [8], [3, 1, 4, 1, 5]]  # shorter and longer than d_conv, one token


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ragged_batch_steps_each_row_as_its_full_forward(name):
    """Prompts of different lengths in one cache, then steps: every row's logits are its own full forward's."""
    model = tiny_model(**MODELS[name])
    rows = [prompt + tokens(1, 4, seed=i)[0].tolist() for i, prompt in enumerate(RAGGED)]
    cache = allocate_cache(model, len(rows), 16)
    got = [[logits] for logits in prefill(model, cache, list(range(len(rows))), RAGGED)]
    assert cache.lengths == [len(p) for p in RAGGED]
    for t in range(4):
        step = torch.tensor([[row[len(p) + t]] for row, p in zip(rows, RAGGED)])
        for i, logits in enumerate(forward_cached(model, step, cache)[:, 0]):
            got[i].append(logits)
    with torch.no_grad():
        for row, prompt, logits in zip(rows, RAGGED, got):
            full = model(torch.tensor([row])).logits[0, len(prompt) - 1:len(prompt) + 4]
            torch.testing.assert_close(torch.stack(logits), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ragged_greedy_generation_equals_each_prompt_alone(name):
    model = tiny_model(**MODELS[name])
    alone = [generate(model, prompt, 8, temperature=0) for prompt in RAGGED]
    assert generate(model, RAGGED, 8, temperature=0) == alone
    eod = alone[1][2]  # one row stops early, the others go on
    assert generate(model, RAGGED, 8, temperature=0, eod=eod) == [
        generate(model, prompt, 8, temperature=0, eod=eod) for prompt in RAGGED]


def test_what_generation_refuses():
    model = tiny_model(pattern="MM")
    with pytest.raises(InferenceError, match="prompt is empty"):
        generate(model, [], 3)
    with pytest.raises(InferenceError, match="prompt is empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(InferenceError, match="top_k"):
        generate(model, [1, 2], 3, top_k=0)
    stage = build_model(model.cfg, blocks=[0], post_process=False)
    with pytest.raises(InferenceError, match="pipeline stage"):
        generate(stage, [1, 2], 3)
    assert generate(model, [1, 2], 0) == []


def save_tiny_checkpoint(root, corpus, pattern="MEAF") -> tuple:
    """A checkpoint of a small model (random weights) whose config names the tiny corpus and its tokenizer."""
    cfg = config_from_dict({
        "model": {"pattern": pattern, "d_model": 32, "d_state": 8, "num_experts": 4, "num_heads": 4,
                  "vocab_size": 1024, "capacity_factor": 1.0},
        "data": {"data_path": [corpus["prefix"]], "tokenizer_model": corpus["tokenizer"], "seq_length": 32,
                 "split": "6,2,2"},
        "training": {"seed": 9}})
    model = perturbed(build_model(cfg.model, seed=9), 9)
    checkpoint.save(str(root), model, None, TrainState(step=3), cfg, None)
    return str(root), model, cfg


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_cli(tmp_path, tiny_corpus, capsys, monkeypatch):
    from megamoe.checkpoint.convert import reshard
    from megamoe.data import load_tokenizer
    root, model, _ = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus)
    # stored as a TP 2 x EP 2 run would have saved it: it still loads whole into one process
    resharded = reshard(root, str(tmp_path / "tp2ep2"), tp=2, ep=2)
    rng = torch.get_rng_state()
    for path in (root, resharded):
        loaded, _ = load_for_inference(path)
        assert torch.equal(torch.get_rng_state(), rng)  # the run's saved generators are not restored here
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        experts = [m for m in loaded.modules() if isinstance(m, Experts)]  # laid out for CPU steps
        assert experts and all(w.transpose(-1, -2).is_contiguous() for m in experts for w in m.parameters())
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    expected = generate(model, tok.encode("import os"), 8, temperature=0, eod=tok.eod, vocab_size=tok.vocab_size)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", root, "--prompt",
                          "import os", "--max-new-tokens", "8", "--temperature", "0", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["tokens"] == [expected]
    assert out["samples"] == [tok.decode([t for t in expected if t != tok.eod])]
    tool = _tool("generate")
    # --bf16: what the bf16 model loaded for use decodes
    half, _ = load_for_inference(root, bf16=True)
    assert half.layers["0"].mixer.in_proj.weight.dtype == torch.bfloat16
    assert tool.main(["--load", root, "--prompt", "import os", "--max-new-tokens", "8", "--temperature", "0",
                      "--bf16", "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == [
        generate(half, tok.encode("import os"), 8, temperature=0, eod=tok.eod, vocab_size=tok.vocab_size)]
    # user errors: one line on stderr, exit code 2
    assert tool.main(["--load", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"generate: error: --load: {tmp_path / 'nowhere'} does not exist"
    assert tool.main(["--load", root, "--tokenizer-model", str(tmp_path / "none.model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.model does not exist" in err and len(err.splitlines()) == 1
    monkeypatch.setattr("megamoe.inference.loading.available_bytes", lambda device: 1000)
    assert tool.main(["--load", root]) == 2
    err = capsys.readouterr().err.strip()
    assert "GiB of cpu memory, more than the 0.0 GiB available here" in err and len(err.splitlines()) == 1
    monkeypatch.undo()
    if not torch.cuda.is_available():
        assert tool.main(["--load", root, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
