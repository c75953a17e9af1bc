"""Continuous batching: with fewer slots than requests, every request (greedy or seeded sampling, any prompt
length) gets what it gets alone, so a reused slot is a fresh one; stop strings, cancelling, errors."""
import threading

import pytest
import torch

from megamoe.inference import Engine, InferenceError, Request, generate
from tests.test_generation import MODELS, RAGGED, one_thread, tiny_model  # noqa: F401 (one_thread: autouse)

EOD = 7
# (prompt, max_tokens, temperature, top_k, top_p, seed): greedy and seeded sampling, long and short requests
REQUESTS = [(RAGGED[0], 9, 0.0, None, None, None), (RAGGED[1], 3, 1.0, None, None, 11),
            (RAGGED[2], 6, 0.8, 5, None, 12), (RAGGED[3], 1, 0.0, None, None, None),
            ([4, 4, 2, 9, 1, 1], 7, 1.2, None, 0.9, 13)]


def alone(model, prompt, max_tokens, temperature, top_k, top_p, seed, eod=None, vocab_size=None):
    return generate(model, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    eod=eod, vocab_size=vocab_size)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_slots_five_requests_each_as_alone(name):
    model = tiny_model(**MODELS[name])
    engine = Engine(model, slots=2, eod=EOD, vocab_size=60)
    requests = engine.run([Request(p, n, t, k, q, s) for p, n, t, k, q, s in REQUESTS])
    for request, args in zip(requests, REQUESTS):
        expected = alone(model, *args, eod=EOD, vocab_size=60)
        assert request.tokens == expected, args
        assert request.finish_reason == ("stop" if expected[-1:] == [EOD] else "length")
        assert request.done and request.wait(0)
    assert not engine.busy and engine.slots == [None, None]
    # the same requests again in the reused engine, in another order: the same tokens
    again = engine.run([Request(p, n, t, k, q, s) for p, n, t, k, q, s in reversed(REQUESTS)])
    assert [r.tokens for r in reversed(again)] == [r.tokens for r in requests]


def test_requests_join_while_others_decode():
    """A request submitted between steps is prefilled into the free slot while the other keeps decoding."""
    model = tiny_model(**MODELS["attention_ffn"])
    engine = Engine(model, slots=2)
    long = engine.submit(Request([1, 2, 3], max_tokens=12, temperature=0))
    for _ in range(4):
        engine.step()
    late = [engine.submit(Request(p, max_tokens=4, temperature=0)) for p in RAGGED[:2]]
    engine.run()
    assert long.tokens == generate(model, [1, 2, 3], 12, temperature=0)
    assert [r.tokens for r in late] == [generate(model, p, 4, temperature=0) for p in RAGGED[:2]]


def test_stop_strings_cancel_and_text():
    model = tiny_model(**MODELS["moe_mamba"])
    decode = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    full = generate(model, RAGGED[1], 10, temperature=0)
    text = decode(full)
    stop = text[4:6]
    engine = Engine(model, slots=1, decode=decode)
    cut, whole, cancelled, empty = engine.run([
        Request(RAGGED[1], 10, 0.0, stop=(stop, "never")), Request(RAGGED[1], 10, 0.0),
        Request(RAGGED[1], 10, 0.0), Request(RAGGED[1], 0, 0.0)])
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
    assert whole.finish_reason == "length" and whole.text == text and whole.tokens == full
    assert empty.tokens == [] and empty.finish_reason == "length"
    seen = []
    request = Request(RAGGED[1], 10, 0.0, on_update=lambda r: (seen.append(len(r.tokens)), len(seen) == 3
                                                               and r.cancel()))
    engine.run([request])
    assert request.finish_reason == "cancelled" and len(request.tokens) == 3 and seen[-1] == 3
    assert not engine.busy


def test_serve_forever_in_a_thread_and_errors(monkeypatch):
    model = tiny_model(**MODELS["mamba"])
    engine = Engine(model, slots=2, max_length=12)
    thread = threading.Thread(target=engine.serve_forever, daemon=True)
    thread.start()
    requests = [engine.submit(Request(p, 5, 0.0)) for p in RAGGED]
    assert all(r.wait(60) for r in requests)
    assert [r.tokens for r in requests] == [generate(model, p, 5, temperature=0) for p in RAGGED]
    # a failing step fails the requests it held, and the engine serves the next ones as before
    monkeypatch.setattr("megamoe.inference.engine.forward_cached", lambda *a, **k: 1 / 0)
    broken = engine.submit(Request([1, 2], 5, 0.0))
    assert broken.wait(60) and broken.finish_reason == "error" and "ZeroDivisionError" in broken.error
    monkeypatch.undo()
    again = engine.submit(Request(RAGGED[1], 5, 0.0))
    assert again.wait(60) and again.tokens == requests[1].tokens
    engine.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    for bad, message in ((Request([], 3), "prompt is empty"), (Request([1, 99], 3), r"\[0, 64\)"),
                         (Request([1], -1), "max_tokens=-1"), (Request([1], 3, top_k=0), "top_k=0"),
                         (Request([1], 3, top_p=1.5), "top_p=1.5"), (Request([1], 3, temperature=-1), "temperature"),
                         (Request([1], 3, seed="x"), "seed"), (Request([1], 3, stop="x"), "stop"),
                         (Request([1], 3, stop=("x",)), "decode function"),
                         (Request(list(range(10)), 3), "max_length 12")):
        with pytest.raises(InferenceError, match=message):
            engine.submit(bad)
    with pytest.raises(InferenceError, match="slots=0"):
        Engine(model, slots=0)
    assert torch.get_num_threads() == 1
