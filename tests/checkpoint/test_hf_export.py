"""`--format hf` for every pattern and variant, read back by transformers itself (AutoModelForCausalLM and
AutoTokenizer with trust_remote_code, offline).

One 4-rank gloo job (the slow part) trains each model 2 steps and saves it: MoE-Mamba, Parallel MoE-Mamba,
Transformer-MoE and a mixed pattern (Mamba, MoE, attention, FFN, untied head) in TP2 x EP2; MoE in the Mamba
projections in EP2 x DP2, as TP > 1 does not take it. Each export then gives megamoe's logits (fp32, no capacity
limit, as megamoe's generation runs it) within 1e-5, the same logits token by token with its cache, greedy
`generate()` equal to tools/generate.py --temperature 0 token for token, and left-padded batches equal to each prompt
alone. The tokenizer goes along and round-trips text as megamoe's does.

Small single-process models with megamoe's routing options (sigmoid scores, top-2, post-softmax, renormalisation,
the expert bias, a shared expert, MoE projections with the dense fallback) export with megamoe's logits and greedy
output too; expert choice and forced load balancing are refused in one line.
"""
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every folder is local

import pytest  # noqa: E402
import torch  # noqa: E402

from megamoe import checkpoint  # noqa: E402
from megamoe.data import load_tokenizer  # noqa: E402
from megamoe.inference import generate, load_for_inference  # noqa: E402
from megamoe.model import build_model, moe_capacity  # noqa: E402
from megamoe.parallel import destroy_distributed  # noqa: E402
from megamoe.testing import run_on_ranks  # noqa: E402
from megamoe.training import TrainState  # noqa: E402
from tests.checkpoint.common import ROUTINGS, Rank, config, routed_model  # noqa: E402

transformers = pytest.importorskip("transformers")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
VOCAB = 1280  # the 1024-piece tokenizer's vocabulary padded: the 256 ids beyond it are never generated
VARIANTS = {  # name: (model keys, TP)
    "moe_mamba": (dict(pattern="MEME"), 2),
    "parallel_moe_mamba": (dict(pattern="MEME", parallel_moe=True), 2),
    "moe_in_projections": (dict(pattern="MMMM", mamba_moe_projections=["conv", "gate", "output"],
                                mamba_moe_every=2), 1),
    "transformer_moe": (dict(pattern="AEAE"), 2),
    "mixed": (dict(pattern="MEAF", tie_embeddings=False), 2),
}
PROMPT = "def fibonacci(n):\n    "
TEXTS = ["def f(x):\n\treturn x  +  1\n", "  leading spaces, ünïcode — and 12345 digits\n\n", "", "</s> <s> <pad>"]


def _train_and_save(root: str, tokenizer: str) -> int:
    for name, (model, tp) in VARIANTS.items():
        cfg = config(tp=tp, ep=2, vocab_size=VOCAB, **model)
        cfg.data.tokenizer_model = tokenizer
        rank = Rank(cfg)
        rank.train(0, 2)
        checkpoint.save(f"{root}/{name}", rank.model, rank.optimizer, TrainState(step=2), cfg, rank.topo)
    destroy_distributed()
    return 0


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    root = str(tmp_path_factory.mktemp("hf_trained"))
    run_on_ranks(_train_and_save, 4, (root, tiny_corpus["tokenizer"]), timeout=400)
    return root


