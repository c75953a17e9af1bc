"""megamoe as an lm-evaluation-harness model: tools/lm_eval.py runs lm_eval's own command line and evaluator on
tasks defined here (task YAMLs over local JSONL files: no hub dataset is reachable), from a checkpoint saved in
TP2 x EP2, with batches of 3. The per-sample log-likelihoods lm_eval writes equal megamoe's own forward of each
request alone, the rolling log-likelihoods the sum over the text, and generate_until megamoe's greedy generation
cut at the `until` string. Without lm_eval installed the front end names the extra."""
import glob
import importlib
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from megamoe import checkpoint
from megamoe.checkpoint.convert import reshard
from megamoe.data import load_tokenizer
from megamoe.errors import InferenceError
from megamoe.inference import generate, load_for_inference
from megamoe.model import build_model, moe_capacity
from megamoe.training import TrainState
from tests.checkpoint.common import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "lm_eval.py")
MC = [{"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
      {"question": "import", "choices": ["os", "the", "42"], "answer": 0},
      {"question": "for i in", "choices": ["range(10):", "banana", "))"], "answer": 0},
      {"question": "class Foo", "choices": ["(object):", ":", " = 3"], "answer": 1}]
TEXTS = [{"text": "def fibonacci(n):\n    if n < 2:\n        return n\n"}, {"text": "import os, sys\n"},
         {"text": "x"}]
PROMPTS = [{"prompt": "def main():\n", "answer": "    pass"}, {"prompt": "import", "answer": " os"},
           {"prompt": "class A:", "answer": "\n"}]
TASKS = {
    "mm_mc": ("mc.jsonl", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                              'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                              "metric_list:\n  - metric: acc\n"),
    "mm_rolling": ("texts.jsonl", TEXTS, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                                         'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'),
    "mm_gen": ("prompts.jsonl", PROMPTS, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                                         'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n'
                                         "  max_gen_toks: 10\n  do_sample: false\n"
                                         "metric_list:\n  - metric: exact_match\n"),
}


def _write_tasks(folder) -> None:
    os.makedirs(folder, exist_ok=True)
    for task, (data, rows, body) in TASKS.items():
        with open(os.path.join(folder, data), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
            f.write(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {os.path.join(folder, data)}\ntest_split: test\n{body}")


def _checkpoint(tmp_path, tokenizer) -> str:
    """A MoE-Mamba with attention and FFN, saved in one process and re-cut to TP2 x EP2."""
    cfg = config(pattern="MEAF", vocab_size=1024)
    cfg.data.tokenizer_model, cfg.data.seq_length = tokenizer, 64
    model = build_model(cfg.model, seed=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    checkpoint.save(str(tmp_path / "one"), model, None, TrainState(step=3), cfg, None)
    return reshard(str(tmp_path / "one"), str(tmp_path / "ckpt"), tp=2, ep=2)


def _samples(out: str, task: str) -> list:
    (path,) = glob.glob(os.path.join(out, "*", f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in open(path)]


def _logprob(model, context: list, continuation: list) -> float:
    """megamoe's own forward of one request: log p(continuation | context)."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.no_grad(), moe_capacity(model, 0.0):
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(float(logprobs[p, t]) for p, t in zip(positions, continuation))


@pytest.mark.slow
def test_lm_eval_tasks_score_as_megamoe_does(tmp_path, tiny_corpus):
    pytest.importorskip("lm_eval")
    ckpt = _checkpoint(tmp_path, tiny_corpus["tokenizer"])
    _write_tasks(str(tmp_path / "tasks"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds"),
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, TOOL, "--model", "megamoe", "--model_args", f"load={ckpt}",
                          "--tasks", ",".join(TASKS), "--include_path", str(tmp_path / "tasks"), "--batch_size", "3",
                          "--output_path", str(tmp_path / "out"), "--log_samples"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    assert set(TASKS) <= set(json.load(open(results))["results"])

    model, cfg = load_for_inference(ckpt)
    tok = load_tokenizer(cfg.data.tokenizer_model)
    for sample in _samples(str(tmp_path / "out"), "mm_mc"):
        for (args, resp) in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]  # lm_eval's split: whole minus context
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            assert float(resp[0][0]) == pytest.approx(_logprob(model, ctx, whole[len(ctx):]), rel=1e-5, abs=1e-5)
    for sample in _samples(str(tmp_path / "out"), "mm_rolling"):
        ids = tok.encode(sample["doc"]["text"])
        assert float(sample["resps"][0][0]) == pytest.approx(_logprob(model, [tok.eod], ids), rel=1e-5, abs=1e-5)
    for sample in _samples(str(tmp_path / "out"), "mm_gen"):
        new = generate(model, tok.encode(sample["doc"]["prompt"]), 10, temperature=0, eod=tok.eod,
                       vocab_size=tok.vocab_size)
        text = tok.decode([t for t in new if t != tok.eod]).split("\n\n")[0]
        assert sample["filtered_resps"][0] == text


def test_lm_eval_front_end_names_the_missing_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "megamoe.inference.harness", raising=False)
    monkeypatch.setattr(sys, "argv", [TOOL, "--model", "megamoe"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(TOOL, run_name="__main__")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("lm_eval: error: lm-evaluation-harness is not installed: "
                                               "pip install megamoe[eval]")


def test_lm_eval_model_is_registered_and_refuses_unknown_arguments(tmp_path):
    registry = pytest.importorskip("lm_eval.api.registry")
    harness = importlib.import_module("megamoe.inference.harness")
    assert registry.get_model("megamoe") is harness.MegaMoELM
    with pytest.raises(InferenceError, match=r"--model_args lod: give load=CHECKPOINT"):
        harness.MegaMoELM(lod=str(tmp_path))