@pytest.fixture
def one_thread():
    """Decoding is many tiny matmuls: one thread keeps BLAS from waiting on the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _export(trained, tmp_path, name) -> str:
    out = str(tmp_path / f"hf_{name}")
    assert _tool("convert_checkpoint").main([f"{trained}/{name}", "--output", out, "--format", "hf"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_reloads_with_megamoe_logits_cache_and_greedy_output(trained, tmp_path, capsys, one_thread, name):
    out = _export(trained, tmp_path, name)
    assert {"config.json", "configuration_megamoe.py", "modeling_megamoe.py", "model.safetensors", "tokenizer.model",
            "tokenization_megamoe.py", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    for code in ("configuration_megamoe.py", "modeling_megamoe.py", "tokenization_megamoe.py"):
        assert "megamoe." not in open(os.path.join(out, code)).read().replace("megamoe.py", "")  # self-contained
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(hf).__name__ == "MegaMoEForCausalLM" and hf.dtype == torch.float32
    model, cfg = load_for_inference(f"{trained}/{name}")  # saved in TP2 x EP2, loaded in one process
    tokens = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), moe_capacity(model, 0.0):
        full = hf(tokens).logits
        torch.testing.assert_close(full, model(tokens).logits, rtol=0, atol=1e-5)
        out_ = hf(tokens[:, :9], use_cache=True)  # the prompt, then one token at a time through the cache
        steps, cache = [out_.logits], out_.cache
        for t in range(9, tokens.shape[1]):
            out_ = hf(tokens[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out_.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)

    capsys.readouterr()
    assert _tool("generate").main(["--load", f"{trained}/{name}", "--prompt", PROMPT, "--temperature", "0",
                                   "--max-new-tokens", "20", "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)["tokens"][0]
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == load_tokenizer(cfg.data.tokenizer_model).encode(PROMPT)
    greedy = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert greedy == reference and max(greedy) < 1024
    # Left padding: a batch of a shorter and a longer prompt continues each as it would alone.
    short = tok("import os", return_tensors="pt").input_ids
    batch = tok.pad({"input_ids": [short[0].tolist(), ids[0].tolist()]}, padding_side="left", return_tensors="pt")
    both = hf.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, prompt in zip(both.tolist(), (short, ids)):
        alone = hf.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
        assert row[:len(alone)] == alone


@pytest.mark.slow
def test_tokenizer_round_trips_as_megamoe_and_mamba_only_stays_native(trained, tmp_path, tiny_corpus):
    out = _export(trained, tmp_path, "mixed")
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours = load_tokenizer(tiny_corpus["tokenizer"])
    assert tok.eos_token_id == ours.eod and tok.pad_token_id == ours.pad and len(tok) == ours.vocab_size
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == ours.encode(text) and tok.decode(ids) == text == ours.decode(ids)
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation["eos_token_id"] == ours.eod and generation["suppress_tokens"] == list(range(1024, VOCAB))
    # A Mamba-only model is still transformers' own MambaForCausalLM, with the same tokenizer files.
    cfg = config(pattern="MMM", vocab_size=VOCAB)
    cfg.data.tokenizer_model = tiny_corpus["tokenizer"]
    net = build_model(cfg.model, seed=2).eval()
    checkpoint.save(str(tmp_path / "mamba"), net, None, TrainState(step=1), cfg, None)
    native = str(tmp_path / "hf_mamba")
    assert _tool("convert_checkpoint").main([str(tmp_path / "mamba"), "--output", native, "--format", "hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(native).eval()
    assert type(hf).__name__ == "MambaForCausalLM" and "modeling_megamoe.py" not in os.listdir(native)
    tokens = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, net(tokens).logits, rtol=0, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(native, trust_remote_code=True)(TEXTS[0]).input_ids == \
        ours.encode(TEXTS[0])


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routing_options_export_with_megamoe_logits_and_greedy_output(tmp_path, one_thread, name):
    model, cfg = routed_model(name)
    checkpoint.save(str(tmp_path / "ck"), model, None, TrainState(step=1), cfg, None)
    out = _export(str(tmp_path), tmp_path, "ck")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values())  # every tensor has its place: expert biases, shared experts, fallbacks
    hf.eval()
    saved = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    assert bool(saved) == cfg.model.router_enable_expert_bias
    for n, b in saved.items():  # loaded, not initialised afresh
        assert torch.equal(hf.get_buffer("model." + n), b) and b.abs().min() > 0
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), moe_capacity(model, 0.0):
        reference = model(tokens).logits
        torch.testing.assert_close(hf(tokens).logits, reference, rtol=0, atol=1e-5)
        for b in saved.values():  # the bias changes the routing (so the comparison above could fail)
            b.zero_()
        assert not saved or (model(tokens).logits - reference).abs().max() > 1e-3
    model, _ = load_for_inference(str(tmp_path / "ck"))
    prompt = tokens[0, :6]
    greedy = hf.generate(prompt[None], max_new_tokens=12, do_sample=False)[0, 6:].tolist()
    assert greedy == generate(model, prompt, 12, temperature=0)


@pytest.mark.parametrize("keys,message", [
    (dict(router_type="expert_choice", router_load_balancing_type="none"),
     "model.router_type=expert_choice cannot be exported to HF: each expert picks its tokens from the whole batch, "
     "which is not causal"),
    (dict(router_force_load_balancing=True),
     "model.router_force_load_balancing cannot be exported to HF: it deals tokens to experts ignoring the router"),
], ids=["expert_choice", "force_load_balancing"])
def test_export_refuses_routing_hf_cannot_run(tmp_path, capsys, keys, message):
    cfg = config(pattern="MEME", **keys)
    checkpoint.save(str(tmp_path / "ck"), build_model(cfg.model, seed=1), None, TrainState(step=1), cfg, None)
    capsys.readouterr()
    assert _tool("convert_checkpoint").main([str(tmp_path / "ck"), "--output", str(tmp_path / "hf"),
                                             "--format", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and " train " in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "hf")
